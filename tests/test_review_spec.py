"""
Review of docs/protocol.md as a normative specification.

Every example value the document states is recomputed here INDEPENDENTLY
(hashlib, hmac, struct and `cryptography` directly, not vsc's codec, key
schedule or KDF code), compared with the text of the document, and then
compared with what vsc's own functions give. Before this review most of
these values (§10.5's password keys, §10.6.2's Master key, §10.14's worked
insert, §5.6/§5.8's example frames, §11.1's listing) were stated in the
document and checked by nothing: a second implementation could follow a
wrong example and no test would notice.

The rest checks the document's tables against the code they describe: the
enumerations (the values a receiver MUST treat as MALFORMED), and every
length bound of the §10.4 message tables against the construct schemas.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import struct
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from tests.vectors.support import KEY_PATH, VECTORS_DIR

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "protocol.md").read_text(encoding="utf-8")
FLAT = re.sub(r"\s+", "", DOC)  # hex values wrap across lines and are split by spaces for reading

PASSWORD = b"correct horse"
SALT = bytes(range(16))


def in_doc(hex_value: str) -> bool:
    return hex_value.lower() in FLAT.lower()


def listing(heading: str, occurrence: int = 0) -> list[str]:
    """The indented code block that follows ``heading`` in the document, as lines."""
    at = -1
    for _ in range(occurrence + 1):
        at = DOC.index(heading, at + 1)
    lines = DOC[at:].split("\n")[1:]
    while lines and not lines[0].startswith("    "):
        lines = lines[1:]
    block = []
    for line in lines:
        if not line.startswith("    ") and line.strip():
            break
        if not line.strip() and block:
            break
        block.append(line)
    return block


def hex_of(lines: list[str]) -> bytes:
    """The bytes a listing shows: on each line the leading hex tokens, up to the first comment word."""
    out = b""
    for line in lines:
        for token in line.split():
            if len(token) % 2 or not re.fullmatch(r"[0-9a-f]+", token):
                break
            out += bytes.fromhex(token)
    return out


def hkdf(salt: bytes, ikm: bytes, info: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, salt, info).derive(ikm)


def scrypt_keys() -> tuple[bytes, bytes]:
    d = hashlib.scrypt(PASSWORD, salt=SALT, n=1 << 15, r=8, p=1, dklen=64, maxmem=1 << 27)
    return d[:32], d[32:]


MASTER = hashlib.sha256(b"vsc default Master key - replace it in a deployment").digest()


# ---------------------------------------------------------------- §10.5 password keys, §10.6.2 Master key


def test_password_key_example_of_10_5():
    """
    §10.5's example (scrypt N=2^15, r=8, p=1 over `correct horse` and salt 00..0f; the legacy MD5 derivation
    with SALT "EP0936530-VSC-SALT"): auth key, protection key and verifier, recomputed with hashlib, appear in
    the document and equal vsc.card.ops.derive_keys / vsc.protocol.auth.verifier_for.
    """
    from vsc.card import ops
    from vsc.protocol import auth
    from vsc.wire.ops import KdfAlg, KdfParams

    auth_key, protection_key = scrypt_keys()
    verifier = hashlib.sha256(auth_key).digest()
    legacy = hashlib.md5(PASSWORD + b"EP0936530-VSC-SALT").digest()
    legacy_verifier = hashlib.md5(legacy[:8]).digest()
    for value in (auth_key, protection_key, verifier, legacy[:8], legacy[8:], legacy_verifier):
        assert in_doc(value.hex()), f"{value.hex()} is not the value §10.5 states"

    keys = ops.derive_keys(PASSWORD.decode(), KdfParams(KdfAlg.SCRYPT, SALT, 15, 8, 1))
    assert (keys.auth_key, keys.protection_key) == (auth_key, protection_key)
    assert auth.verifier_for(keys.auth_key, KdfAlg.SCRYPT) == verifier
    old = ops.derive_keys(PASSWORD.decode(), KdfParams(KdfAlg.LEGACY_MD5, b"", 0, 0, 0))
    assert (old.auth_key, old.protection_key) == (legacy[:8], legacy[8:])
    assert auth.verifier_for(old.auth_key, KdfAlg.LEGACY_MD5) == legacy_verifier
    assert auth.check_password(legacy_verifier, legacy[:8]) and auth.check_password(verifier, auth_key)


def test_kdf_params_encodings_of_10_4():
    """§10.4: LEGACY_MD5 is `0100000000`; the default scrypt parameters with a 16-byte salt are 21 bytes,
    `02 10 <salt> 0f 08 01`."""
    from vsc.card import ops
    from vsc.wire.ops import KdfAlg, KdfParams

    assert "`0100000000`" in DOC and "`02 10 <salt> 0f 08 01`" in DOC
    assert ops.new_kdf(lambda n: b"", legacy=True).encode() == bytes.fromhex("0100000000")
    scrypt = ops.new_kdf(lambda n: SALT[:n]).encode()
    assert scrypt == b"\x02\x10" + SALT + b"\x0f\x08\x01" and len(scrypt) == 21
    assert KdfParams.decode(scrypt) == KdfParams(KdfAlg.SCRYPT, SALT, 15, 8, 1)


def test_master_key_and_master_input_of_10_6_2():
    """§10.6.2: the built-in Master key is SHA-256 of its sentence; "vsc1 master-key" is the 15 bytes the text
    gives; HMAC-SHA256 over MasterInput (recomputed with hmac) is vsc's master_mac and the MAC of §10.14."""
    from vsc.protocol import auth

    assert in_doc(MASTER.hex()) and auth.DEFAULT_MASTER_KEY == MASTER
    assert in_doc(b"vsc1 master-key".hex()) and len(b"vsc1 master-key") == 15
    ri1, ri2 = b"\xaa" * 32, b"\xbb" * 32
    mac = hmac.new(MASTER, b"vsc1 master-key" + ri1 + ri2 + b"\x05alice", "sha256").digest()
    assert in_doc(mac.hex())
    assert auth.master_mac(MASTER, ri1, ri2, "alice") == mac


