"""
Implementation authentication beyond the Master key (Figure 8, 503/504):
keyfile authentication [0044]-[0046], the one-time algorithm [0049]-[0051]
(a mobile agent for a safe stack machine), and the reader-less device of
[0005]-[0006], [0015], claim 5 (TOTP, RFC 6238).

Part 1: the pieces, pure (the VM, keyfile sign/seal/verify/tamper, TOTP
window and replay). Part 2: the sans-IO server machine with every method
configured, answered by the real card-side code; the 30 s deadline on a
Clock; enrolment material (IssueMaterial, made by the real Registrar as the
glue would). Part 3: the store's atomic TOTP consumption.
Part 4: end to end — a real ``twistd -n vsc-server`` with
``impl_auth = master-key,keyfile,one-time-agent,totp`` and a real
``twistd -n vsc-card`` that inserts with all four methods, and the
negative cases through the same processes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import random
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import attrs
import pytest

from tests.integration import wait_for
from twisted.internet.task import Clock

from tests.servers import TWISTD, VSC, Servers, _env, admin, init_data_dir, open_store
from vsc import crypto
from vsc.card import ops as card_ops
from vsc.protocol import auth, implauth, onetime_agent
from vsc.protocol import onetime_agent as agent
from vsc.protocol.cardstore import (
    CardRecord,
    CheckOut,
    CountFailure,
    DestroyCard,
    EnrolCard,
    LoadCard,
    LogRefusal,
    Outcome,
    RecoverCard,
)
from vsc.protocol.lifecycle import Operation
from vsc.protocol.server_ops import (
    Authenticated,
    CancelDeadline,
    IssueMaterial,
    OpsPolicy,
    ProtocolViolation,
    Reply,
    ServerOps,
    StartDeadline,
)
from vsc.server.store import CardState, Store
from vsc.wire import WireError
from vsc.wire.onetime_agent import AgentOp, Instruction, Program, decode_program, encode_program
from vsc.wire.implauth import EnrolReply, KeyfileBody, Registration, SealedKeyfile, SignedKeyfile
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

VECTORS = Path(__file__).parent / "vectors"
SERVER_KEY = crypto.RSAPrivateKey.from_pem((VECTORS / "test-server-key-rsa2048.pem").read_bytes())
SERVER_PUB = SERVER_KEY.public_key().spki_der
PINNED = crypto.fingerprint(SERVER_PUB)
OTHER_KEY = crypto.RSAPrivateKey.generate(2048)
MASTER = crypto.sha256(b"test Master key")
DECOY = crypto.sha256(b"test decoy secret")
PEER = "192.0.2.7:40000"
SERIAL = "card-1"
NOW = 1_700_000_000.0
KDF = KdfParams(alg=KdfAlg.SCRYPT, salt=b"s" * 16, log2_n=10)
KEYS = card_ops.PasswordKeys(crypto.sha256(b"auth key"), crypto.sha256(b"protection key"), KDF)
MUK = b"M" * 32
SECRET = b"S" * 32
ALL = (AuthMethod.MASTER_KEY, AuthMethod.KEYFILE, AuthMethod.ONE_TIME_AGENT, AuthMethod.TOTP)


class Rand:
    """Deterministic rand(n): SHA-256 counter stream."""

    def __init__(self, seed: bytes = b"rand"):
        self.seed, self.n = seed, 0

    def __call__(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            out += hashlib.sha256(self.seed + self.n.to_bytes(8, "big")).digest()
            self.n += 1
        return out[:n]


def registrar(now: float = NOW, rand=None, key: crypto.RSAPrivateKey = SERVER_KEY) -> implauth.Registrar:
    return implauth.Registrar(lambda data: crypto.rsa_pss_sign(key, data), key.public_key().spki_der,
                              rand or Rand(b"registrar"), lambda: now)


def registration(keys: card_ops.PasswordKeys = KEYS, serial: str = SERIAL, card_key: bytes = b"CARD-9E-KEY") -> bytes:
    return Registration(card_key=card_key, seal_key=implauth.seal_public(keys.protection_key, serial)).encode()


def enrolled_material(serial: str = SERIAL, keys: card_ops.PasswordKeys = KEYS):
    """What enrolment gives the server (auth_info additions) and the card (the EnrolReply)."""
    m = registrar().enrol(serial, registration(keys, serial), [AuthMethod.KEYFILE, AuthMethod.TOTP])
    return m.auth_info, EnrolReply.decode(m.reply)


def step_of(now: float) -> int:
    return int(math.floor(now / implauth.TOTP_PERIOD))


# ================================================================ Part 1a: the one-time agent's VM


def test_generated_functions_differ_in_operations_and_parameters():
    """[0051]: no two challenges share f — the generated programs differ in their operation sequences AND their constants, sboxes and outputs."""
    programs = [onetime_agent.generate(Rand(b"install-%d" % i)) for i in range(30)]
    shapes = {tuple(i.op for i in p.code) for p in programs}
    constants = {tuple(i.a for i in p.code if i.op is AgentOp.PUSH) for p in programs}
    assert len(shapes) == 30 and len(constants) == 30
    assert len({p.sbox for p in programs}) == 30 and all(sorted(p.sbox) == list(range(256)) for p in programs)
    y = bytes(range(32))
    assert len({onetime_agent.run(p, y) for p in programs}) == 30
    ops_used = {i.op for p in programs for i in p.code}
    assert {AgentOp.LOOP, AgentOp.SBOX, AgentOp.ROTL, AgentOp.HASH, AgentOp.MUL, AgentOp.DUP} <= ops_used


def test_agent_is_deterministic_and_depends_on_y():
    """f is a function: the same program and y always give the same 32 bytes; any change of y changes f(y)."""
    p = onetime_agent.generate(Rand(b"one"))
    y = Rand(b"y")(32)
    out = onetime_agent.run(p, y)
    assert len(out) == 32 and onetime_agent.run(p, y) == out
    assert onetime_agent.execute(encode_program(p), y) == out  # over the wire
    for i in range(32):
        flipped = bytearray(y)
        flipped[i] ^= 1
        assert onetime_agent.run(p, bytes(flipped)) != out


def test_agent_program_encoding_round_trips_and_rejects_trailing_bytes():
    """The program is a construct schema (vsc.wire.onetime_agent): decode(encode(p)) == p, and trailing bytes are refused."""
    p = onetime_agent.generate(Rand(b"enc"))
    data = encode_program(p)
    assert decode_program(data) == p
    with pytest.raises(WireError):
        decode_program(data + b"\x00")


def _loop_nest(depth: int, count: int) -> Program:
    """PUSH 7, then ``depth`` nested LOOPs of ``count``; the innermost body is NOT, NOT (each body: the inner loops + 2)."""
    loops = [Instruction(AgentOp.LOOP, count, depth - d + 1) for d in range(depth)]
    return Program(sbox=bytes(range(256)),
                   code=(Instruction(AgentOp.PUSH, 7), *loops, Instruction(AgentOp.NOT), Instruction(AgentOp.NOT)))


def test_step_budget_is_enforced_before_running(monkeypatch):
    """A program whose loops would take more than MAX_STEPS steps is refused with AgentError before a single step runs."""
    big = _loop_nest(3, 255)  # ~33 million steps
    assert onetime_agent.static_steps(_loop_nest(1, 3).code) == 1 + 1 + 3 * 2
    calls = []
    monkeypatch.setattr(onetime_agent._Machine, "step", lambda self, i, ins: calls.append(i))
    with pytest.raises(onetime_agent.AgentError, match="step budget"):
        onetime_agent.execute(encode_program(big), bytes(32))
    assert calls == []  # refused before the first step


def test_step_budget_is_also_enforced_while_running(monkeypatch):
    """The running count is the last line of defence: with the static check disabled, the run still stops at MAX_STEPS."""
    monkeypatch.setattr(onetime_agent, "static_steps", lambda code: 0)
    with pytest.raises(onetime_agent.AgentError, match="step budget"):
        onetime_agent.run(_loop_nest(3, 255), bytes(32))


@pytest.mark.parametrize(
    "code, message",
    [
        ((Instruction(AgentOp.ADD),), "underflow"),
        (tuple(Instruction(AgentOp.PUSH, 1) for _ in range(onetime_agent.MAX_STACK + 1)), "overflow"),
        ((Instruction(AgentOp.LOOP, 2, 5), Instruction(AgentOp.NOT)), "past the end"),
        ((Instruction(AgentOp.INPUT, 4),), "INPUT"),
        ((Instruction(AgentOp.PUSH, 1), Instruction(AgentOp.ROTL, 0)), "ROTL"),
        ((Instruction(AgentOp.PUSH, 1), Instruction(AgentOp.DUP, 3)), "DUP"),
        ((Instruction(AgentOp.PUSH, 1), Instruction(AgentOp.HASH, 2)), "HASH"),
        ((Instruction(AgentOp.PUSH, 1), Instruction(AgentOp.DROP)), "nothing on the stack"),
        (tuple(Instruction(AgentOp.LOOP, 2, 5 - d) for d in range(5)) + (Instruction(AgentOp.PUSH, 1),), "nest"),
    ],
    ids=["underflow", "overflow", "loop-past-end", "input", "rotl", "dup", "hash", "empty", "nesting"],
)
def test_unsafe_programs_are_refused(code, message):
    """Every way a program can be wrong is one specific AgentError, never another exception."""
    with pytest.raises(onetime_agent.AgentError, match=message):
        onetime_agent.run(Program(sbox=bytes(256), code=code), bytes(32))


def _only_agent_errors(data: bytes, y: bytes) -> None:
    try:
        out = onetime_agent.execute(data, y)
    except onetime_agent.AgentError:
        return
    assert isinstance(out, bytes) and out


def test_fuzz_random_bytes_never_crash_the_vm():
    """Random bytes, random valid-looking headers, and mutated real programs either run or raise AgentError — nothing else, ever."""
    rng = random.Random(0x5EED)
    y = bytes(32)
    header = b"VSCA\x01" + bytes(range(256))
    for _ in range(3000):
        _only_agent_errors(rng.randbytes(rng.randrange(0, 600)), y)
    for _ in range(3000):
        n = rng.randrange(0, 40)
        body = n.to_bytes(2, "big") + rng.randbytes(rng.randrange(0, 200))
        _only_agent_errors(header + body, y)
    real = encode_program(onetime_agent.generate(Rand(b"fuzz")))
    for _ in range(3000):
        mutated = bytearray(real)
        for _ in range(rng.randrange(1, 6)):
            mutated[rng.randrange(261, len(mutated))] = rng.randrange(256)
        _only_agent_errors(bytes(mutated), rng.randbytes(32))


def test_fuzz_random_instruction_lists_never_crash_the_vm():
    """Structurally valid programs with random operations and operands: AgentError or an output, never a crash."""
    rng = random.Random(7)
    for _ in range(1000):
        code = []
        for _ in range(rng.randrange(1, 60)):
            op = rng.choice(list(AgentOp))
            a = rng.randrange(1 << 64) if op is AgentOp.PUSH else rng.randrange(256)
            code.append(Instruction(op, a, rng.randrange(256) if op is AgentOp.LOOP else 0))
        program = Program(sbox=rng.randbytes(256), code=tuple(code))
        _only_agent_errors(encode_program(program), rng.randbytes(32))


def test_agent_challenge_decrypts_only_with_f():
    """[0050]: w = E[x, f(y)]; the card discovers x by running f on y; a changed program or y cannot decrypt w."""
    issued = implauth.agent_challenge(SERIAL, Rand(b"ch"))
    assert implauth.agent_answer(issued.data, SERIAL) == issued.x
    from vsc.wire.onetime_agent import AgentChallenge

    ch = AgentChallenge.decode(issued.data)
    other = AgentChallenge(program=onetime_agent.generate_bytes(Rand(b"other")), y=ch.y, nonce=ch.nonce, w=ch.w)
    with pytest.raises(crypto.CryptoError):
        implauth.agent_answer(other.encode(), SERIAL)
    with pytest.raises(crypto.CryptoError):
        implauth.agent_answer(attrs.evolve(ch, y=bytes(32)).encode(), SERIAL)
    with pytest.raises(crypto.CryptoError):
        implauth.agent_answer(issued.data, "another-card")


# ================================================================ Part 1b: keyfiles


def test_keyfile_is_signed_sealed_and_opens_only_for_its_card_and_password():
    """[0044]-[0046]: the server's keyfile binds serial, card key and as1 under its signature; only this card's password opens it."""
    info, reply = enrolled_material()
    body = implauth.open_keyfile(reply.keyfile, SERIAL, KEYS.protection_key, PINNED)
    assert body == KeyfileBody(serial=SERIAL, card_key=b"CARD-9E-KEY", as1=bytes.fromhex(info["keyfile"]["as1"]),
                               issued=int(NOW))
    assert len(body.as1) == 16
    with pytest.raises(implauth.KeyfileError, match="does not decrypt"):
        implauth.open_keyfile(reply.keyfile, SERIAL, crypto.sha256(b"another password"), PINNED)
    with pytest.raises(implauth.KeyfileError, match="does not decrypt"):
        implauth.open_keyfile(reply.keyfile, "card-2", KEYS.protection_key, PINNED)


def _reseal(signed: SignedKeyfile) -> bytes:
    return implauth.seal_keyfile(signed.encode(), SERIAL, implauth.seal_public(KEYS.protection_key, SERIAL), Rand(b"x"))


def test_tampered_keyfiles_are_refused():
    """A flipped ciphertext byte, a changed body (bad signature), another signer, or another serial: each a specific KeyfileError."""
    _, reply = enrolled_material()
    sealed = SealedKeyfile.decode(reply.keyfile)
    flipped = bytearray(sealed.sealed)
    flipped[10] ^= 0x01
    with pytest.raises(implauth.KeyfileError, match="does not decrypt"):
        implauth.open_keyfile(attrs.evolve(sealed, sealed=bytes(flipped)).encode(), SERIAL, KEYS.protection_key, PINNED)
    signed = SignedKeyfile.decode(implauth.unseal_keyfile(reply.keyfile, SERIAL, KEYS.protection_key))
    body = KeyfileBody.decode(signed.body)
    forged = attrs.evolve(signed, body=attrs.evolve(body, as1=b"A" * 16).encode())
    with pytest.raises(implauth.KeyfileError, match="signature does not verify"):
        implauth.open_keyfile(_reseal(forged), SERIAL, KEYS.protection_key, PINNED)
    other = implauth.sign_keyfile(attrs.evolve(body, as1=b"A" * 16), lambda d: crypto.rsa_pss_sign(OTHER_KEY, d),
                                  OTHER_KEY.public_key().spki_der)
    with pytest.raises(implauth.KeyfileError, match="not by the pinned server key"):
        implauth.open_keyfile(_reseal(SignedKeyfile.decode(other)), SERIAL, KEYS.protection_key, PINNED)
    renamed = implauth.sign_keyfile(attrs.evolve(body, serial="card-9"), lambda d: crypto.rsa_pss_sign(SERVER_KEY, d),
                                    SERVER_PUB)
    with pytest.raises(implauth.KeyfileError, match="for card card-9"):
        implauth.open_keyfile(_reseal(SignedKeyfile.decode(renamed)), SERIAL, KEYS.protection_key, PINNED)
    with pytest.raises(implauth.KeyfileError, match="malformed"):
        implauth.open_keyfile(b"garbage", SERIAL, KEYS.protection_key, PINNED)


def test_keyfile_reseal_for_a_new_password_keeps_the_signature():
    """A password change re-seals the keyfile locally: it opens with the new password only, with the same as1 and a valid signature."""
    info, reply = enrolled_material()
    new = card_ops.PasswordKeys(b"n" * 32, crypto.sha256(b"new protection key"), KDF)
    resealed = implauth.reseal_keyfile(reply.keyfile, SERIAL, KEYS.protection_key, new.protection_key, Rand(b"r"))
    assert implauth.open_keyfile(resealed, SERIAL, new.protection_key, PINNED).as1.hex() == info["keyfile"]["as1"]
    with pytest.raises(implauth.KeyfileError):
        implauth.open_keyfile(resealed, SERIAL, KEYS.protection_key, PINNED)


def test_keyfile_mac_is_figure_10_with_as1_and_its_own_label():
    """[0046]: the answer is (ri2, HMAC-SHA256(as1, label || ri1 || ri2 || serial)); the label differs from the Master key's."""
    as1, ri1 = b"a" * 16, b"1" * 32
    answer = implauth.keyfile_answer(as1, ri1, SERIAL, Rand(b"ri2"))
    resp = MasterResponse.decode(answer)
    assert implauth.check_keyfile(as1, ri1, SERIAL, answer)
    assert not implauth.check_keyfile(b"b" * 16, ri1, SERIAL, answer)
    assert not implauth.check_keyfile(as1, b"2" * 32, SERIAL, answer)
    assert resp.mac != auth.master_mac(as1, ri1, resp.ri2, SERIAL)
    assert not implauth.check_keyfile(as1, ri1, SERIAL, b"short")


