"""
A private, throw-away PostgreSQL cluster for the benchmarks (never the system one).

``PgCluster().start()`` runs the real ``initdb`` and ``pg_ctl`` from
/usr/lib/postgresql/<major>/bin on a fresh temporary directory: trust
authentication, listening only on 127.0.0.1 on a free port, its unix socket in
that directory, default durability (fsync = on, synchronous_commit = on, so it
is comparable with SQLite's synchronous=FULL). PostgreSQL refuses to run as
root, so as root the directory is handed to the ``postgres`` system user and
the programs run through ``runuser -u postgres --``. ``stop()`` stops it
(``pg_ctl stop -m fast``) and deletes the directory.

(tests/pg.py does the same for the test suite; this copy keeps the benchmarks
independent of pytest.)
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
from pathlib import Path

SUPERUSER = "postgres"


def find_bindir() -> str | None:
    def major(path: str) -> float:
        try:
            return float(Path(path).parent.name)
        except ValueError:
            return 0.0

    for bindir in sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=major, reverse=True):
        if all(os.access(os.path.join(bindir, p), os.X_OK) for p in ("initdb", "pg_ctl", "postgres")):
            return bindir
    return None


def unavailable() -> str | None:
    """Why a cluster cannot be started here, or None."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        return "psycopg is not installed (pip install 'vsc[postgres]')"
    if find_bindir() is None:
        return "no PostgreSQL server binaries under /usr/lib/postgresql/*/bin"
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing"
    return None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class PgCluster:
    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.as_root = os.geteuid() == 0
        self.root: Path | None = None
        self.port = 0
        self.started = False

    def _run(self, program: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        cmd = [os.path.join(self.bindir, program), *args]
        if self.as_root:
            cmd = ["runuser", "-u", SUPERUSER, "--", *cmd]
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env["LC_ALL"] = "C"
        return subprocess.run(cmd, cwd=self.root, env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)

    def _chown(self, path: Path) -> None:
        if self.as_root:
            pw = pwd.getpwnam(SUPERUSER)
            os.chown(path, pw.pw_uid, pw.pw_gid)

    def start(self) -> "PgCluster":
        self.root = Path(tempfile.mkdtemp(prefix="vsc-bench-pg-"))
        self._chown(self.root)
        data, sock = self.root / "data", self.root / "sock"
        proc = self._run("initdb", "-D", str(data), "-U", SUPERUSER, "--auth=trust", "-E", "UTF8",
                         "--locale=C", "--no-sync", "--no-instructions")
        if proc.returncode != 0:
            raise RuntimeError(f"initdb failed: {proc.stderr.strip()[-500:]}")
        sock.mkdir(mode=0o700)
        self._chown(sock)
        with open(data / "postgresql.conf", "a") as f:
            f.write(
                "\n# vsc benchmark cluster\n"
                "listen_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{sock}'\n"
                "fsync = on\nsynchronous_commit = on\nmax_connections = 100\nshared_buffers = 64MB\n"
            )
        (data / "pg_hba.conf").write_text("local all all trust\nhost all all 127.0.0.1/32 trust\n")
        for attempt in range(5):
            self.port = _free_port()
            proc = self._run("pg_ctl", "start", "-w", "-t", "30", "-D", str(data),
                             "-l", str(self.root / "server.log"), "-o", f"-p {self.port}", timeout=40)
            if proc.returncode == 0:
                self.started = True
                return self
        raise RuntimeError(f"pg_ctl start failed: {proc.stderr.strip()[-500:]}")

    def postmaster_pid(self) -> int | None:
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.root / "data" / "postmaster.pid").read_text().split()[0])
        return None

    def create_database(self, name: str) -> str:
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def url(self, database: str) -> str:
        return f"postgresql://{SUPERUSER}@127.0.0.1:{self.port}/{database}"

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