# ---------------------------------------------------------------- §10.14 the worked insert


def _envelope_independently() -> tuple[bytes, bytes, bytes]:
    """(wrapping key, index plaintext, envelope) of §10.14, with `cryptography` only."""
    _, protection_key = scrypt_keys()
    wk = hkdf(b"vsc protection wrap", protection_key, b"vsc1 wrap", 32)

    def aad(label: bytes, kind: int = 0, name: bytes = b"") -> bytes:
        return bytes([len(label)]) + label + b"\x05alice" + bytes([kind, len(name)]) + name

    data_key = b"\x11" * 32
    value = AESGCM(data_key).encrypt(b"\x21" * 12, struct.pack(">q", 10), aad(b"item", 2, b"uses"))
    index = (b"\x01" + struct.pack(">H", 1) + b"\x02\x04uses\x00" + struct.pack(">H", 0)
             + b"\x21" * 12 + struct.pack(">I", 8) + value)
    wrap = AESGCM(wk).encrypt(b"\x23" * 12, data_key, aad(b"wrap"))
    sealed_index = AESGCM(data_key).encrypt(b"\x22" * 12, index, aad(b"index"))

    def sealed(nonce: bytes, ct_tag: bytes) -> bytes:
        return nonce + struct.pack(">I", len(ct_tag) - 16) + ct_tag

    envelope = b"VSCP\x01\x05alice" + sealed(b"\x23" * 12, wrap) + sealed(b"\x22" * 12, sealed_index)
    for a in (aad(b"wrap"), aad(b"index"), aad(b"item", 2, b"uses")):
        assert in_doc(a.hex())
    return wk, index, envelope


