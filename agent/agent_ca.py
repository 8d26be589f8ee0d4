"""The agent's local CA: from files, a directory, a watched Secret, node CA mode or self-signed,
and what follows when it changes (reissue, move to a renewed node CA)."""

from __future__ import annotations

import logging
from typing import Any

from agent.agent_base import (
    AgentBase,
    StartupError,
)
from agent.errors import AgentError
from agent.issuers.base import Issuer
from agent.issuers.local import ca_child_problem
from agent.pki.ca import (
    CAProvider,
    StaticCAProvider,
    ensure_self_signed_ca,
    load_ca_dir,
    load_ca_files,
)

# The server's logger: its parts log as one component, as before the split.
log = logging.getLogger("agent.server")


CA_OVERLAP_STATE = "ca-overlap.json"  # under the data root: CAs replaced, kept in ca.crt a while


NODE_CA_TMPFS_BYTES = 1024 * 1024


class AgentCA(AgentBase):
    """Choosing and following the local CA."""

    def _ca_provider(self, api: Any, cert_manager: Issuer | None) -> CAProvider:
        config = self.config
        if config.node_ca is not None:
            if api is None or cert_manager is None:
                raise RuntimeError("--node-ca-issuer-name needs Kubernetes access")
            return self._start_node_ca(cert_manager)
        if config.ca_cert_file and config.ca_key_file:
            return StaticCAProvider(load_ca_files(config.ca_cert_file, config.ca_key_file))
        if config.ca_dir:
            return StaticCAProvider(load_ca_dir(config.ca_dir))
        if config.ca_secret:
            if api is None:
                raise RuntimeError("--ca-secret needs Kubernetes access; drop --standalone")
            from agent.issuers.ca_rotation import SecretCARotation

            overlap = config.ca_overlap_seconds
            rotation = SecretCARotation(
                api,
                *config.ca_secret,
                reissue_all=self._reissue_all,
                # By default the longest lifetime the local CA signs: every certificate the old
                # CA issued has expired before it leaves ca.crt.
                overlap_seconds=config.max_duration_seconds if overlap is None else overlap,
                state_file=config.data_root / CA_OVERLAP_STATE,
                clock=self.clock,
                on_load=self._ca_loaded,
            )
            self._closers.append(rotation.stop)
            rotation.start()
            self._rotation = rotation
            return rotation.provider
        return StaticCAProvider(ensure_self_signed_ca(config.data_root / "ca"))

    def _start_node_ca(self, requester: Issuer) -> CAProvider:
        from agent.issuers.node_ca import NodeCAProvider, NodeCASettings
        from agent.issuers.node_ca_store import NodeCAStore
        from agent.spec.model import IssuerRef

        config = self.config
        node_ca = config.node_ca
        assert node_ca is not None
        # The node key lives on a tmpfs of its own: never on a disk, never in a pod volume.
        directory = config.data_root / "node-ca"
        if self.mounter.can_mount and not self.mounter.is_tmpfs(directory):
            # Mounted by this start: a start that fails takes it away again (a tmpfs found
            # mounted holds the node CA a restart reuses, and stays).
            self._rollback.append(lambda: self.mounter.unmount_tmpfs(directory))
        self.mounter.ensure_tmpfs(directory, NODE_CA_TMPFS_BYTES)
        settings = NodeCASettings(
            issuer=IssuerRef(node_ca.issuer_name, node_ca.issuer_kind, node_ca.issuer_group),
            namespace=node_ca.namespace,
            node_id=config.node_id,
            permitted=node_ca.permitted,
            duration_seconds=node_ca.duration_seconds,
            renew_before_seconds=node_ca.renew_before_seconds,
            require_name_constraints=node_ca.require_name_constraints,
            pod_name=config.pod_name,
            pod_uid=config.pod_uid,
            pod_namespace=config.pod_namespace,
            request_timeout_seconds=config.issue_timeout_seconds,
        )
        self.metrics.enable_node_ca()
        provider = NodeCAProvider(
            settings,
            requester,
            NodeCAStore(directory),
            metrics=self.metrics,
            clock=self.clock,
            rng=self._rng,
            on_renewed=self.move_to_node_ca,
        )
        self.node_ca = provider
        self._closers.append(provider.stop)
        provider.start()
        return provider

    def move_to_node_ca(self) -> None:
        """Reissue, spread out, every pod certificate the current node CA did not sign, each
        before its own (old-CA-capped) expiry; no-op outside node CA mode."""
        manager, scheduler = getattr(self, "manager", None), getattr(self, "scheduler", None)
        if self.node_ca is None or manager is None or scheduler is None:
            return  # on start, recover() runs first and calls this again
        # Imported here: outside node CA mode the module is never needed (18 ms of imports).
        from agent.issuers.node_ca import reissue_due

        try:
            signer = self.node_ca.current().certificate
        except AgentError:
            return
        now, moved = self.clock(), 0
        for volume_id, not_after in manager.volumes_not_signed_by(signer):
            due = reissue_due(now, not_after, self._rng)
            scheduled = scheduler.due_time(volume_id)
            if scheduled is None or due < scheduled:
                scheduler.schedule(volume_id, due)
                moved += 1
        if moved:
            log.info("moving pod certificates to the new node CA", extra={"volumes": moved})

    def _reissue_all(self) -> None:
        """The local CA changed: renew its volumes now (the renewal workers bound the rate)."""
        for meta in self.manager.local_ca_volumes():
            self.scheduler.schedule(meta.volume_id, 0.0)

    def _ca_loaded(self, ca: Any) -> None:
        self.metrics.set_ca_expiry(ca.not_after.timestamp())
        if self.pcr is not None:
            self.pcr.ca_changed()  # the published ClusterTrustBundle follows the CA

    def _check_allow_ca(self) -> None:
        """--allow-ca with a CA that may not sign CAs would fail every is-ca volume: say so now.
        (A CA from --ca-secret that is not loaded yet, or rotates later, is checked per request.)
        """
        if not self.config.allow_ca:
            return
        problem = ca_child_problem(self.ca_provider.current())
        if problem is not None:
            raise StartupError(
                f"--allow-ca: {problem}, so no CA certificate it signs would verify; give a CA "
                "without that limit or drop --allow-ca"
            )
