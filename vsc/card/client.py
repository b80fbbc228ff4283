"""
The one client of the card daemon's control socket (the commands are the
rows of vsc.wire.control): blocking, on one UNIX socket, without a reactor.
Every ``vsc card`` command that talks to the daemon, ``vsc license check``,
``vsc run`` (from a thread) and the licensing API inside a protected program
use it. It imports no Twisted, construct or crypto library, so a ``vsc card
status`` process costs little more than starting the interpreter::

    with ControlClient(home) as card:
        signature = card.call(control.SIGN_DIGEST, slot="9a", digest=digest)["signature"]

Every failure is a ControlError whose message is one line for the user;
its subclasses say which kind (no daemon, the card refused, no answer in
time, the connection dropped).

It uses ``_socket``, the C module that ``socket`` wraps, for the few calls
it makes (connect, sendall, recv, settimeout, setsockopt, close):
``socket``'s own import (its enums, selectors) costs about as much as this
whole request (bench/startup.py, ``python -X importtime``).

Once connected the socket is a blocking one whose waits the kernel bounds
(SO_SNDTIMEO / SO_RCVTIMEO, vsc.wire.control.socket_wait): a request is one
send and one receive. With Python's own socket timeout every call would
also switch the socket's blocking mode and poll(2) before the send and
before the receive: six system calls instead of two, on the local API's
path (issue 15).
"""

from __future__ import annotations

import _socket  # the C module behind socket: see below
import os
import time  # clock-ok: a blocking socket call bounds its own wait (monotonic)

from vsc.card import paths
from vsc.wire import control as wc
from vsc.wire.ampbox import Incomplete, Malformed, decode_box, encode_box


class ControlError(Exception):
    """A control request that did not get its answer; the message is one line for the user."""


class NotRunning(ControlError):
    """No card daemon serves ``home``: no socket (``reachable`` False), or nobody answers on it."""

    def __init__(self, home: str, path: str, stale: bool):
        super().__init__(f"no card daemon is running for {home}")
        self.home = home
        self.path = path
        self.stale = stale  # the socket exists but nobody accepts on it (a daemon that died)


class Refused(ControlError):
    """The card refused; the message is its one-line reason."""


class NoAnswer(ControlError):
    """The daemon did not answer within the timeout."""


class Dropped(ControlError):
    """The daemon closed the connection before it answered (the card was removed, or the daemon stopped)."""


