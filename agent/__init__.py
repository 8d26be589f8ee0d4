"""csi-cert-agent: a CSI node plugin that gives every pod its own TLS key and certificate."""

import time

# Start-up is timed from here (agent/observe/startup.py): the package is imported first.
IMPORTED_AT = time.monotonic()

__version__ = "0.1.0"

# The agent's own issuer group: volumes naming it (or no issuer at all) are signed by the local CA.
AGENT_ISSUER_GROUP = "cert-agent.io"
DEFAULT_DRIVER_NAME = "csi.cert-agent.io"
