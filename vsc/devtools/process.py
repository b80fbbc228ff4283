"""
Child processes under supervision (one responsibility: start a program,
know when it is ready, keep its output, stop it for sure).

* ``Child``: one program in its own session (a Ctrl-C at the terminal
  reaches only the supervisor, which stops its children in order), its
  stdout and stderr in a log file — or stdin and stdout as pipes, for a
  line protocol. On Linux the kernel sends it SIGTERM if the supervisor dies
  without stopping it (PR_SET_PDEATHSIG; that follows the *thread* that
  started the child, so start children from a thread that outlives them),
  and an atexit hook stops whatever is still running.
* Waits are bounded and fail with ``ProcessFailed`` (carrying the tail of
  the log) when the child exits first or the time is up: ``wait_until``
  (any condition), ``wait_port`` (a TCP port accepts connections),
  ``wait_line`` (a line in the log, since this start), ``readline`` (a line
  on the stdout pipe).
* ``stop``: a signal (SIGTERM), a bounded wait, SIGKILL if need be, and the
  child is always reaped (a zombie still answers ``kill(pid, 0)``).
* ``VscServer``: ``twistd -n vsc-server`` on 127.0.0.1, on a chosen port or
  on port 0 (the port it got is then read from its log).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time  # clock-ok: a supervisor polls its children against the monotonic clock
import weakref
from pathlib import Path
from typing import Callable, TypeVar

START_TIMEOUT = 30.0  # seconds for a program to become ready
STOP_TIMEOUT = 10.0  # seconds for a program to exit after its signal, before SIGKILL
KILL_TIMEOUT = 10.0  # seconds to reap a program after SIGKILL
POLL = 0.05  # seconds between two looks at a condition
LOOPBACK = "127.0.0.1"

T = TypeVar("T")


# ---------------------------------------------------------------- small helpers


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port nobody listens on right now (another program may still take it before we do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def port_is_free(port: int, host: str = LOOPBACK) -> bool:
    """Whether a listener could bind ``port`` (with SO_REUSEADDR, as Twisted's listenTCP does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def port_accepts(port: int, host: str = LOOPBACK, timeout: float = 0.5) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        return s.connect_ex((host, port)) == 0


def program(name: str) -> str | None:
    """The console script ``name`` installed next to this Python (a venv's bin/), else on PATH, else None."""
    candidate = Path(sys.executable).parent / name  # not resolved: in a venv, python is a symlink
    if candidate.exists():
        return str(candidate)
    return shutil.which(name)


def exit_text(code: int | None) -> str:
    """``exit code N`` or ``killed by SIGNAME`` for a Popen return code."""
    if code is None:
        return "still running"
    if code >= 0:
        return f"exit code {code}"
    try:
        return f"killed by {signal.Signals(-code).name}"
    except ValueError:
        return f"killed by signal {-code}"


def die_with_parent_hook() -> Callable[[], None] | None:
    """A preexec_fn asking Linux to SIGTERM the child when the thread that started it dies (None elsewhere)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


class ProcessFailed(RuntimeError):
    """A child exited before it was ready, or was not ready in time. ``reason`` is one line; ``log`` its output's tail."""

    def __init__(self, reason: str, log: str = ""):
        super().__init__(reason + (f"\n{log}" if log else ""))
        self.reason = reason
        self.log = log


# ---------------------------------------------------------------- a child


_RUNNING: "weakref.WeakSet[Child]" = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    for child in list(_RUNNING):
        with contextlib.suppress(Exception):
            child.stop(timeout=5.0)


class Child:
    """
    One supervised program. ``log_path``: where its stdout and stderr go
    (``stderr_path`` separates stderr; ``append`` keeps earlier starts, each
    after a ``banner`` line). ``pipes``: stdin and stdout are pipes for a line
    protocol (``write_line``, ``readline``); stderr then goes to the log.
    """

    def __init__(self, argv: list[str], log_path: str | os.PathLike | None = None, *, name: str | None = None,
                 cwd: str | os.PathLike | None = None, env: dict | None = None,
                 stderr_path: str | os.PathLike | None = None, pipes: bool = False, append: bool = False,
                 die_with_parent: bool = True, stop_timeout: float = STOP_TIMEOUT,
                 clock: Callable[[], float] = time.monotonic,  # clock-ok
                 sleep: Callable[[float], None] = time.sleep):  # clock-ok
        self.argv = [str(a) for a in argv]
        self.name = name or (os.path.basename(self.argv[0]) if self.argv else "process")
        self.log_path = Path(log_path) if log_path is not None else None
        self.stderr_path = Path(stderr_path) if stderr_path is not None else None
        self.cwd = cwd
        self.env = env
        self.pipes = pipes
        self.append = append
        self.die_with_parent = die_with_parent
        self.stop_timeout = stop_timeout
        self.clock = clock
        self.sleep = sleep
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.killed = False  # the last stop needed SIGKILL
        self._log_offset = 0
        self._out = b""

    # ------------------------------------------------------------ state

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def returncode(self) -> int | None:
        """The exit status (negative: the signal that ended it), None while it runs or before it started."""
        return self.proc.poll() if self.proc is not None else None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self, since_start: bool = False) -> str:
        """The log (this start's part only with ``since_start``); "" if there is none yet."""
        if self.log_path is None:
            return ""
        try:
            with open(self.log_path, "rb") as f:
                if since_start:
                    f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def stderr_text(self) -> str:
        with contextlib.suppress(OSError):
            if self.stderr_path is not None:
                return self.stderr_path.read_text(errors="replace")
        return ""

    def tail(self, lines: int = 20, since_start: bool = True) -> str:
        """The last non-blank lines of the log."""
        text = self.log_text(since_start) + (("\n" + self.stderr_text()) if self.stderr_path else "")
        return "\n".join([ln for ln in text.splitlines() if ln.strip()][-lines:])

    # ------------------------------------------------------------ start

    def spawn(self, banner: str | None = None) -> "Child":
        """Start the program (not waiting for anything); ``banner`` is first written as a line of the log."""
        assert not self.running(), f"{self.name} is already running"
        opened = []
        try:
            log = None
            if self.log_path is not None:
                log = open(self.log_path, "ab" if self.append else "wb")
                opened.append(log)
                if banner:
                    log.write(f"\n===== {banner} =====\n".encode())
                    log.flush()
                self._log_offset = log.tell()
            if self.pipes:
                stdin, stdout, stderr = subprocess.PIPE, subprocess.PIPE, log
            else:
                stdin, stdout = subprocess.DEVNULL, (log or subprocess.DEVNULL)
                stderr = subprocess.STDOUT if log else subprocess.DEVNULL
            if self.stderr_path is not None:
                stderr = open(self.stderr_path, "ab" if self.append else "wb")
                opened.append(stderr)
            self._out = b""
            self.killed = False
            self.proc = subprocess.Popen(
                self.argv, stdin=stdin, stdout=stdout, stderr=stderr, cwd=self.cwd, env=self.env,
                start_new_session=True,  # a terminal's Ctrl-C reaches the supervisor, which stops its children
                preexec_fn=die_with_parent_hook() if self.die_with_parent else None,
            )
        finally:
            for f in opened:  # the child has its own copies
                f.close()
        self.starts += 1
        _RUNNING.add(self)
        return self

    # ------------------------------------------------------------ waits

    def wait_until(self, condition: Callable[[], T], timeout: float, what: str, interval: float = POLL) -> T:
        """Poll ``condition`` until it returns something true (returned); ProcessFailed if the child exits first or time is up."""
        deadline = self.clock() + timeout
        while True:
            value = condition()
            if value:
                return value
            code = self.returncode
            if code is not None:
                raise ProcessFailed(f"{self.name} ended ({exit_text(code)}) before {what}", self.tail())
            if self.clock() > deadline:
                raise ProcessFailed(f"{self.name}: no {what} within {timeout:g} s", self.tail())
            self.sleep(interval)

    def wait_port(self, port: int, timeout: float = START_TIMEOUT, host: str = LOOPBACK) -> float:
        """Wait until ``host:port`` accepts connections; returns the seconds it took."""
        t0 = self.clock()
        self.wait_until(lambda: port_accepts(port, host), timeout, f"listening on {host}:{port}")
        return self.clock() - t0

    def wait_line(self, pattern: str, timeout: float = START_TIMEOUT) -> re.Match:
        """Wait until this start's log has a match for the regular expression ``pattern``; returns the match."""
        regex = re.compile(pattern)
        return self.wait_until(lambda: regex.search(self.log_text(since_start=True)), timeout,
                               f"log line matching {pattern!r}")

    # ------------------------------------------------------------ pipes

    def write_line(self, data: bytes) -> None:
        """One line to the child's stdin (``pipes``); OSError if it is gone."""
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(data + b"\n")
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        if self.proc is not None and self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()

    def readline(self, timeout: float) -> bytes | None:
        """The next line from the child's stdout (``pipes``), newline included; None on timeout or end of output."""
        assert self.proc is not None and self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = self.clock() + timeout
        while b"\n" not in self._out:
            remaining = deadline - self.clock()
            if remaining <= 0 or not select.select([fd], [], [], remaining)[0]:
                return None
            chunk = os.read(fd, 65536)
            if not chunk:
                line, self._out = self._out, b""
                return line or None
            self._out += chunk
        line, _, self._out = self._out.partition(b"\n")
        return line + b"\n"

    # ------------------------------------------------------------ stop

    def stop(self, timeout: float | None = None, sig: int = signal.SIGTERM, grace: float = 0.0) -> int | None:
        """
        Wait ``grace`` seconds for it to exit by itself (after ``close_stdin`` or
        a quit message), send ``sig``, wait ``timeout`` seconds (``stop_timeout``
        unless told), then SIGKILL (``killed`` says so); always reaped. Returns
        the exit status.
        """
        proc = self.proc
        if proc is None:
            return None
        timeout = self.stop_timeout if timeout is None else timeout
        try:
            if grace > 0 and proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(grace)
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.killed = True
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                    proc.wait(KILL_TIMEOUT)
        finally:
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            if proc.poll() is not None:
                _RUNNING.discard(self)
        return proc.returncode

    def kill(self, sig: int = signal.SIGKILL) -> int | None:
        """Send ``sig`` (SIGKILL unless told) and reap, with SIGKILL after ``stop_timeout`` if it did not go; the exit status."""
        return self.stop(None, sig)


