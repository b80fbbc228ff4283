"""
The programs ``vsc demo`` runs, each as its own process: the VSC Server and
the card process (long-running, supervised by vsc.devtools.process: their own
session, output in a log file, SIGTERM then SIGKILL, stopped with the demo),
and short ``vsc ...`` / ``openssl`` commands. Every failure becomes one
``cli.CommandError`` line that names the log to read.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from vsc import cli
from vsc.demo.guidance import display, last_line, shown, tail
from vsc.devtools.process import Child, ProcessFailed, VscServer, program

START_TIMEOUT = 15.0  # seconds for the server to accept connections
INSERT_TIMEOUT = 45.0  # seconds for the card process to have the card in use
CARD_STOP_TIMEOUT = 20.0  # seconds for the card process to remove the card and exit after SIGTERM
STOP_TIMEOUT = 10.0  # seconds for the server to exit after SIGTERM
COMMAND_TIMEOUT = 60.0  # seconds for one vsc subcommand


def bindir() -> Path:
    # Not resolved: in a venv, sys.executable is .venv/bin/python (a symlink).
    return Path(sys.executable).parent


def find_program(name: str) -> str:
    """The console script ``name`` installed next to this Python, else on PATH."""
    found = program(name)
    if found is None:
        raise cli.CommandError(f"{name} not found next to {sys.executable} or on PATH (is vsc installed?)")
    return found


def run(cmd: list[str], what: str, check: bool = True, env: dict | None = None,
        cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run one short command in its own session (a Ctrl-C reaches only the demo, which decides)."""
    try:
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
            env=env, cwd=cwd, start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        raise cli.CommandError(f"{what} did not finish within {COMMAND_TIMEOUT:.0f} s: {display(cmd)}") from None
    if check and proc.returncode != 0:
        raise cli.CommandError(f"{what} failed (exit {proc.returncode}): {last_line(proc.stderr or proc.stdout)}")
    return proc


def parse_json(proc: subprocess.CompletedProcess, what: str) -> dict:
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise cli.CommandError(f"{what} printed something other than JSON: {last_line(proc.stdout)}") from None


class ServerProcess(VscServer):
    """``twistd -n vsc-server`` on 127.0.0.1:``port``, its output in ``log_path``."""

    def __init__(self, twistd: str, data_dir: Path, port: int, log_path: Path, cwd: Path):
        super().__init__(data_dir, log_path, port, launcher=[twistd], name="server", cwd=cwd,
                         stop_timeout=STOP_TIMEOUT)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> float:
        """Wait until the port accepts connections; returns the seconds it took."""
        try:
            return self.wait_listening(timeout)
        except ProcessFailed as e:
            if self.returncode is not None:
                raise cli.CommandError(f"the server exited with code {self.returncode} before listening; "
                                       f"see {shown(self.log_path)}\n{tail(self.log_path)}") from None
            raise cli.CommandError(f"the server did not start within {timeout:.0f} s; "
                                   f"see {shown(self.log_path)} ({e.reason})") from None


def card_process(cmd: list[str], log_path: Path, cwd: Path, env: dict) -> Child:
    """``twistd -n vsc-card ...`` (started), its output in ``log_path``."""
    return Child(cmd, log_path, name="card", cwd=cwd, env=env, stop_timeout=CARD_STOP_TIMEOUT).spawn()
