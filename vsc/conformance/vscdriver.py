"""
The card-mode operations driver for vsc's own card: ``python -m
vsc.conformance.vscdriver ACTION --dir DIR --endpoint E --fingerprint FP
--serial S [--code C]``, the default ``--card-driver`` of ``vsc conformance
--card`` (docs/integrator.md "Conformance"). A second card implementation
writes its own driver with the same five actions; each exits 0 when the
action succeeded and non-zero (one line on stderr) when the card refused or
failed:

* ``enrol``: enrol serial S with the one-time code C at the server E pinned
  to FP (the card keeps what it needs, its HOME, under DIR);
* ``insert``: insert the card and keep it serving (a daemon) until
  ``remove``; exit 0 once it serves, non-zero if it refused to (e.g. the
  protected information is older than it has seen: docs/security.md);
* ``step``: make one change the card must store on the server before it
  acknowledges it (here a counter step, which syncs);
* ``remove``: remove the card (upload, set idle) and stop serving;
* ``stop``: stop whatever still runs (cleanup; always exits 0).

For vsc: ``vsc card enroll``, ``twistd -n vsc-card``, ``vsc card counter
conformance --add 1`` and ``vsc card remove``, with the card's HOME, runtime
directory and machine-lock directory under DIR.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time  # clock-ok: the driver waits (bounded) for its daemon, as a person at a terminal would
from pathlib import Path

PASSWORD = "conformance card password"
INSERT_TIMEOUT = 45.0
CLI_TIMEOUT = 60.0


def _bin(name: str) -> str:
    return os.path.join(os.path.dirname(sys.executable), name)


def _env(d: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSC_")}
    rt = d / "rt"
    rt.mkdir(mode=0o700, exist_ok=True)
    lock = d / "lock"
    lock.mkdir(mode=0o700, exist_ok=True)
    env.update(XDG_RUNTIME_DIR=str(rt), VSC_LOCK_DIR=str(lock), PYTHONUNBUFFERED="1")
    return env


def _cli(d: Path, *args: str) -> int:
    r = subprocess.run([_bin("vsc"), "card", "--home", str(d / "home"), *args], env=_env(d),
                       stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=CLI_TIMEOUT)
    if r.returncode != 0:
        print((r.stderr.strip().splitlines() or [f"vsc card {args[0]} exited {r.returncode}"])[-1], file=sys.stderr)
    return r.returncode


def enrol(d: Path, a) -> int:
    pw = d / "password"
    pw.write_text(PASSWORD + "\n")
    pw.chmod(0o600)
    return _cli(d, "enroll", "--server", a.endpoint, "--server-key", a.fingerprint, "--serial", a.serial,
                "--code", a.code, "--password-file", str(pw), "--scrypt-log2n", "10")


def insert(d: Path, a) -> int:
    log, err = d / "daemon.log", d / "daemon.stderr"
    with open(log, "wb") as out, open(err, "wb") as errf:  # fresh: an earlier insert's lines must not count
        proc = subprocess.Popen([_bin("twistd"), "-n", "--pidfile=", "vsc-card", "--home", str(d / "home"),
                                 "--password-file", str(d / "password")], env=_env(d), stdin=subprocess.DEVNULL,
                                stdout=out, stderr=errf, start_new_session=True)
    (d / "daemon.pid").write_text(str(proc.pid))
    deadline = time.monotonic() + INSERT_TIMEOUT  # clock-ok
    while time.monotonic() < deadline:  # clock-ok
        text = log.read_text(errors="replace") + err.read_text(errors="replace")
        if "inserted; control socket" in text:
            return 0
        if proc.poll() is not None:
            lines = [line for line in err.read_text(errors="replace").splitlines() if line.strip()]
            print(lines[-1] if lines else f"the card daemon exited {proc.returncode}", file=sys.stderr)
            return 1
        time.sleep(0.05)  # clock-ok
    stop(d, a)
    print(f"the card was not inserted within {INSERT_TIMEOUT:g} s", file=sys.stderr)
    return 1


def step(d: Path, a) -> int:
    return _cli(d, "counter", "conformance", "--add", "1")


def remove(d: Path, a) -> int:
    code = _cli(d, "remove")
    _wait_gone(d, 20.0)
    return code


def _wait_gone(d: Path, seconds: float) -> bool:
    pid_file = d / "daemon.pid"
    if not pid_file.exists():
        return True
    pid = int(pid_file.read_text())
    deadline = time.monotonic() + seconds  # clock-ok
    while time.monotonic() < deadline:  # clock-ok
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                pid_file.unlink(missing_ok=True)
                return True
        except ChildProcessError:
            pass  # not our child (an earlier driver run started it): ask the kernel whether it is alive
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            pid_file.unlink(missing_ok=True)
            return True
        time.sleep(0.05)  # clock-ok
    return False


def stop(d: Path, a) -> int:
    pid_file = d / "daemon.pid"
    if pid_file.exists():
        pid = int(pid_file.read_text())
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        if not _wait_gone(d, 10.0):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        pid_file.unlink(missing_ok=True)
    return 0


ACTIONS = {"enrol": enrol, "insert": insert, "step": step, "remove": remove, "stop": stop}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vsc.conformance.vscdriver", description=__doc__.splitlines()[1])
    p.add_argument("action", choices=sorted(ACTIONS))
    p.add_argument("--dir", required=True)
    p.add_argument("--endpoint", default="")
    p.add_argument("--fingerprint", default="")
    p.add_argument("--serial", default="")
    p.add_argument("--code", default="")
    a = p.parse_args(argv)
    d = Path(a.dir)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return ACTIONS[a.action](d, a)


if __name__ == "__main__":
    sys.exit(main())
