"""
The one-time algorithm's mobile agent ([0049]-[0051]) as bytes: a program
for the tiny stack machine of vsc.protocol.onetime_agent, and the challenge that
carries it (program, y, w = E[x, f(y)]).

    Program:   magic "VSCA", format 1, sbox (256 bytes), instructions
    Instruction: op (1 byte), then its operands (which depend on op):
        PUSH  u64 constant        INPUT u8 word index      ROTL u8 bits
        DUP   u8 depth            HASH  u8 word count      LOOP u8 count, u8 body length
        every other op has no operand
    Challenge: program, y (32 bytes), nonce (12), w (AES-256-GCM of x, 48 bytes)

Machine words are unsigned 64-bit integers; ``Words`` is how a list of them
becomes bytes (big-endian, for y, for HASH and for the output f(y)).
"""

from __future__ import annotations

import enum

import attrs
import construct as c

from vsc.wire.codec import U8, U16, U32, U64, Array, Bytes, StrictEnum
from vsc.wire.errors import ErrorCode, WireError

MAX_INSTRUCTIONS = 1024
MAX_PROGRAM = 4 + 1 + 256 + 2 + MAX_INSTRUCTIONS * 9  # magic, format, sbox, count, widest instructions (9479)
Y_SIZE = 32
X_SIZE = 32
W_SIZE = X_SIZE + 16


class AgentOp(enum.IntEnum):
    INPUT = 1  # push word a of y (0..3)
    PUSH = 2  # push the constant a
    ADD = 3  # pop b, pop a, push (a + b) mod 2^64
    SUB = 4  # ... (a - b) mod 2^64
    MUL = 5  # ... (a * b) mod 2^64
    XOR = 6
    AND = 7
    OR = 8
    NOT = 9  # pop a, push ~a
    ROTL = 10  # pop a, push a rotated left by the operand (1..63)
    SBOX = 11  # pop a, push a with each of its 8 bytes substituted through the program's sbox
    DUP = 12  # push a copy of the word at the operand's depth (0 = top)
    SWAP = 13
    DROP = 14
    HASH = 15  # pop the operand's number of words, push the 4 words of SHA-256 of their encoding
    LOOP = 16  # run the next b instructions a times (a: 1..255, b: 1..255)


_ONE_BYTE = {AgentOp.INPUT, AgentOp.ROTL, AgentOp.DUP, AgentOp.HASH, AgentOp.LOOP}


@attrs.frozen
class Instruction:
    op: AgentOp
    a: int = 0
    b: int = 0


_Instruction = c.Struct(
    "op" / StrictEnum(U8, AgentOp),
    "a" / c.Switch(lambda ctx: int(ctx.op), {int(AgentOp.PUSH): U64, **{int(o): U8 for o in _ONE_BYTE}},
                   default=c.Computed(0)),
    "b" / c.Switch(lambda ctx: int(ctx.op), {int(AgentOp.LOOP): U8}, default=c.Computed(0)),
)


@attrs.frozen
class Program:
    sbox: bytes
    code: tuple = attrs.field(converter=tuple)


ProgramSchema = c.Struct(
    "magic" / c.Const(b"VSCA"),
    "format" / c.Const(1, U8),
    "sbox" / c.Bytes(256),
    "code" / Array(U16, _Instruction, MAX_INSTRUCTIONS, 1, "agent instructions"),
    c.Terminated,
)


def encode_program(program: Program) -> bytes:
    try:
        return ProgramSchema.build(
            dict(sbox=program.sbox, code=[dict(op=i.op, a=i.a, b=i.b) for i in program.code])
        )
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"cannot encode the agent program: {str(e).strip()}") from None


def decode_program(data: bytes) -> Program:
    try:
        parsed = ProgramSchema.parse(data)
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"agent program: {str(e).strip()}") from None
    return Program(sbox=parsed.sbox, code=tuple(Instruction(i.op, i.a, i.b) for i in parsed.code))


@attrs.frozen
class AgentChallenge:
    """Server → card: the unique function f as a program, y, and w = E[x, f(y)] ([0050])."""

    program: bytes
    y: bytes
    nonce: bytes
    w: bytes

    def encode(self) -> bytes:
        return _encode(_ChallengeSchema, attrs.asdict(self), "agent challenge")

    @classmethod
    def decode(cls, data: bytes) -> "AgentChallenge":
        return cls(**_fields(_decode(_ChallengeSchema, data, "agent challenge"), cls))


_ChallengeSchema = c.Struct(
    "program" / Bytes(U16, MAX_PROGRAM, 1, "agent program"),
    "y" / c.Bytes(Y_SIZE),
    "nonce" / c.Bytes(12),
    "w" / c.Bytes(W_SIZE),
    c.Terminated,
)

#: The AES-GCM additional data binding w to its card and challenge.
AgentAad = c.Struct("label" / c.Const(b"vsc1 agent"), "serial" / c.PascalString(U8, "utf8"), "y" / c.Bytes(Y_SIZE))


def agent_aad(serial: str, y: bytes) -> bytes:
    return AgentAad.build(dict(serial=serial, y=y))


#: Machine words <-> bytes: big-endian unsigned 64-bit.
Words = c.GreedyRange(U64)


def words_to_bytes(words) -> bytes:
    return Words.build(list(words))


def bytes_to_words(data: bytes) -> list[int]:
    if len(data) % 8:
        raise WireError(ErrorCode.MALFORMED, f"{len(data)} bytes are not a whole number of 64-bit words")
    return list(Words.parse(data))


def random_u32(data: bytes) -> int:
    """Four random bytes as an integer (the program generator's choices)."""
    return U32.parse(data)


def random_u64(data: bytes) -> int:
    return U64.parse(data)


def _encode(schema, values: dict, what: str) -> bytes:
    try:
        return schema.build(values)
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"cannot encode the {what}: {str(e).strip()}") from None


def _decode(schema, data: bytes, what: str):
    try:
        return schema.parse(data)
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"{what}: {str(e).strip()}") from None


def _fields(parsed, cls) -> dict:
    return {f.name: parsed[f.name] for f in attrs.fields(cls)}
