"""The issuance policy at the volume manager: one check before any key is made.

Called for a volume's first issue (before its metadata exists) and for every renewal, inside
the manager's attempt, which counts a denial as a failed attempt with reason ``policy``. A
denial is raised as PERMISSION_DENIED; at a renewal it is logged as an error (the served
certificate stays and runs out unless the policy or the pod changes), at a publish as a
warning (the pod author sees the message in the pod's events).
"""

from __future__ import annotations

import logging
from dataclasses import replace

from agent.pki.policy import PolicyChecker, PolicyRequest, PolicyViolation
from agent.spec.model import DEFAULT_DURATION_SECONDS, CertificateSpec, PodInfo

log = logging.getLogger(__name__)


def apply_policy(
    policy: PolicyChecker, spec: CertificateSpec, pod: PodInfo, operation: str
) -> CertificateSpec:
    """Check ``spec`` for ``pod``; return the spec to issue or raise PolicyViolation.

    A spec without a duration of its own gets the allowing rule's max-duration when that is
    shorter than the default, so the rule caps the lifetime instead of refusing the volume.
    """
    try:
        decision = policy.check(PolicyRequest.from_spec(pod, spec))
    except PolicyViolation as exc:
        log.log(
            logging.ERROR if operation == "renew" else logging.WARNING,
            "%s denied by the issuance policy: %s",
            operation,
            exc.message,
            extra={"pod": pod.name, "namespace": pod.namespace, "rule": exc.rule},
        )
        raise
    log.debug(
        "issuance policy allows the request",
        extra={"pod": pod.name, "namespace": pod.namespace, "rule": decision.rule},
    )
    cap = decision.max_duration_seconds
    if cap is not None and spec.duration_seconds is None:
        return replace(spec, duration_seconds=min(DEFAULT_DURATION_SECONDS, cap))
    return spec
