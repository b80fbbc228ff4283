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


def compute_muk(sources: dict | None = None) -> bytes:
    """MUK = SHA-256 of the canonical JSON of the sources (32 bytes)."""
    src = sources if sources is not None else muk_sources()
    return crypto.sha256(json.dumps(src, sort_keys=True, separators=(",", ":")).encode("utf-8"))


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