def test_worked_insert_of_10_14_recomputed():
    """
    §10.14 shows every inner plaintext of an insert byte by byte. Rebuilt here with struct, hashlib, hmac and
    AES-GCM from the stated inputs (serial `alice`, password `correct horse`, salt 00..0f, server randomness
    `aa`, card randomness `bb`, data key `11`x32, nonces 21/22/23, the MUK as printed), each listing must be
    exactly those bytes, of the stated length.
    """
    auth_key, _ = scrypt_keys()
    secret = bytes(range(32))
    assert in_doc(hashlib.sha256(secret).hexdigest())

    op_request = b"\x31\x01\x05alice\x20" + secret + b"\x00" + struct.pack(">II", 0, 0)
    assert hex_of(listing("**OP_REQUEST(INSERT)**, 50 bytes")) == op_request and len(op_request) == 50

    kdf = b"\x02\x10" + SALT + b"\x0f\x08\x01"
    challenge = (b"\x32" + struct.pack(">H", len(kdf)) + kdf + b"\x02" + b"\x01" + struct.pack(">H", 0)
                 + b"\x02" + struct.pack(">H", 32) + b"\xaa" * 32)
    assert hex_of(listing("**AUTH_CHALLENGE**, 63 bytes")) == challenge and len(challenge) == 63

    shown = hex_of(listing("**AUTH_RESPONSE**, 137 bytes"))
    muk = shown[-32:]
    mac = hmac.new(MASTER, b"vsc1 master-key" + b"\xaa" * 32 + b"\xbb" * 32 + b"\x05alice", "sha256").digest()
    response = (b"\x33\x02" + b"\x01" + struct.pack(">H", 32) + auth_key + b"\x02" + struct.pack(">H", 64)
                + b"\xbb" * 32 + mac + b"\x20" + muk)
    assert shown == response and len(response) == 137

    wk, index, envelope = _envelope_independently()
    assert in_doc(wk.hex())
    assert hex_of(listing("holding one COUNTER\nitem")) == envelope and len(envelope) == 159
    assert hex_of(listing("and the Index plaintext")) == index and len(index) == 52
    result = listing("**OP_RESULT(OK)**, 171 bytes")
    head = hex_of(result[:4])
    assert head == b"\x34\x00" + struct.pack(">II", 1, len(envelope))
    assert hex_of(result[5:]) == b"\x00\x00"  # the registration's length
    assert len(head) + len(envelope) + 2 == 171


def test_worked_insert_of_10_14_is_what_vsc_does():
    """The same §10.14 bytes from vsc's own encoders and functions (ops.answer with card randomness `bb`,
    the envelope opens with CardMemory.load to the counter 10)."""
    from vsc.card import ops
    from vsc.card.protected import CardMemory, wrapping_key
    from vsc.wire.codec import encode_inner
    from vsc.wire.ops import AuthChallenge, AuthItem, AuthMethod, AuthResponse, Op, OpRequest, OpResult, Status
    from vsc.wire.protected import ItemKind, decode_counter

    auth_key, protection_key = scrypt_keys()
    assert encode_inner(OpRequest(op=Op.INSERT, serial="alice", insert_secret=bytes(range(32)))) == \
        hex_of(listing("**OP_REQUEST(INSERT)**, 50 bytes"))
    challenge = AuthChallenge(kdf=b"\x02\x10" + SALT + b"\x0f\x08\x01",
                              challenges=(AuthItem(AuthMethod.PASSWORD), AuthItem(AuthMethod.MASTER_KEY, b"\xaa" * 32)))
    assert encode_inner(challenge) == hex_of(listing("**AUTH_CHALLENGE**, 63 bytes"))
    answers, keys = ops.answer(challenge, "alice", PASSWORD.decode(), MASTER, lambda n: b"\xbb" * n)
    shown = hex_of(listing("**AUTH_RESPONSE**, 137 bytes"))
    assert encode_inner(AuthResponse(responses=tuple(answers), muk=shown[-32:])) == shown
    assert keys.auth_key == auth_key and keys.protection_key == protection_key

    wk, _, envelope = _envelope_independently()
    assert wrapping_key(protection_key) == wk
    mem = CardMemory.load("alice", envelope, protection_key)
    try:
        assert mem.read(ItemKind.COUNTER, "uses", decode_counter) == 10
    finally:
        mem.wipe()
    assert len(encode_inner(OpResult(status=Status.OK, version=1, protected=envelope))) == 171


