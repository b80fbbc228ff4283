"""
``vsc demo``: the end-to-end walk-through behind ``./quickstart demo``.

It does what a new administrator and a card would do, each as its own
process, and says what happened at every step:

1. create (or reuse) a server data directory with ``vsc admin init``
   (the embedded default database, SQLite, lives there);
2. start ``twistd -n vsc-server`` on 127.0.0.1 (port 7390, or a free one);
3. run ``vsc ping`` once per modern suite, with and without forward
   secrecy, each pinning the server key's fingerprint and exchanging
   sealed echo records over the protected channel (Figure 7);
4. run ``vsc ping`` pinning a wrong fingerprint, which must be refused;
5. stop the server and print what to try next.

This is a command-line program, not library code: it uses subprocess and
polls with time.sleep. Every wait is bounded, and the server is stopped on
every way out (finally, atexit, SIGTERM; on Linux the server also gets
SIGTERM if this process dies without cleaning up).
"""

from __future__ import annotations

import atexit
import base64
import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from vsc import cli

DEFAULT_DIR = "vsc-demo"
DEFAULT_PORT = 7390
START_TIMEOUT = 15.0  # seconds for the server to accept connections
STOP_TIMEOUT = 10.0  # seconds for the server to exit after SIGTERM
COMMAND_TIMEOUT = 60.0  # seconds for one vsc subcommand
FORWARD_SECRECY_MODES = ("off", "require")
LOG_NAME = "server.log"


# ---------------------------------------------------------------- helpers


def _bindir() -> Path:
    # Not resolved: in a venv, sys.executable is .venv/bin/python (a symlink).
    return Path(sys.executable).parent


def _program(name: str) -> str:
    """The console script ``name`` installed next to this Python, else on PATH."""
    candidate = _bindir() / name
    if candidate.exists():
        return str(candidate)
    import shutil

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
    """A command line for printing: programs by their short name, the rest quoted."""
    return shlex.join([os.path.basename(cmd[0]), *cmd[1:]])


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1] if lines else "(no output)"


def _tail(path: Path, n: int = 5) -> str:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    return "\n".join("      | " + ln for ln in lines[-n:])


def _run(cmd: list[str], what: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(
            cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=COMMAND_TIMEOUT
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


# ---------------------------------------------------------------- the server process


class ServerProcess:
    """``twistd -n vsc-server`` as a child process whose output goes to a log file."""

    def __init__(self, twistd: str, data_dir: Path, port: int):
        self.data_dir = data_dir
        self.port = port
        self.log_path = data_dir / LOG_NAME
        self.cmd = [
            twistd,
            "-n",  # stay in the foreground: this process owns it
            "--pidfile=",  # no twistd.pid in the current directory
            "vsc-server",
            "--data-dir",
            str(data_dir),
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
        ]
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches the demo, which stops the server in order
                preexec_fn=_die_with_parent_hook(),
            )
        atexit.register(self.stop)

    def wait_ready(self, timeout: float = START_TIMEOUT) -> float:
        """Wait until the port accepts connections; returns the seconds it took."""
        assert self.proc is not None
        t0 = time.monotonic()  # clock-ok
        deadline = t0 + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                raise cli.CommandError(
                    f"the server exited with code {code} before listening; see {self.log_path}\n{_tail(self.log_path)}"
                )
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                    return time.monotonic() - t0  # clock-ok
            except OSError:
                pass
            if time.monotonic() > deadline:  # clock-ok
                raise cli.CommandError(f"server did not start within {timeout:.0f} s; see {self.log_path}")
            time.sleep(0.05)  # clock-ok: polling a child process from a CLI

    def startup_failed_on_port(self) -> bool:
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "CannotListenError" in text or "Address already in use" in text

    def stop(self) -> int | None:
        """SIGTERM, wait (bounded), SIGKILL if needed. Returns the exit code. Safe to call twice."""
        proc = self.proc
        if proc is None:
            return None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=STOP_TIMEOUT)
        return proc.returncode


# ---------------------------------------------------------------- the walk-through


def _say(text: str = "") -> None:
    print(text, flush=True)


