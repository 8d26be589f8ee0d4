"""The ``trust-bundle-*`` volume attributes: where ``ca.crt`` comes from instead of the issuer.

Pure validation, no I/O: the names must be valid Kubernetes names so a typo is reported on
publish as INVALID_ARGUMENT naming the attribute, while a bundle that does not exist (yet) is the
bundle watch's business (FAILED_PRECONDITION, kubelet retries).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from agent.errors import InvalidArgument
from agent.spec.model import TrustBundleKind, TrustBundleRef
from agent.spec.templating import quote

SOURCE_ATTRIBUTES = ("trust-bundle-configmap", "trust-bundle-signer", "trust-bundle-cluster")
TRUST_ATTRIBUTES = frozenset(
    {*SOURCE_ATTRIBUTES, "trust-bundle-label-selector", "trust-bundle-include-issuer"}
)

_SUBDOMAIN_RE = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_CONFIGMAP_KEY_RE = re.compile(r"[-._a-zA-Z0-9]+")
# ClusterTrustBundle names carry the signer name with '/' turned into ':' (example.com:foo:v1).
_BUNDLE_NAME_RE = re.compile(r"[a-z0-9]([-a-z0-9.:]*[a-z0-9])?")
_SIGNER_PATH_RE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")
_LABEL_KEY = r"([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?"
_LABEL_VALUE = r"([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)?"
_SELECTOR_TERM_RE = re.compile(
    rf"!?{_LABEL_KEY}"
    rf"|{_LABEL_KEY}\s*(=|==|!=)\s*{_LABEL_VALUE}"
    rf"|{_LABEL_KEY}\s+(in|notin)\s+\(\s*{_LABEL_VALUE}(\s*,\s*{_LABEL_VALUE})*\s*\)"
)


def parse_trust_bundle(values: Mapping[str, tuple[str, str]]) -> TrustBundleRef | None:
    """``values`` maps attribute name -> (key as written, value) for the trust attributes set."""

    def key(name: str) -> str:
        return values[name][0] if name in values else name

    def fail(name: str, detail: str) -> InvalidArgument:
        return InvalidArgument(f"{key(name)}: {detail}", key(name))

    sources = [name for name in SOURCE_ATTRIBUTES if name in values]
    if len(sources) > 1:
        raise fail(
            sources[1],
            f"cannot be combined with {key(sources[0])}; ca.crt comes from one trust bundle source",
        )
    include = False
    if "trust-bundle-include-issuer" in values:
        text = values["trust-bundle-include-issuer"][1].strip().lower()
        if text not in ("true", "false"):
            raise fail("trust-bundle-include-issuer", f'{quote(text)} is not "true" or "false"')
        include = text == "true"
    selector = values.get("trust-bundle-label-selector", ("", ""))[1].strip()
    if selector and sources != ["trust-bundle-signer"]:
        raise fail(
            "trust-bundle-label-selector",
            "selects ClusterTrustBundles of a signer: set trust-bundle-signer too",
        )
    if not sources:
        if "trust-bundle-include-issuer" in values:
            raise fail(
                "trust-bundle-include-issuer",
                "needs a trust bundle: set trust-bundle-configmap, trust-bundle-signer or "
                "trust-bundle-cluster",
            )
        return None
    source = sources[0]
    value = values[source][1].strip()
    if source == "trust-bundle-configmap":
        name, slash, entry = value.partition("/")
        if not slash or not name or not entry:
            raise fail(source, f"{quote(value)} is not NAME/KEY (a ConfigMap and one of its keys)")
        if len(name) > 253 or not _SUBDOMAIN_RE.fullmatch(name):
            raise fail(source, f"{quote(name)} is not a valid ConfigMap name")
        if len(entry) > 253 or not _CONFIGMAP_KEY_RE.fullmatch(entry):
            raise fail(source, f"{quote(entry)} is not a valid ConfigMap key (a-z, A-Z, 0-9, -._)")
        return TrustBundleRef(
            TrustBundleKind.CONFIGMAP, name=name, key=entry, include_issuer=include
        )
    if source == "trust-bundle-cluster":
        if len(value) > 253 or not _BUNDLE_NAME_RE.fullmatch(value):
            raise fail(source, f"{quote(value)} is not a valid ClusterTrustBundle name")
        return TrustBundleRef(TrustBundleKind.CLUSTER, name=value, include_issuer=include)
    domain, slash, path = value.partition("/")
    if (
        not slash
        or len(value) > 571
        or not _SUBDOMAIN_RE.fullmatch(domain)
        or not all(_SIGNER_PATH_RE.fullmatch(part) for part in path.split("/"))
    ):
        raise fail(
            source, f"{quote(value)} is not a signer name: write DOMAIN/PATH, as example.com/my-ca"
        )
    for term in _split_terms(selector):
        if not _SELECTOR_TERM_RE.fullmatch(term.strip()):
            raise fail(
                "trust-bundle-label-selector",
                f"{quote(term.strip())} is not a label selector term (key=value, key!=value, "
                "key in (a,b), key notin (a,b), key, !key)",
            )
    return TrustBundleRef(
        TrustBundleKind.SIGNER, signer_name=value, label_selector=selector, include_issuer=include
    )


def _split_terms(selector: str) -> list[str]:
    """Split on the commas that are not inside ``in (...)``."""
    terms, depth, current = [], 0, ""
    for ch in selector:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            terms.append(current)
            current = ""
        else:
            current += ch
    if selector:
        terms.append(current)
    return terms
