"""Recovery on start without making kubelet wait for all of it.

The agent serves as soon as its socket is up; one background thread then lists the volumes on
disk and recovers them (metadata, payload, bind, schedule) one at a time. A kubelet call for a
volume still in the queue recovers that volume at once, in the calling thread, and a call for a
volume the background thread is recovering right now waits for that one volume only (a call
that comes before the listing waits for the listing first). So `Probe` answers within the
start-up time whatever the number of volumes, and no call ever acts on a volume before its
recovery.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable

log = logging.getLogger(__name__)


class RecoveryQueue:
    """Volumes waiting for recovery; ``recover_one(volume_id)`` runs exactly once for each."""

    def __init__(self, recover_one: Callable[[str], None]) -> None:
        self._recover_one = recover_one
        self._lock = threading.Lock()
        self._todo: dict[str, None] = {}  # insertion-ordered set: not started yet
        self._running: dict[str, threading.Event] = {}  # started, not finished
        self._idle = threading.Event()
        self._idle.set()
        # Clear from ``expect`` until ``load``: the volumes on disk are being listed.
        self._listed = threading.Event()
        self._listed.set()
        self._stopping = False
        self.recovered = 0

    def expect(self) -> None:
        """The volumes on disk will be listed and loaded soon (by the background thread, so
        that listing thousands does not delay the socket): until then ``settle`` waits for
        the listing, so no call acts on a volume before it is known to need recovery."""
        with self._lock:
            self._listed.clear()
            self._idle.clear()

    def load(self, volume_ids: Iterable[str]) -> int:
        """Queue ``volume_ids``; returns how many are queued now."""
        with self._lock:
            for volume_id in volume_ids:
                self._todo[volume_id] = None
            if self._todo:
                self._idle.clear()
            elif not self._running:
                self._idle.set()
            self._listed.set()
            return len(self._todo)

    def listed(self) -> None:
        """The listing is over even though ``load`` did not run (it failed): stop waiting."""
        with self._lock:
            self._listed.set()
            if not self._todo and not self._running:
                self._idle.set()

    def pending(self) -> int:
        """Volumes not recovered yet (queued or being recovered)."""
        with self._lock:
            return len(self._todo) + len(self._running)

    def settle(self, volume_id: str) -> None:
        """Make sure ``volume_id`` is recovered before the caller touches it (O(1) when it is)."""
        self._listed.wait()
        with self._lock:
            if volume_id in self._todo:
                del self._todo[volume_id]
                done = self._running[volume_id] = threading.Event()
                mine = True
            elif volume_id in self._running:
                done, mine = self._running[volume_id], False
            else:
                return
        if mine:
            self._run_one(volume_id, done)
        else:
            done.wait()

    def run(self) -> int:
        """Recover every queued volume (the background thread's job); returns how many this
        call recovered itself. Returns early, leaving the rest queued, after ``stop()``."""
        count = 0
        while True:
            with self._lock:
                if self._stopping or not self._todo:
                    break
                volume_id = next(iter(self._todo))
                del self._todo[volume_id]
                done = self._running[volume_id] = threading.Event()
            self._run_one(volume_id, done)
            count += 1
        return count

    def wait(self, timeout: float | None = None) -> bool:
        """Block until nothing is queued or running; False on timeout."""
        return self._idle.wait(timeout)

    def stop(self) -> None:
        with self._lock:
            self._stopping = True
            self._listed.set()  # no call waits for a listing that will not come

    @property
    def stopping(self) -> bool:
        with self._lock:
            return self._stopping

    def _run_one(self, volume_id: str, done: threading.Event) -> None:
        try:
            self._recover_one(volume_id)
        except Exception:
            log.exception("could not recover volume", extra={"volume_id": volume_id})
        finally:
            with self._lock:
                del self._running[volume_id]
                self.recovered += 1
                if not self._todo and not self._running:
                    self._idle.set()
            done.set()


def run_in_background(
    queue: RecoveryQueue,
    on_done: Callable[[int, float], None],
    list_volumes: Callable[[], Iterable[str]] | None = None,
) -> threading.Thread:
    """Start the thread that empties ``queue``; ``on_done(recovered, seconds)`` at the end.

    With ``list_volumes`` (after ``queue.expect()``), the thread first lists the volumes and
    loads them into the queue."""

    def work() -> None:
        started = time.monotonic()
        if list_volumes is not None:
            try:
                queue.load(list_volumes())
            finally:
                queue.listed()
        queue.run()
        if queue.stopping:
            return
        queue.wait()  # volumes that kubelet calls took over may still be finishing
        on_done(queue.recovered, time.monotonic() - started)

    thread = threading.Thread(target=work, name="cert-agent-recovery", daemon=True)
    thread.start()
    return thread
