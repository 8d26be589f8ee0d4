"""Assembles the agent from its parts and runs it until SIGTERM or SIGINT."""

from __future__ import annotations

import datetime as dt
import logging
import os
import random
import signal
import threading
import time
from collections.abc import Callable
from concurrent import futures
from typing import Any

import grpc

from agent import __version__
from agent.config import AgentConfig
from agent.csi import endpoint
from agent.csi.admission import VolumeOperationSlots
from agent.csi.handlers import add_csi_servicers
from agent.csi.service import IdentityServicer, NodeServicer
from agent.errors import AgentError
from agent.issuers.base import Issuer
from agent.issuers.local import LocalCAIssuer, ca_child_problem
from agent.issuers.router import IssuerRouter
from agent.observe.httpserver import HealthServer
from agent.observe.metrics import AgentMetrics
from agent.observe.status_socket import STATUS_SOCKET, StatusServer
from agent.pki.ca import (
    CAProvider,
    StaticCAProvider,
    ensure_self_signed_ca,
    load_ca_dir,
    load_ca_files,
)
from agent.pki.policy_reload import PolicySource
from agent.volumes.manager import VolumeManager
from agent.volumes.mounter import Mounter, detect_mounter
from agent.volumes.paths import TargetPolicy
from agent.volumes.recovery import run_in_background
from agent.volumes.scheduler import RenewalScheduler
from agent.volumes.store import VolumeStore

log = logging.getLogger(__name__)

CA_OVERLAP_STATE = "ca-overlap.json"  # under the data root: CAs replaced, kept in ca.crt a while

# How long a stop waits for CSI calls and renewals in flight. Short: kubelet retries a cut-off
# call, and an unfinished issue is finished on the next start (the volume records it).
STOP_GRACE_SECONDS = 0.5


class StartupError(Exception):
    """The agent cannot start; the message says what to fix (logged as one line)."""


NODE_CA_TMPFS_BYTES = 1024 * 1024