def test_registrar_refuses_a_card_without_a_seal_key():
    """Keyfile authentication needs the card's registration: none, a malformed one, or one without a seal key is a clear ImplAuthError."""
    r = registrar()
    for reg in (b"", b"junk", Registration(card_key=b"K").encode()):
        with pytest.raises(implauth.ImplAuthError):
            r.enrol(SERIAL, reg, [AuthMethod.KEYFILE])
    assert r.enrol(SERIAL, b"", [AuthMethod.TOTP]).auth_info["totp"]["last_step"] == -1


# ================================================================ Part 1c: TOTP


@pytest.mark.parametrize("t, code", [(59, "94287082"), (1111111109, "07081804"), (1234567890, "89005924"),
                                     (2000000000, "69279037"), (20000000000, "65353130")])
def test_totp_rfc6238_sha1_vectors(t, code):
    """RFC 6238 Appendix B (HMAC-SHA1, 8 digits) through vsc.crypto."""
    assert implauth.totp_now(b"12345678901234567890", t, digits=8) == code


def test_totp_window_and_replay():
    """The server accepts the codes of the current step and one on either side, each only if later than the last accepted step."""
    secret = b"k" * 20
    s = step_of(NOW)
    for d in (-1, 0, 1):
        assert implauth.check_totp(secret, implauth.totp_answer(implauth.totp_code(secret, s + d)), NOW, -1) == s + d
    for d in (-3, -2, 2, 3):
        assert implauth.check_totp(secret, implauth.totp_answer(implauth.totp_code(secret, s + d)), NOW, -1) is None
    code = implauth.totp_answer(implauth.totp_code(secret, s))
    assert implauth.check_totp(secret, code, NOW, s) is None  # used
    assert implauth.check_totp(secret, code, NOW, s + 1) is None  # a later one was used
    assert implauth.check_totp(secret, code, NOW, s - 1) == s
    assert implauth.check_totp(secret, implauth.totp_answer("12345"), NOW, -1) is None
    assert implauth.check_totp(secret, b"", NOW, -1) is None
    assert implauth.otpauth_uri(secret, "card 1").startswith("otpauth://totp/VSC%3Acard%201?secret=NNVWW")


