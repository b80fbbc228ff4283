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
_ZERO_RUN = 65536
_ZEROS = memoryview(bytes(_ZERO_RUN))  # what ``zero`` copies over short runs


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
        """
        Write zeros over the whole mapping, or bytes ``start`` to ``end`` of
        it: within the buffer's view and up to 64 KiB copied from a zero
        buffer (a fifth of a ctypes memset call's cost: every operation
        zeroes two buffers), else memset.
        """
        end = self._len if end is None else min(end, self._len)
        if not 0 <= start < end:
            return
        if end <= self.size and end - start <= _ZERO_RUN:
            self.view[start:end] = _ZEROS[:end - start]
            return
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


class ScratchPool:
    """
    Locked pages for the plaintext of one operation (an item of the card
    memory opened to sign, to check a PIN, to answer a GET DATA), reused
    instead of mapped per operation: a LockedBuffer costs five system calls
    (mmap, mlock, madvise, munlock, munmap) and about 15 us, and a local API
    signature opened four of them (issue 15). A buffer taken is the same
    kind of memory as a new LockedBuffer (mlocked, out of core dumps); it is
    zeroed when given back, before it goes on the spare list, and at most
    ``keep`` spare buffers of each size are kept (the rest are freed).
    List pops and appends are atomic under the GIL, so worker threads may
    take buffers too.
    """

    def __init__(self, keep: int = 4):
        self.keep = keep
        self._spare: dict[int, list[LockedBuffer]] = {}

    def take(self, size: int) -> LockedBuffer:
        """A zeroed locked buffer of at least ``size`` bytes (whole pages): use ``view[:size]``, then ``give``."""
        pages = (max(1, size) + _PAGE - 1) // _PAGE * _PAGE
        spare = self._spare.get(pages)
        if spare:
            try:
                return spare.pop()
            except IndexError:  # another thread took the last one
                pass
        return LockedBuffer(pages)

    def give(self, buf: LockedBuffer) -> None:
        """Zero ``buf`` and keep it for the next ``take`` (or free it when enough are kept)."""
        if buf._mm is None:
            return
        buf.zero()
        spare = self._spare.setdefault(buf._len, [])
        if len(spare) < self.keep and buf.size == buf._len:
            spare.append(buf)
        else:
            buf.free()

    def clear(self) -> None:
        """Free every spare buffer."""
        for spare in self._spare.values():
            while spare:
                spare.pop().free()

    def spare(self) -> int:
        """How many zeroed buffers are kept."""
        return sum(len(s) for s in self._spare.values())


#: the card process's pool of one-operation plaintext buffers (vsc.card.protected.CardMemory.open)
scratch = ScratchPool()


def random_into(buf: memoryview) -> None:
    """Fill ``buf`` from the kernel CSPRNG without a Python bytes copy."""
    fd = os.open("/dev/urandom", os.O_RDONLY)
    try:
        got = 0
        while got < len(buf):
            got += os.readv(fd, [buf[got:]])
    finally:
        os.close(fd)
