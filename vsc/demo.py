"""
``vsc demo``: the end-to-end walk-through behind ``./quickstart demo``.

It does what an administrator and a card owner would do, each program as
its own process, and says what happened at every step:

1. create (or reuse) a demo directory (``$VSC_DEMO_DIR``, default
   ``./vsc-demo/``) and in it a server data directory with ``vsc admin
   init`` (the embedded default database, SQLite, lives there);
2. start ``twistd -n vsc-server`` on 127.0.0.1 (port 7390, or a free one);
3. issue a one-time enrolment code (``vsc admin issue``) and enrol the demo
   card ``demo-card`` with it (``vsc card enroll``: keys made on this
   machine, sealed under a random password kept in a 0600 file). On a rerun
   the card is already enrolled and is simply inserted again; a card left in
   use by a killed demo is first freed with ``vsc card recover``;
4. insert it: start the card process ``twistd -n vsc-card`` (its own home
   and machine-lock directory inside the demo directory) and wait until
   ``vsc card status`` says ``in-use``;
5. sign a message with slot 9a (RSA) and slot 9c (ECDSA) and verify both
   signatures with openssl (or with vsc.crypto when openssl is missing);
6. step a counter on the card (stored on the server before it is
   acknowledged);
7. show what the server knows (``vsc admin show``);
8. (``--channels``) open a channel per modern suite with and without
   forward secrecy, and see a wrong pinned server key refused;
9. stay up and print what to try next until Ctrl-C or SIGTERM
   (``--once``: go on at once), then remove the card (SIGTERM to the card
   process, which uploads it and sets it idle), stop the server, and print
   the card's final state.

This is a command-line program, not library code: it uses subprocess and
polls with time.sleep. Every wait is bounded, and the children are stopped
on every way out (finally, atexit, SIGINT/SIGTERM/SIGHUP; on Linux they also
get SIGTERM if this process dies without cleaning up).
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time  # clock-ok: a command-line tool (or the harness) reads the wall clock
from pathlib import Path

from vsc import cli

DEFAULT_DIR = "vsc-demo"
DEFAULT_PORT = 7390
SERIAL = "demo-card"
COUNTER = "demo-runs"
START_TIMEOUT = 15.0  # seconds for the server to accept connections
INSERT_TIMEOUT = 45.0  # seconds for the card process to have the card in use
CARD_STOP_TIMEOUT = 20.0  # seconds for the card process to remove the card and exit after SIGTERM
STOP_TIMEOUT = 10.0  # seconds for the server to exit after SIGTERM
COMMAND_TIMEOUT = 60.0  # seconds for one vsc subcommand
FORWARD_SECRECY_MODES = ("off", "require")
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
SLOT_TEXT = {"9a": "RSA-2048, PKCS#1 v1.5", "9c": "ECDSA P-256"}


# ---------------------------------------------------------------- helpers


def _bindir() -> Path:
    # Not resolved: in a venv, sys.executable is .venv/bin/python (a symlink).
    return Path(sys.executable).parent


def _program(name: str) -> str:
    """The console script ``name`` installed next to this Python, else on PATH."""
    candidate = _bindir() / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise cli.CommandError(f"{name} not found next to {sys.executable} or on PATH (is vsc installed?)")
    return found


def _shown(path: str | os.PathLike) -> str:
    """A path as the user would type it from the current directory."""
    path = os.path.abspath(path)
    rel = os.path.relpath(path)
    return rel if not rel.startswith("..") else path


def _display(cmd: list[str]) -> str:
    """A command line for printing: programs by their short name, paths as typed from here."""
    shown = [os.path.basename(cmd[0])]
    for arg in cmd[1:]:
        shown.append(_shown(arg) if os.path.isabs(arg) and os.path.exists(os.path.dirname(arg)) else arg)
    return shlex.join(shown)


def _last_line(text: str) -> str:
    lines = [ln for ln in (text or "").strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def _tail(path: Path, n: int = 5) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return "\n".join("      | " + ln for ln in lines[-n:])


def _say(text: str = "") -> None:
    print(text, flush=True)


def _port_is_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Twisted's listenTCP does
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _any_free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wrong_fingerprint() -> str:
    """A well-formed pin of a key that is not the server's."""
    digest = hashlib.sha256(b"not the server key " + os.urandom(16)).digest()
    return "SHA256:" + base64.b64encode(digest).decode("ascii").rstrip("=")


def _die_with_parent_hook():
    """A preexec_fn asking Linux to SIGTERM the child if this process dies first."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(1, int(signal.SIGTERM), 0, 0, 0)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


def _run(cmd: list[str], what: str, check: bool = True, env: dict | None = None,
         cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Run one short command in its own session (a Ctrl-C reaches only the demo, which decides)."""
    try:
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=COMMAND_TIMEOUT,
            env=env, cwd=cwd, start_new_session=True,
        )
    except subprocess.TimeoutExpired:
        raise cli.CommandError(f"{what} did not finish within {COMMAND_TIMEOUT:.0f} s: {_display(cmd)}") from None
    if check and proc.returncode != 0:
        raise cli.CommandError(f"{what} failed (exit {proc.returncode}): {_last_line(proc.stderr or proc.stdout)}")
    return proc