def _prepare_data_dir(vsc: str, data_dir: Path, key_bits: int) -> dict:
    if (data_dir / "vsc-server.ini").exists() and (data_dir / "server-key.pem").exists():
        cmd = [vsc, "admin", "--data-dir", str(data_dir), "fingerprint", "--json"]
        _say(f"   $ {_display(cmd)}")
        info = _json(_run(cmd, "vsc admin fingerprint"), "vsc admin fingerprint")
        _say("   the directory already exists: reusing it (same server key, so the same fingerprint)")
        return {"fingerprint": info["fingerprint"], "database": None}
    cmd = [vsc, "admin", "--data-dir", str(data_dir), "init", "--key-bits", str(key_bits), "--json"]
    _say(f"   $ {_display(cmd)}")
    t0 = time.monotonic()  # clock-ok
    info = _json(_run(cmd, "vsc admin init"), "vsc admin init")
    _say(f"   created it with a new RSA-{key_bits} server key in {time.monotonic() - t0:.1f} s")  # clock-ok
    return info


def _start_server(twistd: str, data_dir: Path, port: int | None) -> ServerProcess:
    chosen = port if port is not None else DEFAULT_PORT
    if port is None and not _port_is_free(chosen):
        chosen = _any_free_port()
        _say(f"   port {DEFAULT_PORT} is taken; using free port {chosen} instead")
    for attempt in (1, 2):
        server = ServerProcess(twistd, data_dir, chosen)
        _say(f"   $ {_display(server.cmd)}")
        server.start()
        try:
            took = server.wait_ready()
        except cli.CommandError:
            server.stop()
            if attempt == 1 and port is None and server.startup_failed_on_port():
                chosen = _any_free_port()
                _say(f"   that port was taken meanwhile; retrying on free port {chosen}")
                continue
            raise
        _say(f"   server pid {server.proc.pid} listening on 127.0.0.1:{chosen} after {took:.1f} s")
        _say(f"   its log: {_shown(server.log_path)}")
        return server
    raise AssertionError("unreachable")  # pragma: no cover


def _ping_all(vsc: str, server: ServerProcess, fingerprint: str, count: int) -> int:
    from vsc.protocol.suites import DEFAULT_SUITES

    template = [vsc, "ping", "--server", server.endpoint, "--server-key", fingerprint,
                "--suites", "SUITE", "--forward-secrecy", "off|require", "--count", str(count), "--json"]
    _say(f"   $ {_display(template)}")
    _say(f"   {'suite':<24} {'forward secrecy':<23} {'handshake':>10}  {'sealed echo records':<22} {'median rtt':>10}")
    done = 0
    for suite in DEFAULT_SUITES:
        for fs in FORWARD_SECRECY_MODES:
            what = f"vsc ping ({suite.label}, forward secrecy {fs})"
            cmd = [vsc, "ping", "--server", server.endpoint, "--server-key", fingerprint,
                   "--suites", suite.label, "--forward-secrecy", fs, "--count", str(count), "--json"]
            proc = _run(cmd, what, check=False)
            if proc.returncode != 0:
                raise cli.CommandError(
                    f"{what} failed (exit {proc.returncode}): {_last_line(proc.stderr)}; see {server.log_path}"
                )
            r = _json(proc, what)
            problems = []
            if r.get("suite") != suite.label:
                problems.append(f"negotiated {r.get('suite')!r}")
            if bool(r.get("forward_secret")) != (fs == "require"):
                problems.append(f"forward_secret={r.get('forward_secret')!r}")
            if r.get("server_key") != fingerprint:
                problems.append(f"server key {r.get('server_key')!r} is not the pinned one")
            if r.get("records") != count:
                problems.append(f"{r.get('records')!r} records instead of {count}")
            if problems:
                raise cli.CommandError(f"{what}: unexpected result: {'; '.join(problems)}")
            fs_text = "X25519 (forward secret)" if r["forward_secret"] else "off (plain Figure 7)"
            records = f"{r['records']} x {r.get('record_bytes', '?')} B, all echoed"
            rtt = r.get("median_rtt_ms")
            _say(
                f"   {suite.label:<24} {fs_text:<23} {r.get('handshake_ms', 0):>7.1f} ms  {records:<22} "
                f"{(f'{rtt:.2f} ms' if rtt is not None else '-'):>10}"
            )
            done += 1
    _say(f"   every channel pinned the server key {fingerprint}")
    return done


def _ping_wrong_key(vsc: str, server: ServerProcess) -> str:
    wrong = _wrong_fingerprint()
    cmd = [vsc, "ping", "--server", server.endpoint, "--server-key", wrong]
    _say(f"   $ {_display(cmd)}")
    proc = _run(cmd, "vsc ping with a wrong pinned key", check=False)
    if proc.returncode == 0:
        raise cli.CommandError("the handshake with a WRONG pinned key succeeded: server key pinning is broken")
    message = _last_line(proc.stderr)
    if "SERVER_KEY_MISMATCH" not in message:
        raise cli.CommandError(f"the wrong-key ping failed for another reason than the pin: {message}")
    _say(f"   refused, as it must be (exit {proc.returncode}):")
    _say(f"   {message}")
    return message