# ================================================================ Part 2: the server machine with every method


def record(auth_info: dict | None = None, **kw) -> CardRecord:
    info = {"methods": ["password", "master-key", "keyfile", "one-time-agent", "totp"]}
    info.update(auth_info if auth_info is not None else enrolled_material()[0])
    fields = dict(
        serial=SERIAL, state=CardState.IDLE, muk=None, protected=b"PROTECTED", channel_info=None,
        verifier=auth.verifier_for(KEYS.auth_key, KdfAlg.SCRYPT), kdf=KDF.encode(), auth_info=json.dumps(info),
        version=4, failures=0, locked_until=0.0, created=NOW - 100, updated=NOW - 50,
    )
    fields.update(kw)
    return CardRecord(**fields)


def machine(now: list | None = None, policy: OpsPolicy = OpsPolicy(impl_auth=ALL), rand=None) -> ServerOps:
    clock = now if now is not None else [NOW]
    return ServerOps(policy=policy, master=MASTER, decoy_secret=DECOY, peer=PEER, suite="aes256-gcm",
                     now=lambda: clock[0], rand=rand or Rand(b"server"))


def challenge_of(m: ServerOps, card: CardRecord | None, op: Op = Op.INSERT) -> AuthChallenge:
    req = OpRequest(op=op, serial=SERIAL, insert_secret=SECRET if op is Op.INSERT else b"")
    assert m.message(req) == [LoadCard(SERIAL)]
    effects = m.loaded(card)
    assert len(effects) == 2 and effects[1] == StartDeadline(30.0)
    return effects[0].message


