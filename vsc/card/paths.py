"""
Where a card lives on this machine: its home (settings) and, in the user's
runtime dir, the sockets its daemon serves; and how a private file in it is
written (``write_private``). Plain strings from ``os.path``:
the ``vsc card`` request path and a protected program's licence check import
this module, so it imports neither pathlib nor anything that brings in
Twisted (vsc.card.config re-exports these as Path objects for the daemon).
The socket name carries a SHA-256 tag of the home, hence vsc.crypto.
"""

from __future__ import annotations

import os

AGENT_SOCKET_SUFFIX = ".ssh-agent.sock"


def default_home() -> str:
    """$VSC_HOME, else ~/.config/vsc."""
    return os.environ.get("VSC_HOME") or os.path.join(os.path.expanduser("~"), ".config", "vsc")


def home_of(home: str | os.PathLike | None) -> str:
    """The given home (``~`` expanded), or the default one."""
    return os.path.expanduser(os.fspath(home)) if home else default_home()


def runtime_dir() -> str:
    """$XDG_RUNTIME_DIR/vsc when that is a writable directory, else /tmp/vsc-UID."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and os.access(base, os.W_OK):
        return os.path.join(base, "vsc")
    return f"/tmp/vsc-{os.getuid()}"


def control_socket_for(home: str | os.PathLike) -> str:
    """The control socket of the card daemon serving ``home`` (one per resolved home)."""
    from vsc import crypto

    tag = crypto.sha256(os.path.realpath(os.fspath(home)).encode()).hex()[:12]
    return os.path.join(runtime_dir(), f"card-{tag}.sock")


def agent_socket_for(home: str | os.PathLike) -> str:
    """The default ssh-agent socket: the control socket's name with ``.ssh-agent.sock`` (same 0700 runtime dir)."""
    control = control_socket_for(home)
    return control[: -len(".sock")] + AGENT_SOCKET_SUFFIX


def write_private(path: str | os.PathLike, data: bytes) -> None:
    """Write ``path`` with mode 0600, atomically (a crash leaves the old file or the new one, never half of one)."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
