"""A socketserver loop that sleeps until a connection or a stop, instead of polling.

``socketserver.BaseServer.serve_forever`` wakes every ``poll_interval`` (0.5 s) to notice a
``shutdown()``: an idle agent woke twice a second per server for nothing, and a SIGTERM waited up
to half a second per server (two servers: most of the 1 s stop budget). Here a pipe wakes the loop
the moment ``shutdown()`` is called, and nothing else wakes it but a client.
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socketserver
import threading


class PromptShutdownMixin(socketserver.TCPServer):
    """Put before the server class: ``class S(PromptShutdownMixin, HTTPServer)`` (any TCPServer,
    UNIX ones included)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        self._wake_read, self._wake_write = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._stop_requested = False
        self._loop_done = threading.Event()
        self._loop_done.set()  # no loop running: shutdown() has nothing to wait for
        try:
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        except BaseException:
            self._close_pipe()
            raise

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        del poll_interval  # never polls
        self._loop_done.clear()
        try:
            with selectors.DefaultSelector() as selector:
                selector.register(self.fileno(), selectors.EVENT_READ)
                selector.register(self._wake_read, selectors.EVENT_READ)
                while not self._stop_requested:
                    ready = selector.select()
                    if self._stop_requested:
                        break
                    if any(key.fd == self.fileno() for key, _ in ready):
                        self._accept_one()
        finally:
            self._loop_done.set()

    def _accept_one(self) -> None:
        # What BaseServer._handle_request_noblock does (not part of its typed interface).
        try:
            request, client_address = self.get_request()
        except OSError:
            return
        if not self.verify_request(request, client_address):
            self.shutdown_request(request)
            return
        try:
            self.process_request(request, client_address)
        except Exception:
            self.handle_error(request, client_address)
            self.shutdown_request(request)
        except BaseException:
            self.shutdown_request(request)
            raise

    def shutdown(self) -> None:
        """Stop the loop and wait for it; returns at once if it is not running."""
        self._stop_requested = True
        if self._wake_write >= 0:
            with contextlib.suppress(BlockingIOError):  # a wake-up byte is already waiting
                os.write(self._wake_write, b"\0")
        self._loop_done.wait()

    def server_close(self) -> None:
        super().server_close()
        self._close_pipe()

    def _close_pipe(self) -> None:
        # -1 afterwards: a later shutdown() must not write into a descriptor number reused since.
        fds, self._wake_read, self._wake_write = (self._wake_read, self._wake_write), -1, -1
        for fd in fds:
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
