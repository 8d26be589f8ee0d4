"""Runs the agent until SIGTERM or SIGINT: signals, start-up interruption, exit codes.

The agent itself is assembled in ``agent_assembly`` (its CA in ``agent_ca``, its other parts in
``agent_parts``, start/stop in ``agent_base``).
"""

from __future__ import annotations

import logging
import signal
import threading

from agent.agent_assembly import Agent
from agent.agent_base import STOP_GRACE_SECONDS, StartupError
from agent.agent_ca import CA_OVERLAP_STATE
from agent.config import AgentConfig
from agent.errors import AgentError

__all__ = [
    "CA_OVERLAP_STATE",
    "STOP_GRACE_SECONDS",
    "Agent",
    "StartupError",
    "describe_failure",
    "serve",
]

log = logging.getLogger(__name__)


class _StopDuringStartup(BaseException):
    """Raised by the signal handler into a start-up blocked in I/O (a BaseException, so no
    ``except Exception`` on the way swallows it); ``Agent.start`` then undoes its work."""


def describe_failure(exc: BaseException) -> str:
    """One line that says what failed, for an operator (no traceback)."""
    if isinstance(exc, AgentError):
        return exc.message
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{exc.strerror}{where}"
    if isinstance(exc, StartupError | RuntimeError | ValueError):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def serve(config: AgentConfig) -> int:
    """Run the agent until SIGTERM/SIGINT. 0 after a stop (in any phase), 1 if it cannot start.

    A signal while starting interrupts whatever start-up is blocked on (a Kubernetes API that
    does not answer, a backoff sleep) at once: the handler raises into the main thread, the
    start is undone, and the process exits 0 like any other requested stop.
    """
    agent = Agent(config)
    done = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if done.is_set():
            return  # already stopping
        done.set()
        if agent.interruptible:
            log.info("received %s during start-up, stopping", name)
            raise _StopDuringStartup(name)
        log.info("received %s, stopping", name)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        agent.start()
    except _StopDuringStartup:
        log.info("agent stopped")
        return 0
    except Exception as exc:
        log.debug("start-up failed", exc_info=True)
        log.error("cannot start: %s", describe_failure(exc))
        return 1
    done.wait()
    agent.stop()
    return 0