def card_credentials(keyfile: bytes | None = None, code: str | None = None) -> card_ops.Credentials:
    if keyfile is None:
        keyfile = enrolled_material()[1].keyfile
    if code is None:
        secret = bytes.fromhex(enrolled_material()[0]["totp"]["secret"])
        code = implauth.totp_now(secret, NOW)
    return card_ops.Credentials(keyfiles=(keyfile,), server_key=PINNED, totp=lambda: code)


def card_answers(ch: AuthChallenge, creds: card_ops.Credentials | None = None) -> AuthResponse:
    """The real card code (vsc.card.ops.answer) answering every challenge."""
    answers, _ = card_ops.answer(ch, SERIAL, "", MASTER, Rand(b"card"), KEYS, creds or card_credentials())
    return AuthResponse(responses=tuple(answers), muk=MUK)


def test_insert_with_all_four_methods_checks_out_and_consumes_the_totp_step():
    """[0084]: password, Master key, keyfile, one-time agent and TOTP all pass; the check-out carries the TOTP step to consume."""
    m = machine()
    ch = challenge_of(m, record())
    assert [i.method for i in ch.challenges] == [AuthMethod.PASSWORD, *ALL]
    assert [len(i.data) for i in ch.challenges][:3] == [0, 32, 32] and ch.challenges[4].data == b""
    creds = card_credentials()
    effects = m.message(card_answers(ch, creds))
    assert creds.notes == [] and creds.keyfile_used == 0
    assert effects == [CancelDeadline(), CheckOut(
        serial=SERIAL, muk=MUK, session=crypto.sha256(SECRET), channel={"suite": "aes256-gcm", "peer": PEER},
        peer=PEER, verifier=record().verifier, totp_step=step_of(NOW), own_machine=False)]


