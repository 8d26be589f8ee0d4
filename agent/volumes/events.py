"""What the volume manager tells the pod's owner: the interface, and the no-op for standalone mode.

The manager calls these at the moments a pod's owner should hear about (``kubectl describe pod``);
``agent.kube.volume_events.KubeVolumeEvents`` writes them as Kubernetes Events. Every method is
best effort and returns at once: it never raises and never waits for the API server.
"""

from __future__ import annotations

from typing import Protocol

from agent.spec.model import PodInfo


class VolumeEvents(Protocol):
    def issue_failed(self, pod: PodInfo, code: str, message: str) -> None:
        """A first issue failed; ``message`` is the one the gRPC caller got (``code``)."""

    def policy_denied(self, pod: PodInfo, message: str) -> None:
        """A policy (the agent's own, or an issuer's approver) refused the certificate."""

    def renewal_failed(self, pod: PodInfo, message: str, failures: int) -> None:
        """A renewal failed (``failures`` in a row); the old certificate stays in place."""

    def renewal_recovered(self, pod: PodInfo, failures: int, serial: str, not_after: float) -> None:
        """A renewal succeeded after ``failures`` failed attempts."""

    def expiring(self, pod: PodInfo, not_after: float, window_start: float, message: str) -> None:
        """The certificate is inside its renew-before window and still not renewed."""


class NoEvents:
    """Standalone mode: nobody to tell."""

    def issue_failed(self, pod: PodInfo, code: str, message: str) -> None:
        pass

    def policy_denied(self, pod: PodInfo, message: str) -> None:
        pass

    def renewal_failed(self, pod: PodInfo, message: str, failures: int) -> None:
        pass

    def renewal_recovered(self, pod: PodInfo, failures: int, serial: str, not_after: float) -> None:
        pass

    def expiring(self, pod: PodInfo, not_after: float, window_start: float, message: str) -> None:
        pass
