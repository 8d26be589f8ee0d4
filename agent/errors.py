"""Errors that carry the gRPC status a CSI caller must see.

The pure modules raise these without importing grpc; the servicers turn ``code`` (the name of a
``grpc.StatusCode``) into the status. Messages are shown to pod authors in ``kubectl describe pod``,
so they say what was wrong and what to do, and never contain key material.
"""

# Request input quoted in a message is cut to this many characters: gRPC status details travel
# in HTTP/2 headers (clients refuse more than a few KiB) and kubelet events are short.
MAX_QUOTED_CHARS = 128


def shorten(value: str, limit: int = MAX_QUOTED_CHARS) -> str:
    """``value`` as quoted in an error message: whole when short, else its start and its size."""
    if len(value) <= limit:
        return value
    size = len(value.encode("utf-8", "surrogatepass"))
    return f"{value[:limit]}\u2026({size} bytes)"


class AgentError(Exception):
    """Base class: a failure with a gRPC status code name and a user-facing message."""

    code = "INTERNAL"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    # Short machine-readable reason used as a metrics label (no user data in it).
    @property
    def reason(self) -> str:
        return self.code.lower()


class InvalidArgument(AgentError):
    """A missing or invalid request field or volume attribute."""

    code = "INVALID_ARGUMENT"

    def __init__(self, message: str, attribute: str | None = None) -> None:
        super().__init__(message)
        self.attribute = attribute


class AlreadyExists(AgentError):
    """The volume is already published at that target with different arguments."""

    code = "ALREADY_EXISTS"


class Aborted(AgentError):
    """Another operation on the same volume is in progress; the caller retries."""

    code = "ABORTED"


class FailedPrecondition(AgentError):
    """The agent or issuer is not in a state to serve this request."""

    code = "FAILED_PRECONDITION"


class PermissionDenied(AgentError):
    """The issuer refused (for example a cert-manager request was denied)."""

    code = "PERMISSION_DENIED"


class DeadlineExceeded(AgentError):
    """Issuance did not finish in time; the pending request is kept for the retry."""

    code = "DEADLINE_EXCEEDED"


class Unavailable(AgentError):
    """A dependency (the Kubernetes API, an issuer) cannot be reached right now."""

    code = "UNAVAILABLE"


class IssuanceFailed(AgentError):
    """The issuer tried and failed (cert-manager Failed condition, signing error)."""

    code = "INTERNAL"

    def __init__(self, message: str, reason: str = "failed") -> None:
        super().__init__(message)
        self._reason = reason

    @property
    def reason(self) -> str:
        return self._reason


class ResourceExhausted(AgentError):
    """The node is out of a resource (volume operation slots, tmpfs space); retry later."""

    code = "RESOURCE_EXHAUSTED"


class Internal(AgentError):
    """A bug or an environment failure (disk, mount) the user cannot fix by editing the pod."""

    code = "INTERNAL"
