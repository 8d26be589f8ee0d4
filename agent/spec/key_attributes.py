"""The key attributes: key-algorithm, key-size, key-encoding, reuse-private-key, key-usages."""

from __future__ import annotations

from agent.spec.attribute_state import (
    ParseState,
    closest,
    dedupe,
    parse_bool,
    parse_int,
    split_list,
)
from agent.spec.model import DEFAULT_KEY_USAGES, KeyAlgorithm, KeyEncoding, KeySpec
from agent.spec.templating import quote

KEY_USAGES: frozenset[str] = frozenset(
    {
        "signing",
        "digital signature",
        "content commitment",
        "key encipherment",
        "key agreement",
        "data encipherment",
        "cert sign",
        "crl sign",
        "encipher only",
        "decipher only",
        "any",
        "server auth",
        "client auth",
        "code signing",
        "email protection",
        "s/mime",
        "ipsec end system",
        "ipsec tunnel",
        "ipsec user",
        "timestamping",
        "ocsp signing",
        "microsoft sgc",
        "netscape sgc",
    }
)


def key(state: ParseState) -> KeySpec:
    alg_attr = state.attrs.get("key-algorithm")
    algorithm = KeyAlgorithm.RSA
    if alg_attr is not None:
        by_lower = {a.value.lower(): a for a in KeyAlgorithm}
        found = by_lower.get(alg_attr.value.strip().lower())
        if found is None:
            alg_attr.fail(f"{quote(alg_attr.value)} is not supported: use RSA, ECDSA or Ed25519")
        algorithm = found
    size_attr = state.attrs.get("key-size")
    size: int | None
    if algorithm is KeyAlgorithm.ED25519:
        if size_attr is not None:
            size_attr.fail("must not be set when the key algorithm is Ed25519")
        size = None
    elif algorithm is KeyAlgorithm.ECDSA:
        size = 256
        if size_attr is not None:
            text = size_attr.value.strip()
            if text not in ("256", "384", "521"):
                size_attr.fail(f"{quote(text)} is not an ECDSA key size: use 256, 384 or 521")
            size = int(text)
    else:
        size = 2048
        if size_attr is not None:
            text = size_attr.value.strip()
            if alg_attr is None and text in ("256", "384", "521"):
                size_attr.fail(
                    f"{quote(text)} is not an RSA key size (2048 to 8192); the key algorithm "
                    f"defaults to RSA: set {state.key_for('key-algorithm')}: ECDSA"
                )
            size = parse_int(size_attr, 2048, 8192, "RSA key size")
    enc_attr = state.attrs.get("key-encoding")
    encoding = KeyEncoding.PKCS1 if algorithm is KeyAlgorithm.RSA else KeyEncoding.PKCS8
    if enc_attr is not None:
        by_upper = {e.value: e for e in KeyEncoding}
        found_enc = by_upper.get(enc_attr.value.strip().upper())
        if found_enc is None:
            enc_attr.fail(f"{quote(enc_attr.value)} is not supported: use PKCS1 or PKCS8")
        if found_enc is KeyEncoding.PKCS1 and algorithm is not KeyAlgorithm.RSA:
            enc_attr.fail(f"PKCS1 holds only RSA keys; use PKCS8 for {algorithm.value} keys")
        encoding = found_enc
    reuse = parse_bool(state.attrs.get("reuse-private-key"))
    return KeySpec(algorithm=algorithm, size=size, encoding=encoding, reuse=reuse)


def key_usages(state: ParseState) -> tuple[str, ...]:
    attr = state.attrs.get("key-usages")
    if attr is None:
        return DEFAULT_KEY_USAGES
    result = []
    for entry in split_list(attr):
        usage = " ".join(entry.lower().split())
        if usage not in KEY_USAGES:
            close = closest(usage, KEY_USAGES)
            hint = f" (did you mean {quote(close)}?)" if close else ""
            attr.fail(
                f"{quote(entry)} is not a key usage{hint}; accepted: "
                + ", ".join(sorted(KEY_USAGES))
            )
        result.append(usage)
    return dedupe(result)
