"""Getting a volume a certificate: choose the key, call the issuer, commit the files.

A first issue saves the metadata before anything else (a crash mid-issue is finished on start)
and leaves nothing behind when it fails, except after a timeout: the pending request and its key
stay for kubelet's retry. A commit swaps the payload in atomically, mounts, records, schedules.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from cryptography import x509

from agent.errors import (
    AgentError,
    DeadlineExceeded,
    IssuanceFailed,
)
from agent.issuers.base import IssuedCertificate, IssueRequest
from agent.pki.csr import build_csr
from agent.pki.keys import (
    PrivateKey,
    encode_private_key,
    generate_private_key,
    key_matches_spec,
    load_private_key,
)
from agent.pki.pkcs12 import build_keystore
from agent.spec.model import CertificateSpec, KeyEncoding, PodInfo
from agent.volumes.manager_core import (
    MOUNT,
    STORAGE,
    Attempt,
    ManagerCore,
    gid,
    ip_sans_key,
    log_fields,
)
from agent.volumes.recovery_hint import hint_for
from agent.volumes.scheduler import plan_renewal
from agent.volumes.store import (
    VolumeMeta,
    VolumeState,
    read_payload_file,
    write_payload,
)
from agent.volumes.trust import compose_ca

# The manager's logger: its parts log as one component, as before the split.
log = logging.getLogger("agent.volumes.manager")


class Issuing(ManagerCore):
    """Key, issuer, commit: the steps publish and renew share."""

    def _first_issue(
        self, meta: VolumeMeta, spec: CertificateSpec, pod: PodInfo, *, new: bool = False
    ) -> None:
        """Issue and publish a volume that has never served a certificate (lock held).

        A ``new`` volume's metadata is saved first, in state ``issuing``, so a crash during a
        slow issue (cert-manager) is finished on start. The agent's own CA signs within this
        call, so its volumes get no such record: their metadata is written once, complete,
        after the payload and before the bind (``_commit``), so every bind has a record and a
        payload without one has no bind (``VolumeStore.remove_unrecorded`` removes it).
        """
        try:
            # A missing bundle or a pod watch we may not run fails before anything is issued.
            bundle = self.trust.bundle_for(meta.volume_id, spec, pod)
            issue_spec, ips = self.pod_ips.spec_for_issue(spec, pod, ip_sans_key(meta))
            with self._attempt("issue") as attempt:
                attempt.start(self._issuer_label(spec))
                # Decided before anything of the volume exists: a denial leaves nothing behind.
                checked = self._apply_policy(spec, pod, "issue")
                if checked.duration_seconds != spec.duration_seconds:  # the rule's lifetime cap
                    issue_spec = dataclasses.replace(
                        issue_spec, duration_seconds=checked.duration_seconds
                    )
                spec = checked
                if new and not spec.issuer.is_local:
                    attempt.step = STORAGE
                    self.store.save(meta)
                    attempt.step = None
                    self.metrics.set_managed_volumes(self.store.count())
                # A volume new to the local CA has no pending key to look for (nothing of it
                # is on disk yet).
                key = self._select_key(
                    meta,
                    spec,
                    "issue",
                    attempt,
                    look_for_pending=not (new and spec.issuer.is_local),
                )
                issued = self._issue(meta, issue_spec, pod, key, attempt)
                self._commit(meta, spec, pod, key, issued, attempt, bundle, ips)
                if new and spec.issuer.is_local:
                    self.metrics.set_managed_volumes(self.store.count())
        except DeadlineExceeded:
            # The pending request and its key stay, so kubelet's retry picks them up.
            raise
        except AgentError:
            self._discard_unserved(meta)
            raise
        except Exception:
            log.exception("publishing failed", extra=log_fields(meta, pod))
            self._discard_unserved(meta)
            raise
        self._failures.pop(meta.volume_id, None)  # a pending first issue finished
        log.info(
            "published volume",
            extra={**log_fields(meta, pod), "serial": meta.serial, "not_after": meta.not_after},
        )

    def _discard_unserved(self, meta: VolumeMeta) -> None:
        """Forget a volume whose first issue failed: nothing of it stays on disk."""
        try:
            self._clear_target(meta, self.paths.check(meta.target_path))
        except AgentError as exc:
            log.warning(
                "could not clear the target of a failed publish",
                extra={"volume_id": meta.volume_id, "error": exc.message},
            )
        self.store.remove(meta.volume_id)
        self._tokens.pop(meta.volume_id, None)
        self._failures.pop(meta.volume_id, None)
        self.issuers.forget(meta.volume_id)
        self.trust.release(meta.volume_id)
        self.pod_ips.forget(meta.volume_id)
        self.metrics.set_managed_volumes(self.store.count())

    def _select_key(
        self,
        meta: VolumeMeta,
        spec: CertificateSpec,
        operation: str,
        attempt: Attempt,
        *,
        look_for_pending: bool = True,
    ) -> PrivateKey:
        """A pending key (a retry of an unfinished request), the current key, or a new one."""
        attempt.step = STORAGE
        # A local-CA volume never has one (see below), unless an older agent left it.
        pending = self.store.load_pending_key(meta.volume_id) if look_for_pending else None
        if pending is not None:
            attempt.pending_key = True  # used or not, the commit removes it
            key = load_private_key(pending)
            if key_matches_spec(key, spec.key):
                return key
        if operation == "renew" and spec.key.reuse:
            current = read_payload_file(self._payload_dir(meta), spec.files.private_key)
            if current is not None:
                key = load_private_key(current)
                if key_matches_spec(key, spec.key):
                    return key
        attempt.step = None
        with self.keygen.hold():
            key = generate_private_key(spec.key)
        if not spec.issuer.is_local:
            # Kept for a retry that picks up the issuer's pending request (a timeout, a crash);
            # the agent's own CA signs within this call, so nothing would ever pick it up.
            attempt.step = STORAGE
            self.store.save_pending_key(meta.volume_id, encode_private_key(key, spec.key.encoding))
            attempt.pending_key = True
            attempt.step = None
        return key

    def _issue(
        self,
        meta: VolumeMeta,
        spec: CertificateSpec,
        pod: PodInfo,
        key: PrivateKey,
        attempt: Attempt,
    ) -> IssuedCertificate:
        operation = attempt.operation
        issuer = self.issuers.for_ref(spec.issuer)
        # The local CA signs the public key of a key that never left this process: a CSR built
        # and verified within this call would prove nothing (see IssueRequest.public_key).
        direct = getattr(issuer, "signs_public_key", False)
        request = IssueRequest(
            volume_id=meta.volume_id,
            node_id=self.node_id,
            pod=pod,
            spec=spec,
            csr_pem=b"" if direct else build_csr(key, spec),
            service_account_token=self._tokens.get(meta.volume_id),
            public_key=key.public_key() if direct else None,
        )
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "requesting certificate",
                extra={
                    **log_fields(meta, pod),
                    "operation": operation,
                    "issuer": spec.issuer.describe(),
                    "key": f"{spec.key.algorithm} {spec.key.size or ''}".strip(),
                    "dns_names": list(spec.dns_names),
                    "ip_addresses": list(spec.ip_addresses),
                    "uris": list(spec.uris),
                    "duration_seconds": spec.duration_seconds,
                },
            )
        started = time.monotonic()
        try:
            issued = issuer.issue(request, self.issue_timeout_seconds)
            check_issued_for_key(issued, key)
            return issued
        except AgentError as exc:
            log.warning(
                "%s failed: %s",
                operation,
                exc.message,
                extra={**log_fields(meta, pod), "issuer": issuer.name, "reason": exc.reason},
            )
            raise
        finally:
            attempt.issuer_seconds = time.monotonic() - started

    def _commit(
        self,
        meta: VolumeMeta,
        spec: CertificateSpec,
        pod: PodInfo,
        key: PrivateKey,
        issued: IssuedCertificate,
        attempt: Attempt,
        bundle: bytes | None = None,
        pod_ips: tuple[str, ...] = (),
    ) -> None:
        """Swap the new files in, mount, record, schedule (lock held)."""
        if spec.issuer.is_local and self.local_trust_bundle is not None:
            # The bundle as of now, not as of signing: a CA retired while this renewal ran
            # (its volume's ca.crt already rewritten) must not come back with it.
            bundle_now = self.local_trust_bundle()
            if bundle_now != issued.ca_pem:  # mostly the same bytes: no copy of the result
                issued = dataclasses.replace(issued, ca_pem=bundle_now)
        include_issuer = spec.trust_bundle is not None and spec.trust_bundle.include_issuer
        ca_pem = issued.ca_pem
        if bundle is not None and spec.trust_bundle is not None:
            ca_pem = compose_ca(bundle, issued.ca_pem, include_issuer)
        files = payload_files(spec, key, issued, ca_pem)
        attempt.step = STORAGE
        if meta.mode == "direct":
            self._ensure_target_dir(meta)
        write_payload(self._payload_dir(meta), files, gid(spec, meta))
        attempt.step = None
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "payload swapped in",
                extra={
                    "volume_id": meta.volume_id,
                    "files": sorted(files),
                    "serial": issued.serial_hex,
                    "not_after": issued.not_after.isoformat(),
                },
            )
        # A first issue records the volume before binding it, so a kill at any moment leaves
        # no bind without a record (the next start re-binds a recorded one); a renewal checks
        # its bind first and records the new certificate last.
        record_first = attempt.operation == "issue"
        if not record_first:
            self._mount_step(meta, attempt)
        not_before = issued.not_before.timestamp()
        not_after = issued.not_after.timestamp()
        meta.state = VolumeState.READY
        meta.serial = issued.serial_hex
        meta.not_before = not_before
        meta.not_after = not_after
        # From the certificate as issued: the issuer may have granted less than was asked for.
        plan = plan_renewal(
            not_before,
            not_after,
            spec.renew_before_seconds,
            self.rng,
            now=self.clock(),
            min_interval=self.min_renewal_interval_seconds,
        )
        if plan.renew_before_ignored:
            self._report_renew_before_ignored(meta, spec, pod, not_after - not_before)
        meta.next_renewal = plan.due
        meta.pending_request = None
        meta.issuer = spec.issuer.describe()
        meta.recovery_hint = hint_for(spec)
        meta.updated_at = self.clock()
        meta.pod_ips = list(pod_ips)
        meta.issuer_ca_pem = issued.ca_pem.decode() if include_issuer else ""
        attempt.step = STORAGE
        self.store.save(meta)
        if attempt.pending_key:
            self.store.clear_pending_key(meta.volume_id)
        attempt.step = None
        if record_first:
            self._mount_step(meta, attempt)
        self._publish_metrics(meta, pod)
        self.scheduler.schedule(meta.volume_id, meta.next_renewal)
        self.pod_ips.committed(meta.volume_id, spec, pod, pod_ips)
        if self.on_commit is not None:
            self.on_commit()

    def _mount_step(self, meta: VolumeMeta, attempt: Attempt) -> None:
        if meta.mode == "mount":
            attempt.step = MOUNT
            self._ensure_mounted(meta)
            attempt.step = None

    def _report_renew_before_ignored(
        self, meta: VolumeMeta, spec: CertificateSpec, pod: PodInfo, lifetime: float
    ) -> None:
        """Say once per volume (per agent run) that renew-before gave way to the lifetime."""
        if meta.volume_id in self._renew_before_reported:
            return
        self._renew_before_reported.add(meta.volume_id)
        self.metrics.note_renew_before_ignored(meta.issuer)
        log.warning(
            "renew-before is not shorter than the certificate's lifetime: renewing at 2/3 of "
            "the lifetime instead",
            extra={
                **log_fields(meta, pod),
                "renew_before_seconds": spec.renew_before_seconds,
                "lifetime_seconds": round(lifetime),
                "issuer": meta.issuer,
            },
        )


def payload_files(
    spec: CertificateSpec, key: PrivateKey, issued: IssuedCertificate, ca_pem: bytes
) -> dict[str, bytes]:
    files = {
        spec.files.private_key: encode_private_key(key, spec.key.encoding),
        spec.files.certificate: issued.chain_pem,
        spec.files.ca: ca_pem,
    }
    if spec.files.credential_bundle:
        # podCertificate's credentialBundlePath layout: a PKCS#8 PRIVATE KEY block, then the
        # chain (leaf first); one file, so key and certificate always come from one generation.
        files[spec.files.credential_bundle] = (
            encode_private_key(key, KeyEncoding.PKCS8) + issued.chain_pem
        )
    if spec.pkcs12 is not None:
        files[spec.pkcs12.filename] = build_keystore(
            key,
            x509.load_pem_x509_certificates(issued.chain_pem),
            x509.load_pem_x509_certificates(ca_pem) if ca_pem.strip() else [],
            spec.pkcs12.password,
        )
    return files


def check_issued_for_key(issued: IssuedCertificate, key: PrivateKey) -> None:
    """Never publish a certificate that does not belong to the key we hold."""
    # Key equality compares the key material itself (OpenSSL's EVP_PKEY_eq), without encoding
    # both keys first; keys of different types are never equal.
    if issued.leaf.public_key() != key.public_key():
        raise IssuanceFailed(
            "the issuer returned a certificate for a different key", reason="key_mismatch"
        )
