"""
The doc-test harness: the console examples of README.md and docs/*.md, run.

Markers (HTML comments, invisible on a rendered page), each on a line of its
own before a fenced block (an ``illustrative`` or ``run`` marker may instead be
on the line right after a block's closing fence):

* ``<!-- doc-test: run SESSION -->`` before a ```console block: the block is
  run in SESSION (one per page; a page may have several). A session's blocks
  run in page order, in one bash, in a scratch directory that is also HOME.
* ``<!-- doc-test: illustrative: WHY -->`` before any block: not run (WHY
  says why: a placeholder, a service the harness does not have, ...).
* ``<!-- doc-test: session SESSION after FILE#OTHER -->`` (anywhere on the
  page): SESSION first runs the blocks of FILE's session OTHER, in the same
  scratch directory (the page says "first, as in the README").
* ``<!-- doc-test: session SESSION needs WHAT... -->``: the programs (or
  absolute paths) the session needs (skipped when missing, a failure with
  VSC_REQUIRE_INTEGRATION=1). The machine services a page takes for granted
  are started privately for the session: ``pcscd`` (with vpcd, as Debian's
  pcscd package runs it) and ``/usr/sbin/sshd`` (port 22, logins with keys in
  ``~/.ssh/authorized_keys``, as Debian's openssh-server).
* ``<!-- doc-test: session SESSION path venv -->``: the session starts with
  the venv's bin directory on PATH (every page but the README, which says how
  to put it there).

A *console block* is a fenced block whose info string is ``console``, ``sh``,
``shell`` or ``bash``, or an unlabelled one with a line starting ``$ ``.
Every console block must carry one of the two markers (tests/test_docs.py).

In a run block a line ``$ COMMAND`` is a command (continued by a trailing
``\\`` or by lines starting ``> ``); the lines after it, up to the next
command, are its expected output (stdout and stderr together):

* a line that is only ``...`` matches any number of lines (none too);
* ``...`` inside a line matches any text within that line (serials' codes,
  fingerprints, times, pids);
* anything else must be equal (trailing blanks ignored).

A command that shows no output must print nothing and exit 0; one that shows
output may exit non-zero (the page shows the error the user sees). A command
ending in ``&`` that starts ``twistd`` is a service: the harness waits until
the log it is redirected to says it is ready (the server listens, the card is
inserted) and stops it (SIGTERM) when the session ends, as it does every
process whose pid file is in the scratch directory. When run as root with
unshare(1), each session has its own network and mount namespace: the
documented default ports (7390, vpcd's 35963, ssh's 22) are the session's own,
and so are pcscd and sshd; the scratch ``~/.ssh`` is bound over the user's
real ``~/.ssh`` there, so ssh and sshd (which ask passwd, not $HOME) use it.

    python -m tests.docrun docs/admin.md#revoke   # one session, verbosely
    python -m tests.docrun docs/admin.md          # every session of a page
    python -m tests.docrun --list                 # the sessions and blocks
"""

from __future__ import annotations

import contextlib
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import attrs

ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
DOC_FILES = ("README.md", "docs/admin.md", "docs/card.md", "docs/dongle.md", "docs/integrator.md",
             "docs/licensing.md", "docs/pcsc.md", "docs/security.md", "docs/openpgp.md",
             "docs/protocol.md", "docs/benchmarks.md")
CONSOLE_LANGS = {"console", "sh", "shell", "bash"}
COMMAND_TIMEOUT = 120.0
READY_TIMEOUT = 60.0
STOP_TIMEOUT = 20.0
#: what a service's log says when it is ready, by twistd plugin
READY = {
    "vsc-server": re.compile(r"starting on \d+"),
    "vsc-card": re.compile(r"inserted; control socket"),
}
_MARK = re.compile(r"<!--\s*doc-test:\s*(.*?)\s*-->", re.S)
_FENCE = re.compile(r"^(\s*)(`{3,}|~{3,})\s*([\w+-]*)")
_END = "__DOCRUN_END__"


class DocError(AssertionError):
    """A page does not do what it shows: one message with file:line, the command, expected and got."""


@attrs.define
class Command:
    line: int
    text: str
    expected: list[tuple[int, str]] = attrs.Factory(list)