# ---------------------------------------------------------------- §5.6, §5.8, §10.4: small frames


def test_small_examples_of_5_6_5_8_10_4():
    """ALERT(HANDSHAKE_FAILED) (§5.6), CLOSE(CLOSE_NOTIFY), ECHO_REQUEST("hi"), ECHO_REPLY("") (§5.8), the
    bare OP_RESULT(REFUSED) (§10.4): each as struct builds it, as the document prints it, as vsc encodes it."""
    from vsc.wire.codec import encode_frame, encode_inner
    from vsc.wire.errors import ErrorCode
    from vsc.wire.messages import Alert, Close, EchoReply, EchoRequest
    from vsc.wire.ops import OpResult, Status

    cases = [
        (struct.pack(">2sBBIH", b"VS", 1, 5, 2, 6), encode_frame(Alert(ErrorCode.HANDSHAKE_FAILED))),
        (struct.pack(">BH", 0x20, 0), encode_inner(Close(ErrorCode.CLOSE_NOTIFY))),
        (struct.pack(">BI", 0x21, 2) + b"hi", encode_inner(EchoRequest(b"hi"))),
        (struct.pack(">BI", 0x22, 0), encode_inner(EchoReply(b""))),
        (struct.pack(">BBIIH", 0x34, 1, 0, 0, 0), encode_inner(OpResult(status=Status.REFUSED))),
    ]
    for independent, vsc in cases:
        assert f"`{independent.hex()}`" in DOC
        assert vsc == independent


def test_fingerprint_example_of_6_4():
    """§6.4: the test key's fingerprint, as "SHA256:" + unpadded standard base64 of SHA-256(SPKI DER)."""
    from vsc import crypto

    key = serialization.load_pem_private_key(KEY_PATH.read_bytes(), None)
    spki = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    fp = "SHA256:" + base64.b64encode(hashlib.sha256(spki).digest()).decode().rstrip("=")
    assert f"`{fp}`" in DOC and len(spki) == 294
    assert crypto.fingerprint(spki) == fp


def test_record_length_examples_of_7_5():
    """§7.5: an aes256-cbc-hmac-sha256 record of an empty inner plaintext is 64 bytes, of a 69-byte one 128
    (vsc's cipher seals those lengths)."""
    from vsc.crypto.aead import CBCHMACRecordCipher

    cipher = CBCHMACRecordCipher(b"\x01" * 32, b"\x02" * 32, lambda n: b"\x03" * n)
    assert "64 for an empty inner\nplaintext; 128 for a 69-byte one" in DOC
    assert [len(cipher.seal(b"\x00" * 8, b"x" * n, b"a" * 13)) for n in (0, 69)] == [64, 128]


# ---------------------------------------------------------------- §11.1 the listing equals the vector


