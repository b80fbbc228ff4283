"""
Real ``twistd -n vsc-card`` processes and the real ``vsc card`` CLI for the
integration tests (tests/test_card_e2e.py, tests/test_memory_scan.py).

* Every card daemon writes its stdout (the twistd log) and its stderr to two
  files of its own, so a test can tell "one clear line on stderr" from log
  noise; every wait is bounded; ``Cards.close`` (fixture teardown) kills
  whatever is still running and reaps it.
* A ``Machine`` is where a process runs. ``Machine.here`` is this host with a
  private lock directory (VSC_LOCK_DIR). ``Machine.other`` is a SIMULATED
  second machine: the process runs under ``unshare --uts --mount`` with
  another host name (so the MUK, which hashes the host name, differs) and a
  private tmpfs over the lock directory (so this host's machine lock does not
  apply there). Each such process is its own namespace: two processes on
  "the other machine" do not share a lock directory, which no test relies on.
* The control socket lives in XDG_RUNTIME_DIR: one short private directory
  per test (UNIX socket paths are limited to 108 bytes), shared by both
  machines so the CLI can reach a daemon running under unshare.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import attrs
import pytest

from vsc.devtools.process import Child, ProcessFailed

from tests.integration import missing
from tests.servers import TWISTD, VSC, _env

START_TIMEOUT = 45.0  # a card insert: channel handshake, scrypt, download, locked memory
STOP_TIMEOUT = 20.0
CLI_TIMEOUT = 60.0
OTHER_HOST = "other-host"

# unshare(1) keeps the pid (no --fork), so the Popen pid is the twistd pid.
_OTHER_MACHINE = 'hostname "$0" && mount -t tmpfs -o mode=0700 tmpfs "$1" && shift && exec "$@"'


class CardFailed(AssertionError):
    pass


@attrs.define
class Machine:
    name: str
    lock_dir: Path
    hostname: str | None = None  # None: this host as it is

    def wrap(self, argv: list[str]) -> list[str]:
        if self.hostname is None:
            return argv
        return ["unshare", "--uts", "--mount", "sh", "-c", _OTHER_MACHINE, self.hostname, str(self.lock_dir), *argv]


def unshare_available() -> None:
    """missing(...) unless ``unshare --uts --mount`` with hostname and tmpfs works here (root)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("hostname") is None:
        missing("simulating a second machine needs root, unshare(1) and hostname(1)")
    with tempfile.TemporaryDirectory(prefix="vsc-ns-") as d:
        probe = Machine("probe", Path(d), OTHER_HOST).wrap(["hostname"])
        try:
            out = subprocess.run(probe, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired) as e:
            missing(f"unshare --uts --mount does not work here: {e}")
        if out.returncode != 0 or out.stdout.strip() != OTHER_HOST:
            missing(f"unshare --uts --mount does not work here: {out.stderr.strip() or out.stdout.strip()}")


@attrs.define
class CLIResult:
    argv: list
    returncode: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)

    @property
    def error_lines(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.strip()]


