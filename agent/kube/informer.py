"""One list+watch of a set of objects, kept in memory: the agent's small informer.

The loop (list, watch, relist on 410, backoff) is ``kube/list_watch.ListWatch``. ``on_change``
gets the whole current set after the initial list, after every relist and after every event, so
consumers compute their state from a snapshot and never depend on seeing each event.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from agent.errors import AgentError
from agent.kube.client import backoff_delay
from agent.kube.list_watch import WATCH_SECONDS, ListWatch
from agent.kube.rest import ApiClient

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Snapshot = dict[str, Obj]  # "namespace/name" (or "name") -> object


def object_key(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace")
    return f"{namespace}/{meta.get('name')}" if namespace else str(meta.get("name"))


class Informer(ListWatch):
    """Keeps ``snapshot()`` equal to the collection at ``path`` (narrowed by the selectors),
    via one watch."""

    def __init__(
        self,
        api: ApiClient,
        path: str,
        *,
        what: str,
        on_change: Callable[[Snapshot], None],
        name: str,
        field_selector: str | None = None,
        label_selector: str | None = None,
        watch_seconds: int = WATCH_SECONDS,
        backoff: Callable[[int], float] = backoff_delay,
    ) -> None:
        selectors: dict[str, str | int | bool] = {}
        if field_selector:
            selectors["fieldSelector"] = field_selector
        if label_selector:
            selectors["labelSelector"] = label_selector
        super().__init__(
            api,
            path,
            params=selectors,
            what=what,
            name=name,
            watch_seconds=watch_seconds,
            backoff=backoff,
        )
        self._on_change = on_change
        self._objects: Snapshot = {}
        self._lock = threading.Lock()
        self._synced = threading.Event()
        # Set when the list succeeded or failed for good (403, 404): a waiter need not wait
        # through the retries of a transient failure (429, 5xx, a dropped connection) for that.
        self._attempted = threading.Event()

    def wait_first_list(self, timeout: float) -> bool:
        """Block until the first list succeeded (True), failed for good, or ``timeout``."""
        self._attempted.wait(timeout)
        return self._synced.is_set()

    @property
    def synced(self) -> bool:
        return self._synced.is_set()

    def snapshot(self) -> Snapshot:
        with self._lock:
            return dict(self._objects)

    # ---- what the loop hands over

    def _fail(self, error: AgentError, *, retryable: bool) -> None:
        if not retryable:
            self._attempted.set()
        super()._fail(error, retryable=retryable)

    def _take_list(self, items: list[Obj], arrived: float) -> None:
        objects = {object_key(obj): obj for obj in items}
        with self._lock:
            self._objects = objects
        self._notify()  # before the events: a waiter must find the consumer's state current
        self._synced.set()
        self._attempted.set()

    def _take_event(self, kind: str, obj: Obj, arrived: float) -> None:
        if kind in ("ADDED", "MODIFIED"):
            with self._lock:
                self._objects[object_key(obj)] = obj
        elif kind == "DELETED":
            with self._lock:
                self._objects.pop(object_key(obj), None)
        else:
            return  # BOOKMARK: only a version
        self._notify()

    def _notify(self) -> None:
        try:
            self._on_change(self.snapshot())
        except Exception:
            log.exception("watch consumer failed", extra={"what": self.what})
