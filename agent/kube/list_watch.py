"""The list+watch loop every watch of the agent runs (the informer, the PCR watch).

List, then watch from the list's resourceVersion; on 410 Gone list again (after a backoff when
the watch from a fresh list is already gone); on a dropped connection watch again from the last
version seen; on errors back off (full jitter, capped). Every request goes through the agent's
rate-limited client. Subclasses say what a list and an event mean (``_take_list``,
``_take_event``) and how a failure is told.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from agent.errors import AgentError
from agent.kube.client import backoff_delay, is_retryable, map_api_error
from agent.kube.rest import ApiClient, KubeApiError, KubeUnreachable, Watch

log = logging.getLogger(__name__)

Obj = dict[str, Any]
WATCH_SECONDS = 300  # server-side timeout of one watch; then we simply watch again


class ListWatch:
    """One thread listing and watching the collection at ``path``, narrowed by ``params``."""

    # How long stop() cuts the watch and waits for the thread; a daemon thread still stuck in
    # a list request after that is left behind: a stop must not wait for the API.
    stop_wait_seconds = 1.0

    def __init__(
        self,
        api: ApiClient,
        path: str,
        *,
        params: Mapping[str, str | int | bool],
        what: str,
        name: str,
        watch_seconds: int = WATCH_SECONDS,
        backoff: Callable[[int], float] = backoff_delay,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._path = path
        self._params = dict(params)
        self.what = what  # "list pods with fieldSelector spec.nodeName=node-1": names the verb
        self.name = name
        self._watch_seconds = watch_seconds
        self._backoff = backoff
        self._clock = clock
        self._resource_version: str | None = None
        self._stop = threading.Event()
        self._watcher: Watch | None = None
        self._thread: threading.Thread | None = None
        self.last_error: AgentError | None = None
        self.lists = 0  # successful lists: 1 + relists after 410, for tests and logs

    @property
    def relists(self) -> int:
        """Lists after the first (410 Gone), for tests and logs."""
        return max(0, self.lists - 1)

    # ---- what a subclass says

    def _take_list(self, items: list[Obj], arrived: float) -> None:
        """The listed objects (``arrived``: the clock when the list came back)."""
        raise NotImplementedError

    def _take_event(self, kind: str, obj: Obj, arrived: float) -> None:
        """One watch event (BOOKMARKs included; their object carries only a version)."""
        raise NotImplementedError

    def _api_error(self, exc: KubeApiError) -> AgentError:
        return map_api_error(exc, self.what)

    def _dropped(self, exc: Exception) -> None:
        """The watch connection dropped or could not be made; the loop watches again."""
        self._fail(map_api_error(exc, self.what), retryable=True)

    def _fail(self, error: AgentError, *, retryable: bool) -> None:
        self.last_error = error
        level = logging.INFO if retryable else logging.ERROR
        log.log(level, "list/watch failed", extra={"what": self.what, "error": error.message})

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
        # getting the response, when there is nothing to cut yet).
        deadline = time.monotonic() + self.stop_wait_seconds
        while thread.is_alive() and time.monotonic() < deadline:
            watcher = self._watcher
            if watcher is not None:
                watcher.stop()  # also shuts the socket down
            thread.join(0.05)

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
                    if not listed:
                        log.info("watch expired, listing again", extra={"what": self.what})
                        continue
                    # Gone even from the version a list just gave: listing again at once would
                    # loop as fast as the server answers, so back off like any failure.
                self._fail(self._api_error(exc), retryable=is_retryable(exc) or exc.status == 410)
            except (KubeUnreachable, ConnectionError, TimeoutError) as exc:
                self._dropped(exc)
            except AgentError as exc:
                self._fail(exc, retryable=True)
            except Exception:
                log.exception("watch failed", extra={"what": self.what})
            if self._stop.wait(self._backoff(failures)):
                return
            failures += 1

    def _list(self) -> None:
        body = self._api.get(self._path, self._params)
        arrived = self._clock()
        self.lists += 1
        self.last_error = None
        self._take_list(body.get("items") or [], arrived)
        self._resource_version = (body.get("metadata") or {}).get("resourceVersion")

    def _watch(self) -> None:
        watcher = self._api.watch(
            self._path,
            params=self._params,
            resource_version=self._resource_version,
            timeout_seconds=self._watch_seconds,
        )
        self._watcher = watcher
        try:
            if self._stop.is_set():
                return  # stop() may have run before the watcher existed
            for event in watcher:
                arrived = self._clock()
                if self._stop.is_set():
                    return
                obj = event.get("object") or {}
                self._take_event(str(event.get("type")), obj, arrived)
                version = (obj.get("metadata") or {}).get("resourceVersion")
                if version:
                    self._resource_version = version  # BOOKMARKs carry only this
        finally:
            self._watcher = None
