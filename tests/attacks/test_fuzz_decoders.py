"""
Hypothesis-driven fuzzing of every decoder outside the channel (the channel's
own decoders are fuzzed in tests/test_fuzz.py): the operation messages, KDF
parameters, Master-key responses, the protected-information envelope and
index, licence keyfiles, the dongle's challenge table. Each must raise only
its one specific error for bad input, and never another exception. The last
test checks how many inputs were tried. Reproducible: derandomized, no
example database, every byte drawn by hypothesis (no os.urandom inside a
property); mutations start from valid encoded messages and flip, insert and
delete bytes.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vsc.wire import WireError, decode_inner, encode_inner
from vsc.wire.dongle import ChallengeTable, decode_table, encode_table
from vsc.wire.license import License, armor, dearmor, decode_body, encode_body
from vsc.wire.ops import (
    AuthChallenge,
    AuthItem,
    AuthMethod,
    AuthResponse,
    EnrolRequest,
    KdfAlg,
    KdfParams,
    MasterResponse,
    Op,
    OpRequest,
    OpResult,
    Status,
)
from vsc.wire.protected import (
    Item,
    ItemKind,
    KeyAlg,
    SealedValue,
    decode_envelope,
    decode_index,
    encode_envelope,
    encode_index,
)

COUNTS: dict[str, int] = {}
EXAMPLES = 300
FUZZ = settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


def _count(name: str) -> None:
    COUNTS[name] = COUNTS.get(name, 0) + 1


def _mutate(data: bytes, spec) -> bytes:
    """Apply (position, new byte) flips, splices (delete some bytes, insert others), a truncation or an extension chosen by hypothesis."""
    flips, splices, cut, extra = spec
    b = bytearray(data)
    for pos, val in flips:
        if b:
            b[pos % len(b)] = val
    for pos, delete, insert in splices:
        at = pos % (len(b) + 1)
        b[at:at + delete] = insert
    if cut is not None and b:
        b = b[: cut % (len(b) + 1)]
    return bytes(b) + extra


MUTATION = st.tuples(
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 8), st.binary(max_size=8)), max_size=2),
    st.one_of(st.none(), st.integers(0, 10_000)),
    st.binary(max_size=8),
)

VALID_OPS = [
    encode_inner(EnrolRequest(serial="s", code="c", verifier=b"v" * 32, kdf=KdfParams(KdfAlg.SCRYPT, b"x" * 16).encode(),
                              protected=b"p" * 40, registration=b"")),
    encode_inner(OpRequest(op=Op.INSERT, serial="card-1", insert_secret=b"s" * 32, muk=b"m" * 32)),
    encode_inner(OpRequest(op=Op.SYNC, serial="card-1", insert_secret=b"s" * 32, version=3, protected=b"z" * 20)),
    encode_inner(AuthChallenge(kdf=b"k" * 20, challenges=(AuthItem(AuthMethod.PASSWORD), AuthItem(AuthMethod.MASTER_KEY, b"r" * 32)))),
    encode_inner(AuthResponse(responses=(AuthItem(AuthMethod.PASSWORD, b"a" * 32),), muk=b"m" * 32)),
    encode_inner(OpResult(status=Status.OK, version=2, protected=b"q" * 30)),
]


@FUZZ
@given(st.binary(max_size=300))
def test_operation_decoder_random_bytes(data):
    """Random bytes as an inner operation message raise only WireError."""
    _count("operations: random")
    try:
        decode_inner(data)
    except WireError:
        pass


@FUZZ
@given(st.sampled_from(VALID_OPS), MUTATION)
def test_operation_decoder_mutated(valid, spec):
    """Mutated valid operation messages decode to a valid message or raise WireError, nothing else."""
    _count("operations: mutated")
    try:
        msg = decode_inner(_mutate(valid, spec))
    except WireError:
        return
    assert encode_inner(msg)  # anything accepted re-encodes


VALID_KDF = KdfParams(KdfAlg.SCRYPT, b"x" * 16).encode()
VALID_MASTER = MasterResponse(ri2=b"r" * 32, mac=b"m" * 32).encode()


@FUZZ
@given(st.binary(max_size=120), st.binary(max_size=120), MUTATION)
def test_kdf_and_master_response_decoders(a, b, spec):
    """KDF parameters and Master-key responses: random bytes and mutations of valid ones raise only WireError."""
    _count("kdf + master response")
    for fn, data in ((KdfParams.decode, a), (MasterResponse.decode, b), (KdfParams.decode, _mutate(VALID_KDF, spec)),
                     (MasterResponse.decode, _mutate(VALID_MASTER, spec))):
        try:
            fn(data)
        except WireError:
            pass


def _envelope() -> bytes:
    item = Item(ItemKind.COUNTER, "runs", KeyAlg.NONE, b"", SealedValue(b"n" * 12, b"c" * 8, b"t" * 16))
    index = encode_index([item])
    return encode_envelope(SealedValue(b"w" * 12, b"k" * 32, b"t" * 16), SealedValue(b"i" * 12, index, b"t" * 16), "card-1")


@FUZZ
@given(MUTATION)
def test_envelope_and_index_decoders(spec):
    """The protected-information envelope and index: mutations raise only WireError."""
    _count("envelope + index")
    env = _envelope()
    try:
        decode_envelope(_mutate(env, spec))
    except WireError:
        pass
    idx = encode_index([Item(ItemKind.DATA, "d", KeyAlg.NONE, b"", SealedValue(b"n" * 12, b"c" * 5, b"t" * 16))])
    try:
        decode_index(_mutate(idx, spec))
    except WireError:
        pass


def _keyfile() -> str:
    lic = License(product="p", license_id=b"i" * 16, card_key=b"k" * 91, slot="9c", issued=1, expires=0, runs=3,
                  counter="", cost=1, features=("pro",))
    return armor(encode_body(lic), b"s" * 64)


@FUZZ
@given(MUTATION, st.text(max_size=200))
def test_keyfile_decoders(spec, text):
    """Licence keyfiles: mutated armor/body and random text raise only WireError."""
    _count("keyfile")
    kf = _keyfile()
    for candidate in (_mutate(kf.encode(), spec).decode("latin-1"), text):
        try:
            body, _sig = dearmor(candidate)
            decode_body(body)
        except WireError:
            pass
    try:
        decode_body(_mutate(encode_body(License("p", b"i" * 16, b"k" * 10, "9c", 1, 0, 0, "", 1)), spec))
    except WireError:
        pass


@FUZZ
@given(MUTATION, st.lists(st.tuples(st.binary(min_size=16, max_size=16), st.binary(min_size=16, max_size=16)),
                          min_size=1, max_size=4))
def test_challenge_table_decoder(spec, pairs):
    """The dongle's challenge table (its pairs drawn by hypothesis, so reproducible): mutations raise only WireError."""
    _count("challenge table")
    table = encode_table(ChallengeTable("s", tuple(pairs)))
    try:
        decode_table(_mutate(table, spec))
    except WireError:
        pass


def test_every_fuzzer_ran_its_inputs():
    """Counts the inputs tried per decoder family (printed with -s); each ran its full budget."""
    print("\nfuzzed inputs per decoder:", ", ".join(f"{k}: {v}" for k, v in sorted(COUNTS.items())))
    expected = {"operations: random", "operations: mutated", "kdf + master response", "envelope + index",
                "keyfile", "challenge table"}
    assert set(COUNTS) == expected, "run the whole file: the count needs every fuzzer"
    assert all(v >= EXAMPLES for v in COUNTS.values()), COUNTS
