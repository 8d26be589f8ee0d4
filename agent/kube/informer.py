"""One list+watch of a set of objects, kept in memory: the agent's small informer.

List, then watch from the list's resourceVersion; on 410 Gone list again (after a backoff when
the watch from a fresh list is already gone); on a dropped
connection watch again from the last version seen; on errors back off (full jitter, capped).
Every request goes through the agent's rate-limited client. ``on_change`` gets the whole
current set after the initial list, after every relist and after every event, so consumers
compute their state from a snapshot and never depend on seeing each event.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from agent.errors import AgentError
from agent.kube.client import backoff_delay, is_retryable, map_api_error
from agent.kube.rest import ApiClient, KubeApiError, KubeUnreachable, Watch

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Snapshot = dict[str, Obj]  # "namespace/name" (or "name") -> object
WATCH_SECONDS = 300  # server-side timeout of one watch; then we simply watch again


def object_key(obj: Obj) -> str:
    meta = obj.get("metadata") or {}
    namespace = meta.get("namespace")
    return f"{namespace}/{meta.get('name')}" if namespace else str(meta.get("name"))


class Informer:
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
        self._api = api
        self._path = path
        self._selectors: dict[str, str | int | bool] = {}
        if field_selector:
            self._selectors["fieldSelector"] = field_selector
        if label_selector:
            self._selectors["labelSelector"] = label_selector
        self.what = what  # "list pods with fieldSelector spec.nodeName=node-1": names the verb
        self.name = name
        self._on_change = on_change
        self._watch_seconds = watch_seconds
        self._backoff = backoff
        self._objects: Snapshot = {}
        self._resource_version: str | None = None
        self._lock = threading.Lock()
        self._synced = threading.Event()
        # Set when the list succeeded or failed for good (403, 404): a waiter need not wait
        # through the retries of a transient failure (429, 5xx, a dropped connection) for that.
        self._attempted = threading.Event()
        self._stop = threading.Event()
        self._watcher: Watch | None = None
        self._thread: threading.Thread | None = None
        self.last_error: AgentError | None = None
        self.relists = 0  # lists after the first (410 Gone), for tests and logs

    # ---- lifecycle

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is None:
            return
        # Cut the watch's socket until the thread notices (it may be between connecting and
        # getting the response, when there is nothing to cut yet). A daemon thread still stuck
        # in a list request after a second is left behind: a stop must not wait for the API.
        deadline = time.monotonic() + 1
        while thread.is_alive() and time.monotonic() < deadline:
            watcher = self._watcher
            if watcher is not None:
                watcher.stop()  # also shuts the socket down
            thread.join(0.05)

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

    # ---- the loop

    def _run(self) -> None:
        failures = 0
        while not self._stop.is_set():
            listed = False
            try:
                if self._resource_version is None:
                    self._list()
                    listed = True
                self._watch()
                failures = 0
                continue
            except KubeApiError as exc:
                if exc.status == 410:
                    self._resource_version = None
                    self.relists += 1
                    if not listed:
                        log.info("watch expired, listing again", extra={"what": self.what})
                        continue
                    # Gone even from the version a list just gave: listing again at once would
                    # loop as fast as the server answers, so back off like any failure.
                self._fail(
                    map_api_error(exc, self.what), retryable=is_retryable(exc) or exc.status == 410
                )
            except (KubeUnreachable, ConnectionError, TimeoutError) as exc:
                self._fail(map_api_error(exc, self.what), retryable=True)
            except AgentError as exc:
                self._fail(exc, retryable=True)
            except Exception:
                log.exception("watch failed", extra={"what": self.what})
            if self._stop.wait(self._backoff(failures)):
                return
            failures += 1

    def _fail(self, error: AgentError, *, retryable: bool) -> None:
        self.last_error = error
        if not retryable:
            self._attempted.set()
        level = logging.INFO if retryable else logging.ERROR
        log.log(level, "list/watch failed", extra={"what": self.what, "error": error.message})

    def _list(self) -> None:
        body = self._api.get(self._path, self._selectors)
        objects = {object_key(obj): obj for obj in body.get("items") or []}
        with self._lock:
            self._objects = objects
        self._resource_version = (body.get("metadata") or {}).get("resourceVersion")
        self.last_error = None
        self._notify()  # before the events: a waiter must find the consumer's state current
        self._synced.set()
        self._attempted.set()

    def _watch(self) -> None:
        watcher = self._api.watch(
            self._path,
            params=self._selectors,
            resource_version=self._resource_version,
            timeout_seconds=self._watch_seconds,
        )
        self._watcher = watcher
        try:
            if self._stop.is_set():
                return  # stop() may have run before the watcher existed
            for event in watcher:
                if self._stop.is_set():
                    return
                kind, obj = event.get("type"), event.get("object") or {}
                version = (obj.get("metadata") or {}).get("resourceVersion")
                if kind in ("ADDED", "MODIFIED"):
                    with self._lock:
                        self._objects[object_key(obj)] = obj
                elif kind == "DELETED":
                    with self._lock:
                        self._objects.pop(object_key(obj), None)
                if version:
                    self._resource_version = version  # BOOKMARKs carry only this
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._notify()
        finally:
            self._watcher = None

    def _notify(self) -> None:
        try:
            self._on_change(self.snapshot())
        except Exception:
            log.exception("watch consumer failed", extra={"what": self.what})