def test_each_challenge_gets_a_new_agent():
    """[0051]: no two inserts share f — every challenge carries a different program, y and w."""
    datas = {challenge_of(machine(rand=Rand(b"s%d" % i)), record()).challenges[3].data for i in range(5)}
    assert len(datas) == 5


def _refused_identically(m: ServerOps, resp: AuthResponse, detail: str) -> None:
    effects = m.message(resp)
    assert effects == [CancelDeadline(), CountFailure(SERIAL, Operation.INSERT, PEER, detail, MUK, False)]
    assert m.stored(None) == [Reply(OpResult(status=Status.REFUSED))]


def _forged_answer(ch: AuthChallenge, method: AuthMethod, data: bytes) -> AuthResponse:
    resp = card_answers(ch)
    items = [AuthItem(i.method, data) if i.method is method else i for i in resp.responses]
    return attrs.evolve(resp, responses=tuple(items))


def test_tampered_keyfile_is_refused_and_the_card_says_why():
    """A tampered keyfile: the genuine card will not use it (a note says why) and the server refuses like any failure."""
    sealed = SealedKeyfile.decode(enrolled_material()[1].keyfile)
    bad = bytearray(sealed.sealed)
    bad[0] ^= 0x80
    creds = card_credentials(keyfile=attrs.evolve(sealed, sealed=bytes(bad)).encode())
    m = machine()
    _refused_identically(m, card_answers(challenge_of(m, record()), creds), "failed: keyfile")
    assert creds.notes and "keyfile" in creds.notes[0] and "does not decrypt" in creds.notes[0]


def test_wrong_as1_is_refused():
    """A rogue card that answers the keyfile challenge with an as1 of its own choosing ([0047]) is refused."""
    m = machine()
    ch = challenge_of(m, record())
    forged = implauth.keyfile_answer(b"\x00" * 16, ch.challenges[2].data, SERIAL, Rand(b"rogue"))
    _refused_identically(m, _forged_answer(ch, AuthMethod.KEYFILE, forged), "failed: keyfile")


def test_wrong_agent_answer_is_refused():
    """A card that cannot run f answers the wrong x: refused."""
    m = machine()
    ch = challenge_of(m, record())
    _refused_identically(m, _forged_answer(ch, AuthMethod.ONE_TIME_AGENT, b"x" * 32), "failed: one-time-agent")


def test_wrong_totp_is_refused():
    """A TOTP code that is not the device's current one: refused."""
    secret = bytes.fromhex(enrolled_material()[0]["totp"]["secret"])
    wrong = next(c for c in ("000000", "111111", "222222")
                 if c not in {implauth.totp_code(secret, step_of(NOW) + d) for d in (-1, 0, 1)})
    m = machine()
    _refused_identically(m, card_answers(challenge_of(m, record()), card_credentials(code=wrong)), "failed: totp")


def test_reused_totp_is_refused():
    """A code already accepted (its step is the last accepted step) is refused, though it is still inside the window."""
    info = enrolled_material()[0]
    info["totp"]["last_step"] = step_of(NOW)
    m = machine()
    _refused_identically(m, card_answers(challenge_of(m, record(info))), "failed: totp")


def test_missing_totp_code_is_refused_with_a_note():
    """No code to give: the card answers empty, notes why, and the server refuses like any failure."""
    creds = card_credentials()
    creds.totp = None
    m = machine()
    _refused_identically(m, card_answers(challenge_of(m, record()), creds), "failed: totp")
    assert any("TOTP" in n for n in creds.notes)


def test_all_failures_look_the_same_to_the_card():
    """Every failed method (and an unknown serial) gets the same bytes back: REFUSED, nothing else."""
    replies = set()
    for method, data in ((AuthMethod.KEYFILE, b""), (AuthMethod.ONE_TIME_AGENT, b""), (AuthMethod.TOTP, b""),
                         (AuthMethod.MASTER_KEY, b"")):
        m = machine()
        ch = challenge_of(m, record())
        m.message(_forged_answer(ch, method, data))
        replies.add(tuple(m.stored(None)))
    m = machine()
    ch = challenge_of(m, None)  # unknown serial: decoy challenges for every method
    assert [i.method for i in ch.challenges] == [AuthMethod.PASSWORD, *ALL]
    m.message(card_answers(ch))
    replies.add(tuple(m.stored(None)))
    assert replies == {(Reply(OpResult(status=Status.REFUSED)),)}


class DeadlineHarness:
    """The glue's deadline handling (vsc.server.service) on a task.Clock: StartDeadline → callLater, CancelDeadline → cancel."""

    def __init__(self, m: ServerOps, clock: Clock):
        self.m, self.clock, self.timer, self.out = m, clock, None, []

    def run(self, effects: list) -> list:
        for e in effects:
            if isinstance(e, StartDeadline):
                self.timer = self.clock.callLater(e.seconds, lambda: self.out.extend(self.run(self.m.deadline())))
            elif isinstance(e, CancelDeadline) and self.timer is not None and self.timer.active():
                self.timer.cancel()
        self.out.extend(effects)
        return effects