def cmd_demo(args) -> int:
    t_start = time.monotonic()  # clock-ok
    raw_dir = args.dir or os.environ.get("VSC_DEMO_DIR") or DEFAULT_DIR
    data_dir = Path(raw_dir).expanduser().absolute()
    vsc = _program("vsc")
    twistd = _program("twistd")
    bindir = _shown(_bindir())

    _say("vsc demo: a VSC Server and a card-side client, each its own process, talking over the")
    _say("protected channel of EP 0 936 530 Figure 7 (RSA key transport, then sealed records).")
    _say()
    _say(f"1. Server data directory {_shown(data_dir)} (database: embedded SQLite in that directory)")
    info = _prepare_data_dir(vsc, data_dir, args.key_bits)
    fingerprint = info["fingerprint"]
    _say(f"   server key fingerprint (cards pin this): {fingerprint}")
    if info.get("database"):
        _say(f"   database: {info['database']}")

    server: ServerProcess | None = None
    previous_term = signal.getsignal(signal.SIGTERM)

    def on_sigterm(signum, frame):  # turn SIGTERM into an exception so finally runs
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, on_sigterm)
    try:
        _say()
        _say("2. Starting the VSC Server as a separate process")
        server = _start_server(twistd, data_dir, args.port)

        _say()
        _say(f"3. A card-side client (another process) opens a channel per suite, with and without forward secrecy")
        n = _ping_all(vsc, server, fingerprint, args.count)

        _say()
        _say("4. The same ping pinning a wrong server key: the card must refuse the handshake")
        _ping_wrong_key(vsc, server)

        _say()
        _say("5. Stopping the server")
        pid = server.proc.pid
        code = server.stop()
        if code not in (0, -signal.SIGTERM):
            raise cli.CommandError(f"the server exited with code {code} when stopped; see {server.log_path}")
        how = f"exit code {code}" if code >= 0 else f"ended by {signal.Signals(-code).name}"
        _say(f"   server stopped (pid {pid}, {how}); nothing is left running")
    finally:
        if server is not None:
            server.stop()
        signal.signal(signal.SIGTERM, previous_term)

    elapsed = time.monotonic() - t_start  # clock-ok
    _say()
    _say(f"Demo finished in {elapsed:.1f} s: {n} protected channels established, each exchanging "
         f"{args.count} sealed echo records, and 1 wrong pin refused.")
    _say()
    _say("What to try next:")
    _say(f"  * run the server yourself (Ctrl-C stops it):")
    _say(f"      {bindir}/twistd -n vsc-server --data-dir {_shown(data_dir)}")
    _say(f"  * and from a second terminal ping it (it listens on {DEFAULT_PORT} unless you change vsc-server.ini):")
    _say(f"      {bindir}/vsc ping --server tcp:127.0.0.1:{DEFAULT_PORT} --server-key {fingerprint}")
    _say(f"  * options: {bindir}/vsc ping --help (suites, --forward-secrecy require, --count, --size, --json)")
    _say(f"  * what the server saw: {_shown(data_dir / LOG_NAME)}")
    _say("  * run the whole test suite: ./quickstart test")
    _say("  The card life cycle (insert, remove, recover, destroy), PC/SC, ssh-agent and the dongle come later;")
    _say("  see README.md.")
    return cli.EXIT_OK


def _add_demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="start a throw-away server and show the protected channel working end to end",
        description=(
            "Create (or reuse) a server data directory, start twistd -n vsc-server on 127.0.0.1, "
            "ping it over every modern suite with and without forward secrecy, show that a wrong "
            "pinned key is refused, then stop the server."
        ),
    )
    p.add_argument("--dir", help=f"server data directory (default: $VSC_DEMO_DIR, else ./{DEFAULT_DIR})")
    p.add_argument("--port", type=int, help=f"TCP port on 127.0.0.1 (default: {DEFAULT_PORT}, or a free one if taken)")
    p.add_argument("--key-bits", type=int, default=3072, choices=(2048, 3072, 4096),
                   help="server key size when the directory is created (default: 3072)")
    p.add_argument("--count", type=int, default=3, help="sealed echo records per channel (default: 3)")
    p.set_defaults(func=cmd_demo)


cli._PARSER_EXTENSIONS["top"].append(_add_demo_parser)