def _json(proc: subprocess.CompletedProcess, what: str) -> dict:
    try:
        return json.loads(proc.stdout)
    except ValueError:
        raise cli.CommandError(f"{what} printed something other than JSON: {_last_line(proc.stdout)}") from None


def _clock() -> float:
    return time.monotonic()  # clock-ok: timing a CLI walk-through


class _Stop(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived: stop the demo (cleanly)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


# ---------------------------------------------------------------- child processes


class Child:
    """A long-running child (``twistd -n ...``) in its own session, its output in a log file."""

    def __init__(self, name: str, cmd: list[str], log_path: Path, cwd: Path, env: dict | None = None):
        self.name = name
        self.cmd = cmd
        self.log_path = log_path
        self.cwd = cwd
        self.env = env
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.cwd,
                env=self.env,
                start_new_session=True,  # Ctrl-C reaches the demo, which stops the children in order
                preexec_fn=_die_with_parent_hook(),
            )
        atexit.register(self.kill)

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float) -> tuple[int | None, bool]:
        """SIGTERM, wait (bounded), SIGKILL if needed. Returns (exit code, whether it had to be killed)."""
        proc = self.proc
        if proc is None:
            return None, False
        if proc.poll() is not None:
            return proc.returncode, False
        proc.terminate()
        try:
            proc.wait(timeout=timeout)
            return proc.returncode, False
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_TIMEOUT)
            return proc.returncode, True

    def kill(self) -> None:
        """Last resort (atexit, unexpected errors): SIGTERM, a short wait, SIGKILL."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)


class ServerProcess(Child):
    """``twistd -n vsc-server`` on 127.0.0.1."""

    def __init__(self, twistd: str, data_dir: Path, port: int, log_path: Path, cwd: Path):
        self.data_dir = data_dir
        self.port = port
        cmd = [
            twistd,
            "-n",  # stay in the foreground: this process owns it
            "--pidfile=",  # no twistd.pid in the current directory
            "vsc-server",
            "--data-dir",
            str(data_dir),
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
        ]
        super().__init__("server", cmd, log_path, cwd)

    @property
    def endpoint(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = START_TIMEOUT) -> float:
        """Wait until the port accepts connections; returns the seconds it took."""
        assert self.proc is not None
        t0 = _clock()
        while True:
            code = self.proc.poll()
            if code is not None:
                raise cli.CommandError(
                    f"the server exited with code {code} before listening; see {_shown(self.log_path)}\n"
                    f"{_tail(self.log_path)}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return _clock() - t0
            except OSError:
                pass
            if _clock() - t0 > timeout:
                raise cli.CommandError(f"the server did not start within {timeout:.0f} s; see {_shown(self.log_path)}")
            time.sleep(0.05)  # clock-ok: polling a child process from a CLI

    def startup_failed_on_port(self) -> bool:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "CannotListenError" in text or "Address already in use" in text


# ---------------------------------------------------------------- the demo


class Demo:
    """The walk-through's state: paths, programs, children, and the steps."""

    def __init__(self, args):
        raw = args.dir or os.environ.get("VSC_DEMO_DIR") or DEFAULT_DIR
        self.args = args
        self.root = Path(raw).expanduser().absolute()
        self.server_dir = self.root / "server"
        self.home = self.root / "card"
        self.password_file = self.root / "card-password"
        self.lock_dir = self.root / "lock"
        self.work = self.root / "work"
        self.server_log = self.root / "server.log"
        self.card_log = self.root / "card.log"
        self.vsc = _program("vsc")
        self.twistd = _program("twistd")
        self.openssl = shutil.which("openssl")
        self.card_env = {**os.environ, "VSC_LOCK_DIR": str(self.lock_dir)}
        self.card_env.pop("VSC_HOME", None)
        self.server: ServerProcess | None = None
        self.card: Child | None = None
        self.fingerprint = ""
        self.step = 0
        self.up = False
        self.up_after = 0.0
        self.signatures = 0

    # ------------------------------------------------------------ small pieces

    def heading(self, text: str) -> None:
        self.step += 1
        _say()
        _say(f"{self.step}. {text}")

    def run(self, cmd: list[str], what: str, check: bool = True, show: bool = True,
            env: dict | None = None, redirect: Path | None = None) -> subprocess.CompletedProcess:
        if show:
            _say(f"   $ {_display(cmd)}" + (f" > {shlex.quote(_shown(redirect))}" if redirect else ""))
        return _run(cmd, what, check=check, env=env, cwd=self.root)

    def card_cmd(self, *action: str) -> list[str]:
        return [self.vsc, "card", "--home", str(self.home), *action]

    def admin_cmd(self, *action: str) -> list[str]:
        return [self.vsc, "admin", "--data-dir", str(self.server_dir), *action]

    def show_card(self, show: bool = True) -> dict | None:
        """``vsc admin show demo-card --json``; None when the server has no such card."""
        proc = self.run(self.admin_cmd("show", SERIAL, "--json"), "vsc admin show", check=False, show=show)
        if proc.returncode != 0:
            if f"no card {SERIAL}" in proc.stderr:
                return None
            raise cli.CommandError(f"vsc admin show failed (exit {proc.returncode}): {_last_line(proc.stderr)}")
        return _json(proc, "vsc admin show")

    def card_daemon_answers(self) -> dict | None:
        """The status of a card process serving the demo card's home, if one answers."""
        from vsc.card.config import control_socket_for

        if not control_socket_for(self.home).exists():
            return None
        proc = _run(self.card_cmd("status", "--json"), "vsc card status", check=False, env=self.card_env)
        if proc.returncode != 0:
            return None
        try:
            return json.loads(proc.stdout)
        except ValueError:
            return None

    def card_settings(self):
        """The demo card's settings (card.ini), or None when it has none."""
        from vsc.card import config as cc

        if not (self.home / cc.CARD_INI).exists():
            return None
        try:
            return cc.load(self.home)
        except cc.CardConfigError:
            return None

    # ------------------------------------------------------------ 1. server data directory

    def prepare_server_dir(self) -> None:
        self.heading(f"Server data directory {_shown(self.server_dir)} (database: embedded SQLite in that directory)")
        self.root.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(exist_ok=True)
        if (self.server_dir / "vsc-server.ini").exists() and (self.server_dir / "server-key.pem").exists():
            info = _json(self.run(self.admin_cmd("fingerprint", "--json"), "vsc admin fingerprint"),
                         "vsc admin fingerprint")
            _say("   it already exists: reusing it (same server key, same database, same cards)")
        else:
            t0 = _clock()
            info = _json(self.run(self.admin_cmd("init", "--key-bits", str(self.args.key_bits), "--json"),
                                  "vsc admin init"), "vsc admin init")
            _say(f"   created it with a new RSA-{self.args.key_bits} server key in {_clock() - t0:.1f} s")
            _say(f"   database: {info.get('database')}")
        self.fingerprint = info["fingerprint"]
        _say(f"   server key fingerprint (cards pin this): {self.fingerprint}")

    # ------------------------------------------------------------ 2. server

    def preferred_port(self) -> tuple[int, bool]:
        """(port, whether the user chose it): --port, else the port the demo card knows, else 7390."""
        if self.args.port is not None:
            return self.args.port, True
        cfg = self.card_settings()
        if cfg is not None and cfg.server.startswith("tcp:127.0.0.1:"):
            try:
                return int(cfg.server.rsplit(":", 1)[1]), False
            except ValueError:
                pass
        return DEFAULT_PORT, False

    def start_server(self) -> None:
        self.heading("Starting the VSC Server as a separate process")
        port, chosen = self.preferred_port()
        if not chosen and not _port_is_free(port):
            free = _any_free_port()
            _say(f"   port {port} is taken; using free port {free} instead")
            port = free
        for attempt in (1, 2):
            server = ServerProcess(self.twistd, self.server_dir, port, self.server_log, self.root)
            _say(f"   $ {_display(server.cmd)}")
            self.server = server
            server.start()
            try:
                took = server.wait_ready()
            except cli.CommandError:
                server.stop(STOP_TIMEOUT)
                if attempt == 1 and not chosen and server.startup_failed_on_port():
                    port = _any_free_port()
                    _say(f"   that port was taken meanwhile; retrying on free port {port}")
                    continue
                raise
            _say(f"   server pid {server.pid} listening on 127.0.0.1:{port} after {took:.1f} s; "
                 f"log: {_shown(self.server_log)}")
            return

    # ------------------------------------------------------------ 3. enrol, or reuse the card

    def password(self) -> None:
        if self.password_file.exists():
            return
        fd = os.open(self.password_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_urlsafe(24) + "\n")

    def enrol_or_reuse(self) -> None:
        assert self.server is not None
        self.heading(f"The demo card {SERIAL!r}")
        info = self.show_card()
        cfg = self.card_settings()
        usable = cfg is not None and cfg.serial == SERIAL and cfg.server_key == self.fingerprint \
            and self.password_file.exists()
        if info is not None and info["state"] != "issued":
            if not usable:
                raise cli.CommandError(
                    f"the server already has a card {SERIAL} ({info['state']}) but {_shown(self.home)} cannot use it "
                    f"(its settings or {_shown(self.password_file)} are missing): "
                    f"delete {_shown(self.root)} to start the demo afresh"
                )
            self.reuse(info, cfg)
            return
        if info is None:
            _say(f"   the server has no card {SERIAL} yet: enrol one")
        else:
            _say(f"   {SERIAL} was issued but never enrolled: issue a fresh code and enrol it")
        self.enrol(force=cfg is not None)

    def enrol(self, force: bool) -> None:
        assert self.server is not None
        issued = _json(self.run(self.admin_cmd("issue", SERIAL, "--json"), "vsc admin issue"), "vsc admin issue")
        _say(f"   one-time enrolment code {issued['code']} (what the administrator hands the card's owner)")
        self.password()
        _say(f"   the owner's password: a random one in {_shown(self.password_file)} (mode 0600)")
        cmd = self.card_cmd("enroll", "--server", self.server.endpoint, "--server-key", self.fingerprint,
                            "--serial", SERIAL, "--code", issued["code"], "--password-file", str(self.password_file),
                            "--json")
        if force:
            cmd.insert(-1, "--force")
        t0 = _clock()
        result = _json(self.run(cmd, "vsc card enroll", env=self.card_env), "vsc card enroll")
        slots = ", ".join(f"{s} {k}" for s, k in sorted(result.get("slots", {}).items()))
        _say(f"   card {SERIAL} enrolled in {_clock() - t0:.1f} s: keys made on this machine ({slots}), "
             f"sealed under a key derived from the password ({result.get('kdf')}), uploaded; "
             f"the server never sees the password")

    def reuse(self, info: dict, cfg) -> None:
        assert self.server is not None
        from vsc.card import config as cc

        _say(f"   already enrolled (server state {info['state']}, version {info['version']}): "
             "reusing it (enrolling again would need a new code)")
        if cfg.server != self.server.endpoint:
            cc.save(self.home, **{**cfg.settings, "server": self.server.endpoint})
            _say(f"   the server listens on a new port: {_shown(self.home / cc.CARD_INI)} now says "
                 f"server = {self.server.endpoint}")
        if info.get("locked_out"):
            raise cli.CommandError(
                f"card {SERIAL} is locked out after {info.get('failures')} failed authentications; clear it with: "
                f"{_display(self.admin_cmd('unlock', SERIAL))}"
            )
        if info["state"] == "destroyed":
            raise cli.CommandError(
                f"card {SERIAL} has been destroyed, which is final; delete {_shown(self.root)} to start the demo afresh"
            )
        if info["state"] == "in-use":
            status = self.card_daemon_answers()
            if status is not None and status.get("state") == "in-use":
                _say("   it is still in use by a card process from earlier: remove it through that process")
                self.run(self.card_cmd("remove", "--json"), "vsc card remove", env=self.card_env)
            else:
                _say("   the server still has it in use, but no card process serves it (an earlier demo was killed):")
                _say("   recover it; only this machine, where it was last inserted, may")
                self.recover()
            after = self.show_card(show=False)
            if after is None or after["state"] != "idle":
                raise cli.CommandError(f"card {SERIAL} is still {after and after['state']}; see {_shown(self.server_log)}")
            _say(f"   card {SERIAL} is idle again (version {after['version']})")

    def recover(self) -> None:
        t0 = _clock()
        self.run(self.card_cmd("recover", "--password-file", str(self.password_file), "--json"),
                 "vsc card recover", env=self.card_env)
        _say(f"   recovered in {_clock() - t0:.1f} s")

    # ------------------------------------------------------------ 4. insert

    def insert(self) -> None:
        self.heading("Inserting the card: the card process downloads and decrypts it, then serves it")
        self.lock_dir.mkdir(exist_ok=True)
        cmd = [self.twistd, "-n", "--pidfile=", "vsc-card", "--home", str(self.home),
               "--password-file", str(self.password_file)]
        _say(f"   $ VSC_LOCK_DIR={shlex.quote(_shown(self.lock_dir))} {_display(cmd)}")
        self.card = Child("card", cmd, self.card_log, self.root, self.card_env)
        t0 = _clock()
        self.card.start()
        status_cmd = self.card_cmd("status", "--json")
        _say(f"   $ {_display(status_cmd)}   (repeated until it says in-use)")
        status = self.wait_in_use(t0)
        _say(f"   card {status['serial']} is {status['state']} after {_clock() - t0:.1f} s: card process pid "
             f"{self.card.pid}, version {status['version']}, channel suite {status.get('suite')}; "
             f"log: {_shown(self.card_log)}")
        slots = ", ".join(f"{k} {v['algorithm']}" for k, v in sorted(status.get("slots", {}).items()))
        _say(f"   slots: {slots}")

    def wait_in_use(self, t0: float) -> dict:
        from vsc.card.config import control_socket_for

        assert self.card is not None and self.card.proc is not None
        sock = control_socket_for(self.home)
        last = ""
        while True:
            code = self.card.proc.poll()
            if code is not None:
                raise cli.CommandError(
                    f"the card process exited with code {code} before the card was in use; "
                    f"see {_shown(self.card_log)}\n{_tail(self.card_log)}"
                )
            if sock.exists():
                proc = _run(self.card_cmd("status", "--json"), "vsc card status", check=False, env=self.card_env)
                if proc.returncode == 0:
                    status = _json(proc, "vsc card status")
                    if status.get("state") == "in-use":
                        return status
                    last = f"state {status.get('state')}"
                else:
                    last = _last_line(proc.stderr)
            if _clock() - t0 > INSERT_TIMEOUT:
                raise cli.CommandError(
                    f"the card was not in use within {INSERT_TIMEOUT:.0f} s ({last or 'no control socket yet'}); "
                    f"see {_shown(self.card_log)} and {_shown(self.server_log)}"
                )
            time.sleep(0.1)  # clock-ok: polling a child process from a CLI

    # ------------------------------------------------------------ 5. sign and verify

    def sign_and_verify(self) -> None:
        how = "openssl" if self.openssl else "vsc.crypto (openssl is not installed)"
        self.heading(f"Signing a message with the card and verifying the signatures with {how}")
        message = self.work / "message.txt"
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")  # clock-ok: a timestamp in the demo's message
        text = f"signed by the Virtual Smart Card {SERIAL} at {stamp}\n"
        message.write_text(text)
        _say(f"   message: {_shown(message)} ({text.strip()!r})")
        tampered = self.work / "message-changed.txt"
        tampered.write_text(text.replace("signed", "forged"))
        for slot in ("9a", "9c"):
            pem_path = self.work / f"{slot}.pem"
            sig_path = self.work / f"message.{slot}.sig"
            pem = self.run(self.card_cmd("public-key", "--slot", slot), "vsc card public-key",
                           redirect=pem_path).stdout.strip() + "\n"
            if "BEGIN PUBLIC KEY" not in pem:
                raise cli.CommandError(f"vsc card public-key printed no PEM public key: {_last_line(pem)}")
            pem_path.write_text(pem)
            self.run(self.card_cmd("sign", "--slot", slot, "--in", str(message), "--out", str(sig_path)),
                     "vsc card sign")
            size = sig_path.stat().st_size
            if self.openssl:
                verify = [self.openssl, "dgst", "-sha256", "-verify", str(pem_path), "-signature", str(sig_path)]
                proc = self.run(verify + [str(message)], "openssl dgst -verify", check=False)
                ok = proc.returncode == 0 and "Verified OK" in proc.stdout
                said = _last_line(proc.stdout + proc.stderr)
                forged = _run(verify + [str(tampered)], "openssl dgst -verify", check=False, cwd=self.root)
                refused = forged.returncode != 0
            else:
                from vsc import crypto

                der = crypto.public_der_from_pem(pem.encode())
                ok = crypto.verify_sha256(der, message.read_bytes(), sig_path.read_bytes())
                said = "valid" if ok else "INVALID"
                refused = not crypto.verify_sha256(der, tampered.read_bytes(), sig_path.read_bytes())
            if not ok:
                raise cli.CommandError(f"the slot {slot} signature did not verify: {said}")
            if not refused:
                raise cli.CommandError(f"the slot {slot} signature also verified over a changed message")
            _say(f"   slot {slot} ({SLOT_TEXT[slot]}): {size}-byte signature verified ({said}); "
                 "over a changed message it fails, as it must")
            self.signatures += 1

    # ------------------------------------------------------------ 6. counter

    def step_counter(self) -> None:
        self.heading("Stepping a counter on the card (stored on the server before it is acknowledged)")
        value = _json(self.run(self.card_cmd("counter", COUNTER, "--add", "1", "--json"), "vsc card counter"),
                      "vsc card counter")["value"]
        note = "" if value == 1 else " (the card kept it across remove and insert)"
        _say(f"   {COUNTER} = {value}{note}")

    # ------------------------------------------------------------ 7. the server's view

    def server_view(self) -> None:
        self.heading("What the server knows about the card (never its protected information)")
        info = self.show_card()
        if info is None or info["state"] != "in-use":
            raise cli.CommandError(f"the server says the card is {info and info['state']}, not in-use")
        _say("   " + self.highlights(info))

    @staticmethod
    def highlights(info: dict) -> str:
        parts = [f"state {info['state']}", f"version {info['version']}"]
        if info.get("muk"):
            parts.append(f"machine (MUK) {info['muk'][:16]}...")
        if info.get("protected_bytes") is not None:
            parts.append(f"{info['protected_bytes']} bytes of encrypted protected information")
        parts.append(f"{info.get('failures', 0)} failed authentications")
        return ", ".join(parts)

    # ------------------------------------------------------------ 8. channels (optional)

    def channels(self) -> None:
        from vsc.protocol.suites import DEFAULT_SUITES

        assert self.server is not None
        self.heading("The protected channel with every modern suite, with and without forward secrecy")
        count = self.args.count
        template = [self.vsc, "ping", "--server", self.server.endpoint, "--server-key", self.fingerprint,
                    "--suites", "SUITE", "--forward-secrecy", "off|require", "--count", str(count), "--json"]
        _say(f"   $ {_display(template)}")
        _say(f"   {'suite':<24} {'forward secrecy':<23} {'handshake':>10}  {'sealed echo records':<22} {'median rtt':>10}")
        for suite in DEFAULT_SUITES:
            for fs in FORWARD_SECRECY_MODES:
                what = f"vsc ping ({suite.label}, forward secrecy {fs})"
                cmd = [self.vsc, "ping", "--server", self.server.endpoint, "--server-key", self.fingerprint,
                       "--suites", suite.label, "--forward-secrecy", fs, "--count", str(count), "--json"]
                proc = self.run(cmd, what, check=False, show=False)
                if proc.returncode != 0:
                    raise cli.CommandError(f"{what} failed (exit {proc.returncode}): {_last_line(proc.stderr)}; "
                                           f"see {_shown(self.server_log)}")
                r = _json(proc, what)
                problems = []
                if r.get("suite") != suite.label:
                    problems.append(f"negotiated {r.get('suite')!r}")
                if bool(r.get("forward_secret")) != (fs == "require"):
                    problems.append(f"forward_secret={r.get('forward_secret')!r}")
                if r.get("server_key") != self.fingerprint:
                    problems.append(f"server key {r.get('server_key')!r} is not the pinned one")
                if r.get("records") != count:
                    problems.append(f"{r.get('records')!r} records instead of {count}")
                if problems:
                    raise cli.CommandError(f"{what}: unexpected result: {'; '.join(problems)}")
                fs_text = "X25519 (forward secret)" if r["forward_secret"] else "off (plain Figure 7)"
                records = f"{r['records']} x {r.get('record_bytes', '?')} B, all echoed"
                rtt = r.get("median_rtt_ms")
                _say(f"   {suite.label:<24} {fs_text:<23} {r.get('handshake_ms', 0):>7.1f} ms  {records:<22} "
                     f"{(f'{rtt:.2f} ms' if rtt is not None else '-'):>10}")
        wrong = [self.vsc, "ping", "--server", self.server.endpoint, "--server-key", _wrong_fingerprint()]
        proc = self.run(wrong, "vsc ping with a wrong pinned key", check=False)
        if proc.returncode == 0:
            raise cli.CommandError("the handshake with a WRONG pinned key succeeded: server key pinning is broken")
        message = _last_line(proc.stderr)
        if "SERVER_KEY_MISMATCH" not in message:
            raise cli.CommandError(f"the wrong-key ping failed for another reason than the pin: {message}")
        _say(f"   a wrong pinned key is refused (exit {proc.returncode}): {message}")

    # ------------------------------------------------------------ 9. stay up

    def try_next(self) -> None:
        assert self.server is not None and self.card is not None
        b = _shown(_bindir())
        vsc = shlex.quote(f"{b}/vsc")
        home = shlex.quote(_shown(self.home))
        data = shlex.quote(_shown(self.server_dir))
        pw = shlex.quote(_shown(self.password_file))
        lock = f"VSC_LOCK_DIR={shlex.quote(_shown(self.lock_dir))}"
        work = _shown(self.work)
        note_in = shlex.quote(f"{work}/note.txt")
        note_out = shlex.quote(f"{work}/note.out")
        mine = shlex.quote(f"{work}/mine.txt")
        mine_sig = shlex.quote(f"{work}/mine.sig")
        pem = shlex.quote(f"{work}/9c.pem")
        card = f"{vsc} card --home {home}"
        admin = f"{vsc} admin --data-dir {data}"
        _say()
        _say(f"The demo stays up: the VSC Server (pid {self.server.pid}) listens on 127.0.0.1:{self.server.port} and "
             f"card {SERIAL} is in use in its card process (pid {self.card.pid}).")
        _say("Try it from another terminal, in this directory:")
        rows = [
            ("the card's state", [f"{card} status"]),
            ("sign a file", [f"echo 'my text' > {mine}",
                             f"{card} sign --slot 9c --in {mine} --out {mine_sig}"]),
        ]
        if self.openssl:
            rows.append(("verify it", [f"openssl dgst -sha256 -verify {pem} -signature {mine_sig} {mine}"]))
        rows += [
            ("step a counter", [f"{card} counter {COUNTER} --add 1"]),
            ("store a secret", [f"echo 's3cret' > {note_in}", f"{card} data put note --in {note_in}"]),
            ("read it back", [f"{card} data get note --out {note_out} && cat {note_out}"]),
            ("the server's view", [f"{admin} list", f"{admin} show {SERIAL}", f"{admin} history {SERIAL}"]),
            ("the channel", [f"{vsc} ping --server {self.server.endpoint} --server-key {self.fingerprint}"]),
            ("remove the card", [f"{card} remove   # uploads it, sets it idle, ends the card process"]),
            ("insert it again", [f"{lock} {shlex.quote(f'{b}/twistd')} -n --pidfile= vsc-card --home {home} "
                                 f"--password-file {pw}"]),
            ("after a crash", [f"{lock} {card} recover --password-file {pw}   "
                               "# frees a card a killed card process left in use (this machine only)"]),
        ]
        agent = self.ssh_agent_socket()
        if agent:
            rows.append(("ssh with the card", [f"{card} ssh-pubkey   # authorized_keys lines",
                                               f"SSH_AUTH_SOCK={shlex.quote(agent)} ssh-add -l"]))
        rows.append(("logs", [f"{_shown(self.server_log)}  {_shown(self.card_log)}"]))
        for label, lines in rows:
            for i, line in enumerate(lines):
                _say(f"  {(label + ':') if i == 0 else '':<19} {line}")
        _say("Press Ctrl-C to stop: the card is removed (uploaded and set idle), then the server stops.")

    def _card_says(self) -> list[str]:
        """The lines the card process wrote for its user (``vsc-card: ...``) in its log."""
        try:
            text = self.card_log.read_text(errors="replace")
        except OSError:
            return []
        return [ln for ln in text.splitlines() if "vsc-card: " in ln]

    def ssh_agent_socket(self) -> str | None:
        """The card process's ssh-agent socket, when this version of it serves one."""
        marker = "vsc-card: ssh-agent on "
        for line in self._card_says():
            if marker in line:
                return line.split(marker, 1)[1].split(";", 1)[0].strip() or None
        return None

    def stay_up(self) -> None:
        assert self.server is not None and self.card is not None
        card_noted = False
        while True:
            code = self.server.proc.poll() if self.server.proc else None
            if code is not None:
                raise cli.CommandError(f"the server exited unexpectedly (code {code}); see {_shown(self.server_log)}\n"
                                       f"{_tail(self.server_log)}")
            if not card_noted and not self.card.alive():
                card_noted = True
                code = self.card.proc.returncode
                _say()
                if code == 0:
                    _say("(the card process exited: the card was removed, as 'vsc card remove' does; insert it again "
                         "with the command above; Ctrl-C still stops the demo)")
                else:
                    how = f"code {code}" if code > 0 else f"killed by {signal.Signals(-code).name}"
                    _say(f"(the card process ended ({how}) without removing the card: the server still has it in use. "
                         "Free it with the 'after a crash' command above, or press Ctrl-C: the demo recovers it)")
            time.sleep(0.25)  # clock-ok: waiting for Ctrl-C while watching the children

    # ------------------------------------------------------------ shutdown

    def shutdown(self) -> dict | None:
        """Remove the card, stop the server, return the card's final record. Bounded; raises CommandError."""
        self.heading("Stopping: remove the card, then stop the server")
        problems = []
        if self.card is not None and self.card.alive():
            _say(f"   SIGTERM to the card process (pid {self.card.pid}): it uploads the card, sets it idle, exits")
            t0 = _clock()
            code, killed = self.card.stop(CARD_STOP_TIMEOUT)
            if killed:
                problems.append(f"the card process did not exit within {CARD_STOP_TIMEOUT:.0f} s and was killed; "
                                f"see {_shown(self.card_log)}")
            else:
                how = f"exit code {code}" if code >= 0 else f"ended by {signal.Signals(-code).name}"
                said = [ln.split("vsc-card: ", 1)[1].strip() for ln in self._card_says()
                        if "removed" in ln or "remove failed" in ln]
                _say(f"   card process exited after {_clock() - t0:.2f} s ({how}); it said: "
                     f"{said[-1] if said else '(nothing about the removal; see ' + _shown(self.card_log) + ')'}")
        if self.server is not None and self.server.alive():
            info = self.show_card(show=False)
            if info is not None and info["state"] == "in-use":
                status = self.card_daemon_answers()
                if status is not None:
                    _say("   another card process (started by hand) still serves the card: removing it through it")
                    self.run(self.card_cmd("remove", "--json"), "vsc card remove", env=self.card_env)
                else:
                    _say("   the card is still in use with no card process left: recovering it")
                    self.recover()
            t0 = _clock()
            pid = self.server.pid
            code, killed = self.server.stop(STOP_TIMEOUT)
            if killed:
                problems.append(f"the server did not exit within {STOP_TIMEOUT:.0f} s and was killed; "
                                f"see {_shown(self.server_log)}")
            elif code not in (0, -signal.SIGTERM):
                problems.append(f"the server exited with code {code} when stopped; see {_shown(self.server_log)}")
            else:
                _say(f"   server stopped (pid {pid}) after {_clock() - t0:.2f} s; nothing is left running")
        final = None
        if (self.server_dir / "vsc-server.ini").exists():
            final = self.show_card()
            if final is not None:
                _say("   " + self.highlights(final))
        if problems:
            raise cli.CommandError("; ".join(problems))
        return final

    def kill_all(self) -> None:
        for child in (self.card, self.server):
            if child is not None:
                child.kill()


