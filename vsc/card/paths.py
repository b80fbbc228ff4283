"""
Where a card lives on this machine: its home (settings) and, in the user's
runtime dir, the sockets its daemon serves and its machine lock; how that
directory is checked before it is used (``check_runtime_dir``: yours, 0700,
not a symlink — another user's directory is refused with one line, never
used, issue 11); and how a private file is written (``write_private``). Plain strings from ``os.path``:
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


class UnsafeDirectory(Exception):
    """A directory the card will not use: another user could reach into it (the message is one plain line)."""


def runtime_dir() -> str:
    """$XDG_RUNTIME_DIR/vsc when XDG_RUNTIME_DIR is set, else $TMPDIR/vsc-UID (/tmp/vsc-UID). Not checked: see check_runtime_dir."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base:
        return os.path.join(base, "vsc")
    return os.path.join(os.environ.get("TMPDIR") or "/tmp", f"vsc-{os.getuid()}")


def _who(uid: int) -> str:
    try:
        import pwd

        return f"user {pwd.getpwuid(uid).pw_name} (uid {uid})"
    except (KeyError, ImportError):
        return f"uid {uid}"


def check_private_dir(path: str, create: bool = False, what: str = "the card's runtime directory",
                      shared_ok: bool = False) -> str:
    """
    ``path`` if it is a real directory (not a symlink) owned by this user
    and reachable by nobody else (mode 0700; with ``shared_ok``, others may
    read but not write it); created 0700 when missing and ``create``.
    Anything else is UnsafeDirectory, one line, and the directory is not
    used — never repaired: a directory another user made is theirs.
    """
    import stat

    path = os.fspath(path)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        if not create:
            return path
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass  # someone made it meanwhile: judged below like any other
        except OSError as e:
            raise UnsafeDirectory(f"cannot create {what} {path}: {e.strerror}") from None
        st = os.lstat(path)
    except OSError as e:
        raise UnsafeDirectory(f"cannot use {what} {path}: {e.strerror}") from None
    uid = os.getuid()
    fix = "; remove it, or set XDG_RUNTIME_DIR to a directory of your own (mode 0700)"
    if stat.S_ISLNK(st.st_mode):
        raise UnsafeDirectory(f"{what} {path} is a symbolic link: vsc will not use it{fix}")
    if not stat.S_ISDIR(st.st_mode):
        raise UnsafeDirectory(f"{what} {path} is not a directory: vsc will not use it{fix}")
    if st.st_uid != uid:
        raise UnsafeDirectory(f"{what} {path} belongs to {_who(st.st_uid)}, not to you: vsc will not use it{fix}")
    mode = stat.S_IMODE(st.st_mode)
    if mode & (0o022 if shared_ok else 0o077):
        raise UnsafeDirectory(f"{what} {path} has mode {mode:04o}; it must be 0700 (only you can reach into it): "
                              f"vsc will not use it (chmod 700 {path} if it is yours)")
    return path


def check_runtime_dir(create: bool = False) -> str:
    """
    The runtime directory, checked (and created 0700 with ``create``): its
    base ($XDG_RUNTIME_DIR: yours and 0700, as the XDG spec requires; else
    a /tmp-like directory that is sticky or writable only by root and you),
    then the directory itself (check_private_dir). UnsafeDirectory otherwise.
    """
    import stat

    path = runtime_dir()
    base = os.path.dirname(path)
    if os.environ.get("XDG_RUNTIME_DIR"):
        if not os.path.isabs(base):
            raise UnsafeDirectory(f"XDG_RUNTIME_DIR={base} is not an absolute path: vsc will not use it")
        if not os.path.exists(base):
            raise UnsafeDirectory(f"XDG_RUNTIME_DIR={base} does not exist: vsc will not use it")
        check_private_dir(base, what="XDG_RUNTIME_DIR")
    else:
        try:
            st = os.stat(base)
        except OSError as e:
            raise UnsafeDirectory(f"cannot use {base} for the card's runtime directory: {e.strerror}") from None
        writable_by_others = stat.S_IMODE(st.st_mode) & 0o022
        if st.st_uid not in (0, os.getuid()) or (writable_by_others and not st.st_mode & stat.S_ISVTX):
            raise UnsafeDirectory(f"{base} is writable by other users and not sticky: vsc will not make its "
                                  f"runtime directory there (set XDG_RUNTIME_DIR to a directory of your own)")
    return check_private_dir(path, create)


def control_socket_for(home: str | os.PathLike) -> str:
    """The control socket of the card daemon serving ``home`` (one per resolved home)."""
    from vsc import crypto

    # the name as the bytes it is: a non-UTF-8 one comes with surrogate escapes (os.fsencode gives them back)
    tag = crypto.sha256_light(os.fsencode(os.path.realpath(os.fspath(home)))).hex()[:12]
    return os.path.join(runtime_dir(), f"card-{tag}.sock")


def agent_socket_for(home: str | os.PathLike) -> str:
    """The default ssh-agent socket: the control socket's name with ``.ssh-agent.sock`` (same 0700 runtime dir)."""
    control = control_socket_for(home)
    return control[: -len(".sock")] + AGENT_SOCKET_SUFFIX


def write_private(path: str | os.PathLike, data: bytes) -> None:
    """
    Write ``path`` with mode 0600, atomically and durably: a crash leaves the
    old file or the new one, never half of one, and once this returns a
    power loss cannot bring the old one back (the file is fsynced before the
    rename, its directory after). The data goes to a new file of our own
    (O_EXCL, O_NOFOLLOW, a random name), never through whatever sits at a
    fixed name: a symlink there is not followed. Every private file of the
    card's home is written this way (card.ini, keyfiles, the freshness record).
    """
    path = os.fspath(path)
    # a new file of our own: never one another user made first under a name we would pick (PATH.tmp in /tmp)
    tmp = f"{path}.{os.urandom(8).hex()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _sync_directory(os.path.dirname(path) or ".")


def _sync_directory(path: str) -> None:
    """fsync a directory, so that a rename in it survives a power loss (not supported everywhere: then skipped)."""
    import errno

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)