def test_listing_of_11_1_equals_the_vector_and_the_key_schedule():
    """
    §11.1 prints aes256-gcm-nofs.json's frames and key schedule. Every frame listing must be the vector's
    frame, and the key schedule is recomputed here from the listing's r1, r2, s1, s2 with hmac and HKDF
    (tests/test_vectors.py re-derives the JSON file; this ties the document's text to it).
    """
    vector = json.loads((VECTORS_DIR / "aes256-gcm-nofs.json").read_text())
    hs = vector["handshake"]
    hello = hex_of(listing("**HELLO** (337 bytes):"))
    kt = hex_of(listing("**KEY_TRANSPORT** (303 bytes):"))
    finished = listing("**SERVER_FINISHED** (42 bytes)")
    assert (hello.hex(), kt.hex()) == (hs["hello"], hs["key_transport"])
    assert (len(hello), len(kt)) == (337, 303)
    assert hex_of(finished[:1]).hex() == hs["server_finished"]
    assert hex_of(finished[2:3]).hex() == hs["client_finished"]
    first = listing("**`records[0]`, card → server, seq 0**")
    last = listing("**`records[3]`, server → card, seq 1**")
    for shown, rec in ((first, vector["records"][0]), (last, vector["records"][3])):
        at = next(i for i, ln in enumerate(shown) if "frame =" in ln)
        frame = hex_of([shown[at].split("=", 1)[1]] + shown[at + 1:])
        assert frame == bytes.fromhex(rec["frame"])
        inner = next(ln for ln in shown if "inner =" in ln).split("=", 1)[1]
        assert hex_of([inner]).hex() == rec["inner"]

    r1, r2 = hello[8:40], kt[8:40]
    s1, s2 = (bytes.fromhex(re.search(rf"{n}\s+= ([0-9a-f]{{64}})", DOC).group(1)) for n in ("s1", "s2"))
    th = hashlib.sha256(hello + kt).digest()
    prk = hmac.new(r1 + r2, s1 + s2, "sha256").digest()

    def okm(label: bytes, n: int) -> bytes:
        info = b"vsc1 " + bytes([len(label)]) + label + b"\x01" + th
        out, block, i = b"", b"", 1
        while len(out) < n:
            block = hmac.new(prk, block + info + bytes([i]), "sha256").digest()
            out, i = out + block, i + 1
        return out[:n]

    assert in_doc(th.hex()) and in_doc(prk.hex())
    assert in_doc("767363312007633273206b657901")
    for label, n in ((b"c2s key", 32), (b"c2s iv", 12), (b"s2c key", 32), (b"s2c iv", 12),
                     (b"server finished", 32), (b"client finished", 32)):
        assert in_doc(okm(label, n).hex()), label
    sf_mac = hmac.new(okm(b"server finished", 32), b"\x0fserver finished" + th + b"\x01\x00", "sha256").digest()
    cf_mac = hmac.new(okm(b"client finished", 32), b"\x0fclient finished" + th + b"\x01\x00", "sha256").digest()
    assert hs["server_finished"].endswith(sf_mac.hex()) and hs["client_finished"].endswith(cf_mac.hex())

    for rec, key, iv in ((vector["records"][0], okm(b"c2s key", 32), okm(b"c2s iv", 12)),
                         (vector["records"][3], okm(b"s2c key", 32), okm(b"s2c iv", 12))):
        direction, seq = (0 if rec["direction"] == "card->server" else 1), rec["seq"]
        nonce = bytes(a ^ b for a, b in zip(iv, b"\x00" * 4 + struct.pack(">Q", seq)))
        assert in_doc(nonce.hex())
        aad = struct.pack(">2sBBBQ", b"VS", 1, 0x10, direction, seq)
        sealed = AESGCM(key).encrypt(nonce, bytes.fromhex(rec["inner"]), aad)
        assert bytes.fromhex(rec["frame"]) == struct.pack(">2sBBIQ", b"VS", 1, 0x10, 8 + len(sealed), seq) + sealed


# ---------------------------------------------------------------- the document's enumerations are the code's


def _pairs(text: str) -> dict[int, str]:
    """``1 INSERT, 2 REMOVE`` (or ``0 none, 1 RSA-2048``) as {1: "INSERT", ...}; names upper-cased, no '-'."""
    return {int(n): name.replace("-", "").upper() for n, name in re.findall(r"(?:^|[:,;] )(\d+) ([A-Za-z][\w-]*)", text.strip())}


def _row(field: str, after: str) -> str:
    """The table row of `field` that first follows the text ``after``."""
    at = DOC.index(after)
    return next(ln for ln in DOC[at:].split("\n") if ln.startswith(f"| `{field}` |"))


