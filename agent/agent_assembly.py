"""The agent assembled: its parts made and wired in order, cheap checks first."""

from __future__ import annotations

import datetime as dt
import logging

from agent import __version__
from agent.agent_base import (
    STOP_GRACE_SECONDS,
    StartupError,
)
from agent.agent_ca import AgentCA
from agent.agent_parts import AgentParts
from agent.csi import endpoint
from agent.errors import AgentError
from agent.issuers.base import Issuer
from agent.issuers.local import LocalCAIssuer
from agent.issuers.router import IssuerRouter
from agent.observe.httpserver import HealthServer
from agent.observe.startup import TIMELINE
from agent.pki.policy_reload import PolicySource
from agent.volumes.manager import VolumeManager
from agent.volumes.paths import TargetPolicy
from agent.volumes.recovery import run_in_background
from agent.volumes.scheduler import RenewalScheduler
from agent.volumes.store import VolumeStore

# The server's logger: its parts log as one component, as before the split.
log = logging.getLogger("agent.server")


class Agent(AgentParts, AgentCA):
    """One running agent: CSI socket, volume manager, renewal scheduler, metrics endpoint."""

    def _start(self) -> None:
        config = self.config
        TIMELINE.mark("agent setup")  # the mounter probe, the metrics registry
        self.health = HealthServer(
            config.metrics_address, self.metrics.registry, self.ready, alive=self.alive
        )
        try:
            self.health.start()
        except OSError as exc:
            raise StartupError(
                f"cannot serve /metrics on --metrics-address {config.metrics_address}: "
                f"{exc.strerror or exc}"
            ) from exc
        self._closers.append(self.health.stop)
        try:
            endpoint.claim(config.socket_path)
        except endpoint.EndpointInUse as exc:
            raise StartupError(f"--endpoint {config.endpoint}: {exc}") from exc
        TIMELINE.mark("metrics port, endpoint check")
        self._prepare_data_root()
        TIMELINE.mark("data root and its tmpfs")
        self.store = VolumeStore(config.data_root)
        api = None if config.standalone else self._kubernetes_client()
        cert_manager: Issuer | None = None
        if api is not None:
            from agent.issuers.certmanager import CertManagerIssuer

            cert_manager = CertManagerIssuer(
                api, node_id=config.node_id, driver_name=config.driver_name
            )
        self.ca_provider = self._ca_provider(api, cert_manager)
        self.local_issuer = LocalCAIssuer(
            self.ca_provider,
            max_duration_seconds=config.max_duration_seconds,
            allow_ca=config.allow_ca,
            allowed_namespaces=config.allowed_namespaces,
            clock=lambda: dt.datetime.fromtimestamp(self.clock(), dt.UTC),
            leaf_guard=None if self.node_ca is None else self.node_ca.check_leaf,
        )
        if self.node_ca is None:
            # Node CA mode reports its (short-lived) CA in cert_agent_node_ca_* instead.
            try:
                self.metrics.set_ca_expiry(self.local_issuer.ca_not_after().timestamp())
            except AgentError as exc:
                log.error("the local CA cannot sign yet", extra={"error": exc.message})
            else:
                self._check_allow_ca()
        TIMELINE.mark("CA")
        self.issuers = IssuerRouter(self.local_issuer, cert_manager)
        self.policy = PolicySource(
            config.policy_file,
            cluster_domain=config.cluster_domain,
            trust_domain=config.trust_domain,
            observer=self.metrics,
        )
        self.policy.start()
        self._closers.append(self.policy.stop)
        self.manager = VolumeManager(
            store=self.store,
            mounter=self.mounter,
            issuers=self.issuers,
            metrics=self.metrics,
            node_id=config.node_id,
            issue_timeout_seconds=config.issue_timeout_seconds,
            clock=self.clock,
            rng=self._rng,
            keygen_workers=config.keygen_workers,
            min_duration_seconds=config.min_duration_seconds,
            min_renewal_interval_seconds=config.min_renewal_interval_seconds,
            tmpfs_reserve_bytes=config.tmpfs_reserve_bytes,
            target_policy=TargetPolicy(
                config.kubelet_root, config.data_root, config.relaxed_target_paths
            ),
            policy=self.policy,
            policy_for_cert_manager=config.policy_for_cert_manager,
        )
        self.manager.local_trust_bundle = self.ca_provider.trust_bundle_pem
        self.metrics.watch_tmpfs(self.store.free_space)
        self.scheduler = RenewalScheduler(
            self.manager.renew,
            workers=config.renewal_workers,
            clock=self.clock,
            rng=self._rng,
            min_interval=config.min_renewal_interval_seconds,
        )
        if api is not None:
            self._start_events(api)
        self.manager.attach_scheduler(self.scheduler)
        self._attach_pod_and_trust_watches(api)
        if self._rotation is not None:
            self._rotation.attach(
                self.manager.local_certificate_start_times, self.manager.rewrite_ca_bundles
            )
            self.manager.on_commit = self._rotation.note_issued
        TIMELINE.mark("policy, manager, scheduler")
        # Serve first, recover behind: Probe answers at once whatever the number of volumes (the
        # background thread even lists them), and a call for a volume not recovered yet recovers
        # that one first (volumes/recovery.py).
        self.manager.recovery.expect()
        if config.pcr_signers and api is not None:
            self._start_pcr(api)
        self._closers.append(lambda: self.scheduler.stop(STOP_GRACE_SECONDS))
        self._closers.append(self.manager.recovery.stop)
        self.scheduler.start()
        self._start_status()
        self._start_grpc()
        TIMELINE.mark("status socket, gRPC serving")
        self.interruptible = False
        self._serving = True
        self._recovery_thread = run_in_background(
            self.manager.recovery, self._recovered, self.manager.volumes_on_disk
        )
        log.info(
            "agent serving",
            extra={
                "version": __version__,
                "endpoint": config.endpoint,
                "node_id": config.node_id,
                "driver_name": config.driver_name,
                "data_root": str(config.data_root),
                "metrics_port": self.health.port,
                "mounts": self.mounter.can_mount,
                "policy": self.policy.policy.source,
                # Milliseconds from the first import of the agent package, step by step.
                "startup_ms": TIMELINE.report(),
            },
        )

    def _recovered(self, count: int, seconds: float) -> None:
        """The background recovery is done (its thread calls this)."""
        self.metrics.set_managed_volumes(self.store.count())
        # Certificates of an earlier node CA (renewed while the agent was down) move over too.
        self.move_to_node_ca()
        log.info(
            "volumes recovered",
            extra={"volumes_recovered": count, "seconds": round(seconds, 3)},
        )
        self.recovery_done.set()

    def wait_recovered(self, timeout: float | None = None) -> bool:
        """Block until the start-up recovery is done (tests, and `serve` logs it)."""
        return self.recovery_done.wait(timeout)