def test_agent_answer_just_in_time_is_accepted_on_a_clock():
    """[0050]: an answer 29.9 s after the challenge is in time."""
    clock = Clock()
    m = machine(now=[NOW])
    h = DeadlineHarness(m, clock)
    h.run(m.message(OpRequest(op=Op.INSERT, serial=SERIAL, insert_secret=SECRET)))
    ch = h.run(m.loaded(record()))[0].message
    resp = card_answers(ch)
    clock.advance(29.9)
    effects = h.run(m.message(resp))
    assert effects[0] == CancelDeadline() and isinstance(effects[1], CheckOut)
    clock.advance(10)
    assert not any(isinstance(e, CountFailure) for e in h.out)


def test_agent_answer_too_late_is_refused_on_a_clock():
    """[0050]: 30 s after the challenge the deadline fires: the unanswered challenge is counted as a failure (result "timeout"), the card gets TIMEOUT, and the late (correct) answer never checks out."""
    clock = Clock()
    m = machine(now=[NOW])
    h = DeadlineHarness(m, clock)
    h.run(m.message(OpRequest(op=Op.INSERT, serial=SERIAL, insert_secret=SECRET)))
    ch = h.run(m.loaded(record()))[0].message
    resp = card_answers(ch)
    clock.advance(29.99)
    assert h.out[-1] == StartDeadline(30.0)
    clock.advance(0.02)
    assert h.out[-1] == CountFailure(SERIAL, Operation.INSERT, PEER, "no answer within 30 s", None, False,
                                     result="timeout")
    assert h.run(m.stored(None)) == [Reply(OpResult(status=Status.TIMEOUT))]
    late = h.run(m.message(resp))
    assert [type(e) for e in late] == [CancelDeadline, ProtocolViolation]
    assert not any(isinstance(e, CheckOut) for e in h.out)


def test_recover_and_destroy_consume_the_totp_step_too():
    """Recover and destroy authenticate like insert: their store effects carry the matched TOTP step."""
    for op, effect in ((Op.RECOVER, RecoverCard), (Op.DESTROY, DestroyCard)):
        m = machine()
        ch = challenge_of(m, record(), op)
        [_, call] = m.message(card_answers(ch))
        assert isinstance(call, effect) and call.totp_step == step_of(NOW)


def test_card_keeps_its_methods_when_the_policy_drops_them():
    """A card that was given a keyfile and a TOTP seed must keep using them, whatever the policy says now."""
    info = enrolled_material()[0]
    m = machine(policy=OpsPolicy(impl_auth=(AuthMethod.MASTER_KEY,)))
    ch = challenge_of(m, record(dict(info, methods=["password", "master-key"])))
    assert [i.method for i in ch.challenges] == [AuthMethod.PASSWORD, AuthMethod.MASTER_KEY, AuthMethod.KEYFILE,
                                                 AuthMethod.TOTP]


# ---------------------------------------------------------------- enrolment


def issue(m: ServerOps, effects: list) -> list:
    """Carry out an IssueMaterial as the glue does (vsc.server.service): the real Registrar, its refusal as material_refused."""
    [e] = effects
    assert isinstance(e, IssueMaterial)
    try:
        material = registrar().enrol(e.serial, e.registration, e.methods)
    except implauth.ImplAuthError as err:
        return m.material_refused(str(err))
    return m.material(material)


def test_enrol_issues_keyfile_and_totp_seed_and_stores_the_server_side():
    """Enrolment with keyfile and totp in the policy: the material is asked for first (IssueMaterial), as1 and the seed go to the store (EnrolCard.auth_extra), the sealed keyfile and seed to the card with the OK."""
    m = machine()
    reg = registration()
    req = EnrolRequest(serial=SERIAL, code="abcde", verifier=b"V" * 32, kdf=KDF.encode(), protected=b"P",
                       registration=reg)
    effects = m.message(req)
    assert effects == [IssueMaterial(SERIAL, reg, (AuthMethod.KEYFILE, AuthMethod.TOTP), auth.code_hash("abcde"), b"V" * 32,
                                     KDF.encode(), b"P")]
    [call] = issue(m, effects)
    assert isinstance(call, EnrolCard) and call.registration == reg
    extra = call.auth_extra
    assert set(extra) == {"keyfile", "totp"}
    [authenticated, reply] = m.stored(Outcome(Status.OK, version=1))
    assert authenticated == Authenticated(SERIAL) and reply.message.status is Status.OK
    er = EnrolReply.decode(reply.message.registration)
    assert implauth.open_keyfile(er.keyfile, SERIAL, KEYS.protection_key, PINNED).as1.hex() == extra["keyfile"]["as1"]
    assert er.totp_secret.hex() == extra["totp"]["secret"] and (er.totp_digits, er.totp_period) == (6, 30)


def test_enrol_refused_code_gets_no_material():
    """A refused enrolment (bad code) sends nothing of the material it prepared."""
    m = machine()
    issue(m, m.message(EnrolRequest(serial=SERIAL, code="abcde", verifier=b"V" * 32, kdf=KDF.encode(),
                                    protected=b"P", registration=registration())))
    assert m.stored(Outcome(Status.REFUSED)) == [Reply(OpResult(status=Status.REFUSED))]


