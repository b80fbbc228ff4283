"""
A private, throw-away PostgreSQL cluster (never the system one), for the
integration tests and the benchmarks.

``Cluster().start()`` runs the real ``initdb`` and ``pg_ctl`` (Debian puts
them in /usr/lib/postgresql/<major>/bin) on a fresh temporary directory:
trust authentication, listening only on 127.0.0.1 on a free port, its unix
socket inside that directory, fsync and synchronous_commit on (comparable
with SQLite's synchronous=FULL). PostgreSQL refuses to run as root, so as
root the directory is handed to the ``postgres`` system user and the programs
run through ``runuser -u postgres --``. ``stop()`` stops the server
(``pg_ctl stop -m fast``) and deletes the directory.

``fresh_database()`` (a context manager) and ``create_database(name)`` make
databases in it. ``unavailable()`` says, in one line, why a cluster cannot
be started here (None when it can): the tests turn that into
``tests.integration.missing``, the benchmarks into a note.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time  # clock-ok: how long the cluster took to start
import uuid
from pathlib import Path
from typing import Iterator

from vsc.devtools.process import free_port

SUPERUSER = "postgres"
START_TIMEOUT = 30
#: postgresql.conf settings besides where to listen; a caller may change or add to them.
SETTINGS = {
    "fsync": "on",
    "synchronous_commit": "on",
    "max_connections": "200",
    "shared_buffers": "32MB",
}


def find_bindir() -> str | None:
    """The newest /usr/lib/postgresql/*/bin holding initdb, pg_ctl and postgres, else the directory of initdb on PATH."""

    def major(path: str) -> float:
        try:
            return float(Path(path).parent.name)
        except ValueError:
            return 0.0

    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True):
        if all(os.access(os.path.join(bindir, p), os.X_OK) for p in ("initdb", "pg_ctl", "postgres")):
            return bindir
    # not Debian: initdb/pg_ctl on PATH (skipping Debian's pg_wrapper-style wrappers is best effort)
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return os.path.dirname(os.path.realpath(initdb))
    return None


def unavailable() -> str | None:
    """Why a cluster cannot be started here (one line), or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'vsc[postgres]')"
    if find_bindir() is None:
        return "PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin or on PATH"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            return "running as root and there is no 'postgres' system user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is not available to drop to the 'postgres' user"
    return None


class Cluster:
    """One private cluster; ``start`` it, ``url`` a database in it, ``stop`` it (which deletes everything)."""

    def __init__(self, bindir: str | None = None, settings: dict | None = None, prefix: str = "vsc-pg-"):
        self.bindir = bindir or find_bindir()
        self.settings = {**SETTINGS, **(settings or {})}
        self.prefix = prefix
        self.as_root = os.geteuid() == 0
        self.root: Path | None = None
        self.port = 0
        self.started = False
        self.start_seconds = 0.0

    # ------------------------------------------------------------ running programs

    def _run(self, program: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        if self.bindir is None:
            raise RuntimeError(unavailable() or "PostgreSQL server binaries not found")
        cmd = [os.path.join(self.bindir, program), *args]
        if self.as_root:
            cmd = ["runuser", "-u", SUPERUSER, "--", *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return subprocess.run(
            cmd, cwd=self.root, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout
        )

    def _check(self, proc: subprocess.CompletedProcess, what: str) -> None:
        if proc.returncode != 0:
            log = ""
            with contextlib.suppress(OSError, TypeError):
                log = (self.root / "server.log").read_text()[-2000:]
            raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{log}")

    def _give_to_superuser(self, path: Path) -> None:
        if self.as_root:
            pw = pwd.getpwnam(SUPERUSER)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def _temp_parent(self) -> str:
        """The usual temp dir, unless (as root) the postgres user could not reach into it."""
        parent = tempfile.gettempdir()
        if not self.as_root:
            return parent
        path = Path(parent).resolve()
        for p in (path, *path.parents):
            if not os.stat(p).st_mode & 0o001:  # not searchable by others
                return "/tmp"
        return parent

    # ------------------------------------------------------------ life cycle

    def start(self) -> "Cluster":
        """initdb, configure, pg_ctl start on a free port (a few tries); on any failure nothing is left behind."""
        t0 = time.monotonic()  # clock-ok
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.monotonic() - t0  # clock-ok
        return self

    def _start(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix=self.prefix, dir=self._temp_parent()))
        self._give_to_superuser(self.root)
        data, sock = self.root / "data", self.root / "sock"
        self._check(self._run("initdb", "-D", str(data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                              "--locale=C", "--no-sync", "--no-instructions"), "initdb")
        sock.mkdir(mode=0o700)  # the socket directory, owned by the cluster's owner
        self._give_to_superuser(sock)
        with open(data / "postgresql.conf", "a") as f:
            f.write("\n# vsc private cluster\n"
                    f"listen_addresses = '127.0.0.1'\nunix_socket_directories = '{sock}'\n")
            f.writelines(f"{k} = {v}\n" for k, v in self.settings.items())
        # trust only over loopback and the private socket
        (data / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
        for attempt in range(5):  # another program may take the free port first
            self.port = free_port()
            proc = self._run("pg_ctl", "start", "-w", "-t", str(START_TIMEOUT), "-D", str(data),
                             "-l", str(self.root / "server.log"), "-o", f"-p {self.port}", timeout=START_TIMEOUT + 10)
            if proc.returncode == 0:
                self.started = True
                return
        self._check(proc, "pg_ctl start")

    def stop(self) -> None:
        if self.root is None:
            return
        try:
            if self.started:
                self._run("pg_ctl", "stop", "-m", "fast", "-w", "-D", str(self.root / "data"))
                self.started = False
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError, TypeError):
            return int((self.root / "data" / "postmaster.pid").read_text().split()[0])
        return None

    # ------------------------------------------------------------ URLs and databases

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> str:
        """A new empty database ``name``; its URL."""
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    @contextlib.contextmanager
    def fresh_database(self) -> Iterator[str]:
        """A new, empty database with a unique name; dropped afterwards (even with connections left open)."""
        import psycopg

        url = self.create_database("vsc_" + uuid.uuid4().hex[:16])
        try:
            yield url
        finally:
            with psycopg.connect(self.url(), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{url.rsplit("/", 1)[1]}" WITH (FORCE)')
