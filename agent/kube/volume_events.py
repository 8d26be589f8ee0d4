"""The volume manager's events (``agent.volumes.events.VolumeEvents``) as Kubernetes Events.

Reasons are stable CamelCase words an operator can filter on
(``kubectl get events --field-selector reason=RenewalFailed``); notes say what happened and
what to do, and carry the same message the gRPC caller (kubelet) got.
"""

from __future__ import annotations

import datetime as dt

from agent.kube.events import NORMAL, WARNING, EventRecorder, ObjectRef

ISSUE_FAILED = "IssueFailed"
POLICY_DENIED = "PolicyDenied"
RENEWAL_FAILED = "RenewalFailed"
RENEWED = "RenewalRecovered"
EXPIRING = "CertificateExpiring"


class KubeVolumeEvents:
    def __init__(self, recorder: EventRecorder) -> None:
        self.recorder = recorder

    def issue_failed(self, pod: ObjectRef, code: str, message: str) -> None:
        self.recorder.record(pod, WARNING, ISSUE_FAILED, "Issue", f"{_code_name(code)}: {message}")

    def policy_denied(self, pod: ObjectRef, message: str) -> None:
        self.recorder.record(pod, WARNING, POLICY_DENIED, "Issue", f"PermissionDenied: {message}")

    def renewal_failed(self, pod: ObjectRef, message: str, failures: int) -> None:
        # The note of a series is fixed by its first occurrence; the count says how many followed.
        self.recorder.record(
            pod,
            WARNING,
            RENEWAL_FAILED,
            "Renew",
            f"renewal failed; the current certificate stays in place and the agent retries with "
            f"backoff: {message}",
        )

    def renewal_recovered(
        self, pod: ObjectRef, failures: int, serial: str, not_after: float
    ) -> None:
        self.recorder.record(
            pod,
            NORMAL,
            RENEWED,
            "Renew",
            f"certificate renewed after {failures} failed attempt{'s' if failures != 1 else ''}: "
            f"serial {serial}, valid until {_when(not_after)}",
        )

    def expiring(self, pod: ObjectRef, not_after: float, window_start: float, message: str) -> None:
        self.recorder.record(
            pod,
            WARNING,
            EXPIRING,
            "Renew",
            f"the certificate expires at {_when(not_after)} and is inside its renew-before window "
            f"(since {_when(window_start)}) without a successful renewal; last error: {message}",
        )


def _code_name(code: str) -> str:
    """INVALID_ARGUMENT -> InvalidArgument, as kubelet prints gRPC codes."""
    return "".join(part.capitalize() for part in code.split("_"))


def _when(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
