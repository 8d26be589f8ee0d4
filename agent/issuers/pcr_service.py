"""The PodCertificateRequest signer mode: one watch and one signer per ``--pcr-signer-name``,
plus the optional ClusterTrustBundle publisher. Started by ``server.py`` when configured."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from cryptography import x509
from prometheus_client import CollectorRegistry

from agent.issuers.pcr_signer import PcrSigner, PolicyCheck
from agent.kube.pcr_client import PcrClient
from agent.kube.pcr_watch import PcrWatch
from agent.kube.trust_bundle_publisher import TrustBundlePublisher
from agent.observe.pcr_metrics import PcrMetrics
from agent.pki.ca import CAProvider
from agent.spec.pcr import PcrSignerConfig

log = logging.getLogger(__name__)


class PcrService:
    def __init__(
        self,
        api: Any,
        *,
        node: str,
        signers: tuple[PcrSignerConfig, ...],
        ca: CAProvider,
        registry: CollectorRegistry,
        publish_trust_bundle: bool = False,
        policy: PolicyCheck | None = None,
        leaf_guard: Callable[[x509.Name, list[x509.GeneralName]], None] | None = None,
    ) -> None:
        self.metrics = PcrMetrics(registry, tuple(s.signer_name for s in signers))
        client = PcrClient(api)
        self.signers = [
            PcrSigner(
                s,
                node=node,
                api=client,
                ca=ca,
                metrics=self.metrics,
                policy=policy,
                leaf_guard=leaf_guard,
            )
            for s in signers
        ]
        self.watches = [
            PcrWatch(
                client.api,
                node=node,
                signer=signer.signer,
                on_object=signer.on_object,
                on_deleted=signer.on_deleted,
            )
            for signer in self.signers
        ]
        self.publisher = (
            TrustBundlePublisher(api, tuple(s.signer_name for s in signers), ca.trust_bundle_pem)
            if publish_trust_bundle
            else None
        )

    def start(self) -> None:
        if self.publisher is not None:
            self.publisher.start()
        for watch in self.watches:
            watch.start()
        log.info(
            "signing PodCertificateRequests",
            extra={"signers": [s.signer for s in self.signers],
                   "field_selectors": [w.field_selector for w in self.watches]},
        )  # fmt: skip

    def ca_changed(self) -> None:
        if self.publisher is not None:
            self.publisher.poke()

    def stop(self) -> None:
        for watch in self.watches:
            watch.stop()
        for signer in self.signers:
            signer.stop()
        if self.publisher is not None:
            self.publisher.stop()
