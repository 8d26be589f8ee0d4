"""Where a trust bundle comes from (kept apart from the watches, which need the HTTP
client: a standalone agent imports this without paying for that import at start)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BundleSource:
    """Where a bundle comes from; equal sources share one watch."""

    kind: str  # "configmap", "cluster" or "signer" (agent.spec.model.TrustBundleKind values)
    namespace: str = ""
    name: str = ""
    key: str = ""
    signer_name: str = ""
    label_selector: str = ""

    def describe(self) -> str:
        if self.kind == "configmap":
            return f"ConfigMap {self.namespace}/{self.name} key {self.key}"
        if self.kind == "cluster":
            return f"ClusterTrustBundle {self.name}"
        labels = f" with labels {self.label_selector}" if self.label_selector else ""
        return f"ClusterTrustBundles of signer {self.signer_name}{labels}"
