"""
This machine, as the card sees it: the Machine Unique Key ([0031], [0053],
[0088]) and the machine lock ([0054], [0089]-[0090]).

MUK sources on Linux (hashed together with SHA-256; docs/card.md lists them):
  * network addresses: every non-loopback interface's hardware address,
    /sys/class/net/*/address
  * the host name: uname(2) nodename (socket.gethostname)
  * the logged-in user: the effective user's login name (pwd)
  * fixed-disk sizes: /sys/block/*/size in 512-byte sectors, for every block
    device that is not loop, ram, zram, or removable (/sys/block/*/removable)
  * swap size: SwapTotal from /proc/meminfo

Every one of those is world-readable, and the login name is in /etc/passwd:
any user of the host could compute them. So the card's MUK is an HMAC of
them under the machine secret, 32 random bytes in the card's HOME
(``machine-secret``, 0600, made at the first use) that only the owner can
read (``machine_muk``): another user of the host cannot produce the owner's
MUK, to recover the card or to fill the owner's own lockout bucket.
"""

from __future__ import annotations

import fcntl
import json
import os
import pwd
import re
import socket
import stat
from pathlib import Path

from vsc import crypto
from vsc.card import paths

LOCK_NAME = "machine.lock"


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def muk_sources(sys_root: str = "/") -> dict:
    root = Path(sys_root)
    macs = []
    net = root / "sys/class/net"
    if net.is_dir():
        for iface in sorted(net.iterdir()):
            if iface.name == "lo":
                continue
            mac = _read(iface / "address")
            if mac and mac != "00:00:00:00:00:00":
                macs.append(f"{iface.name}={mac}")
    disks = []
    block = root / "sys/block"
    if block.is_dir():
        for dev in sorted(block.iterdir()):
            if dev.name.startswith(("loop", "ram", "zram")) or _read(dev / "removable") == "1":
                continue
            disks.append(f"{dev.name}={_read(dev / 'size')}")
    swap = ""
    for line in _read(root / "proc/meminfo").splitlines():
        if line.startswith("SwapTotal:"):
            swap = line.split(":", 1)[1].strip()
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    return {
        "network": macs,
        "hostname": socket.gethostname(),
        "user": user,
        "disks": disks,
        "swap": swap,
    }


def compute_muk(sources: dict | None = None, secret: bytes | None = None) -> bytes:
    """
    The canonical JSON of the sources, hashed (32 bytes): HMAC-SHA256 under
    ``secret`` (the machine secret: what the card sends), or SHA-256 without
    one (anyone who can read the sources can compute that one).
    """
    src = sources if sources is not None else muk_sources()
    text = json.dumps(src, sort_keys=True, separators=(",", ":")).encode("utf-8")
    return crypto.hmac_sha256(secret, text) if secret is not None else crypto.sha256(text)


SECRET_NAME = "machine-secret"
SECRET_SIZE = 32


class MachineKeyError(Exception):
    """The machine secret cannot be used safely (message: one plain line)."""


def machine_secret(home: str | os.PathLike, rand: crypto.RandomBytes = crypto.system_random) -> bytes:
    """
    ``HOME/machine-secret``, made on first use (0600, written aside and
    linked into place, so a reader never sees half of one and two first uses
    agree). One that is a symbolic link, not a regular file of this user,
    readable by anyone else, or not 32 bytes is refused, never repaired.
    """
    home = os.fspath(home)
    path = os.path.join(home, SECRET_NAME)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except FileNotFoundError:
            _make_secret(home, path, rand)
            continue
        except OSError as e:
            raise MachineKeyError(f"the machine secret {path} is not a file of yours ({e.strerror}): "
                                  "vsc will not use it") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
                raise MachineKeyError(f"the machine secret {path} is not a file of yours: vsc will not use it")
            mode = stat.S_IMODE(st.st_mode)
            if mode & 0o077:
                raise MachineKeyError(f"the machine secret {path} is readable by others (mode {mode:04o}): vsc will "
                                      f"not use it (chmod 600 it to recover a card in use; delete it once the card "
                                      f"is idle)")
            data = os.pread(fd, SECRET_SIZE + 1, 0)
        finally:
            os.close(fd)
        if len(data) != SECRET_SIZE:
            raise MachineKeyError(f"the machine secret {path} is damaged ({len(data)} bytes, not {SECRET_SIZE})")
        return data
    raise MachineKeyError(f"cannot make the machine secret {path}")  # pragma: no cover - made, then gone at once