@attrs.define
class Block:
    path: str
    line: int  # the fence's line, 1-based
    lang: str
    body: list[tuple[int, str]]
    end: int = 0  # the closing fence's line, 1-based
    marker: str | None = None  # "run", "illustrative" or None
    session: str | None = None
    why: str = ""

    @property
    def console(self) -> bool:
        return self.lang in CONSOLE_LANGS or (self.lang == "" and any(t.startswith("$ ") for _, t in self.body))

    def where(self) -> str:
        return f"{self.path}:{self.line}"

    def commands(self) -> list[Command]:
        out: list[Command] = []
        cont = False
        for n, text in self.body:
            if text.startswith("$ ") or text == "$":
                out.append(Command(n, text[2:]))
                cont = text.endswith("\\")
            elif out and (cont or text.startswith("> ")):
                out[-1].text += "\n" + (text[2:] if text.startswith("> ") and not cont else text)
                cont = text.endswith("\\")
            elif out:
                out[-1].expected.append((n, text))
            elif text.strip():
                raise DocError(f"{self.path}:{n}: output before the first '$ ' command of a run block: {text!r}")
        return out


@attrs.define
class Session:
    path: str
    name: str
    blocks: list[Block] = attrs.Factory(list)
    after: str | None = None
    needs: list[str] = attrs.Factory(list)
    venv_path: bool = False

    @property
    def key(self) -> str:
        return f"{self.path}#{self.name}"


@attrs.define
class Page:
    path: str
    blocks: list[Block]
    sessions: dict[str, Session]


def parse(path: str, text: str | None = None) -> Page:
    """The fenced blocks of a page with their markers, and its sessions."""
    if text is None:
        text = (ROOT / path).read_text()
    lines = text.splitlines()
    blocks: list[Block] = []
    sessions: dict[str, Session] = {}
    pending: tuple[int, str] | None = None
    i = 0

    def session(name: str) -> Session:
        return sessions.setdefault(name, Session(path, name))

    while i < len(lines):
        line = lines[i]
        for m in _MARK.finditer(line) if _MARK.fullmatch(line.strip()) else ():  # a marker is a line of its own
            words = m.group(1)
            if words.startswith("session "):
                parts = words.split()
                if len(parts) >= 4 and parts[2] == "after":
                    session(parts[1]).after = parts[3]
                elif len(parts) >= 3 and parts[2] == "needs":
                    session(parts[1]).needs.extend(parts[3:])
                elif parts[2:] == ["path", "venv"]:
                    session(parts[1]).venv_path = True
                else:
                    raise DocError(f"{path}:{i + 1}: unknown doc-test session marker: {words!r}")
            elif blocks and blocks[-1].marker is None and blocks[-1].end == i:
                # right under a block's closing fence: that block's marker (the style of a marker after it)
                _mark(blocks[-1], words, i + 1, session)
            else:
                pending = (i + 1, words)
        fence = _FENCE.match(line)
        if fence:
            indent, ticks, lang = fence.groups()
            start = i + 1
            body = []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith(ticks):
                body.append((i + 1, lines[i][len(indent):] if lines[i].startswith(indent) else lines[i].lstrip()))
                i += 1
            block = Block(path, start, lang, body, end=i + 1)
            if pending is not None:
                _mark(block, pending[1], pending[0], session)
                pending = None
            blocks.append(block)
        elif line.strip() and pending is not None and not _MARK.fullmatch(line.strip()):
            raise DocError(f"{path}:{pending[0]}: a doc-test marker must be followed by a fenced block "
                           f"(line {i + 1} is text)")
        i += 1
    return Page(path, blocks, sessions)


def _mark(block: Block, words: str, at: int, session) -> None:
    path = block.path
    if words.startswith("run "):
        block.marker, block.session = "run", words.split()[1]
        if block.lang != "console":
            raise DocError(f"{path}:{block.line}: a run block must be ```console, not ```{block.lang}")
        session(block.session).blocks.append(block)
    elif words.startswith("illustrative"):
        block.marker, block.why = "illustrative", words.partition(":")[2].strip()
        if not block.why:
            raise DocError(f"{path}:{at}: 'illustrative' needs a reason: illustrative: WHY")
    else:
        raise DocError(f"{path}:{at}: unknown doc-test marker: {words!r}")


