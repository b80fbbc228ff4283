"""
A settings file (vsc-server.ini, card.ini) read for configparser: a regular
file of at most MAX_BYTES of UTF-8, or one line saying what it is instead.
Opened without waiting (a FIFO would block the reader until some writer
came) and checked with fstat on the descriptor it then reads, so neither a
FIFO, a device, a directory nor a file that never ends is read.
"""

from __future__ import annotations

import os
import stat

#: far more than any settings file needs
MAX_BYTES = 1 << 20


class TextFileError(Exception):
    """The file cannot be a settings file (message names it; one line)."""


def read_text(path: str | os.PathLike, max_bytes: int = MAX_BYTES) -> str:
    """The text of the regular file ``path``; TextFileError naming it if it is not one, too large, or not UTF-8."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise TextFileError(f"cannot read {path}: {e.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise TextFileError(f"{path} is not a regular file")
    os.set_blocking(fd, True)
    with os.fdopen(fd, "rb") as f:
        try:
            data = f.read(max_bytes + 1)
        except OSError as e:
            raise TextFileError(f"cannot read {path}: {e.strerror}") from None
    if len(data) > max_bytes:
        raise TextFileError(f"{path} is larger than {max_bytes >> 10} KiB: it is not a settings file")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextFileError(f"{path} is not UTF-8 text (byte {e.start})") from None