# ---------------------------------------------------------------- the command


def cmd_demo(args) -> int:
    t_start = _clock()
    demo = Demo(args)
    _say("vsc demo: a VSC Server on SQLite and a Virtual Smart Card (EP 0 936 530), each its own process:")
    _say("the card is enrolled, inserted, used to sign, then removed, over the protected channel of Figure 7.")
    _say(f"Everything lives in {_shown(demo.root)}/ (delete it to start afresh).")

    stopping = {"now": False}

    def on_signal(signum, frame):
        if stopping["now"]:
            _say(f"   ({signal.Signals(signum).name}: already stopping, please wait; every wait is bounded)")
            return
        raise _Stop(signum)

    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, on_signal)  # installed even when SIGINT was ignored (a background job)

    error: BaseException | None = None
    interrupted: int | None = None
    final: dict | None = None
    try:
        try:
            demo.prepare_server_dir()
            demo.start_server()
            demo.enrol_or_reuse()
            demo.insert()
            demo.sign_and_verify()
            demo.step_counter()
            demo.server_view()
            if args.channels:
                demo.channels()
            demo.up = True
            demo.up_after = _clock() - t_start
            if not args.once:
                demo.try_next()
                demo.stay_up()
        except _Stop as e:
            interrupted = e.signum
            _say()
            _say(f"({signal.Signals(e.signum).name} received: stopping)")
        except KeyboardInterrupt:
            interrupted = signal.SIGINT
            _say()
            _say("(SIGINT received: stopping)")
        except cli.CommandError as e:
            error = e
        stopping["now"] = True
        try:
            final = demo.shutdown()
        except cli.CommandError as e:
            if error is None:
                error = e
            else:
                print(f"vsc: while stopping: {e}", file=sys.stderr, flush=True)
    finally:
        demo.kill_all()  # no-op unless something unexpected happened
        for s, h in previous.items():
            signal.signal(s, h)

    if error is not None:
        raise error
    state = final.get("state") if final is not None else None
    if state not in ("idle", None) or (state is None and demo.up):
        raise cli.CommandError(
            f"the demo card ended {state or 'missing'}, not idle; see {_shown(demo.card_log)} "
            f"and {_shown(demo.server_log)}"
        )
    elapsed = _clock() - t_start
    _say()
    if not demo.up:
        _say(f"Interrupted before the demo was up, after {elapsed:.1f} s; nothing is left running.")
        return 128 + int(interrupted or signal.SIGINT)
    took = f"in {elapsed:.1f} s" if args.once else f"(every step done {demo.up_after:.1f} s after the start)"
    _say(f"Demo finished {took}: card {SERIAL} enrolled or reused, inserted, {demo.signatures} signatures "
         f"made and verified, a counter stepped, the card removed (idle), the server stopped.")
    if args.once:
        _say(f"Run '{shlex.quote(_shown(_bindir()) + '/vsc')} demo' (or './quickstart demo') without --once to keep it "
             "up and try the card yourself; './quickstart test' runs the test suite.")
    else:
        _say("Run it again any time: the same card is inserted again. './quickstart test' runs the test suite.")
    return cli.EXIT_OK


