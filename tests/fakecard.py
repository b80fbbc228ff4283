"""
A stand-in card daemon for the control client's tests: a UNIX socket at the
control socket of a card home, answering each AMP request with a function of
the test's. It speaks AMP through Twisted's own box codec
(``twisted.protocols.amp``), so the client's codec (vsc.wire.ampbox) is
checked against an implementation that is not ours.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import tempfile
import threading
from pathlib import Path

import pytest

CLOSE = object()  # respond() result: close the connection without answering


@pytest.fixture
def fake_home(tmp_path, monkeypatch):
    """A card home whose control socket lives in a private, short runtime dir (import it into a test module)."""
    runtime = Path(tempfile.mkdtemp(prefix="vscctl-", dir="/tmp"))  # short: UNIX socket paths <= 108 bytes
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    yield tmp_path / "home"
    shutil.rmtree(runtime, ignore_errors=True)


class FakeCardSocket:
    """
    A stand-in card daemon on the control socket of ``home``. Each request
    (one at a time per connection, as the client sends them) is answered
    with ``respond(command, args)``: a dict of answer fields (with
    ``b"_error_code"``/``b"_error_description"`` for an error box), raw
    bytes sent as they are, None to stay silent, or CLOSE. With ``hold``,
    a connection stays open after its answers until ``release()``.
    """

    def __init__(self, home: Path, respond, hold: bool = False):
        from vsc.card.paths import control_socket_for

        self.path = Path(control_socket_for(home))
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)  # a runtime dir the client accepts
        self.respond = respond
        self.requests: list[tuple[bytes, dict]] = []
        self.answered = threading.Event()  # set once an answer was sent
        self._released = threading.Event()
        self.hold = hold
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(self.path))
        self.sock.listen(8)
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._connection, args=(conn,), daemon=True).start()

    def _connection(self, conn: socket.socket) -> None:
        from twisted.protocols import amp

        data = b""
        with conn:
            while True:
                try:
                    chunk = conn.recv(65536)
                except OSError:
                    return
                if not chunk:
                    return
                data += chunk
                boxes = amp.parseString(data) if data.endswith(b"\x00\x00") else []
                if not boxes:
                    continue
                data = b""
                for box in boxes:
                    command = box.pop(b"_command")
                    ask = box.pop(b"_ask")
                    self.requests.append((command, dict(box)))
                    answer = self.respond(command, dict(box))
                    if answer is None:
                        continue  # silent: keep the connection open, never answer
                    if answer is CLOSE:
                        return
                    if isinstance(answer, bytes):
                        conn.sendall(answer)
                    elif b"_error_code" in answer:
                        conn.sendall(amp.AmpBox({b"_error": ask, **answer}).serialize())
                    else:
                        conn.sendall(amp.AmpBox({b"_answer": ask, **answer}).serialize())
                    self.answered.set()
                if self.hold:
                    self._released.wait(30)
                    return

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self.release()
        self.sock.close()
        with contextlib.suppress(OSError):
            self.path.unlink()
