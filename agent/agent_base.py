"""An agent's life: start (undone when it fails), readiness, stop. ``server.Agent`` is built on it.

``start`` runs ``_start`` (the assembly, ``agent_assembly.py``); a failure or a signal during it
runs the rollback steps and the closers registered so far, so a failed start leaves nothing
mounted or serving. ``stop`` runs the closers, last registered first.
"""

from __future__ import annotations

import abc
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

import grpc

from agent.config import AgentConfig
from agent.csi import endpoint
from agent.issuers.local import LocalCAIssuer
from agent.issuers.router import IssuerRouter
from agent.observe.httpserver import HealthServer
from agent.observe.metrics import AgentMetrics
from agent.observe.status_socket import StatusServer
from agent.pki.ca import (
    CAProvider,
)
from agent.pki.policy_reload import PolicySource
from agent.volumes.manager import VolumeManager
from agent.volumes.mounter import Mounter, detect_mounter
from agent.volumes.scheduler import RenewalScheduler
from agent.volumes.store import VolumeStore

log = logging.getLogger("agent.server")


# How long a stop waits for CSI calls and renewals in flight. Short: kubelet retries a cut-off
# call, and an unfinished issue is finished on the next start (the volume records it).
STOP_GRACE_SECONDS = 0.5


class StartupError(Exception):
    """The agent cannot start; the message says what to fix (logged as one line)."""


class AgentBase(abc.ABC):
    """The state an agent's parts share, and its start/stop discipline."""

    # Made by the assembly (agent_assembly.Agent._start), used by the parts.
    store: VolumeStore
    ca_provider: CAProvider
    local_issuer: LocalCAIssuer
    issuers: IssuerRouter
    policy: PolicySource
    manager: VolumeManager
    scheduler: RenewalScheduler

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

    def alive(self) -> tuple[bool, str]:
        """/healthz: 503 while starting, so the startup probe (not liveness) covers recovery and
        a start that hangs is restarted; then 200 for as long as the process lives."""
        return (True, "") if self._serving else (False, "starting")

    def ready(self) -> tuple[bool, str]:
        """/readyz: serving, the CSI socket still ours and accepting, the issuers ready."""
        return self._ready(connect=True)

    def probe_ready(self) -> tuple[bool, str]:
        """The CSI Probe: as ``ready`` without connecting to the socket, because the Probe
        itself came over it (the connect was a fifth of every Probe's time)."""
        return self._ready(connect=False)

    def _ready(self, *, connect: bool) -> tuple[bool, str]:
        if not self._serving:
            return False, "starting"
        if self._stopped.is_set():
            return False, "stopping"
        if self._socket_inode is not None:
            problem = endpoint.serving_problem(
                self.config.socket_path, self._socket_inode, connect=connect
            )
            if problem is not None:
                return False, problem
        return self.issuers.ready()

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

    @abc.abstractmethod
    def _start(self) -> None:
        """Make and start every part (``agent_assembly.Agent``)."""