def _make_secret(home: str, path: str, rand: crypto.RandomBytes) -> None:
    try:
        os.makedirs(home, 0o700, exist_ok=True)
        tmp = f"{path}.{os.getpid()}.{rand(8).hex()}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, rand(SECRET_SIZE))
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.link(tmp, path)  # never replaces: the first one made stays
        except FileExistsError:
            pass
        finally:
            os.unlink(tmp)
    except OSError as e:
        raise MachineKeyError(f"cannot make the machine secret {path}: {e.strerror}") from None


def machine_muk(home: str | os.PathLike, sources: dict | None = None) -> bytes:
    """The MUK the card sends: the sources under the machine secret of the card's HOME."""
    return compute_muk(sources, machine_secret(home))


class MachineKey:
    """
    ``machine_muk`` for one card HOME as a session polls it ([0031]): the
    secret read at the first call (the insert) and kept, the sources read at
    every call.
    """

    def __init__(self, home: str | os.PathLike):
        self.home = home
        self._secret: bytes | None = None

    def __call__(self) -> bytes:
        if self._secret is None:
            self._secret = machine_secret(self.home)
        return compute_muk(None, self._secret)


class MachineLockHeld(Exception):
    """Another card process holds the machine lock, or the lock cannot be used safely (message: one plain line)."""


#: what a lock file may hold for its holder's pid to be shown: digits only (nothing else it holds is ever echoed)
_PID = re.compile(rb"\A[0-9]{1,10}\n?\Z")


class MachineLock:
    """
    An exclusive fcntl lock on a well-known file: one card process per
    machine ([0054], [0089]-[0090]). The kernel releases it when the process
    dies, so a crash never leaves it held.

    "The machine" is the one the MUK names, and the MUK hashes the login
    user with the host's identity: two users of one host are two machines
    to the server. So the lock is per user (issue 11): the file is
    ``machine.lock`` in the user's checked runtime directory (or
    $VSC_LOCK_DIR), created 0600 in a directory only the user controls. No
    other user can open it, let alone hold it and stop this user's cards —
    which a machine-wide file that every user must be able to lock (the
    earlier /run/lock/vsc-card.lock, mode 0666) could not prevent. A
    refusal names the holder's pid only when the file holds nothing but
    digits: it never echoes what the file holds.
    """

    def __init__(self, directory: str | None = None):
        self._dir = directory or os.environ.get("VSC_LOCK_DIR") or None
        self._fd: int | None = None

    @property
    def path(self) -> Path:
        return Path(self._dir or paths.runtime_dir()) / LOCK_NAME

    def _directory(self) -> str:
        try:
            if self._dir is None:
                return paths.check_runtime_dir(create=True)
            if not os.path.lexists(self._dir):
                os.makedirs(self._dir, 0o700, exist_ok=True)
            return paths.check_private_dir(self._dir, what="the machine lock's directory", shared_ok=True)
        except paths.UnsafeDirectory as e:
            raise MachineLockHeld(f"cannot take the machine lock: {e}") from None

    def acquire(self) -> None:
        path = os.path.join(self._directory(), LOCK_NAME)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise MachineLockHeld(f"cannot open the machine lock {path}: {e.strerror}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            os.close(fd)
            raise MachineLockHeld(f"the machine lock {path} is not a file of yours: vsc will not use it")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.fchmod(fd, 0o600)
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = b""
            try:
                holder = os.pread(fd, 16, 0)
            except OSError:
                pass
            os.close(fd)
            pid = f" (pid {int(holder)})" if _PID.match(holder) else ""
            raise MachineLockHeld(f"another card process holds this machine's lock {path}{pid}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            try:
                os.ftruncate(self._fd, 0)
                fcntl.lockf(self._fd, fcntl.LOCK_UN)
            finally:
                os.close(self._fd)
                self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
