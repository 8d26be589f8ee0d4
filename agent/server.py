"""Assembles the agent from its parts and runs it until SIGTERM or SIGINT."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc

from agent import __version__
from agent.config import AgentConfig
from agent.csi import csi_pb2_grpc
from agent.csi.service import IdentityServicer, NodeServicer
from agent.errors import AgentError
from agent.issuers.base import Issuer
from agent.issuers.local import LocalCAIssuer
from agent.issuers.router import IssuerRouter
from agent.observe.httpserver import HealthServer
from agent.observe.metrics import AgentMetrics
from agent.pki.ca import (
    CAProvider,
    StaticCAProvider,
    ensure_self_signed_ca,
    load_ca_dir,
    load_ca_files,
)
from agent.volumes.manager import VolumeManager
from agent.volumes.mounter import Mounter, detect_mounter
from agent.volumes.scheduler import RenewalScheduler
from agent.volumes.store import VolumeStore

log = logging.getLogger(__name__)


class Agent:
    """One running agent: CSI socket, volume manager, renewal scheduler, metrics endpoint."""

    def __init__(self, config: AgentConfig, mounter: Mounter | None = None) -> None:
        self.config = config
        self.mounter = mounter or detect_mounter()
        self.metrics = AgentMetrics()
        self._serving = False
        self._stopped = threading.Event()
        self._closers: list[Any] = []
        self._rotation: Any = None  # agent.issuers.ca_rotation.SecretCARotation with --ca-secret
        self.grpc_server: grpc.Server | None = None
        self.health: HealthServer | None = None

    # ------------------------------------------------------------------------------ start

    def start(self) -> None:
        config = self.config
        self._prepare_data_root()
        self.store = VolumeStore(config.data_root)
        api = None if config.standalone else self._kubernetes_client()
        self.ca_provider = self._ca_provider(api)
        self.local_issuer = LocalCAIssuer(
            self.ca_provider,
            max_duration_seconds=config.max_duration_seconds,
            allow_ca=config.allow_ca,
            allowed_namespaces=config.allowed_namespaces,
        )
        try:
            self.metrics.set_ca_expiry(self.local_issuer.ca_not_after().timestamp())
        except AgentError as exc:
            log.error("the local CA cannot sign yet", extra={"error": exc.message})
        cert_manager: Issuer | None = None
        if api is not None:
            from agent.issuers.certmanager import CertManagerIssuer

            cert_manager = CertManagerIssuer(
                api, node_id=config.node_id, driver_name=config.driver_name
            )
        self.issuers = IssuerRouter(self.local_issuer, cert_manager)
        self.manager = VolumeManager(
            store=self.store,
            mounter=self.mounter,
            issuers=self.issuers,
            metrics=self.metrics,
            node_id=config.node_id,
            issue_timeout_seconds=config.issue_timeout_seconds,
        )
        self.scheduler = RenewalScheduler(self.manager.renew, workers=config.renewal_workers)
        self.manager.attach_scheduler(self.scheduler)
        if self._rotation is not None:
            rotation, manager = self._rotation, self.manager
            manager.on_commit = lambda: rotation.note_issued(
                manager.local_certificate_start_times, manager.rewrite_ca_bundles
            )
        recovered = self.manager.recover()
        self.scheduler.start()
        self._closers.append(self.scheduler.stop)
        self._start_grpc()
        self.health = HealthServer(config.metrics_address, self.metrics.registry, self.ready)
        self.health.start()
        self._closers.append(self.health.stop)
        self._serving = True
        log.info(
            "agent serving",
            extra={
                "version": __version__,
                "endpoint": config.endpoint,
                "node_id": config.node_id,
                "driver_name": config.driver_name,
                "data_root": str(config.data_root),
                "metrics_port": self.health.port,
                "volumes_recovered": recovered,
                "mounts": self.mounter.can_mount,
            },
        )

    def _prepare_data_root(self) -> None:
        root = self.config.data_root
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o700)
        volumes = root / "volumes"
        volumes.mkdir(exist_ok=True)
        if self.mounter.can_mount:
            # Keys live in memory only: payloads sit on a tmpfs that no disk ever sees.
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

    def _kubernetes_client(self) -> Any:
        from agent.kube.client import KubeSettings, make_api_client

        return make_api_client(
            KubeSettings(
                kubeconfig=self.config.kubeconfig,
                qps=self.config.kube_qps,
                burst=self.config.kube_burst,
            )
        )

    def _ca_provider(self, api: Any) -> CAProvider:
        config = self.config
        if config.ca_cert_file and config.ca_key_file:
            return StaticCAProvider(load_ca_files(config.ca_cert_file, config.ca_key_file))
        if config.ca_dir:
            return StaticCAProvider(load_ca_dir(config.ca_dir))
        if config.ca_secret:
            if api is None:
                raise RuntimeError("--ca-secret needs Kubernetes access; drop --standalone")
            from agent.issuers.ca_rotation import SecretCARotation

            rotation = SecretCARotation(
                api,
                *config.ca_secret,
                reissue_all=self._reissue_all,
                on_load=lambda ca: self.metrics.set_ca_expiry(ca.not_after.timestamp()),
            )
            rotation.start()
            self._closers.append(rotation.stop)
            self._rotation = rotation
            return rotation.provider
        return StaticCAProvider(ensure_self_signed_ca(config.data_root / "ca"))

    def _reissue_all(self) -> None:
        """The local CA changed: renew its volumes now (the renewal workers bound the rate)."""
        for meta in self.manager.local_ca_volumes():
            self.scheduler.schedule(meta.volume_id, 0.0)

    def _start_grpc(self) -> None:
        socket_path = self.config.socket_path
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(socket_path)
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=self.config.grpc_workers))
        csi_pb2_grpc.add_IdentityServicer_to_server(
            IdentityServicer(self.config.driver_name, self.metrics, self.ready), server
        )
        csi_pb2_grpc.add_NodeServicer_to_server(
            NodeServicer(self.manager, self.config.node_id, self.metrics), server
        )
        if server.add_insecure_port(f"unix://{socket_path}") == 0:
            raise RuntimeError(f"cannot listen on {socket_path}")
        server.start()
        # kubelet and the registrar run as root; nobody else needs the socket.
        os.chmod(socket_path, 0o660)
        self.grpc_server = server

    # ------------------------------------------------------------------------------ state

    def ready(self) -> tuple[bool, str]:
        if not self._serving:
            return False, "starting"
        if self._stopped.is_set():
            return False, "stopping"
        return self.issuers.ready()

    # ------------------------------------------------------------------------------- stop

    def stop(self, grace: float = 5.0) -> None:
        if self._stopped.is_set():
            return
        self._stopped.set()
        if self.grpc_server is not None:
            self.grpc_server.stop(grace).wait(grace + 1)
        for close in reversed(self._closers):
            try:
                close()
            except Exception:
                log.exception("error while stopping")
        # Mounts and payloads stay: pods keep their certificates while the agent restarts.
        log.info("agent stopped")

    def wait(self) -> None:
        self._stopped.wait()


def _remove_stale_socket(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def serve(config: AgentConfig) -> int:
    agent = Agent(config)
    done = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        done.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.start()
    except Exception:
        agent.stop(grace=0)
        raise
    done.wait()
    agent.stop()
    return 0
