"""The volume manager: publish, unpublish, renew and recover, one volume at a time.

Every change to a volume happens under that volume's lock. Issuance for a renewal runs outside
the lock (a slow cert-manager issuer must not block an unpublish) and is committed under it only
if the volume still exists. A volume that has served a certificate is never torn down by a
failure: the old files stay until new ones are complete.
"""

from __future__ import annotations

from agent.volumes.ca_rewrites import CARewrites
from agent.volumes.manager_core import (
    MOUNT,
    STORAGE,
    TOKENS_KEY,
    PublishRequest,
    RenewalFailures,
    Scheduler,
)
from agent.volumes.publish import Publishing
from agent.volumes.recover import Recovering
from agent.volumes.renew import Renewing, renew_before_window_start
from agent.volumes.unpublish import Unpublishing

__all__ = [
    "MOUNT",
    "STORAGE",
    "TOKENS_KEY",
    "PublishRequest",
    "RenewalFailures",
    "Scheduler",
    "VolumeManager",
    "renew_before_window_start",
]


class VolumeManager(Publishing, Unpublishing, Renewing, Recovering, CARewrites):
    """Publish, unpublish, renew, recover and CA-file rewrites of the node's volumes.

    Each job lives in its own module; they share the state and steps of ``ManagerCore``
    (``volumes/manager_core.py``) and the key/issuer/commit steps of ``Issuing``
    (``volumes/issue.py``).
    """
