"""Where the node CA lives between restarts: a directory on the agent's own tmpfs.

``node-ca.json`` (0600) holds the node key, the issued chain and the root together, written
atomically, so a crash never pairs a certificate with the wrong key. ``pending.key`` (0600) is
the key of a request still in flight: a restart reuses it, and with it the pending
CertificateRequest. Nothing here ever reaches a disk or a pod volume.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from agent.pki.ca import write_atomic

log = logging.getLogger(__name__)

STATE_FILE = "node-ca.json"
PENDING_KEY_FILE = "pending.key"
PRIVATE = 0o600


@dataclass(frozen=True)
class StoredNodeCA:
    key_pem: bytes
    chain_pem: bytes
    ca_pem: bytes
    request: str  # namespace/name of the CertificateRequest it came from ("" when unknown)
    issuer: str  # IssuerRef.describe() of the issuer that signed it


class NodeCAStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def prepare(self) -> None:
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.directory, 0o700)

    def load(self) -> StoredNodeCA | None:
        path = self.directory / STATE_FILE
        try:
            data = json.loads(path.read_text())
            return StoredNodeCA(
                key_pem=data["key"].encode(),
                chain_pem=data["chain"].encode(),
                ca_pem=data["ca"].encode(),
                request=str(data.get("request", "")),
                issuer=str(data.get("issuer", "")),
            )
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring an unreadable stored node CA", extra={"error": str(exc)[:200]})
            return None

    def save(self, stored: StoredNodeCA) -> None:
        data = {
            "key": stored.key_pem.decode(),
            "chain": stored.chain_pem.decode(),
            "ca": stored.ca_pem.decode(),
            "request": stored.request,
            "issuer": stored.issuer,
        }
        write_atomic(self.directory / STATE_FILE, json.dumps(data).encode(), PRIVATE)

    def load_pending_key(self) -> bytes | None:
        try:
            return (self.directory / PENDING_KEY_FILE).read_bytes()
        except FileNotFoundError:
            return None

    def save_pending_key(self, key_pem: bytes) -> None:
        write_atomic(self.directory / PENDING_KEY_FILE, key_pem, PRIVATE)

    def clear_pending_key(self) -> None:
        (self.directory / PENDING_KEY_FILE).unlink(missing_ok=True)