def pages() -> list[Page]:
    return [parse(p) for p in DOC_FILES if (ROOT / p).exists()]


def find_session(key: str) -> Session:
    path, _, name = key.partition("#")
    page = parse(path)
    if name not in page.sessions:
        raise DocError(f"{path} has no doc-test session {name!r} (it has: {', '.join(page.sessions) or 'none'})")
    return page.sessions[name]


# ---------------------------------------------------------------- matching


def _line_pattern(expected: str) -> re.Pattern:
    parts = expected.rstrip().split("...")
    return re.compile(".*?".join(re.escape(p) for p in parts) + r"\Z", re.S)


def match(expected: list[str], got: list[str]) -> int | None:
    """None when ``got`` matches ``expected``; else the index of the first expected line that could not be matched."""
    exp = [e.rstrip() for e in expected]
    got = [g.rstrip() for g in got]
    pats = [None if e == "..." else _line_pattern(e) for e in exp]
    best = [0]
    memo: dict[tuple[int, int], bool] = {}

    def go(i: int, j: int) -> bool:
        if (i, j) in memo:
            return memo[i, j]
        best[0] = max(best[0], i)
        if i == len(exp):
            ok = j == len(got)
        elif pats[i] is None:
            ok = any(go(i + 1, k) for k in range(j, len(got) + 1))
        else:
            ok = j < len(got) and bool(pats[i].match(got[j])) and go(i + 1, j + 1)
        memo[i, j] = ok
        return ok

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10000))
    return None if go(0, 0) else min(best[0], max(len(exp) - 1, 0))


# ---------------------------------------------------------------- running


def _namespaces() -> list[str]:
    """unshare(1) for a private network and mount namespace, when we are root and it works here."""
    if os.geteuid() != 0 or shutil.which("unshare") is None or shutil.which("ip") is None:
        return []
    probe = subprocess.run(["unshare", "--net", "--mount", "true"], capture_output=True)
    return ["unshare", "--net", "--mount", "--fork"] if probe.returncode == 0 else []


