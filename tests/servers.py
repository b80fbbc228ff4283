"""
Real ``twistd -n vsc-server`` processes for the integration tests, supervised
by vsc.devtools.process (shared with the demo and the benchmarks).

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
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vsc.devtools.process import ProcessFailed, VscServer, free_port

BIN = Path(sys.executable).parent
TWISTD = BIN / "twistd"
VSC = BIN / "vsc"
START_TIMEOUT = 30.0
ADMIN_TIMEOUT = 60.0


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


class ServerFailed(ProcessFailed, AssertionError):
    pass


class Server(VscServer):
    """One ``twistd -n vsc-server`` on 127.0.0.1:PORT with its output appended to ``log_path`` (vsc.devtools)."""

    def __init__(self, data_dir: Path, log_path: Path):
        super().__init__(data_dir, log_path, 0, launcher=[str(TWISTD)], env=_env(), append=True)

    def spawn(self, port: int | None = None) -> "Server":
        """Start the process (not waiting for it to listen): see ``wait_ready``."""
        self.port = port or self.port or free_port()
        super().spawn(banner=f"start {self.starts + 1} on port {self.port}")
        return self

    def wait_ready(self, timeout: float = START_TIMEOUT) -> None:
        """Block until the port accepts connections; ServerFailed (with the log) if it dies or times out (then killed)."""
        try:
            self.wait_listening(timeout)
        except ProcessFailed as e:
            self.kill()
            raise ServerFailed(e.reason, self.log_text()[-3000:]) from None

    def start(self, timeout: float = START_TIMEOUT) -> "Server":
        """Start and wait until it listens; on a port clash (another program took it) try a new port."""
        for attempt in range(3):
            self.spawn(self.port if attempt == 0 else free_port())
            try:
                self.wait_ready(timeout)
                return self
            except ServerFailed:
                if self.port_clash() and attempt < 2:
                    continue
                raise
        raise AssertionError("unreachable")


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
