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
import socket
from pathlib import Path

from vsc import crypto

DEFAULT_LOCK_DIRS = ("/run/lock", "/var/lock", "/tmp")
LOCK_NAME = "vsc-card.lock"


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
    """Another card process on this machine holds the machine lock."""


class MachineLock:
    """
    An exclusive fcntl lock on a well-known machine-wide file: one card
    process per machine. The kernel releases it when the process dies, so a
    crash never leaves it held ([0054]).
    """

    def __init__(self, directory: str | None = None):
        self.path = Path(directory or os.environ.get("VSC_LOCK_DIR") or self._default_dir()) / LOCK_NAME
        self._fd: int | None = None

    @staticmethod
    def _default_dir() -> str:
        for d in DEFAULT_LOCK_DIRS:
            if os.path.isdir(d) and os.access(d, os.W_OK):
                return d
        return "/tmp"

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            os.fchmod(fd, 0o666)  # every user's card must be able to take it
        except OSError:
            pass
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = ""
            try:
                holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
            except OSError:
                pass
            os.close(fd)
            raise MachineLockHeld(
                f"another card process holds this machine's lock {self.path}" + (f" (pid {holder})" if holder else "")
            ) from None
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