class ControlClient:
    """One connection to the card daemon of ``home`` (default: $VSC_HOME or ~/.config/vsc)."""

    def __init__(self, home: str | os.PathLike | None = None, timeout: float = 30.0):
        self.home = paths.home_of(home)
        self.path = paths.control_socket_for(self.home)
        self.timeout = timeout
        self._sock = None
        self._buf = b""
        self._ask = 0
        self._kernel_wait = False  # the socket's waits are bounded by SO_RCVTIMEO / SO_SNDTIMEO (see connect)
        self._shortened = False  # SO_RCVTIMEO was set below the timeout for the rest of an answer

    def __enter__(self) -> "ControlClient":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def connect(self) -> None:
        if self._sock is not None:
            return
        try:  # never talk to a socket in a directory another user could reach into (issue 11)
            paths.check_private_dir(os.path.dirname(self.path))
        except paths.UnsafeDirectory as e:
            raise ControlError(str(e)) from None
        if not os.path.exists(self.path):
            raise NotRunning(self.home, self.path, stale=False)
        s = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except TimeoutError:
            s.close()
            raise NoAnswer("the card daemon did not accept the connection in time") from None
        except OSError:
            s.close()
            raise NotRunning(self.home, self.path, stale=True) from None
        try:
            self._check_peer(s)
        except ControlError:
            s.close()
            raise
        try:  # blocking from here on, each send and receive bounded by the kernel (the module docstring)
            wait = wc.socket_wait(self.timeout)
            s.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVTIMEO, wait)
            s.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, wait)
            s.settimeout(None)
            self._kernel_wait = True
        except (OSError, AttributeError, OverflowError):  # no such option here: Python's timeout, as before
            s.settimeout(self.timeout)
            self._kernel_wait = False
        self._sock = s

    def _check_peer(self, s) -> None:
        """
        Before anything is sent: the socket just connected is this user's
        daemon's. The directory check above passes a directory that does not
        exist yet, and another local user may make one (in a shared TMPDIR)
        between that check and the connect. So the directory must exist and
        be private now, and the process at the other end must run as this
        user (SO_PEERCRED, where the kernel has it).
        """
        directory = os.path.dirname(self.path)
        try:
            if not os.path.isdir(directory):
                raise paths.UnsafeDirectory(f"{directory} went away while connecting; not used")
            paths.check_private_dir(directory)
        except paths.UnsafeDirectory as e:
            raise ControlError(str(e)) from None
        option = getattr(_socket, "SO_PEERCRED", None)
        if option is None:
            return
        try:
            uid = wc.peer_uid(s.getsockopt(_socket.SOL_SOCKET, option, 12))
        except (OSError, Malformed) as e:
            raise ControlError(f"cannot tell who serves {self.path}: {e}") from None
        if uid != os.getuid():
            raise ControlError(f"{self.path} is served by another user (uid {uid}); not used")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
            self._buf = b""

    def call(self, command: wc.Command, **args) -> dict:
        """Send one request and wait for its answer: the response fields as a dict."""
        self.connect()
        self._ask += 1
        try:
            data = encode_box(wc.request(command, self._ask, args))
        except Malformed as e:
            raise ControlError(str(e)) from None
        deadline = time.monotonic() + self.timeout  # clock-ok
        try:
            if not self._kernel_wait:
                self._sock.settimeout(self.timeout)
            elif self._shortened:
                self._sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVTIMEO, wc.socket_wait(self.timeout))
                self._shortened = False
            self._sock.sendall(data)
            box = self._read_box(deadline)
        except (TimeoutError, BlockingIOError):  # BlockingIOError: SO_RCVTIMEO / SO_SNDTIMEO ran out
            self.close()
            raise NoAnswer("the card did not answer in time") from None
        except (ConnectionResetError, BrokenPipeError):  # the daemon went away mid-request
            self.close()
            raise Dropped("the card daemon closed the connection (the card was removed)") from None
        except OSError as e:
            self.close()
            raise ControlError(f"the card daemon connection failed: {e.strerror or e}") from None
        try:
            return wc.answer(command, self._ask, box)
        except wc.Refused as e:
            if e.code == wc.CARD_ERROR:
                raise Refused(str(e)) from None
            raise ControlError(f"the card daemon could not answer {command.name}: {e}") from None
        except Malformed as e:
            self.close()
            raise ControlError(f"the card daemon's answer is malformed: {e}") from None

    def _read_box(self, deadline: float) -> dict[bytes, bytes]:
        first = True  # the first receive waits at most the timeout set on the socket; later ones what is left
        while True:
            if self._buf:
                try:
                    box, used = decode_box(self._buf)
                except Incomplete:
                    pass
                except Malformed as e:
                    self.close()
                    raise ControlError(f"the card daemon's answer is malformed: {e}") from None
                else:
                    self._buf = self._buf[used:]
                    return box
            if not (first and self._kernel_wait):
                left = deadline - time.monotonic()  # clock-ok
                if left <= 0:
                    raise TimeoutError()
                if self._kernel_wait:
                    self._sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_RCVTIMEO, wc.socket_wait(left))
                    self._shortened = True
                else:
                    self._sock.settimeout(left)
            first = False
            chunk = self._sock.recv(65536)
            if not chunk:
                self.close()
                raise Dropped("the card daemon closed the connection (the card was removed)")
            self._buf += chunk
            if len(self._buf) > wc.MAX_BOX:  # no answer is this long: the peer is not a card daemon
                self.close()
                raise ControlError(f"the card daemon's answer is malformed: longer than {wc.MAX_BOX} bytes")


def call(home: str | os.PathLike | None, command: wc.Command, timeout: float = 30.0, **args) -> dict:
    """One request on a connection of its own."""
    with ControlClient(home, timeout) as client:
        return client.call(command, **args)
