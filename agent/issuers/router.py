"""Picks the issuer a volume's IssuerRef names: the local CA or cert-manager."""

from __future__ import annotations

from agent.errors import FailedPrecondition
from agent.issuers.base import Issuer
from agent.spec.model import IssuerRef


class IssuerRouter:
    def __init__(self, local: Issuer, cert_manager: Issuer | None = None) -> None:
        self.local = local
        self.cert_manager = cert_manager

    def for_ref(self, ref: IssuerRef) -> Issuer:
        if ref.is_local:
            return self.local
        if self.cert_manager is None:
            raise FailedPrecondition(
                f"issuer {ref.describe()} is a cert-manager issuer, but this agent runs without "
                "Kubernetes access (--standalone); remove issuer-name to use the agent's local CA"
            )
        return self.cert_manager

    def forget(self, volume_id: str) -> None:
        """Tell issuers that keep per-volume state that the volume is gone."""
        forget = getattr(self.cert_manager, "forget", None)
        if forget is not None:
            forget(volume_id)

    def ready(self) -> tuple[bool, str]:
        return self.local.ready()