class CardDaemon(Child):
    """One ``twistd -n vsc-card --home HOME --password-file F`` (stdout and stderr in files of their own; vsc.devtools)."""

    def __init__(self, cards: "Cards", home: Path, password_file: Path, machine: Machine, name: str,
                 extra: tuple = (), env: dict | None = None):
        self.cards, self.home, self.password_file, self.machine = cards, Path(home), Path(password_file), machine
        self.extra = tuple(extra)
        self.extra_env = dict(env or {})
        self.out_path = cards.log_dir / f"{name}.log"
        self.err_path = cards.log_dir / f"{name}.stderr"
        argv = [str(TWISTD), "-n", "--pidfile=", "vsc-card", "--home", str(self.home),
                "--password-file", str(self.password_file), *self.extra]
        super().__init__(machine.wrap(argv), self.out_path, name=name, cwd=cards.root,
                         env=dict(cards.env(machine), **self.extra_env), stderr_path=self.err_path,
                         stop_timeout=STOP_TIMEOUT)

    def stderr_lines(self) -> list[str]:
        return [line for line in self.stderr_text().splitlines() if line.strip()]

    def describe(self) -> str:
        return (f"card daemon {self.name} on {self.machine.name} (exit {self.returncode})"
                f"\n--- stderr\n{self.stderr_text()[-2000:]}\n--- log\n{self.log_text()[-4000:]}")

    def inserted(self) -> bool:
        return "inserted; control socket" in self.log_text() or "inserted; control socket" in self.stderr_text()

    def wait_inserted(self, timeout: float = START_TIMEOUT) -> "CardDaemon":
        try:
            self.wait_until(self.inserted, timeout, "the card was inserted")
        except ProcessFailed as e:
            self.kill()
            raise CardFailed(f"{e.reason}:\n{self.describe()}") from None
        return self

    def start(self, timeout: float = START_TIMEOUT) -> "CardDaemon":
        return self.spawn().wait_inserted(timeout)

    def wait_exit(self, timeout: float = STOP_TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise CardFailed(f"the card daemon did not exit within {timeout:g} s:\n{self.describe()}") from None

    def refused(self, timeout: float = START_TIMEOUT) -> tuple[int, list[str]]:
        """Start a daemon that must NOT insert: (exit status, its stderr lines)."""
        self.spawn()
        code = self.wait_exit(timeout)
        assert not self.inserted(), self.describe()
        return code, self.stderr_lines()

    def send(self, sig: int) -> None:
        if self.running():
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(sig)


class Cards:
    """Machines, card homes, the ``vsc`` CLI and every card daemon of one test; ``close`` kills them all."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.log_dir = self.root / "card-logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.runtime = Path(tempfile.mkdtemp(prefix="vsc-rt-", dir="/tmp"))  # short: socket paths
        os.chmod(self.runtime, 0o700)
        self.here = Machine("this machine", self._lock_dir("here"))
        self.other = Machine("the other machine", self._lock_dir("other"), OTHER_HOST)
        self.daemons: list[CardDaemon] = []

    def _lock_dir(self, name: str) -> Path:
        d = self.root / f"lock-{name}"
        d.mkdir(exist_ok=True)
        return d

    def env(self, machine: Machine | None = None) -> dict:
        env = _env()
        env["XDG_RUNTIME_DIR"] = str(self.runtime)
        env["VSC_LOCK_DIR"] = str((machine or self.here).lock_dir)
        return env

    def password_file(self, name: str, password: str) -> Path:
        path = self.root / f"{name}.pw"
        path.write_text(password + "\n")
        path.chmod(0o600)
        return path

    # -- the CLI

    def vsc(self, *args: str, machine: Machine | None = None, check: bool = True,
            timeout: float = CLI_TIMEOUT) -> CLIResult:
        argv = [str(VSC), *args]
        machine = machine or self.here
        proc = subprocess.run(machine.wrap(argv), env=self.env(machine), stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout, cwd=self.root)
        result = CLIResult(argv, proc.returncode, proc.stdout, proc.stderr)
        if check and proc.returncode != 0:
            raise AssertionError(f"vsc {' '.join(args)} on {machine.name} exited {proc.returncode}:\n"
                                 f"{proc.stdout}\n{proc.stderr}")
        return result

    def card(self, home: Path, *args: str, json_out: bool = True, **kw) -> CLIResult:
        """``vsc card --home HOME ARGS [--json]``."""
        return self.vsc("card", "--home", str(home), *args, *(["--json"] if json_out else []), **kw)

    def enrol(self, server, fingerprint: str, data_dir: Path, serial: str, password: str,
              home: Path | None = None, log2n: int = 10) -> tuple[Path, Path]:
        """``vsc admin issue SERIAL --json`` then ``vsc card enroll``: (home, password file)."""
        code = self.vsc("admin", "--data-dir", str(data_dir), "issue", serial, "--json").json()["code"]
        home = home or self.root / f"home-{serial}"
        pw = self.password_file(f"pw-{serial}", password)
        out = self.card(home, "enroll", "--server", server.endpoint, "--server-key", fingerprint,
                        "--serial", serial, "--code", code, "--password-file", str(pw),
                        "--scrypt-log2n", str(log2n),
                        # these tests sign with 9C locally without a PIN; the policies: tests/test_pin_*.py
                        "--pin-policy", "9c=once").json()
        assert out["serial"] == serial, out
        return home, pw

    # -- daemons

    def daemon(self, home: Path, password_file: Path, machine: Machine | None = None, name: str | None = None,
               extra: tuple = (), env: dict | None = None) -> CardDaemon:
        """A daemon (not started): ``extra`` twistd vsc-card options, ``env`` extra environment."""
        name = name or f"card{len(self.daemons) + 1}"
        d = CardDaemon(self, home, password_file, machine or self.here, name, extra, env)
        self.daemons.append(d)
        return d

    def start(self, home: Path, password_file: Path, machine: Machine | None = None, **kw) -> CardDaemon:
        return self.daemon(home, password_file, machine, **kw).start()

    def close(self) -> None:
        for d in self.daemons:
            with contextlib.suppress(Exception):
                d.kill(signal.SIGKILL)
        shutil.rmtree(self.runtime, ignore_errors=True)


def copy_home(src: Path, dst: Path, **changes: str) -> Path:
    """A second HOME with the same card.ini (same serial unless ``changes`` says otherwise)."""
    import configparser

    dst.mkdir(mode=0o700, parents=True, exist_ok=True)
    for f in Path(src).iterdir():  # keyfile.vsc and the like, when the server issued them
        if f.is_file() and f.name != "card.ini":
            shutil.copy2(f, dst / f.name)
    parser = configparser.ConfigParser()
    parser.read(Path(src) / "card.ini")
    for k, v in changes.items():
        parser["card"][k] = v
    with open(dst / "card.ini", "w") as f:
        parser.write(f)
    return dst


@pytest.fixture
def cards(tmp_path):
    """Machines, card homes, the CLI and card daemons of one test (``Cards``); every daemon is killed at teardown."""
    c = Cards(tmp_path / "cards")
    try:
        yield c
    finally:
        c.close()