def test_enrol_without_registration_when_keyfiles_are_required_is_a_bad_request():
    """A card build that sends no registration cannot be given a keyfile: BAD_REQUEST, logged, nothing stored."""
    m = machine()
    [call] = issue(m, m.message(EnrolRequest(serial=SERIAL, code="abcde", verifier=b"V" * 32, kdf=KDF.encode(),
                                             protected=b"P")))
    assert isinstance(call, LogRefusal) and call.result == "bad-request" and call.op is Operation.ENROL
    assert "registration" in call.detail
    assert m.stored(None) == [Reply(OpResult(status=Status.BAD_REQUEST))]


# ================================================================ Part 3: the store consumes each TOTP step once


def _store_with_card(tmp_path, auth_info: dict) -> Store:
    store = Store(f"sqlite:///{tmp_path / 'vsc.sqlite3'}", lambda: NOW)
    store.migrate()
    store.issue(SERIAL, auth.code_hash("CODE"), json.dumps({"methods": ["password"]}), 3600)
    enrol = EnrolCard(SERIAL, auth.code_hash("CODE"), b"V" * 32, KDF.encode(), b"P", b"", auth_info, PEER)
    assert store.enrol(enrol).status is Status.OK
    return store


def test_store_consumes_a_totp_step_atomically_with_the_checkout(tmp_path):
    """The accepted step is written with the check-out; the same step again (a race past the machine) is refused and logged."""
    info, _ = enrolled_material()
    store = _store_with_card(tmp_path, info)
    try:
        s = step_of(NOW)
        assert store.check_out(CheckOut(SERIAL, MUK, b"h" * 32, {}, PEER, b"V" * 32, totp_step=s)).status is Status.OK
        card = store.get(SERIAL)
        assert json.loads(card.auth_info)["totp"]["last_step"] == s
        assert json.loads(card.auth_info)["keyfile"] == info["keyfile"]
        assert store.recover(RecoverCard(SERIAL, MUK, PEER, b"V" * 32, totp_step=s)).status is Status.REFUSED
        assert store.history(SERIAL)[-1].detail == "TOTP code already used"
        assert store.recover(RecoverCard(SERIAL, MUK, PEER, b"V" * 32, totp_step=s + 1)).status is Status.OK
        assert store.destroy(DestroyCard(SERIAL, b"", PEER, b"V" * 32, totp_step=s + 1)).status is Status.REFUSED
        assert store.get(SERIAL).state is CardState.IDLE
    finally:
        store.close()


# ================================================================ Part 4: end to end with real processes

PASSWORD = "correct horse battery staple"
CARD_TIMEOUT = 60.0




