"""
Twisted AMP's box encoding, for clients of the card's control socket that run
without a reactor (vsc.lcp in a protected program): key/value pairs, each a
16-bit length then bytes, ended by an empty key.
"""

from __future__ import annotations

import construct as c

from vsc.wire.errors import ErrorCode, WireError

_Pair = c.Struct(
    "key" / c.Prefixed(c.Int16ub, c.GreedyBytes),
    "value" / c.If(lambda ctx: ctx.key != b"", c.Prefixed(c.Int16ub, c.GreedyBytes)),
)
_Box = c.RepeatUntil(lambda obj, lst, ctx: obj["key"] == b"", _Pair)


class Incomplete(Exception):
    """More bytes are needed to finish the box."""


def encode_box(box: dict[bytes, bytes]) -> bytes:
    for k, v in box.items():
        if not k or len(k) > 255 or len(v) > 0xFFFF:
            raise WireError(ErrorCode.MALFORMED, f"AMP key/value out of range ({len(k)}/{len(v)} bytes)")
    return _Box.build([dict(key=k, value=v) for k, v in box.items()] + [dict(key=b"", value=None)])


def decode_box(data: bytes) -> tuple[dict[bytes, bytes], int]:
    """(box, bytes consumed); raises Incomplete when the box has not all arrived."""
    try:
        pairs = _Box.parse(data)
    except c.StreamError:
        raise Incomplete() from None
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"AMP box: {str(e).strip()}") from None
    size = len(_Box.build(pairs))
    return {p.key: p.value for p in pairs if p.key}, size
