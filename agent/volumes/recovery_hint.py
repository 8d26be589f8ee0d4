"""What a restart needs from a volume's attributes, saved with its metadata at every commit.

Recovering a volume needs the payload's file names, the pod (metrics labels) and whether the
volume follows a trust bundle or the pod's IPs. Parsing the attributes again for that was a
fifth of the recovery time per volume; the commit stores the answer instead (``meta.json``:
``recovery_hint``). Metadata without a hint (written by an older agent) or with another
``HINT_VERSION`` is parsed as before. Bump ``HINT_VERSION`` whenever parsing the same stored
attributes could give other file names, another issuer spelling, or change whether the volume
needs its parsed spec on start.
"""

from __future__ import annotations

from typing import Any

from agent.spec.model import CertificateSpec

HINT_VERSION = 1


def payload_names(spec: CertificateSpec) -> list[str]:
    """The files a complete payload of ``spec`` holds."""
    names = [spec.files.certificate, spec.files.ca, spec.files.private_key]
    if spec.files.credential_bundle:
        names.append(spec.files.credential_bundle)
    return names


def hint_for(spec: CertificateSpec) -> dict[str, Any]:
    return {
        "version": HINT_VERSION,
        "files": payload_names(spec),
        # Trust bundles and ${POD_IP} SANs register the volume with their watches on start,
        # from the parsed spec: such volumes are parsed on start whatever the hint.
        "needs_spec": spec.trust_bundle is not None or spec.wants_pod_ips,
    }


def names_from_hint(hint: dict[str, Any]) -> list[str] | None:
    """The payload's file names when ``hint`` (as loaded) spares the parse, else None."""
    if hint.get("version") != HINT_VERSION or hint.get("needs_spec") is not False:
        return None
    files = hint.get("files")
    if not isinstance(files, list) or not files or not all(isinstance(n, str) for n in files):
        return None
    return files
