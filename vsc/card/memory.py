"""
Locked memory for protected information ([0027]-[0030], [0099]-[0100]).

A LockedBuffer is an anonymous mmap that is mlock(2)ed (never paged to swap),
excluded from core dumps (MADV_DONTDUMP), and zeroed with memset before it
is unmapped. It is what CPython can do; docs/security.md says what it cannot
(copies the interpreter makes of values that pass through Python objects).
"""

from __future__ import annotations

import ctypes
import mmap
import os

_libc = ctypes.CDLL(None, use_errno=True)
_PAGE = mmap.PAGESIZE


class LockedBuffer:
    """A fixed-size, page-aligned, mlock'ed, zero-on-free byte buffer."""

    locked_total = 0
    lock_failures = 0

    def __init__(self, size: int):
        self.size = max(1, size)
        self._len = (self.size + _PAGE - 1) // _PAGE * _PAGE
        self._mm = mmap.mmap(-1, self._len, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._anchor = ctypes.c_char.from_buffer(self._mm)
        self._addr = ctypes.addressof(self._anchor)
        self.locked = _libc.mlock(ctypes.c_void_p(self._addr), ctypes.c_size_t(self._len)) == 0
        if self.locked:
            LockedBuffer.locked_total += self._len
        else:
            LockedBuffer.lock_failures += 1
        if hasattr(mmap, "MADV_DONTDUMP"):
            try:
                self._mm.madvise(mmap.MADV_DONTDUMP)
            except OSError:
                pass
        self.view = memoryview(self._mm)[: self.size]

    def zero(self, start: int = 0, end: int | None = None) -> None:
        """memset the whole mapping to 0, or bytes ``start`` to ``end`` of it."""
        if start == 0 and end is None:
            ctypes.memset(ctypes.c_void_p(self._addr), 0, ctypes.c_size_t(self._len))
            return
        end = self._len if end is None else min(end, self._len)
        if 0 <= start < end:
            ctypes.memset(ctypes.c_void_p(self._addr + start), 0, ctypes.c_size_t(end - start))

    def free(self) -> None:
        if self._mm is None:
            return
        self.zero()
        self.view.release()
        if self.locked:
            _libc.munlock(ctypes.c_void_p(self._addr), ctypes.c_size_t(self._len))
            LockedBuffer.locked_total -= self._len
        del self._anchor
        self._mm.close()
        self._mm = None

    def __enter__(self) -> "LockedBuffer":
        return self

    def __exit__(self, *exc) -> None:
        self.free()

    def __del__(self) -> None:
        try:
            self.free()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


def random_into(buf: memoryview) -> None:
    """Fill ``buf`` from the kernel CSPRNG without a Python bytes copy."""
    fd = os.open("/dev/urandom", os.O_RDONLY)
    try:
        got = 0
        while got < len(buf):
            got += os.readv(fd, [buf[got:]])
    finally:
        os.close(fd)