class Shell:
    """One bash for a session: commands in, their output and exit status out."""

    def __init__(self, cwd: Path, env: dict, log):
        self.cwd, self.log = cwd, log
        self.ns = _namespaces()
        self.proc = subprocess.Popen([*self.ns, "bash", "--noprofile", "--norc"], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.services: list[tuple[int, str]] = []
        self.n = 0
        if self.ns:
            self.run("ip link set lo up", timeout=20)
            # ~/.ssh of the scratch home is also the user's ~/.ssh for programs that ask passwd, not $HOME
            # (ssh's known_hosts, sshd's authorized_keys); the rest of the real home stays as it is
            import pwd

            ssh_dir = Path(pwd.getpwuid(os.getuid()).pw_dir) / ".ssh"
            (cwd / ".ssh").mkdir(mode=0o700, exist_ok=True)
            with contextlib.suppress(OSError):
                ssh_dir.mkdir(mode=0o700)
            if ssh_dir.resolve() != (cwd / ".ssh").resolve():
                status, got = self.run(f"mount --bind {_q(cwd / '.ssh')} {_q(ssh_dir)}", timeout=20)
                if status:
                    raise DocError(f"cannot bind the scratch ~/.ssh over {ssh_dir}: " + " ".join(got))

    def _read_until_end(self, timeout: float) -> str:
        buf = b""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while True:
            m = re.search(rb"%s (\d+)\n" % _END.encode(), buf)
            if m:
                return m.group(1).decode()
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            r, _, _ = select.select([fd], [], [], left)
            if r:
                chunk = os.read(fd, 65536)
                if not chunk:
                    raise DocError(f"the session's shell exited:\n{buf.decode(errors='replace')}")
                buf += chunk

    def run(self, cmd: str, timeout: float = COMMAND_TIMEOUT) -> tuple[int, list[str]]:
        """Run ``cmd`` in the session's shell: (exit status, its output lines)."""
        self.n += 1
        out = self.cwd / f".docrun-{self.n}.out"
        # `$?` survives for the next command ("$ echo $?" shows the exit status, as in a terminal)
        self.proc.stdin.write(f"{{ {cmd}\n}} </dev/null >{_q(out)} 2>&1; __s=$?; echo {_END} $__s; (exit $__s)\n"
                              .encode())
        self.proc.stdin.flush()
        try:
            status = int(self._read_until_end(timeout))
        except TimeoutError:
            raise DocError(f"timed out after {timeout:g} s; output so far:\n{_tail(out)}") from None
        text = out.read_text(errors="replace")
        out.unlink()
        return status, text.splitlines()

    def background(self, cmd: str) -> int:
        """Start ``cmd`` (ending in '&') in the session's shell: its pid."""
        self.proc.stdin.write(f"{cmd.rstrip().rstrip('&')} </dev/null & echo {_END} $!\n".encode())  # noqa: E501
        self.proc.stdin.flush()
        pid = int(self._read_until_end(20))
        self.services.append((pid, cmd))
        return pid

    def close(self) -> None:
        for pid in self._pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and any(_alive(p) for p in self._pids()):
            time.sleep(0.05)
        for pid in self._pids():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def _pids(self) -> list[int]:
        pids = [p for p, _ in reversed(self.services)]
        for top, dirs, files in os.walk(self.cwd):
            for f in files:
                if f.endswith(".pid"):
                    with contextlib.suppress(OSError, ValueError):
                        pids.append(int(Path(top, f).read_text().strip()))
        return [p for p in dict.fromkeys(pids) if _alive(p)]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (our shell's child, not yet reaped) is gone for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _q(p: Path) -> str:
    return "'" + str(p).replace("'", "'\\''") + "'"


def _tail(p: Path, n: int = 3000) -> str:
    try:
        return p.read_text(errors="replace")[-n:]
    except OSError:
        return "(no output file)"


def _read_from(p: Path, offset: int) -> str:
    try:
        with open(p, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")
    except OSError:
        return ""


def _service_log(cmd: str, cwd: Path) -> Path | None:
    m = re.search(r"(?<![0-9&])>>?\s*(\S+)", cmd)
    return (cwd / os.path.expanduser(m.group(1))) if m else None


def _wait_ready(shell: Shell, pid: int, cmd: str, where: str, offset: int = 0) -> None:
    """Wait until what the service wrote to its log since ``offset`` (``>>`` appends) says it is ready."""
    plugin = next((p for p in READY if re.search(rf"\b{p}\b", cmd)), None)
    pattern = READY.get(plugin)
    if plugin == "vsc-card" and "--pcsc" in cmd:  # in the reader, not only inserted
        pattern = re.compile(r"card presented to PC/SC")
    log = _service_log(cmd, shell.cwd)
    if plugin is None or log is None:
        time.sleep(0.5)
        return
    deadline = time.monotonic() + READY_TIMEOUT
    while time.monotonic() < deadline:
        text = _read_from(log, offset)
        if pattern.search(text):
            if plugin == "vsc-card" and "--pcsc" in cmd:
                _wait_in_reader(shell, pid, cmd, where, deadline)
            return
        if not _alive(pid):
            raise DocError(f"{where}: the service `{cmd}` exited before it was ready; its log:\n{text[-3000:]}")
        time.sleep(0.05)
    raise DocError(f"{where}: the service `{cmd}` was not ready within {READY_TIMEOUT:g} s; "
                   f"its log:\n{_tail(log)}")


def _wait_in_reader(shell: Shell, pid: int, cmd: str, where: str, deadline: float) -> None:
    """pcscd notices a card in the vpcd reader at its next poll: wait until `opensc-tool -l` shows one (a user types slower)."""
    while time.monotonic() < deadline:
        status, got = shell.run("opensc-tool -l", timeout=30)
        if any(re.match(r"\d+\s+Yes\s", line) for line in got):
            return
        if not _alive(pid):
            break
        time.sleep(0.2)
    raise DocError(f"{where}: the card of `{cmd}` did not appear in a PC/SC reader within {READY_TIMEOUT:g} s")


def _env(home: Path, venv_path: bool) -> dict:
    keep = ("LANG", "LC_ALL", "TERM", "TZ", "PYTHONHASHSEED", "PYTHONPATH")
    env = {k: v for k, v in os.environ.items() if k in keep}
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env.update(HOME=str(home), USER=os.environ.get("USER", "root"), LOGNAME=os.environ.get("USER", "root"),
               PATH=f"{VENV_BIN}:{path}" if venv_path else path, PYTHONUNBUFFERED="1",
               XDG_RUNTIME_DIR=str(home / ".run"), TZ="UTC", COLUMNS="100")
    return env


def missing_needs(session: Session) -> list[str]:
    out = []
    chain = [session]
    while chain[-1].after:
        chain.append(find_session(chain[-1].after))
    for s in chain:
        for need in s.needs:
            if need.startswith("/"):
                if not os.path.exists(need):
                    out.append(need)
            elif shutil.which(need) is None:
                out.append(need)
    if (_needs(chain, "pcscd") or _needs(chain, "sshd")) and not _namespaces():
        out.append("root with unshare(1) for a private pcscd/sshd")
    return out


def _needs(chain: list[Session], service: str) -> bool:
    return any(os.path.basename(n) == service for s in chain for n in s.needs)


def _chain(session: Session) -> list[Session]:
    chain = [session]
    while chain[-1].after:
        chain.append(find_session(chain[-1].after))
        if len(chain) > 8:
            raise DocError(f"{session.key}: 'after' chain too long (a cycle?)")
    return list(reversed(chain))


def run_session(session: Session, scratch: Path | None = None, verbose: bool = False, out=sys.stdout) -> int:
    """Run a session (after the sessions it follows) in a scratch directory; DocError on the first mismatch."""
    tmp = None
    if scratch is None:
        tmp = tempfile.TemporaryDirectory(prefix="vsc-docrun-")
        scratch = Path(tmp.name)
    chain = _chain(session)
    home = scratch
    (home / ".run").mkdir(mode=0o700, exist_ok=True)
    (home / ".venv").symlink_to(VENV_BIN.parent) if not (home / ".venv").exists() else None
    with contextlib.suppress(OSError):
        os.symlink(ROOT / "quickstart", home / "quickstart")
    shell = Shell(scratch, _env(home, chain[0].venv_path), out)
    ran = 0
    try:
        if _needs(chain, "pcscd"):
            _start_pcscd(shell)
        if _needs(chain, "sshd"):
            _start_sshd(shell)
        for s in chain:
            for block in s.blocks:
                for cmd in block.commands():
                    where = f"{block.path}:{cmd.line}"
                    if verbose:
                        print(f"{where}: $ {cmd.text}", file=out, flush=True)
                    background = _background(cmd.text)
                    if background is not None:
                        log = _service_log(cmd.text, shell.cwd)
                        appends = re.search(r"(?<![0-9&])>>", cmd.text) is not None
                        offset = log.stat().st_size if appends and log is not None and log.exists() else 0
                        if log is not None and not appends:
                            # '>' truncates it anyway, but only once the job runs: an old log must not read as ready
                            with contextlib.suppress(FileNotFoundError):
                                log.unlink()
                        pid = shell.background(background)
                        _wait_ready(shell, pid, cmd.text, where, offset)
                        status, got = 0, []
                    else:
                        try:
                            status, got = shell.run(cmd.text)
                        except DocError as e:
                            raise DocError(f"{where}: `{cmd.text}`: {e}") from None
                    ran += 1
                    _check(block, cmd, status, got, verbose, out)
    finally:
        shell.close()
        if tmp is not None:
            tmp.cleanup()
    return ran


def _start_pcscd(shell: Shell) -> None:
    """A private pcscd (with vpcd) in the session's namespaces: a tmpfs over /run/pcscd."""
    os.makedirs("/run/pcscd", exist_ok=True)
    status, got = shell.run("mount -t tmpfs -o mode=0755 tmpfs /run/pcscd")
    if status:
        raise DocError("cannot mount a private /run/pcscd: " + " ".join(got))
    pid = shell.background(f"pcscd -f >{_q(shell.cwd / '.pcscd.log')} 2>&1 &")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        st, _ = shell.run("test -S /run/pcscd/pcscd.comm && (exec 3<>/dev/tcp/127.0.0.1/35963) 2>/dev/null")
        if st == 0:
            return
        if not _alive(pid):
            break
        time.sleep(0.1)
    raise DocError(f"the session's pcscd did not start:\n{_tail(shell.cwd / '.pcscd.log')}")


SSHD_CONFIG = """\
Port 22
ListenAddress 127.0.0.1
ListenAddress ::1
HostKey {dir}/host_ed25519
PidFile none
UsePAM no
PubkeyAuthentication yes
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
PubkeyAcceptedAlgorithms +ssh-rsa
"""


def _start_sshd(shell: Shell) -> None:
    """
    An sshd like Debian's openssh-server (port 22, keys in ~/.ssh/authorized_keys)
    in the session's namespaces; the scratch directory is the user's home there.
    """
    if not shell.ns:
        raise DocError("a session that needs sshd runs only as root with unshare(1) (port 22 must be its own)")
    d = shell.cwd / ".sshd"
    d.mkdir(mode=0o700, exist_ok=True)
    (d / "sshd_config").write_text(SSHD_CONFIG.format(dir=d))
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # sshd's privilege separation directory
    status, got = shell.run(f"ssh-keygen -q -t ed25519 -N '' -f {_q(d / 'host_ed25519')}")
    if status:
        raise DocError("ssh-keygen for the session's sshd failed: " + " ".join(got))
    pid = shell.background(f"/usr/sbin/sshd -D -e -f {_q(d / 'sshd_config')} >{_q(d / 'sshd.log')} 2>&1 &")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        st, _ = shell.run("(exec 3<>/dev/tcp/127.0.0.1/22) 2>/dev/null")
        if st == 0:
            return
        if not _alive(pid):
            break
        time.sleep(0.1)
    raise DocError(f"the session's sshd did not start:\n{_tail(d / 'sshd.log')}")


def _background(cmd: str) -> str | None:
    """The command without its '&' (and a trailing '# comment') when it ends in one, else None."""
    text = re.sub(r"\s+#[^'\"\n]*$", "", cmd.rstrip()).rstrip()
    if text.endswith("&") and not text.endswith("&&"):
        return text[:-1].rstrip() + " &"
    return None


def _check(block: Block, cmd: Command, status: int, got: list[str], verbose: bool, out) -> None:
    expected = [t for _, t in cmd.expected]
    while expected and not expected[-1].strip():
        expected.pop()
    while got and not got[-1].strip():
        got = got[:-1]
    bad = match(expected, got)
    where = f"{block.path}:{cmd.line}"
    if bad is None and (status == 0 or expected):
        if verbose:
            for g in got:
                print(f"    {g}", file=out)
        return
    if bad is None:
        raise DocError(f"{where}: `{cmd.text}` exited {status} (the page shows no output, so it must succeed)"
                       f"\n--- got:\n" + "\n".join(got))
    line = cmd.expected[bad][0] if cmd.expected else cmd.line
    shown = "\n".join(f"  {n}: {t}" for n, t in cmd.expected) or "  (nothing)"
    raise DocError(
        f"{block.path}:{line}: `{cmd.text}` (exit {status}): output differs from the page, first at the expected "
        f"line {line}: {expected[bad] if expected else '(nothing)'!r}\n--- expected ({block.path}):\n{shown}"
        f"\n--- got:\n" + "\n".join(f"  {g}" for g in got))


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] == "--list":
        for page in pages():
            for b in page.blocks:
                if b.console:
                    print(f"{b.where()}: {b.marker or 'UNMARKED'} {b.session or b.why}")
        return 0
    keys = []
    for arg in argv:
        path, _, name = arg.partition("#")
        rel = str(Path(path).resolve().relative_to(ROOT)) if Path(path).exists() else path
        keys += [f"{rel}#{name}"] if name else [s.key for s in parse(rel).sessions.values()]
    rc = 0
    for key in keys:
        s = find_session(key)
        miss = missing_needs(s)
        if miss:
            print(f"{key}: SKIPPED, missing: {', '.join(miss)}")
            continue
        t = time.monotonic()
        try:
            n = run_session(s, verbose=True)
            print(f"{key}: ok, {n} commands in {time.monotonic() - t:.1f} s")
        except DocError as e:
            print(f"{key}: FAILED\n{e}")
            rc = 1
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