# ---------------------------------------------------------------- the VSC Server


class VscServer(Child):
    """
    ``twistd -n --pidfile= vsc-server --data-dir DIR --listen tcp:PORT:interface=127.0.0.1``.
    ``port`` 0 lets the kernel choose; ``wait_listening`` then reads the port
    from the log, and a later ``spawn`` reuses it. ``launcher`` replaces the
    ``twistd`` program (e.g. a wrapper that raises limits, then runs twistd).
    """

    def __init__(self, data_dir: str | os.PathLike, log_path: str | os.PathLike, port: int = 0, *,
                 launcher: list[str] | None = None, name: str = "vsc-server", cwd: str | os.PathLike | None = None,
                 **kw):
        self.data_dir = Path(data_dir)
        self.port = port
        self.launcher = list(launcher) if launcher else [program("twistd") or "twistd"]
        super().__init__([], log_path, name=name, cwd=cwd if cwd is not None else self.data_dir, **kw)

    @property
    def endpoint(self) -> str:
        return f"tcp:{LOOPBACK}:{self.port}"

    def command(self) -> list[str]:
        """The command line the next ``spawn`` runs."""
        return [*self.launcher, "-n", "--pidfile=", "vsc-server", "--data-dir", str(self.data_dir),
                "--listen", f"tcp:{self.port}:interface={LOOPBACK}"]

    def spawn(self, banner: str | None = None) -> "VscServer":
        self.argv = self.command()
        super().spawn(banner)
        return self

    def wait_listening(self, timeout: float = START_TIMEOUT) -> float:
        """Wait until it accepts connections (port 0: until its log names the port); returns the seconds it took."""
        t0 = self.clock()
        if self.port == 0:
            self.port = int(self.wait_line(r"starting on (\d+)", timeout).group(1))
        else:
            self.wait_port(self.port, timeout)
        return self.clock() - t0

    def port_clash(self) -> bool:
        """Whether this start failed because another program holds the port."""
        text = self.log_text(since_start=True)
        return "CannotListenError" in text or "Address already in use" in text
