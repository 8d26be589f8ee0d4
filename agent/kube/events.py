"""Kubernetes Events (``events.k8s.io/v1``) on the objects the agent works for: best effort.

``EventRecorder.record`` never blocks and never raises: it decides under a lock, in memory, what
to write, and a single writer thread sends it. What it decides follows client-go's
``tools/events`` recorder:

- Isomorphic events (same regarding object, type, reason and action) form a *series*: the first
  is created, repeats raise ``series.count`` and are written as a patch of ``series`` (the note
  is immutable, so it stays the first occurrence's). A series nobody repeats for
  ``FINISH_SECONDS`` ends: its final count is written and the next occurrence starts a new Event.
- Two token buckets bound the writes, so a storm of failures cannot flood the API server: one per
  regarding object (client-go's spam filter: a burst of 25, then one per 5 minutes) and one for
  the whole agent. A repeat that a bucket refuses is still counted; a later write (the next
  occurrence, or ``flush``, which the writer thread runs periodically) carries the full count.
- The queue to the writer is bounded; when it is full the write is skipped (counted in
  ``dropped``) and the series stays pending for the next flush.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

log = logging.getLogger(__name__)

Clock = Callable[[], float]

NORMAL = "Normal"
WARNING = "Warning"
# Server-side limits (k8s.io/kubernetes/pkg/apis/core/validation/events.go).
NOTE_LIMIT_BYTES = 1024
FIELD_LIMIT = 128
# client-go tools/events: a series ends after 6 minutes without a repeat.
FINISH_SECONDS = 6 * 60
# client-go tools/record spam filter defaults, per regarding object.
OBJECT_BURST = 25
OBJECT_REFILL_SECONDS = 300.0
# The whole agent: a burst for a node-wide incident, then a trickle.
AGENT_BURST = 50
AGENT_QPS = 1.0
QUEUE_SIZE = 256
FLUSH_INTERVAL_SECONDS = 30.0
# Buckets of objects that have been quiet long enough are full again: forget them, bounded.
MAX_TRACKED_OBJECTS = 10_000


class ObjectRef(Protocol):
    """The regarding object: a Pod (``agent.spec.model.PodInfo`` fits)."""

    @property
    def name(self) -> str: ...

    @property
    def namespace(self) -> str: ...

    @property
    def uid(self) -> str: ...


@dataclass
class _Series:
    namespace: str
    name: str  # the Event object's name
    body: dict[str, Any]  # what the first create sends (without series)
    count: int = 1
    last_observed: float = 0.0
    written: int = 0  # the count the last queued write carried (0: never queued)
    created: bool = False


@dataclass
class _Write:
    namespace: str
    name: str
    body: dict[str, Any]  # the full object, used for a create (or a re-create after 404)
    series: dict[str, Any] | None  # set: patch this series onto the existing object


@dataclass
class RecorderStats:
    written: int = 0
    failed: int = 0
    dropped: int = 0  # the queue was full
    limited: int = 0  # a token bucket said no (the occurrence still counts in its series)
    last_error: str = ""
    by_reason: dict[str, int] = field(default_factory=dict)


class _Buckets:
    """Token buckets keyed by object, on an injected clock; never sleeps."""

    def __init__(self, burst: float, per_second: float, clock: Clock, limit: int) -> None:
        self.burst = burst
        self.per_second = per_second
        self._clock = clock
        self._limit = limit
        self._state: OrderedDict[object, tuple[float, float]] = OrderedDict()

    def take(self, key: object) -> bool:
        now = self._clock()
        tokens, stamp = self._state.pop(key, (self.burst, now))
        tokens = min(self.burst, tokens + max(0.0, now - stamp) * self.per_second)
        allowed = tokens >= 1.0
        if allowed:
            tokens -= 1.0
        self._state[key] = (tokens, now)
        while len(self._state) > self._limit:
            self._state.popitem(last=False)  # the longest untouched: its bucket refilled most
        return allowed

    def available(self, key: object) -> bool:
        now = self._clock()
        tokens, stamp = self._state.get(key, (self.burst, now))
        return min(self.burst, tokens + max(0.0, now - stamp) * self.per_second) >= 1.0


class EventRecorder:
    """Writes Events about pods through ``api`` (the agent's ``kube.rest.ApiClient``)."""

    def __init__(
        self,
        api: Any,
        *,
        controller: str,
        instance: str,
        clock: Clock = time.time,
        object_burst: int = OBJECT_BURST,
        object_refill_seconds: float = OBJECT_REFILL_SECONDS,
        agent_burst: int = AGENT_BURST,
        agent_qps: float = AGENT_QPS,
        queue_size: int = QUEUE_SIZE,
        flush_interval_seconds: float = FLUSH_INTERVAL_SECONDS,
        on_result: Callable[[str], None] | None = None,
    ) -> None:
        self.api = api
        self.controller = controller[:FIELD_LIMIT]
        self.instance = instance[:FIELD_LIMIT]
        self.clock = clock
        self.stats = RecorderStats()
        # Told "written", "failed", "dropped" or "limited" (the agent counts them on /metrics).
        self._on_result = on_result
        self._objects = _Buckets(
            object_burst, 1.0 / object_refill_seconds, clock, MAX_TRACKED_OBJECTS
        )
        self._agent = _Buckets(agent_burst, agent_qps, clock, 1)
        self._queue: queue.Queue[_Write | None] = queue.Queue(maxsize=queue_size)
        self._flush_interval = flush_interval_seconds
        self._lock = threading.Lock()
        self._series: dict[tuple[str, str, str, str, str], _Series] = {}
        self._sequence = 0
        self._idle = threading.Condition(self._lock)
        self._in_flight = 0
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------ public

    def record(self, regarding: ObjectRef, type_: str, reason: str, action: str, note: str) -> None:
        """Note one occurrence; queue a write if the rate limits allow. Never blocks or raises."""
        try:
            self._record(regarding, type_, reason, action, note)
        except Exception:  # best effort: an event must never break a publish or a renewal
            log.exception("could not record an event", extra={"reason": reason})

    def flush(self) -> None:
        """Write pending series counts the buckets now allow; end series quiet for too long."""
        try:
            with self._lock:
                now = self.clock()
                for key, series in list(self._series.items()):
                    if series.written != series.count:
                        self._try_write(series, key[1])
                    if now - series.last_observed >= FINISH_SECONDS and (
                        series.written == series.count
                    ):
                        del self._series[key]
        except Exception:
            log.exception("could not flush events")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="cert-agent-events", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 2.0) -> None:
        self._stopping.set()
        # When the queue is full the writer sees _stopping after its current write.
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def wait_idle(self, timeout: float = 10.0) -> bool:
        """Block until every queued write is done (tests; the agent never waits)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._in_flight:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    # ---------------------------------------------------------------------------- deciding

    def _record(
        self, regarding: ObjectRef, type_: str, reason: str, action: str, note: str
    ) -> None:
        object_key = regarding.uid or f"{regarding.namespace}/{regarding.name}"
        key = (regarding.namespace, object_key, type_, reason, action)
        with self._lock:
            now = self.clock()
            series = self._series.get(key)
            if series is not None and now - series.last_observed >= FINISH_SECONDS:
                # The old series ended: write its final count if it is pending, start anew.
                if series.written != series.count:
                    self._try_write(series, object_key)
                series = None
            if series is None:
                series = self._new_series(regarding, type_, reason, action, note, now)
                self._series[key] = series
            else:
                series.count += 1
                series.last_observed = now
            self.stats.by_reason[reason] = self.stats.by_reason.get(reason, 0) + 1
            self._try_write(series, object_key)

    def _new_series(
        self, regarding: ObjectRef, type_: str, reason: str, action: str, note: str, now: float
    ) -> _Series:
        self._sequence += 1
        # client-go names events <regarding name>.<hex nanoseconds>; the sequence keeps two
        # events recorded in the same nanosecond (a fake clock) apart.
        name = f"{regarding.name}.{int(now * 1e9) + self._sequence:x}"[:253]
        body = {
            "apiVersion": "events.k8s.io/v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": regarding.namespace},
            "eventTime": micro_time(now),
            "reportingController": self.controller,
            "reportingInstance": self.instance,
            "action": action[:FIELD_LIMIT],
            "reason": reason[:FIELD_LIMIT],
            "type": type_,
            "note": truncate_note(note),
            "regarding": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": regarding.name,
                "namespace": regarding.namespace,
                **({"uid": regarding.uid} if regarding.uid else {}),
            },
        }
        return _Series(regarding.namespace, name, body, last_observed=now)

    def _try_write(self, series: _Series, object_key: str) -> None:
        """Queue a write of ``series`` as it stands if the buckets and the queue allow (locked)."""
        if not (self._objects.available(object_key) and self._agent.available(None)):
            self.stats.limited += 1
            self._tell("limited")
            return
        series_field = None
        if series.count > 1:
            series_field = {
                "count": series.count,
                "lastObservedTime": micro_time(series.last_observed),
            }
        body = dict(series.body)
        if series_field is not None:
            body["series"] = series_field
        write = _Write(
            series.namespace, series.name, body, series_field if series.created else None
        )
        try:
            self._queue.put_nowait(write)
        except queue.Full:
            self.stats.dropped += 1
            self._tell("dropped")
            return
        self._objects.take(object_key)
        self._agent.take(None)
        self._in_flight += 1
        series.created = True
        series.written = series.count

    # ----------------------------------------------------------------------------- writing

    def _run(self) -> None:
        next_flush = time.monotonic() + self._flush_interval
        while not self._stopping.is_set():
            try:
                write = self._queue.get(timeout=max(0.0, next_flush - time.monotonic()))
            except queue.Empty:
                write = None
                if self._stopping.is_set():
                    return
            if write is not None:
                self._send(write)
            elif self._stopping.is_set():
                return
            if time.monotonic() >= next_flush:
                self.flush()
                next_flush = time.monotonic() + self._flush_interval

    def drain(self) -> None:
        """Send everything queued now, in this thread (tests drive the writer this way)."""
        while True:
            try:
                write = self._queue.get_nowait()
            except queue.Empty:
                return
            if write is not None:
                self._send(write)

    def _send(self, write: _Write) -> None:
        try:
            self._write(write)
            self.stats.written += 1
            self._tell("written")
        except Exception as exc:
            self.stats.failed += 1
            self._tell("failed")
            self.stats.last_error = str(exc)[:300]
            log.debug("could not write an event: %s", exc, extra={"event": write.name})
        finally:
            with self._idle:
                self._in_flight -= 1
                self._idle.notify_all()

    def _tell(self, result: str) -> None:
        if self._on_result is not None:
            try:
                self._on_result(result)
            except Exception:
                log.exception("event result callback failed")

    def _write(self, write: _Write) -> None:
        # Imported on first use: a standalone agent never loads the HTTP stack.
        from agent.kube.rest import MERGE_PATCH, KubeApiError

        collection = f"/apis/events.k8s.io/v1/namespaces/{write.namespace}/events"
        if write.series is not None:
            try:
                self.api.request(
                    "PATCH",
                    f"{collection}/{write.name}",
                    body={"series": write.series},
                    content_type=MERGE_PATCH,
                )
                return
            except KubeApiError as exc:
                if exc.status != 404:
                    raise
                # The first write was dropped or the Event aged out: create it whole.
        self.api.request("POST", collection, body=write.body)


def micro_time(epoch: float) -> str:
    """A Kubernetes MicroTime: RFC 3339 with microseconds, UTC."""
    when = dt.datetime.fromtimestamp(epoch, dt.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def truncate_note(note: str) -> str:
    """At most NOTE_LIMIT_BYTES of UTF-8, cut on a character boundary, marked when cut."""
    data = note.encode()
    if len(data) <= NOTE_LIMIT_BYTES:
        return note
    marker = " [truncated]"
    cut = data[: NOTE_LIMIT_BYTES - len(marker)].decode("utf-8", "ignore")
    return cut + marker
