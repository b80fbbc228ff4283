"""The Figure 14 challenge table: random challenges and the token's answers under the DongleKey."""

from __future__ import annotations

import attrs
import construct as c

from vsc.wire.codec import U16, Array, Text
from vsc.wire.errors import ErrorCode, WireError

CHALLENGE = 16


@attrs.frozen
class ChallengeTable:
    serial: str
    entries: tuple = attrs.field(converter=tuple)  # ((challenge, response), ...)


_Entry = c.Struct("challenge" / c.Bytes(CHALLENGE), "response" / c.Bytes(CHALLENGE))
_Table = c.Struct(
    "magic" / c.Const(b"VSCT"),
    "format" / c.Const(1, c.Int8ub),
    "serial" / Text(c.Int8ub, 64, 1, "serial"),
    "entries" / Array(U16, _Entry, 4096, 1, "entries"),
    c.Terminated,
)


def _explain(e: c.ConstructError) -> str:
    return " ".join(str(e).split())  # one line: construct puts the path and the reason on two


def encode_table(table: ChallengeTable) -> bytes:
    try:
        return _Table.build(dict(serial=table.serial,
                                 entries=[dict(challenge=a, response=b) for a, b in table.entries]))
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"challenge table: {_explain(e)}") from None


def decode_table(data: bytes) -> ChallengeTable:
    try:
        p = _Table.parse(data)
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"challenge table: {_explain(e)}") from None
    return ChallengeTable(serial=p.serial, entries=tuple((e.challenge, e.response) for e in p.entries))