def _table(pattern: str, section: str, end: str) -> dict[int, str]:
    text = DOC[DOC.index(section):DOC.index(end, DOC.index(section))]
    return {int(n, 0): name for n, name in re.findall(pattern, text)}


def test_enumerations_in_the_document_are_the_codes():
    """
    Rule (§2, §10.4, §10.12): a value not in a field's table is MALFORMED, so every table must list exactly
    the values the code accepts and sends. Broken: the OP_REQUEST table listed ops 1-6 and called "other
    values MALFORMED", but vsc's card sends OP_REQUEST(ATTACH) = 7 on every reconnection (§10.1, §9.3), so a
    server built from the document closed vsc's reconnecting cards with MALFORMED; §10.12's Item `alg` listed
    0-2, but vsc's OpenPGP applet stores Ed25519 (3) and X25519 (4) keys, so a second card implementation
    built from it could not read such a card. Now each table equals its enum.
    """
    from vsc.wire.codec import MessageType
    from vsc.wire.errors import ErrorCode
    from vsc.wire.messages import Suite
    from vsc.wire.onetime_agent import AgentOp
    from vsc.wire.ops import AuthMethod, KdfAlg, Op, Status
    from vsc.wire.protected import ItemKind, KeyAlg

    def names(enum) -> dict[int, str]:
        return {int(v): v.name.replace("_", "") if enum in (KeyAlg,) else v.name for v in enum}

    op_row = _row("op", "**OP_REQUEST (0x31)**")
    assert _pairs(op_row.split("|")[3]) == names(Op)
    assert _pairs(_row("method", "**AuthItem**").split("|")[3]) == names(AuthMethod)
    assert _pairs(_row("alg", "**KdfParams**").split("|")[3]) == names(KdfAlg)
    assert _pairs(_row("kind", "**Item**").split("|")[2]) == names(ItemKind)
    assert _pairs(_row("alg", "**Item**").split("|")[2]) == names(KeyAlg)
    assert _table(r"\n\| (\d+) \| ([A-Z_]+) \|", "### 10.3 Status codes", "### 10.4") == names(Status)
    assert _table(r"\n\| (\d+) \| ([A-Z_]+) \|", "### 9.1 Codes", "### 9.2") == names(ErrorCode)
    assert _table(r"\n\| (\d+) \| ([A-Z]+) \|", "**Program**", "f(y) is") == names(AgentOp)
    assert _table(r"\n\| `(0x[0-9A-Fa-f]+)` \| ([A-Z_]+) \|", "## 4. Message types", "## 5.") == names(MessageType)
    assert _table(r"\n\| `(0x[0-9A-Fa-f]+)` \| `([a-z0-9-]+)` \|", "### 5.1 Suites", "### 5.2") == \
        {int(s): s.label for s in Suite}


# ---------------------------------------------------------------- §5 and §10 length bounds are the schemas'


def _bounds(con) -> tuple:
    """(prefix width, minimum, maximum, "0 or N") of a length-prefixed field of vsc.wire.codec, read off the schema."""
    import construct as c

    from vsc.wire import codec

    if isinstance(con, c.Renamed):
        con = con.subcon
    if isinstance(con, codec._Utf8):
        con = con.subcon
    assert isinstance(con, codec._Bounded), con
    inner = con.subcon
    width = inner.lengthfield.sizeof() if hasattr(inner, "lengthfield") else inner.subcons[0].subcon.sizeof()
    return width, con.minimum, con.maximum, isinstance(con, codec._EmptyOrExact)


def _field(schema, name: str):
    import construct as c

    while not isinstance(schema, c.Struct):
        schema = schema.subcon
    return next(sc for sc in schema.subcons if sc.name == name)


