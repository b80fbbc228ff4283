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
    """
    The file cannot be a settings file (message names it; one line).
    ``kind`` says why, for a caller with words of its own (vsc.licensing.lcp):
    ``cannot-read`` (``strerror`` says why), ``not-regular``, ``too-large``
    or ``not-utf8``.
    """

    def __init__(self, message: str, kind: str, strerror: str = ""):
        super().__init__(message)
        self.kind = kind
        self.strerror = strerror


def read_text(path: str | os.PathLike, max_bytes: int = MAX_BYTES) -> str:
    """The text of the regular file ``path``; TextFileError naming it if it is not one, too large, or not UTF-8."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise TextFileError(f"cannot read {path}: {e.strerror}", "cannot-read", e.strerror or "") from None
    too_large = TextFileError(f"{path} is larger than {max_bytes >> 10} KiB: it is not a settings file", "too-large")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise TextFileError(f"{path} is not a regular file", "not-regular")
        if st.st_size > max_bytes:
            raise too_large
        os.set_blocking(fd, True)
        chunks, size = [], 0
        while size <= max_bytes:  # a regular file may still grow while it is read
            chunk = os.read(fd, max_bytes + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    except OSError as e:
        raise TextFileError(f"cannot read {path}: {e.strerror}", "cannot-read", e.strerror or "") from None
    finally:
        os.close(fd)
    if size > max_bytes:
        raise too_large
    try:
        return b"".join(chunks).decode("utf-8")
    except UnicodeDecodeError as e:
        raise TextFileError(f"{path} is not UTF-8 text (byte {e.start})", "not-utf8") from None
