"""
Twisted AMP's box encoding (twisted.protocols.amp), for the one client of
the card's control socket (vsc.card.client): a box is key/value pairs, each
a 16-bit big-endian length and then the bytes (a key has 1-255 bytes, a
value 0-65535), ended by an empty key (two zero bytes). This is the only
AMP box codec in vsc. The card daemon reads every box with ``locate_box``
(in place, in locked memory) and writes the answers that carry a secret
with ``encode_box_into``; the commands it does not answer itself go on to
Twisted's own AMP dispatch (vsc.card.control).

Why plain ``int.from_bytes`` here and not construct like the rest of
vsc.wire: this module is on the request path of every ``vsc card`` command
and of the licence check inside a protected program, which should cost
little more than starting the interpreter (``python -c pass``, ~20 ms);
importing construct alone costs ~80 ms (and even ``struct`` a few per cent
of the budget). The format is one 16-bit length before each key and each
value, so the schema is ``_length``/``_read_length`` and the limits below;
every length is checked before it is used.

Bad boxes raise Malformed, not WireError: the control socket is not the
channel and carries no ALERT code (vsc.wire.errors.ErrorCode), and that
module's enum alone would cost a third of the interpreter's start-up here.
"""

from __future__ import annotations

MAX_KEY = 255  # AMP's limit on a key
MAX_VALUE = 0xFFFF


def _length(n: int) -> bytes:
    """The 16-bit big-endian length before every key and every value."""
    return n.to_bytes(2, "big")


class Incomplete(Exception):
    """More bytes are needed to finish the box."""


class Malformed(Exception):
    """Not a valid AMP box (or, vsc.wire.control, not the answer asked for); the message is one line."""


def encode_box(box: dict[bytes, bytes]) -> bytes:
    """
    The box's bytes, keys in sorted order as Twisted's ``AmpBox.serialize``
    writes them (so both give the same bytes); Malformed for an empty or too
    long key, or a value over 65535 bytes.
    """
    out = []
    for key, value in sorted(box.items()):
        klen, vlen = len(key), len(value)
        if not 0 < klen <= MAX_KEY:
            raise Malformed(f"a control message key has {klen} bytes (1 to {MAX_KEY})")
        if vlen > MAX_VALUE:
            raise Malformed(f"{key.decode('ascii', 'replace')} has {vlen} bytes; a control message carries "
                            f"at most {MAX_VALUE} per value")
        out += (klen.to_bytes(2, "big"), key, vlen.to_bytes(2, "big"), value)  # _length, inlined (every request)
    out.append(b"\x00\x00")
    return b"".join(out)


def decode_box(data: bytes) -> tuple[dict[bytes, bytes], int]:
    """
    (box, bytes consumed) for the first box in ``data``; Incomplete when it
    has not all arrived; Malformed for a key over 255 bytes or a key given twice.
    """
    box: dict[bytes, bytes] = {}
    view = memoryview(data)
    pos = 0
    while True:
        if len(view) < pos + 2:
            raise Incomplete()
        klen = (view[pos] << 8 | view[pos + 1])
        pos += 2
        if klen == 0:
            return box, pos
        if klen > MAX_KEY:
            raise Malformed(f"control message: a key of {klen} bytes (at most {MAX_KEY})")
        if len(view) < pos + klen + 2:
            raise Incomplete()
        key = bytes(view[pos:pos + klen])
        pos += klen
        vlen = (view[pos] << 8 | view[pos + 1])
        pos += 2
        if len(view) < pos + vlen:
            raise Incomplete()
        if key in box:
            raise Malformed(f"control message: the key {key!r} twice")
        box[key] = bytes(view[pos:pos + vlen])
        pos += vlen


def locate_box(data) -> tuple[list[tuple[bytes, int, int]], int]:
    """
    The first box in the buffer ``data`` (any bytes-like object) as
    ``([(key, start, end), ...], bytes consumed)``: each value stays where it
    is, ``data[start:end]``, so a caller holding the box in locked memory
    (the card daemon's control socket, vsc.card.control) copies no value
    onto the Python heap. Same checks as ``decode_box`` (Incomplete, Malformed).
    """
    view = memoryview(data)
    try:
        size = len(view)
        found: list[tuple[bytes, int, int]] = []
        keys: set[bytes] = set()
        pos = 0
        while True:
            if size < pos + 2:
                raise Incomplete()
            klen = view[pos] << 8 | view[pos + 1]
            if klen == 0:
                return found, pos + 2
            if klen > MAX_KEY:
                raise Malformed(f"control message: a key of {klen} bytes (at most {MAX_KEY})")
            at = pos + 2 + klen  # the value's length
            if size < at + 2:
                raise Incomplete()
            key = view[pos + 2:at].tobytes()
            start = at + 2
            pos = start + (view[at] << 8 | view[at + 1])
            if size < pos:
                raise Incomplete()
            if key in keys:
                raise Malformed(f"control message: the key {key!r} twice")
            keys.add(key)
            found.append((key, start, pos))
    finally:
        view.release()


def box_size(box: dict) -> int:
    """The encoded size of ``box`` (values may be any buffers)."""
    return sum(4 + len(key) + len(value) for key, value in box.items()) + 2


def encode_box_into(box: dict, out) -> int:
    """
    ``encode_box`` written into the writable buffer ``out`` (at least
    ``box_size(box)`` bytes), values copied buffer to buffer: an answer
    carrying a secret is built in locked memory. Returns the bytes written.
    """
    view = memoryview(out)
    try:
        pos = 0
        for key, value in sorted(box.items()):
            if not key or len(key) > MAX_KEY:
                raise Malformed(f"a control message key has {len(key)} bytes (1 to {MAX_KEY})")
            if len(value) > MAX_VALUE:
                raise Malformed(f"{key.decode('ascii', 'replace')} has {len(value)} bytes; a control message "
                                f"carries at most {MAX_VALUE} per value")
            view[pos:pos + 2] = _length(len(key))
            view[pos + 2:pos + 2 + len(key)] = key
            pos += 2 + len(key)
            view[pos:pos + 2] = _length(len(value))
            view[pos + 2:pos + 2 + len(value)] = value
            pos += 2 + len(value)
        view[pos:pos + 2] = b"\x00\x00"
        return pos + 2
    finally:
        view.release()
