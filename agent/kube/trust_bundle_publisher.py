"""``--pcr-publish-trust-bundle``: keep the signer-linked ClusterTrustBundle holding our CA.

A ClusterTrustBundle with ``spec.signerName`` set must be named ``<signer, '/' as ':'>:<suffix>``
(certificates.k8s.io validation); the agent owns ``<prefix>:primary`` and writes the local CA's
trust bundle into it, so pods can project trust with a ``clusterTrustBundle`` volume source
(``signerName`` + ``labelSelector``). Every agent of the DaemonSet holds the same CA, so they all
converge on the same content: the bundle is only written when it differs (no write storm).
Checked at start, whenever ``poke()`` is called (the CA changed) and every ``resync_seconds``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, cast

from agent.errors import Aborted, AgentError
from agent.kube.client import NotFound, with_retries
from agent.kube.rest import ApiClient

log = logging.getLogger(__name__)

Obj = dict[str, Any]
SUFFIX = "primary"
MANAGED_BY = {"app.kubernetes.io/managed-by": "cert-agent"}
RESYNC_SECONDS = 300.0
CALL_SECONDS = 30.0
PATH = "/apis/certificates.k8s.io/v1beta1/clustertrustbundles"


def bundle_name(signer: str) -> str:
    return signer.replace("/", ":") + ":" + SUFFIX


class TrustBundlePublisher:
    def __init__(
        self,
        api: ApiClient,
        signers: tuple[str, ...],
        bundle_pem: Callable[[], bytes],
        *,
        resync_seconds: float = RESYNC_SECONDS,
    ) -> None:
        self._api = api
        self._signers = signers
        self._bundle_pem = bundle_pem
        self._resync = resync_seconds
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.writes = 0  # creates and updates, for tests and logs

    def start(self) -> None:
        """Publish from the publisher's own thread, at once and then on schedule: an API server
        that does not answer never holds up the agent's start."""
        self._wake.set()
        self._thread = threading.Thread(target=self._run, name="pcr-trust-bundle", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)

    def poke(self) -> None:
        """The CA changed: publish now (from the publisher's thread)."""
        self._wake.set()

    def publish_all(self) -> None:
        for signer in self._signers:
            try:
                self.publish(signer)
            except AgentError as exc:
                log.error(
                    "cannot publish the PCR signer's ClusterTrustBundle",
                    extra={"signer": signer, "error": exc.message},
                )

    def publish(self, signer: str) -> bool:
        """Create or correct the bundle; True when it was written."""
        name = bundle_name(signer)
        wanted = self._bundle_pem().decode()
        for _attempt in range(3):
            current = self._get(name)
            body: Obj = {
                "apiVersion": "certificates.k8s.io/v1beta1",
                "kind": "ClusterTrustBundle",
                "metadata": {"name": name, "labels": dict(MANAGED_BY)},
                "spec": {"signerName": signer, "trustBundle": wanted},
            }
            try:
                if current is None:
                    self._call("POST", PATH, body, f'create clustertrustbundles "{name}"')
                else:
                    if (current.get("spec") or {}).get("trustBundle") == wanted:
                        return False
                    labels = dict((current.get("metadata") or {}).get("labels") or {})
                    body["metadata"]["labels"] = {**labels, **MANAGED_BY}
                    body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                    self._call(
                        "PUT", f"{PATH}/{name}", body, f'update clustertrustbundles "{name}"'
                    )
            except Aborted:
                continue  # another node wrote it meanwhile (409): look again
            self.writes += 1
            log.info("published ClusterTrustBundle", extra={"name": name, "signer": signer})
            return True
        return False

    def _get(self, name: str) -> Obj | None:
        try:
            return self._call("GET", f"{PATH}/{name}", None, f'get clustertrustbundles "{name}"')
        except NotFound:
            return None

    def _call(self, method: str, path: str, body: Obj | None, what: str) -> Obj:
        return with_retries(
            lambda: cast(Obj, self._api.request(method, path, body=body, timeout=CALL_SECONDS)),
            what=what,
            deadline=time.monotonic() + CALL_SECONDS,
        )

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self._resync)
            self._wake.clear()
            if self._stop.is_set():
                return
            self.publish_all()