@attrs.define
class World:
    root: Path
    env: dict
    home: Path
    data: Path
    password_file: Path
    totp_file: Path
    secret: bytes = b""
    card: subprocess.Popen | None = None
    card_log: Path | None = None

    def vsc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(VSC), *args], env=self.env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=CARD_TIMEOUT, cwd=self.root)
        if check and proc.returncode != 0:
            raise AssertionError(f"vsc {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def last_step(self) -> int:
        """The last TOTP step the server accepted (from its database)."""
        store = open_store(self.data)
        try:
            return json.loads(store.get("dave").auth_info)["totp"]["last_step"]
        finally:
            store.close()

    def fresh_code(self) -> str:
        """A code the server has not accepted yet: the current step's, or the next one's if the current was used."""
        return implauth.totp_code(self.secret, max(step_of(time.time()), self.last_step() + 1))

    def start_card(self, code: str, *extra: str) -> tuple[int | None, str]:
        """``twistd -n vsc-card`` with the TOTP code in --totp-file; (None, log) once inserted, (exit code, log) if it exits."""
        self.totp_file.write_text(code + "\n")
        self.card_log = self.root / f"card-{time.monotonic_ns()}.log"
        log = open(self.card_log, "wb")
        self.card = subprocess.Popen(
            [str(TWISTD), "-n", "--pidfile=", "vsc-card", "--home", str(self.home), "--password-file",
             str(self.password_file), "--totp-file", str(self.totp_file), *extra],
            cwd=self.root, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()

        def settled():
            text = self.card_log.read_text(errors="replace")
            if "inserted; control socket" in text:
                return (None, text)
            if self.card.poll() is not None:
                return (self.card.returncode, text)
            return None

        return wait_for(settled, CARD_TIMEOUT, "the card daemon to insert or exit")

    def remove_card(self) -> None:
        self.vsc("card", "--home", str(self.home), "remove")
        assert self.card.wait(30) == 0

    def kill_card(self) -> None:
        if self.card is not None and self.card.poll() is None:
            self.card.kill()
            self.card.wait(10)


@pytest.fixture
def world(tmp_path):
    """A real server requiring every implementation method, and card "dave" enrolled with `vsc card enroll`."""
    runtime = Path(tempfile.mkdtemp(prefix="vscia-", dir="/tmp"))
    env = dict(_env(), VSC_LOCK_DIR=str(tmp_path / "lock"), XDG_RUNTIME_DIR=str(runtime))
    servers = Servers(tmp_path / "logs")
    w = None
    try:
        data = tmp_path / "srv"
        info = init_data_dir(data, settings={"impl_auth": "master-key,keyfile,one-time-agent,totp",
                                             "lockout_threshold": 50})
        server = servers.start(data, "server")
        code = admin(data, "issue", "dave")["code"]
        w = World(root=tmp_path, env=env, home=tmp_path / "home", data=data, password_file=tmp_path / "pw",
                  totp_file=tmp_path / "totp")
        w.password_file.write_text(PASSWORD + "\n")
        out = json.loads(w.vsc("card", "--home", str(w.home), "enroll", "--server", server.endpoint, "--server-key",
                               info["fingerprint"], "--serial", "dave", "--code", code, "--password-file",
                               str(w.password_file), "--scrypt-log2n", "12", "--json").stdout)
        w.secret = implauth_secret(out["totp"]["secret"])
        assert out["totp"]["uri"].startswith("otpauth://totp/VSC%3Adave?secret=")
        assert Path(out["keyfile"]) == w.home / "keyfile.vsc" and (w.home / "keyfile.vsc").stat().st_mode & 0o077 == 0
        yield w
    finally:
        if w is not None:
            w.kill_card()
        servers.close()
        shutil.rmtree(runtime, ignore_errors=True)


def implauth_secret(b32: str) -> bytes:
    import base64

    return base64.b32decode(b32 + "=" * (-len(b32) % 8))


def _history(w: World) -> list:
    store = open_store(w.data)
    try:
        return store.history("dave")
    finally:
        store.close()


@pytest.mark.integration
def test_insert_with_all_four_methods_end_to_end(world):
    """A real vsc-card inserts against a real vsc-server requiring Master key, keyfile, one-time agent and TOTP; the card works; remove; the server stored as1 and the consumed step."""
    code = world.fresh_code()
    rc, log = world.start_card(code)
    assert rc is None, log
    status = json.loads(world.vsc("card", "--home", str(world.home), "status", "--json").stdout)
    assert status["state"] == "in-use" and set(status["slots"]) == {"9a", "9c", "9d", "9e"}
    world.remove_card()
    store = open_store(world.data)
    try:
        card = store.get("dave")
        info = json.loads(card.auth_info)
        assert info["totp"]["last_step"] in (step_of(time.time()) - 1, step_of(time.time()), step_of(time.time()) + 1)
        assert implauth.totp_code(world.secret, info["totp"]["last_step"]) == code
        assert len(bytes.fromhex(info["keyfile"]["as1"])) == 16
        reg = Registration.decode(bytes.fromhex(info["registration"]))
        assert crypto.public_kind(reg.card_key) == "p256"
    finally:
        store.close()
    assert [(h.op, h.result) for h in _history(world)][-2:] == [("insert", "ok"), ("remove", "ok")]


@pytest.mark.integration
def test_negative_cases_end_to_end_are_refused_identically(world):
    """Reused TOTP, wrong TOTP and a tampered keyfile are each refused (REFUSED, the same line from the server); then, with the keyfile restored, `vsc card destroy --totp CODE` authenticates with all four methods."""
    code = world.fresh_code()
    rc, log = world.start_card(code)
    assert rc is None, log
    world.remove_card()
    refusal = "insert refused: refused: wrong password, unknown serial, locked out, or this card build is not accepted"

    rc, log = world.start_card(code)  # the same code again
    assert rc == 1 and refusal in log, log

    real = {implauth.totp_code(world.secret, step_of(time.time()) + d) for d in (-1, 0, 1, 2)}
    wrong = next(c for c in ("000000", "111111", "222222", "333333") if c not in real)
    rc, log = world.start_card(wrong)
    assert rc == 1 and refusal in log, log

    keyfile = world.home / "keyfile.vsc"
    good = keyfile.read_bytes()
    sealed = SealedKeyfile.decode(good)
    bad = bytearray(sealed.sealed)
    bad[5] ^= 0x40
    keyfile.write_bytes(attrs.evolve(sealed, sealed=bytes(bad)).encode())
    rc, log = world.start_card(world.fresh_code())
    assert rc == 1 and refusal in log and "keyfile: the keyfile does not decrypt" in log, log
    keyfile.write_bytes(good)

    refused = [h for h in _history(world) if h.result == "refused"]
    assert [h.detail for h in refused][-3:] == ["failed: totp", "failed: totp", "failed: keyfile"]

    # the restored keyfile and a fresh code authenticate again (destroy authenticates like insert; a third
    # success inside one 30 s step would need the step after next, outside the window)
    proc = world.vsc("card", "--home", str(world.home), "destroy", "--yes", "--password-file",
                     str(world.password_file), "--totp", world.fresh_code(), check=False)
    assert proc.returncode == 0 and "destroyed" in proc.stdout, (proc.stderr, _history(world)[-3:])
    assert (_history(world)[-1].op, _history(world)[-1].result) == ("destroy", "ok")


@pytest.mark.parametrize("size", [0, 31, 33, 64, 16384])
@pytest.mark.parametrize("method", ["MASTER_KEY", "KEYFILE"])
def test_a_challenge_of_the_wrong_size_is_not_answered(method, size):
    """
    A malicious server (the holder of the pinned key) sends a Master-key or
    keyfile challenge that is not 32 bytes: the card makes no MAC under the
    implementation's shared key over bytes of the server's choosing (a
    33-byte ri1 would shift the serial's length byte into the MAC input),
    answers empty and says why.
    """
    from vsc.protocol import methods
    from vsc.wire.ops import AuthMethod

    creds = methods.Credentials()
    side = methods.CardSide("CARD-1", b"a" * 32, b"p" * 32, b"m" * 32, creds, lambda n: b"\x01" * n)
    m = methods.METHODS[AuthMethod[method]]
    assert m.answer(side, b"\x07" * size) == b""
    assert creds.notes and f"is {size} bytes, not 32" in creds.notes[-1]
    if method == "MASTER_KEY":  # the right size is answered (Figure 10: ri2 || MAC)
        assert len(m.answer(side, b"\x07" * 32)) > 32