def _add_demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run a server and a demo card end to end, then stay up to try it (Ctrl-C stops it)",
        description=(
            "In a demo directory: create a VSC Server on SQLite and start it on 127.0.0.1, enrol the demo card "
            f"{SERIAL} (or reuse it), insert it with its own card process, sign a message with slots 9a and 9c "
            "and verify the signatures with openssl, step a counter, show the server's record, then stay up and "
            "print what to try next. Ctrl-C or SIGTERM removes the card, stops the server and prints the final state."
        ),
    )
    p.add_argument("--dir", help=f"the demo directory (default: $VSC_DEMO_DIR, else ./{DEFAULT_DIR})")
    p.add_argument("--port", type=int, help=f"TCP port on 127.0.0.1 (default: {DEFAULT_PORT}, or a free one if taken)")
    p.add_argument("--key-bits", type=int, default=3072, choices=(2048, 3072, 4096),
                   help="server key size when the server directory is created (default: 3072)")
    p.add_argument("--once", "--no-wait", dest="once", action="store_true",
                   help="do every step, then shut down at once (exit 0 only if every step succeeded)")
    p.add_argument("--channels", action="store_true",
                   help="also open a channel per modern suite with and without forward secrecy, "
                        "and show a wrong pinned server key refused")
    p.add_argument("--count", type=int, default=3, help="with --channels: sealed echo records per channel (default: 3)")
    p.set_defaults(func=cmd_demo)