def test_every_length_bound_in_the_document_is_the_schemas():
    """
    Rule (§2): "the length MUST lie in min..max" of each `vec<uN, min..max>` and `list<u8, min..max, T>` the
    document gives; a second implementation enforces exactly these, so each must be the bound vsc's construct
    schema enforces (a tighter schema would refuse a conforming peer, a looser one accept what the peer calls
    MALFORMED). Every such bound in the document, in order, against its schema field; and the fixed counts and
    "0 or N" fields of §5.2, §5.3, §10.6.4, §10.7 and §10.12.
    """
    from vsc.wire import implauth, messages, onetime_agent, ops, protected

    expected = [
        (messages.EchoRequest.SCHEMA, "data"), (messages.EchoReply.SCHEMA, "data"),
        *[(ops.EnrolRequest.SCHEMA, f) for f in ("serial", "code", "verifier", "kdf", "protected", "registration")],
        *[(ops.OpRequest.SCHEMA, f) for f in ("serial", "insert_secret", "muk", "protected")],
        (ops.AuthChallenge.SCHEMA, "kdf"), (ops.AuthChallenge.SCHEMA, "challenges"),
        (ops.AuthResponse.SCHEMA, "responses"), (ops.AuthResponse.SCHEMA, "muk"),
        (ops._Item, "data"),
        (ops.OpResult.SCHEMA, "protected"), (ops.OpResult.SCHEMA, "registration"),
        *[(ops.ChangePassword.SCHEMA, f) for f in ("serial", "insert_secret", "verifier", "kdf", "protected")],
        (ops._KdfSchema, "salt"),
        (implauth.KeyfileBody.SCHEMA, "serial"), (implauth.KeyfileBody.SCHEMA, "card_key"),
        *[(implauth.SignedKeyfile.SCHEMA, f) for f in ("body", "signer", "signature")],
        (implauth.SealedKeyfile.SCHEMA, "sealed"),
        (onetime_agent._ChallengeSchema, "program"),
        (implauth.Registration.SCHEMA, "card_key"), (implauth.EnrolReply.SCHEMA, "keyfile"),
        (protected.EnvelopeSchema, "card_id"), (protected._Sealed, "ciphertext"),
        (protected._Item, "name"), (protected._Item, "public"),
    ]
    stated = re.findall(r"`(\w+)`(?:\s*\|\s*|:\s*|\s+)`(?:vec|list)<u(\d+), (\d+)\.\.(\d+)", DOC)
    assert [name for name, *_ in stated] == [name for _, name in expected]
    for (name, bits, lo, hi), (schema, field) in zip(stated, expected):
        assert (int(bits) // 8, int(lo), int(hi), False) == _bounds(_field(schema, field)), name

    assert re.search(r"the code as `vec<u8, 1..10>`", DOC)
    assert _bounds(_field(implauth.TotpAnswer.SCHEMA, "code")) == (1, 1, 10, False)
    assert "| 32 | 2 | `L` = length of `server_key` | 1..1200 |" in DOC
    assert _bounds(_field(messages.Hello.SCHEMA, "server_key")) == (2, 1, 1200, False)
    assert "| 32 | 1 | `n` = number of suites | 1..8 |" in DOC
    assert _bounds(_field(messages.KeyTransport.SCHEMA, "suites")) == (1, 1, 8, False)
    assert re.search(r"\| `C` = ciphertext length \| 1\.\.512 ", DOC)
    assert _bounds(_field(messages.KeyTransport.SCHEMA, "ciphertext")) == (2, 1, 512, False)
    for schema in (messages.Hello.SCHEMA, messages.KeyTransport.SCHEMA):
        assert _bounds(_field(schema, "fs_public")) == (1, 0, 32, True)
    assert "`u16` instruction count (1..1024)" in DOC
    assert _bounds(_field(onetime_agent.ProgramSchema, "code")) == (2, 1, 1024, False)
    assert re.search(r"`u16`\s+item count \(0\.\.256\)", DOC)
    assert _bounds(_field(protected.IndexSchema, "items")) == (2, 0, 256, False)
    assert "`seal_key` (`u8` length 0 or 32" in DOC
    assert _bounds(_field(implauth.Registration.SCHEMA, "seal_key")) == (1, 0, 32, True)
    assert "`totp_secret`\n(`u8` length 0 or 20" in DOC
    assert _bounds(_field(implauth.EnrolReply.SCHEMA, "totp_secret")) == (1, 0, 20, True)


# ---------------------------------------------------------------- §5.8: a card ignores an ECHO_REPLY it did not ask for


def test_card_ignores_an_unsolicited_echo_reply(tmp_path):
    """
    Rule (§5.8): "A card MAY ignore an ECHO_REPLY it did not ask for (vsc's does)". It did not: CardProtocol
    queued every inner message and handed the oldest to the next request, so one stray ECHO_REPLY on the
    channel became the answer to the card's next sync (OperationRefused "unexpected EchoReply", though the
    server stored the upload), and the sync's real OP_RESULT then answered the request after it: every later
    sync, remove or password change on that channel took the previous one's result as its own, i.e. was
    acknowledged before the server had answered it (§10.9: an upload is acknowledged only once stored).
    Now an ECHO_REPLY with no ECHO_REQUEST outstanding is dropped; a requested one still answers its request.
    """
    from tests.test_server_ops import SECRET, SERIAL, Harness, result_of
    from vsc.wire.messages import EchoReply, EchoRequest
    from vsc.wire.ops import Op, OpRequest, OpResult, Status

    h = Harness(tmp_path)
    client, server, _pump = h.connect()
    server.sendMessage(EchoReply(b"stray"))
    h.settle()
    answer = result_of(h.run(client.request(OpRequest(op=Op.SYNC, serial=SERIAL, insert_secret=SECRET, version=1,
                                                      protected=b"P"))))
    assert isinstance(answer, OpResult) and answer.status is Status.REFUSED, answer
    assert result_of(h.run(client.request(EchoRequest(b"ping")))) == EchoReply(b"ping")
    assert not client.channel.closed and client._unclaimed == []


# ---------------------------------------------------------------- §10.6.1 / §10.8: the keyfile re-issue is specified


def test_the_keyfile_reissue_is_in_the_specification():
    """
    Rule (§10.6.1): the challenge lists "every method of the server's current impl_auth", and §10.4 said
    OP_RESULT.registration is empty for everything but an enrolment. The server does otherwise, by design
    (docs/admin.md "When impl_auth gains keyfile"): a card that holds no keyfile but registered a seal key is
    NOT challenged with KEYFILE (material_due), and its insert's OP_RESULT carries an EnrolReply with a
    re-issued keyfile. None of this was in protocol.md, so a second server built from it challenged such
    cards with KEYFILE (refusing them for good), and a second card ignored the keyfile it was given (and was
    refused at its next insert, which does challenge KEYFILE). The document now specifies the exception and
    the re-issue (§10.6.1, §10.4, §10.8); the behaviour it states is checked here.
    """
    import json

    from vsc.protocol.server_ops import OpsPolicy, material_due, required_methods
    from vsc.wire.implauth import Registration
    from vsc.wire.ops import AuthMethod

    policy = OpsPolicy(impl_auth=(AuthMethod.MASTER_KEY, AuthMethod.KEYFILE))
    with_seal = json.dumps({"methods": ["password", "master-key"],
                            "registration": Registration(card_key=b"", seal_key=b"\x09" * 32).encode().hex()})
    without = json.dumps({"methods": ["password", "master-key"]})
    for info, due in ((with_seal, (AuthMethod.KEYFILE,)), (without, ())):
        methods = required_methods(info, policy)
        assert methods == (AuthMethod.PASSWORD, AuthMethod.MASTER_KEY, AuthMethod.KEYFILE)
        assert material_due(info, methods) == due

    flat = " ".join(DOC.split())
    assert "One exception (`material_due` in `vsc/protocol/server_ops.py`): KEYFILE is left out" in flat
    assert "insert with OK: an EnrolReply carrying a re-issued keyfile (§10.8)" in flat
    assert "**Re-issue** (§10.6.1's exception)." in flat
