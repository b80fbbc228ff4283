"""
Real ``twistd -n vsc-server`` processes for the integration tests.

Every server listens on 127.0.0.1 only, on a free port picked here; its
output (stdout and stderr) goes to a log file; every wait is bounded; and the
``servers`` fixture kills whatever is still running at teardown. Killed
processes are always reaped (``wait``): a zombie still answers
``kill(pid, 0)`` and keeps its port and files.

Also: ``vsc admin`` as a subprocess (``admin``), a data directory with a
2048-bit key and test settings (``init_data_dir``), and a Store opened on the
same database for looking at records and history directly (``open_store``).
"""

from __future__ import annotations

import configparser
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
VSC = BIN / "vsc"
START_TIMEOUT = 30.0
STOP_TIMEOUT = 10.0
ADMIN_TIMEOUT = 60.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSC_") or k == "VSC_REQUIRE_INTEGRATION"}
    env["PYTHONUNBUFFERED"] = "1"
    return env


# ---------------------------------------------------------------- vsc admin


class AdminError(AssertionError):
    pass


def admin(data_dir: Path, *args: str, json_out: bool = True, check: bool = True):
    """Run ``vsc admin --data-dir DIR ARGS [--json]``; the parsed JSON (or the CompletedProcess)."""
    cmd = [str(VSC), "admin", "--data-dir", str(data_dir), *args]
    if json_out:
        cmd.append("--json")
    proc = subprocess.run(cmd, env=_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=ADMIN_TIMEOUT)
    if not check:
        return proc
    if proc.returncode != 0:
        raise AdminError(f"{' '.join(cmd[1:])} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout) if json_out else proc.stdout


#: Settings for a test whose many simulated machines all connect from 127.0.0.1: that one source address
#: must not be admitted like a handshake flood (vsc.server.admission; tests/attacks floods on purpose).
MANY_MACHINES = {"handshakes_per_second": 100000, "handshake_burst": 100000,
                 "max_unauthenticated_per_source": 100000, "max_pending_handshakes": 100000}


def init_data_dir(data_dir: Path, database: str | None = None, settings: dict | None = None) -> dict:
    """
    ``vsc admin init --key-bits 2048 [--database URL]``, then ``settings`` written
    into the [server] section of vsc-server.ini. Returns init's JSON (fingerprint...).
    """
    args = ["init", "--key-bits", "2048"]
    if database and not database.startswith("sqlite:"):
        args += ["--database", database]
    info = admin(data_dir, *args)
    if settings:
        path = data_dir / "vsc-server.ini"
        parser = configparser.ConfigParser()
        parser.read(path)
        for k, v in settings.items():
            parser["server"][k] = str(v)
        with open(path, "w") as f:
            parser.write(f)
    return info


def open_store(data_dir: Path):
    """A Store on the data dir's database (wall clock), for reading records and history."""
    from vsc.server import config
    from vsc.server.policy import Policy
    from vsc.server.store import Store

    cfg = config.load(data_dir)
    store = Store(cfg.database_url, time.time, Policy.from_settings(cfg.settings).lockout)
    return store


# ---------------------------------------------------------------- server processes


class ServerFailed(AssertionError):
    pass


class Server:
    """One ``twistd -n vsc-server`` on 127.0.0.1:PORT with its output in ``log_path``."""

    def __init__(self, data_dir: Path, log_path: Path):
        self.data_dir = Path(data_dir)
        self.log_path = Path(log_path)
        self.port = 0
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    @property
    def endpoint(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        with contextlib.suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def spawn(self, port: int | None = None) -> None:
        """Start the process (not waiting for it to listen): see ``wait_ready``."""
        assert not self.running(), "already running"
        self.port = port or self.port or free_port()
        self.starts += 1
        log = open(self.log_path, "ab")
        log.write(f"\n===== start {self.starts} on port {self.port} =====\n".encode())
        log.flush()
        try:
            self.proc = subprocess.Popen(
                [str(TWISTD), "-n", "--pidfile=", "vsc-server", "--data-dir", str(self.data_dir),
                 "--listen", f"tcp:{self.port}:interface=127.0.0.1"],
                cwd=self.data_dir, env=_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        finally:
            log.close()

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Block until the port accepts connections; ServerFailed (with the log) if it dies or times out."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise ServerFailed(f"vsc-server exited with {self.proc.returncode} before listening:\n{self.log_text()[-3000:]}")
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.settimeout(0.5)
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if time.monotonic() > deadline:
                self.kill()
                raise ServerFailed(f"vsc-server did not listen within {timeout:g} s:\n{self.log_text()[-3000:]}")
            time.sleep(0.05)

    def start(self, timeout: float = START_TIMEOUT) -> "Server":
        """Start and wait until it listens; on a port clash (another program took it) try a new port."""
        for attempt in range(3):
            self.spawn(self.port if attempt == 0 else free_port())
            try:
                self.wait_ready(timeout)
                return self
            except ServerFailed:
                if "Address already in use" in self.log_text() and attempt < 2:
                    self.port = 0
                    continue
                raise
        raise AssertionError("unreachable")

    def kill(self, sig: int = signal.SIGKILL) -> int | None:
        """Send ``sig`` and reap the process (bounded); returns its exit status."""
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)
            try:
                self.proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    self.proc.kill()
                self.proc.wait(STOP_TIMEOUT)
        return self.proc.returncode

    def stop(self) -> int | None:
        """A clean stop (SIGTERM), SIGKILL if it does not exit within STOP_TIMEOUT."""
        return self.kill(signal.SIGTERM)


class Servers:
    """Every server a test started; ``close`` kills them all (fixture teardown)."""

    def __init__(self, log_dir: Path):
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.all: list[Server] = []

    def new(self, data_dir: Path, name: str | None = None) -> Server:
        name = name or f"server{len(self.all) + 1}"
        server = Server(data_dir, self.log_dir / f"{name}.log")
        self.all.append(server)
        return server

    def start(self, data_dir: Path, name: str | None = None) -> Server:
        return self.new(data_dir, name).start()

    def start_many(self, data_dir: Path, count: int) -> list[Server]:
        """``count`` servers on one data dir (one database), started in parallel."""
        servers = [self.new(data_dir) for _ in range(count)]
        for s in servers:
            s.spawn()
        for s in servers:
            s.wait_ready()
        return servers

    def close(self) -> None:
        for server in self.all:
            with contextlib.suppress(Exception):
                server.kill(signal.SIGKILL)


@pytest.fixture
def servers(tmp_path):
    """Start real vsc-server processes with ``servers.start(data_dir)``; all are killed at teardown."""
    s = Servers(tmp_path / "logs")
    try:
        yield s
    finally:
        s.close()
