"""
A private PostgreSQL cluster for the test session, never the system one.

``Cluster.start()`` runs the real ``initdb`` and ``pg_ctl`` (Debian puts them
in /usr/lib/postgresql/<major>/bin) on a fresh temporary directory: trust
authentication, listening only on 127.0.0.1 on a free port, its unix socket
inside the temporary directory, fsync on. PostgreSQL refuses to run as root,
so as root the directory is handed to the ``postgres`` system user and the
programs run through ``runuser -u postgres --``. ``stop()`` stops the server
(``pg_ctl stop -m fast``) and deletes the directory.

``fresh_database()`` creates a database with a unique name, for one test.
When something is missing, ``tests.integration.missing`` skips locally and
fails under VSC_REQUIRE_INTEGRATION=1.
"""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path
from typing import Iterator

from tests.integration import missing

SUPERUSER = "postgres"
START_TIMEOUT = 30


def find_bindir() -> str | None:
    """The newest /usr/lib/postgresql/*/bin holding both initdb and pg_ctl (the real binaries)."""

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, bindir: str):
        self.bindir = bindir
        self.as_root = os.geteuid() == 0
        self.root: Path | None = None
        self.port = 0
        self.started = False
        self.start_seconds = 0.0

    # ------------------------------------------------------------ running programs

    def _run(self, program: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
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
            with contextlib.suppress(OSError):
                log = (self.root / "server.log").read_text()[-2000:]
            raise RuntimeError(f"{what} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}\n{log}")

    # ------------------------------------------------------------ life cycle

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

    def start(self) -> None:
        t0 = time.monotonic()
        self.root = Path(tempfile.mkdtemp(prefix="vsc-pg-", dir=self._temp_parent()))
        if self.as_root:
            pw = pwd.getpwnam(SUPERUSER)
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        data = self.root / "data"
        sock = self.root / "sock"
        proc = self._run(
            "initdb", "-D", str(data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8", "--locale=C",
            "--no-sync", "--no-instructions",
        )
        self._check(proc, "initdb")
        # the socket directory, owned by the cluster's owner
        sock.mkdir(mode=0o700)
        if self.as_root:
            pw = pwd.getpwnam(SUPERUSER)
            os.chown(sock, pw.pw_uid, pw.pw_gid)
        with open(data / "postgresql.conf", "a") as f:
            f.write(
                "\n# vsc test cluster\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{sock}'\n"
                "fsync = on\n"
                "max_connections = 200\n"
                "shared_buffers = 32MB\n"
            )
        # trust only over loopback and the private socket
        (data / "pg_hba.conf").write_text(
            "local all all trust\nhost all all 127.0.0.1/32 trust\n"
        )
        for attempt in range(5):
            self.port = free_port()
            proc = self._run(
                "pg_ctl", "start", "-w", "-t", str(START_TIMEOUT), "-D", str(data),
                "-l", str(self.root / "server.log"), "-o", f"-p {self.port}",
                timeout=START_TIMEOUT + 10,
            )
            if proc.returncode == 0:
                break
            if attempt == 4:
                self._check(proc, "pg_ctl start")
        self.started = True
        self.start_seconds = time.monotonic() - t0

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

    # ------------------------------------------------------------ URLs and databases

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

    @contextlib.contextmanager
    def fresh_database(self) -> Iterator[str]:
        """A new, empty database for one test; dropped afterwards (even with connections left open)."""
        import psycopg

        name = "vsc_" + uuid.uuid4().hex[:16]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        try:
            yield self.url(name)
        finally:
            with psycopg.connect(self.url(), autocommit=True) as conn:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def start_cluster() -> Cluster:
    """Start the session's cluster, or call ``missing`` (skip locally, fail in CI)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        missing("psycopg is not installed (pip install 'vsc[postgres]')")
    bindir = find_bindir()
    if bindir is None:
        missing("PostgreSQL server binaries (initdb, pg_ctl) not found under /usr/lib/postgresql/*/bin or on PATH")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            missing("running as root and there is no 'postgres' system user to run PostgreSQL as")
        if shutil.which("runuser") is None:
            missing("running as root and runuser is not available to drop to the 'postgres' user")
    cluster = Cluster(bindir)
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    return cluster
