"""The metrics and status servers' loop: no polling while idle, woken by shutdown() at once."""

from __future__ import annotations

import os
import selectors
import socket
import socketserver
import threading
from pathlib import Path
from typing import Any, ClassVar

import pytest

from agent.observe.prompt_shutdown import PromptShutdownMixin


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.sendall(b"hello\n")


class _Server(PromptShutdownMixin, socketserver.UnixStreamServer):
    pass


class _RecordingSelector(selectors.DefaultSelector):  # type: ignore[misc,valid-type]
    timeouts: ClassVar[list[float | None]] = []

    def select(self, timeout: float | None = None) -> Any:
        _RecordingSelector.timeouts.append(timeout)
        return super().select(timeout)


@pytest.fixture()
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[float | None]:
    _RecordingSelector.timeouts = []
    monkeypatch.setattr(selectors, "DefaultSelector", _RecordingSelector)
    return _RecordingSelector.timeouts


def _serve(server: _Server) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return thread


def test_the_loop_never_polls_and_shutdown_wakes_it(
    tmp_path: Path, recorded: list[float | None]
) -> None:
    server = _Server(str(tmp_path / "s.sock"), _Echo)
    thread = _serve(server)
    for _ in range(3):
        with socket.socket(socket.AF_UNIX) as client:
            client.connect(str(tmp_path / "s.sock"))
            assert client.recv(16) == b"hello\n"
    server.shutdown()
    thread.join()
    server.server_close()
    # socketserver's own loop calls select(0.5) over and over while idle; this one only blocks.
    assert recorded and all(timeout is None for timeout in recorded)
    # One wake per connection, plus the wake-up byte unless the stop was already requested
    # when the third connection's handler returned: nothing else woke the loop.
    assert 3 <= len(recorded) <= 4


def test_shutdown_before_the_loop_runs_returns_and_the_loop_then_exits(tmp_path: Path) -> None:
    server = _Server(str(tmp_path / "s.sock"), _Echo)
    server.shutdown()
    server.serve_forever()  # sees the request at once
    server.server_close()


def test_shutdown_after_close_writes_to_no_descriptor(tmp_path: Path) -> None:
    server = _Server(str(tmp_path / "s.sock"), _Echo)
    server.server_close()
    # Descriptor numbers are reused: take the pipe's old numbers with a file, then check that a
    # late shutdown() leaves that file untouched.
    reader, writer = os.pipe()
    try:
        server.shutdown()
        os.set_blocking(reader, False)
        with pytest.raises(BlockingIOError):
            os.read(reader, 1)
    finally:
        os.close(reader)
        os.close(writer)


def test_the_metrics_and_status_servers_use_the_prompt_loop() -> None:
    from agent.observe import httpserver, status_socket

    assert issubclass(httpserver._Server, PromptShutdownMixin)
    assert issubclass(status_socket._Server, PromptShutdownMixin)