class Agent:
    """One running agent: CSI socket, volume manager, renewal scheduler, metrics endpoint."""

    def __init__(
        self,
        config: AgentConfig,
        mounter: Mounter | None = None,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.mounter = mounter or detect_mounter()
        # Wall clock (epoch seconds) for signing, renewals and the node CA; injected in tests.
        self.clock = clock
        self._rng = rng or random.Random()
        self.node_ca: Any = None  # agent.issuers.node_ca.NodeCAProvider in node CA mode
        self.metrics = AgentMetrics()
        self._serving = False
        self.recovery_done = threading.Event()
        self._stopped = threading.Event()
        # Run on every stop, last registered first.
        self._closers: list[Callable[[], None]] = []
        # Undo what a start that did not finish left half-done (run before the closers).
        self._rollback: list[Callable[[], None]] = []
        self._socket_inode: int | None = None
        # True while start-up may be interrupted by raising into it (see ``serve``).
        self.interruptible = False
        self._rotation: Any = None  # agent.issuers.ca_rotation.SecretCARotation with --ca-secret
        self.pcr: Any = None  # agent.issuers.pcr_service.PcrService with --pcr-signer-name
        self.grpc_server: grpc.Server | None = None
        self.health: HealthServer | None = None
        self.events: Any = None  # agent.kube.events.EventRecorder in cluster mode
        self.status_server: StatusServer | None = None

    # ------------------------------------------------------------------------------ start

    def start(self) -> None:
        """Bring every part up, or undo what was done and raise (``stop`` is not needed then).

        The cheap checks that could fail (the metrics port, the CSI endpoint) come before
        anything is created, mounted or started.
        """
        try:
            self.interruptible = True
            self._start()
        except BaseException:
            self._abort_start()
            raise
        finally:
            self.interruptible = False

    def _abort_start(self) -> None:
        self.interruptible = False  # the undo itself must run to its end
        self._stopped.set()
        for undo in reversed(self._rollback):
            try:
                undo()
            except Exception as exc:
                log.error("could not undo a start-up step: %s", exc)
        self._rollback.clear()
        self._close()

    def _start(self) -> None:
        config = self.config
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
        self._prepare_data_root()
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
        # Serve first, recover behind: Probe answers at once whatever the number of volumes, and
        # a call for a volume not recovered yet recovers that one first (volumes/recovery.py).
        recovering = self.manager.begin_recovery()
        if config.pcr_signers and api is not None:
            self._start_pcr(api)
        self._closers.append(lambda: self.scheduler.stop(STOP_GRACE_SECONDS))
        self._closers.append(self.manager.recovery.stop)
        self.scheduler.start()
        self._start_status()
        self._start_grpc()
        self.interruptible = False
        self._serving = True
        self._recovery_thread = run_in_background(self.manager.recovery, self._recovered)
        log.info(
            "agent serving",
            extra={
                "version": __version__,
                "endpoint": config.endpoint,
                "node_id": config.node_id,
                "driver_name": config.driver_name,
                "data_root": str(config.data_root),
                "metrics_port": self.health.port,
                "recovering": recovering,
                "mounts": self.mounter.can_mount,
                "policy": self.policy.policy.source,
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

    def _attach_pod_and_trust_watches(self, api: Any) -> None:
        """The pod watch (${POD_IP}) and trust-bundle watches; both start on first use."""
        manager, config = self.manager, self.config
        manager.pod_ips.wait_timeout = manager.trust.wait_timeout = config.issue_timeout_seconds
        manager.trust.start()
        self._closers.append(manager.trust.stop)
        if api is None:
            return
        from agent.kube.pods import PodIPWatch
        from agent.kube.trust_bundles import TrustBundleWatcher

        bundles = TrustBundleWatcher(
            api, on_change=manager.trust.on_change, on_problem=manager.trust.on_problem
        )
        manager.trust.watcher = bundles
        self._closers.append(bundles.stop)
        if config.pod_watch == "off":
            manager.pod_ips.disabled_reason = "the agent runs with --pod-watch=off"
            return
        pods = PodIPWatch(api, config.node_id, on_ips=manager.pod_ips.on_pod_ips)
        manager.pod_ips.source = pods
        self._closers.append(pods.stop)
        if config.pod_watch == "on":
            pods.start()

    def _prepare_data_root(self) -> None:
        root = self.config.data_root
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        volumes = root / "volumes"
        volumes.mkdir(exist_ok=True)
        if self.mounter.can_mount:
            # Keys live in memory only: payloads sit on a tmpfs that no disk ever sees.
            if not self.mounter.is_tmpfs(volumes):
                # Mounted by this start, so empty: a start that fails takes it away again.
                # (A tmpfs found mounted holds live volumes and always stays.)
                self._rollback.append(lambda: self.mounter.unmount_tmpfs(volumes))
            self.mounter.ensure_tmpfs(volumes, self.config.tmpfs_size_bytes)
        elif not self.config.standalone:
            raise RuntimeError(
                "the agent cannot mount (it needs root and CAP_SYS_ADMIN: run the container "
                "privileged); only --standalone may run without mounts"
            )
        else:
            log.warning(
                "not running as root: volumes are written straight into their target "
                "directories instead of being bind-mounted read-only, and payloads are "
                "not on a tmpfs. Fine for trying the agent out; in a cluster it always mounts.",
                extra={"data_root": str(root)},
            )

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

    def _kubernetes_client(self) -> Any:
        from agent.kube.client import KubeSettings, make_api_client

        return make_api_client(
            KubeSettings(
                kubeconfig=self.config.kubeconfig,
                qps=self.config.kube_qps,
                burst=self.config.kube_burst,
            )
        )

    def _start_status(self) -> None:
        """The read-only socket `cert-agent status` reads; without it the agent still serves."""
        status = StatusServer(self.config.data_root / STATUS_SOCKET, self.manager.status)
        try:
            status.start()
        except OSError as exc:  # e.g. a data root path too long for a UNIX socket (108 bytes)
            log.error("cannot serve `cert-agent status`", extra={"error": str(exc)})
            return
        self.status_server = status
        self._closers.append(status.stop)

    def _start_events(self, api: Any) -> None:
        """Events on pods, written by one background thread; best effort (see kube/events.py)."""
        from agent.kube.events import EventRecorder
        from agent.kube.volume_events import KubeVolumeEvents

        recorder = EventRecorder(
            api,
            controller=self.config.driver_name,
            instance=self.config.node_id,
            clock=self.clock,
            on_result=self.metrics.event_result,
        )
        recorder.start()
        self._closers.append(recorder.stop)
        self.events = recorder
        self.manager.attach_events(KubeVolumeEvents(recorder))

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
        from agent.issuers.node_ca import reissue_due

        manager, scheduler = getattr(self, "manager", None), getattr(self, "scheduler", None)
        if self.node_ca is None or manager is None or scheduler is None:
            return  # on start, recover() runs first and calls this again
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

    def _start_pcr(self, api: Any) -> None:
        """PodCertificateRequest signing (docs/pod-certificates.md), with the local CA."""
        from agent.issuers.pcr_policy import pcr_policy
        from agent.issuers.pcr_service import PcrService

        self.pcr = PcrService(
            api,
            node=self.config.node_id,
            signers=self.config.pcr_signers,
            ca=self.ca_provider,
            registry=self.metrics.registry,
            publish_trust_bundle=self.config.pcr_publish_trust_bundle,
            leaf_guard=None if self.node_ca is None else self.node_ca.check_leaf,
            policy=pcr_policy(self.policy),
        )
        self._closers.append(self.pcr.stop)
        self.pcr.start()

    def _reissue_all(self) -> None:
        """The local CA changed: renew its volumes now (the renewal workers bound the rate)."""
        for meta in self.manager.local_ca_volumes():
            self.scheduler.schedule(meta.volume_id, 0.0)

    def _ca_loaded(self, ca: Any) -> None:
        self.metrics.set_ca_expiry(ca.not_after.timestamp())
        if self.pcr is not None:
            self.pcr.ca_changed()  # the published ClusterTrustBundle follows the CA

    def _start_grpc(self) -> None:
        socket_path = self.config.socket_path
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # Again, right before binding: another agent may have started meanwhile.
            endpoint.claim(socket_path)
        except endpoint.EndpointInUse as exc:
            raise StartupError(f"--endpoint {self.config.endpoint}: {exc}") from exc
        # Volume operations get --grpc-workers threads; a few more stay free for Probe & co.
        slots = VolumeOperationSlots(self.config.grpc_workers)
        server = grpc.server(
            futures.ThreadPoolExecutor(
                max_workers=slots.pool_size, thread_name_prefix="cert-agent-grpc"
            )
        )
        add_csi_servicers(
            server,
            {
                "Identity": IdentityServicer(self.config.driver_name, self.metrics, self.ready),
                "Node": NodeServicer(self.manager, self.config.node_id, self.metrics, slots),
            },
        )
        if server.add_insecure_port(f"unix://{socket_path}") == 0:
            raise StartupError(f"cannot listen on --endpoint {self.config.endpoint}")
        self.grpc_server = server
        server.start()
        self._socket_inode = endpoint.inode(socket_path)
        # kubelet and the registrar run as root; nobody else needs the socket.
        os.chmod(socket_path, 0o660)

    # ------------------------------------------------------------------------------ state

    def alive(self) -> tuple[bool, str]:
        """/healthz: 503 while starting, so the startup probe (not liveness) covers recovery and
        a start that hangs is restarted; then 200 for as long as the process lives."""
        return (True, "") if self._serving else (False, "starting")

    def ready(self) -> tuple[bool, str]:
        if not self._serving:
            return False, "starting"
        if self._stopped.is_set():
            return False, "stopping"
        if self._socket_inode is not None:
            problem = endpoint.serving_problem(self.config.socket_path, self._socket_inode)
            if problem is not None:
                return False, problem
        return self.issuers.ready()

    # ------------------------------------------------------------------------------- stop

    def stop(self, grace: float = STOP_GRACE_SECONDS) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        self._close(grace)
        # Mounts and payloads stay: pods keep their certificates while the agent restarts.
        log.info("agent stopped")

    def _close(self, grace: float = 0.0) -> None:
        server, self.grpc_server = self.grpc_server, None
        if server is not None:
            # gRPC removes its socket file when it stops.
            server.stop(grace).wait(grace + 1)
        for close in reversed(self._closers):
            try:
                close()
            except Exception as exc:
                log.error("error while stopping: %s", exc)
        self._closers.clear()

    def wait(self) -> None:
        self._stopped.wait()


class _StopDuringStartup(BaseException):
    """Raised by the signal handler into a start-up blocked in I/O (a BaseException, so no
    ``except Exception`` on the way swallows it); ``Agent.start`` then undoes its work."""


def describe_failure(exc: BaseException) -> str:
    """One line that says what failed, for an operator (no traceback)."""
    if isinstance(exc, AgentError):
        return exc.message
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    if isinstance(exc, StartupError | RuntimeError | ValueError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def serve(config: AgentConfig) -> int:
    """Run the agent until SIGTERM/SIGINT. 0 after a stop (in any phase), 1 if it cannot start.

    A signal while starting interrupts whatever start-up is blocked on (a Kubernetes API that
    does not answer, a backoff sleep) at once: the handler raises into the main thread, the
    start is undone, and the process exits 0 like any other requested stop.
    """
    agent = Agent(config)
    done = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if done.is_set():
            return  # already stopping
        done.set()
        if agent.interruptible:
            log.info("received %s during start-up, stopping", name)
            raise _StopDuringStartup(name)
        log.info("received %s, stopping", name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.start()
    except _StopDuringStartup:
        log.info("agent stopped")
        return 0
    except Exception as exc:
        log.debug("start-up failed", exc_info=True)
        log.error("cannot start: %s", describe_failure(exc))
        return 1
    done.wait()
    agent.stop()
    return 0
