"""The local CA's volumes: which they are, which a new CA did not sign, and new ca.crt files.

A CA rotation or a changed trust bundle rewrites ``ca.crt`` (and a keystore's trust store)
through the atomic payload swap, with the same certificate and key.
"""

from __future__ import annotations

import logging

from cryptography import x509
from cryptography.exceptions import InvalidSignature

from agent.observe.metrics import LOCAL_ISSUER
from agent.pki.keys import (
    load_private_key,
)
from agent.pki.pkcs12 import build_keystore
from agent.spec.model import CertificateSpec
from agent.volumes.manager_core import (
    ManagerCore,
    gid,
    log_fields,
)
from agent.volumes.store import (
    VolumeMeta,
    VolumeState,
    read_payload_file,
    write_payload,
)
from agent.volumes.trust import compose_ca

# The manager's logger: its parts log as one component, as before the split.
log = logging.getLogger("agent.volumes.manager")


class CARewrites(ManagerCore):
    """ca.crt rewrites without reissuing."""

    def local_ca_volumes(self) -> list[VolumeMeta]:
        """Metadata of the volumes the local CA signs (what a CA rotation must reissue)."""
        return [meta for meta in self.store.metas() if meta.issuer == LOCAL_ISSUER]

    def volumes_not_signed_by(self, ca: x509.Certificate) -> list[tuple[str, float]]:
        """Ready local-CA volumes whose certificate ``ca`` did not sign, with their notAfter
        (after a node CA renewal: what must move to the new one)."""
        found = []
        for meta in self.local_ca_volumes():
            if meta.state != VolumeState.READY or meta.not_after is None:
                continue
            spec, _pod = self._parse(meta.volume_context)
            pem = read_payload_file(self._payload_dir(meta), spec.files.certificate)
            if pem is None:
                continue
            try:
                x509.load_pem_x509_certificates(pem)[0].verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                found.append((meta.volume_id, meta.not_after))
        return found

    def local_certificate_start_times(self) -> list[float | None]:
        """notBefore of each local-CA certificate (None while its first issue is pending)."""
        return [meta.not_before for meta in self.local_ca_volumes()]

    def rewrite_ca_bundles(self, ca_pem: bytes) -> int:
        """Swap a new CA bundle into every local-CA volume without reissuing; returns the count.

        After a CA rotation completes, this drops the retired CA from the pods' ca.crt at once
        instead of waiting for each certificate's next renewal. A volume whose ca.crt is a trust
        bundle keeps it (with the new CA added when it includes the issuer).
        """
        rewritten = 0
        for volume_id in self.store.volume_ids():
            with self._locks.hold(volume_id):
                meta = self.store.load(volume_id)
                if meta is None or meta.state != VolumeState.READY:
                    continue
                spec, pod = self._parse(meta.volume_context)
                if meta.issuer != LOCAL_ISSUER:
                    continue
                new_ca = ca_pem
                if spec.trust_bundle is not None:
                    if not spec.trust_bundle.include_issuer:
                        continue
                    bundle = self.trust.current(spec, pod)
                    if bundle is None:
                        continue
                    meta.issuer_ca_pem = ca_pem.decode()
                    self.store.save(meta)
                    new_ca = compose_ca(bundle, ca_pem, include_issuer=True)
                if self._swap_ca_file(meta, spec, new_ca):
                    rewritten += 1
        return rewritten

    def _rewrite_trust_ca(self, volume_id: str) -> bool:
        """The volume's trust bundle changed: a new ca.crt, same certificate and key."""
        with self._locks.hold(volume_id):
            meta = self.store.load(volume_id)
            if meta is None or meta.state != VolumeState.READY:
                return False
            spec, pod = self._parse(meta.volume_context)
            bundle = self.trust.current(spec, pod)
            if spec.trust_bundle is None or bundle is None:
                return False
            issuer_ca = meta.issuer_ca_pem.encode()
            ca_pem = compose_ca(bundle, issuer_ca, spec.trust_bundle.include_issuer)
            if not self._swap_ca_file(meta, spec, ca_pem):
                return False
        log.info("trust bundle rewritten into ca.crt", extra=log_fields(meta, pod))
        return True

    def _swap_ca_file(self, meta: VolumeMeta, spec: CertificateSpec, ca_pem: bytes) -> bool:
        """Write the current files again with a new ca.crt, atomically (lock held)."""
        directory = self._payload_dir(meta)
        names = [spec.files.certificate, spec.files.private_key, spec.files.ca]
        if spec.files.credential_bundle:
            names.append(spec.files.credential_bundle)
        files = {name: read_payload_file(directory, name) for name in names}
        current = {name: content for name, content in files.items() if content is not None}
        if len(current) != len(files) or current[spec.files.ca] == ca_pem:
            return False
        current[spec.files.ca] = ca_pem
        if spec.pkcs12 is not None:  # its trust store follows ca.crt
            current[spec.pkcs12.filename] = build_keystore(
                load_private_key(current[spec.files.private_key]),
                x509.load_pem_x509_certificates(current[spec.files.certificate]),
                x509.load_pem_x509_certificates(ca_pem) if ca_pem.strip() else [],
                spec.pkcs12.password,
            )
        write_payload(directory, current, gid(spec, meta))
        return True
