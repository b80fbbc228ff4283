"""
The PIV card application without a network: the APDU and BER-TLV codecs
(vsc.wire.apdu, vsc.wire.tlv), the sans-IO applet (vsc.protocol.piv) driven
through ``run_sync`` over a dictionary of items, and the vpcd glue
(vsc.card.vpcd) over an in-memory transport on a real CardMemory.

Everything is deterministic: fixed keys (the test RSA key of tests/vectors
and a P-256 key from a fixed scalar), a counter-based randomness source,
and signatures checked with ``cryptography`` directly.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed

from vsc import crypto
from vsc.protocol import pins, piv
from vsc.wire import apdu, tlv
from vsc.wire.errors import WireError
from vsc.wire.protected import ItemKind, KeyAlg

SERIAL = "piv-unit-1"
VECTORS = Path(__file__).parent / "vectors"
DEFAULT_MGMT = bytes.fromhex("010203040506070801020304050607080102030405060708")
PIN = b"123456"
PUK = b"12345678"


class Drbg:
    """Deterministic 'randomness': SHA-256 of a seed and a counter."""

    def __init__(self, seed: bytes = b"piv tests"):
        self.seed, self.counter = seed, 0

    def __call__(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            self.counter += 1
            out += hashlib.sha256(self.seed + self.counter.to_bytes(8, "big")).digest()
        return out[:n]


def _der(key) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


RSA_KEY = serialization.load_pem_private_key((VECTORS / "test-server-key-rsa2048.pem").read_bytes(), None)
EC_KEY = ec.derive_private_key(0x1F2E3D4C5B6A79887766554433221100FFEEDDCCBBAA99887766554433221101, ec.SECP256R1())
KEYS = {"9a": (_der(RSA_KEY), KeyAlg.RSA2048), "9c": (_der(EC_KEY), KeyAlg.P256),
        "9d": (_der(RSA_KEY), KeyAlg.RSA2048), "9e": (_der(EC_KEY), KeyAlg.P256)}
PUBLIC = {slot: crypto.public_der_of(der) for slot, (der, _alg) in KEYS.items()}


def _self_signed(slot: str) -> bytes:
    der, _alg = KEYS[slot]
    return crypto.self_signed_certificate(der, f"{SERIAL} {slot}", 1_700_000_000, Drbg(slot.encode()))


CERTS = {slot: _self_signed(slot) for slot in KEYS}


class FakeCard:
    """Performs the applet's effects on a dictionary of items, the way vsc.card.vpcd does on a CardSession."""

    def __init__(self, certs: bool = True):
        self.items: dict[tuple[ItemKind, str], tuple[bytes, KeyAlg, bytes]] = {}
        for slot, (der, alg) in KEYS.items():
            self.items[(ItemKind.KEY, slot)] = (der, alg, PUBLIC[slot])
            if certs:
                self.items[(ItemKind.CERT, slot)] = (CERTS[slot], KeyAlg.NONE, b"")
        self.stores: list[piv.Store] = []
        self.notices: list[piv.Notice] = []
        self.fail_stores = False
        self.ops = 0
        self.rand = Drbg(b"card")
        self.applet = piv.PivApplet(SERIAL, self.rand)

    def perform(self, effect):
        if isinstance(effect, piv.Load):
            item = self.items.get((effect.kind, effect.name))
            if item is None:
                return None
            return effect.derive(item[0]) if effect.derive is not None else item[0]
        if isinstance(effect, piv.Store):
            if self.fail_stores:
                raise piv.EffectFailed("server unreachable", piv.SW_MEMORY_FAILURE)
            self.stores.append(effect)
            old = self.items.get((effect.kind, effect.name))
            alg, public = (effect.alg, effect.public) if effect.public or old is None else old[1:]
            self.items[(effect.kind, effect.name)] = (effect.value, alg, public)
            return None
        if isinstance(effect, piv.KeyInfo):
            item = self.items.get((ItemKind.KEY, effect.slot))
            return (item[1], item[2]) if item else None
        if isinstance(effect, piv.PrivateOp):
            self.ops += 1
            der = self.items[(ItemKind.KEY, effect.slot)][0]
            with crypto.PrivateKeyHandle(der) as key:
                try:
                    if effect.op == "rsa":
                        return crypto.rsa_private_block(key, effect.data)
                    if effect.op == "ecdsa":
                        return crypto.ecdsa_sign_hash(key, effect.data)
                    return key.ecdh(effect.data)
                except (crypto.CryptoError, ValueError) as e:
                    raise piv.EffectFailed(str(e), piv.SW_WRONG_DATA) from None
        if isinstance(effect, piv.Generate):
            kind = {KeyAlg.RSA2048: crypto.KEY_RSA2048, KeyAlg.P384: crypto.KEY_P384}.get(effect.alg, crypto.KEY_P256)
            der = crypto.generate_private_der(kind)
            public = crypto.public_der_of(der)
            self.items[(ItemKind.KEY, effect.slot)] = (der, effect.alg, public)
            return public
        if isinstance(effect, piv.Notice):
            self.notices.append(effect)
            return None
        raise AssertionError(effect)

    # -- sending

    def raw(self, data: bytes) -> tuple[bytes, int]:
        return apdu.parse_response(piv.run_sync(self.applet.process(data), self.perform))

    def send(self, ins: int, p1: int = 0, p2: int = 0, data: bytes = b"", le: int | None = None, cla: int = 0,
             extended: bool = False) -> tuple[bytes, int]:
        return self.raw(apdu.command(cla, ins, p1, p2, data, le, extended))

    def select(self) -> tuple[bytes, int]:
        return self.send(0xA4, 0x04, 0x00, piv.PIV_AID[:9], le=256)

    def get_all(self, ins: int, p1: int = 0, p2: int = 0, data: bytes = b"", le: int = 256) -> tuple[bytes, int]:
        """Send, then GET RESPONSE while the card answers 61xx (what OpenSC and pcsc do)."""
        body, sw = self.send(ins, p1, p2, data, le=le)
        while sw >> 8 == 0x61:
            more, sw = self.send(0xC0, 0, 0, le=(sw & 0xFF) or 256)
            body += more
        return body, sw

    def get_data(self, tag: int) -> tuple[bytes, int]:
        return self.get_all(0xCB, 0x3F, 0xFF, tlv.encode(0x5C, tlv.tag_bytes(tag)))

    def verify(self, pin: bytes | None, ref: int = 0x80) -> int:
        return self.send(0x20, 0x00, ref, apdu.pad_pin(pin) if pin is not None else b"")[1]

    def mgmt_auth(self, key: bytes = DEFAULT_MGMT, alg: int = 0x03) -> int:
        """yubico-piv-tool's mutual authentication: witness, then our challenge."""
        bs = crypto.mgmt_block_size(alg)
        body, sw = self.send(0x87, alg, 0x9B, tlv.encode(0x7C, tlv.encode(0x80, b"")), le=256)
        if sw != 0x9000:
            return sw
        witness = crypto.mgmt_cipher(alg, key, tlv.to_dict(tlv.decode_one(body, 0x7C))[0x80], encrypt=False)
        challenge = bytes(range(bs))
        body, sw = self.send(0x87, alg, 0x9B, tlv.encode(0x7C, tlv.encode_many([(0x80, witness), (0x81, challenge)])),
                             le=256)
        if sw == 0x9000:
            assert tlv.to_dict(tlv.decode_one(body, 0x7C))[0x82] == crypto.mgmt_cipher(alg, key, challenge, True)
        return sw

    def general_authenticate(self, alg: int, slot: int, tag: int, value: bytes) -> tuple[bytes, int]:
        data = tlv.encode(0x7C, tlv.encode_many([(0x82, b""), (tag, value)]))
        body, sw = self.get_all(0x87, alg, slot, data)
        if sw != 0x9000:
            return b"", sw
        return tlv.to_dict(tlv.decode_one(body, 0x7C))[0x82], sw

    def secret(self, name: str) -> apdu.SecretRecord:
        return apdu.decode_secret(self.items[(ItemKind.PIN, name)][0])


@pytest.fixture
def card() -> FakeCard:
    c = FakeCard()
    assert c.select()[1] == 0x9000
    return c


def _pkcs1_block(digest: bytes) -> bytes:
    info = bytes.fromhex("3031300d060960864801650304020105000420") + digest
    return b"\x00\x01" + b"\xff" * (256 - 3 - len(info)) + b"\x00" + info


# ================================================================ APDU codec


@pytest.mark.parametrize("raw, expected", [
    ("00a40400", apdu.Command(0, 0xA4, 4, 0)),
    ("00a4040000", apdu.Command(0, 0xA4, 4, 0, le=256)),
    ("00a4040010", apdu.Command(0, 0xA4, 4, 0, le=16)),
    ("00a4040002aabb", apdu.Command(0, 0xA4, 4, 0, b"\xaa\xbb")),
    ("00a4040002aabb00", apdu.Command(0, 0xA4, 4, 0, b"\xaa\xbb", le=256)),
    ("00cb3fff000000", apdu.Command(0, 0xCB, 0x3F, 0xFF, le=65536, extended=True)),
    ("00cb3fff000102", apdu.Command(0, 0xCB, 0x3F, 0xFF, le=258, extended=True)),
    ("00cb3fff000002aabb", apdu.Command(0, 0xCB, 0x3F, 0xFF, b"\xaa\xbb", extended=True)),
    ("00cb3fff000002aabb0000", apdu.Command(0, 0xCB, 0x3F, 0xFF, b"\xaa\xbb", le=65536, extended=True)),
])
def test_command_cases_parse_and_build(raw, expected):
    """Every ISO 7816-3 case (1, 2s, 3s, 4s, 2e, 3e, 4e) parses to the right fields and builds back to the same bytes."""
    cmd = apdu.parse_command(bytes.fromhex(raw))
    assert cmd == expected
    assert apdu.build_command(cmd).hex() == raw


@pytest.mark.parametrize("raw", [
    "", "00", "00a404", "00a4040002aa", "00a4040002aabbcc00", "00a4040003aabb", "00a40400000002aa",
    "00a4040000000001", "00a404000000", "00cb3fff000003aabb", "00cb3fff000002aabb00",
])
def test_wrong_lengths_are_6700(raw):
    """Lc/Le that do not add up, an extended Lc of 0, or fewer than 4 bytes: ApduError 6700, and the applet answers 6700."""
    with pytest.raises(apdu.ApduError) as e:
        apdu.parse_command(bytes.fromhex(raw))
    assert e.value.sw == 0x6700
    assert FakeCard().raw(bytes.fromhex(raw)) == (b"", 0x6700)


def test_long_data_builds_extended():
    """build_command switches to extended lengths for more than 255 data bytes or Le above 256."""
    assert apdu.command(0, 0x87, 7, 0x9A, bytes(300))[4:7] == b"\x00\x01\x2c"
    assert apdu.command(0, 0xCB, 0x3F, 0xFF, le=1000) == bytes.fromhex("00cb3fff0003e8")
    assert apdu.command(0, 0xCB, 0x3F, 0xFF, b"\x01", le=65536)[-2:] == b"\x00\x00"


def test_response_codec():
    """Responses are data || SW1 SW2; fewer than 2 bytes is malformed."""
    assert apdu.build_response(b"ab", 0x9000) == b"ab\x90\x00"
    assert apdu.build_response(b"", 0x6A82) == b"\x6a\x82"
    assert apdu.parse_response(b"\x01\x61\x10") == (b"\x01", 0x6110)
    with pytest.raises(WireError):
        apdu.parse_response(b"\x90")


def test_vpcd_message_codec():
    """encode_vpcd prefixes the 2-byte length and refuses more than 0xFFFF bytes; 1-byte control messages are recognised."""
    assert apdu.encode_vpcd(b"\x04") == b"\x00\x01\x04"
    assert apdu.encode_vpcd(bytes(300))[:2] == b"\x01\x2c"
    assert apdu.control_of(b"\x04") is apdu.VpcdControl.GET_ATR
    assert apdu.control_of(b"\x03") is None and apdu.control_of(b"\x00\xa4") is None
    with pytest.raises(WireError):
        apdu.encode_vpcd(bytes(0x10000))


def test_atr_is_t1_with_a_valid_tck():
    """The card's ATR indicates T=1 only and its TCK makes the XOR of T0..TCK zero."""
    from vsc.card.vpcd import ATR, HISTORICAL

    assert ATR[:2] == bytes([0x3B, 0xF0 | len(HISTORICAL)])
    assert ATR[5] == 0x81 and ATR[6] == 0x31  # TD1, TD2: T=1, and nothing but T=1
    x = 0
    for b in ATR[1:]:
        x ^= b
    assert x == 0
    assert apdu.parse_atr(ATR) == HISTORICAL
    with pytest.raises(WireError):
        apdu.parse_atr(ATR[:-1] + bytes([ATR[-1] ^ 1]))


# ================================================================ BER-TLV


@pytest.mark.parametrize("n, prefix", [(0, "00"), (0x7F, "7f"), (0x80, "8180"), (0xFF, "81ff"), (0x100, "820100"),
                                       (0xFFFF, "82ffff"), (0x10000, "83010000")])
def test_tlv_lengths_are_shortest_form(n, prefix):
    """Lengths use the shortest definite form (DER), and parse back."""
    raw = tlv.encode(0x53, bytes(n))
    assert raw[1:].hex().startswith(prefix)
    assert tlv.decode(raw) == [tlv.Tlv(0x53, bytes(n))]


def test_tlv_multibyte_tags():
    """Two- and three-byte tags (7F49, 5FC102) round-trip; tags that are not valid BER are refused when building."""
    raw = tlv.encode_many([(0x7F49, b"\x01"), (0x5FC102, b""), (0x7E, b"xy")])
    assert raw.hex() == "7f4901015fc102007e027879"
    assert [(t.tag, t.value) for t in tlv.decode(raw)] == [(0x7F49, b"\x01"), (0x5FC102, b""), (0x7E, b"xy")]
    for bad in (0x1F, 0x5F80, 0x5FC1):
        with pytest.raises(WireError):
            tlv.encode(bad, b"")


@pytest.mark.parametrize("raw", ["53", "5302aa", "5380", "5384000000010000", "5f", "5fc1c1c10100", "530100ff"])
def test_tlv_malformed(raw):
    """Truncated values, indefinite or 4-byte lengths, 4-byte tags, trailing garbage: WireError."""
    with pytest.raises(WireError):
        tlv.decode(bytes.fromhex(raw))


def test_tlv_dict_refuses_repeats_and_strangers():
    """to_dict refuses a repeated tag and, when given, tags outside the allowed set."""
    with pytest.raises(WireError):
        tlv.to_dict(bytes.fromhex("80008000"))
    with pytest.raises(WireError):
        tlv.to_dict(bytes.fromhex("8000"), allowed=(0x81,))
    assert tlv.to_dict(bytes.fromhex("800181820100")) == {0x80: b"\x81", 0x82: b"\x00"}


# ================================================================ FASC-N, records


def test_fascn_matches_a_known_encoding():
    """The YubiKey default FASC-N decodes to SS 9999 FS 9999 FS 999999 ...; our encoder produces valid parity and LRC."""
    yubikey = bytes.fromhex("d4e739da739ced39ce739d836858210842108421c84210c3eb")
    chars = apdu.decode_fascn(yubikey)
    assert chars[:6] == [0xB, 9, 9, 9, 9, 0xD] and chars[-2] == 0xF
    mine = apdu.encode_fascn("9999", "9999", "999999", "0", "1", "0000000000", "3", "0000", "1")
    assert mine == yubikey  # same fields, same bytes
    broken = bytes([mine[0] ^ 0x08]) + mine[1:]
    with pytest.raises(WireError):
        apdu.decode_fascn(broken)


def test_secret_and_mgmt_records_round_trip():
    """PIN/PUK and management-key records encode and decode; the PIN pads with FF and an FF inside is refused."""
    rec = apdu.SecretRecord(apdu.pad_pin(b"654321"), 2, 3)
    assert apdu.decode_secret(apdu.encode_secret(rec)) == rec
    assert apdu.pad_pin(b"654321") == b"654321\xff\xff"
    assert apdu.unpad_pin(b"654321\xff\xff") == b"654321"
    with pytest.raises(WireError):
        apdu.unpad_pin(b"65\xff4321\xff")
    m = apdu.ManagementKeyRecord(0x08, bytes(16))
    assert apdu.decode_mgmt(apdu.encode_mgmt(m)) == m
    with pytest.raises(WireError):
        apdu.decode_secret(b"\x02\x03\x03\x00")


# ================================================================ SELECT, CLA, INS


@pytest.mark.parametrize("aid", [piv.PIV_AID, piv.PIV_AID[:9], piv.PIV_AID[:5]])
def test_select_answers_the_application_property_template(aid):
    """
    SELECT by the full AID, OpenSC's 9-byte AID or yubico-piv-tool's RID
    answers what a YubiKey 5 answers, byte for byte: 61 11 {4F 06 PIX,
    79 07 {4F 05 A000000308}} (OpenSC debug logs of a YubiKey 5; CanoKey's
    piv.c copies it "compatible with Yubikey 5").
    """
    c = FakeCard()
    body, sw = c.send(0xA4, 0x04, 0x00, aid, le=256)
    assert sw == 0x9000
    assert body == bytes.fromhex("6111" "4f06000010000100" "7907" "4f05a000000308")


def test_unknown_aid_is_6a82_and_keeps_the_selection(card):
    """Other drivers' probes (OpenPGP, MuscleApplet, a PIV AID with a wrong byte) get 6A82; PIV stays selected."""
    for aid in ("d27600012401", "a00000000101", "a000000308000010000200", "a0000003", "a00000030800001000010000"):
        assert card.send(0xA4, 0x04, 0x00, bytes.fromhex(aid), le=256) == (b"", 0x6A82)
    assert card.get_data(0x7E)[1] == 0x9000
    fresh = FakeCard()
    assert fresh.send(0xA4, 0x04, 0x00, bytes.fromhex("d27600012401"), le=256) == (b"", 0x6A82)
    assert fresh.get_data(0x7E) == (b"", 0x6D00)


def test_select_parameters(card):
    """SELECT only by DF name (P1 04); P2 0C answers no data."""
    assert card.send(0xA4, 0x00, 0x00, piv.PIV_AID)[1] == 0x6A86
    assert card.send(0xA4, 0x04, 0x0C, piv.PIV_AID) == (b"", 0x9000)


def test_nothing_but_select_before_selection():
    """Before the PIV application is selected every other instruction is 6D00."""
    c = FakeCard()
    assert c.verify(None) == 0x6D00
    assert c.get_data(0x5FC102) == (b"", 0x6D00)


@pytest.mark.parametrize("cla", [0x80, 0x84, 0x0C, 0x01, 0xFF, 0x90])
def test_wrong_cla_is_6e00(card, cla):
    """Proprietary, secure-messaging and logical-channel classes are refused with 6E00."""
    assert card.send(0xCB, 0x3F, 0xFF, tlv.encode(0x5C, b"\x7e"), cla=cla) == (b"", 0x6E00)


@pytest.mark.parametrize("ins", [0x00, 0x0E, 0xB0, 0xD6, 0xE2, 0x84, 0xF6, 0xFB])
def test_unknown_ins_is_6d00(card, ins):
    """Instructions the applet does not implement (READ BINARY, YubiKey move key/reset, ...) are 6D00."""
    assert card.send(ins, 0, 0, le=256) == (b"", 0x6D00)


# ================================================================ GET DATA


def test_discovery_object(card):
    """Discovery (5C 01 7E) answers 7E{4F AID, 5F2F 40 00} without the 53 wrapper."""
    body, sw = card.get_data(0x7E)
    assert sw == 0x9000
    d = tlv.to_dict(tlv.decode_one(body, 0x7E))
    assert d == {0x4F: piv.PIV_AID, 0x5F2F: b"\x40\x00"}


def test_chuid_is_deterministic_from_the_serial(card):
    """CHUID: FASC-N (agency 9999, valid parity/LRC), a non-zero RFC 4122-style GUID from the serial, expiry, 3E, FE."""
    body, sw = card.get_data(0x5FC102)
    assert sw == 0x9000
    fields = tlv.to_dict(tlv.decode_one(body, 0x53))
    assert set(fields) == {0x30, 0x34, 0x35, 0x3E, 0xFE}
    assert apdu.decode_fascn(fields[0x30])[1:5] == [9, 9, 9, 9]
    assert len(fields[0x34]) == 16 and any(fields[0x34]) and fields[0x34][6] >> 4 == 8
    assert fields[0x35] == b"20991231"
    assert card.get_data(0x5FC102) == (body, 0x9000)
    other = FakeCard()
    other.applet.serial = "another"
    other.select()
    assert tlv.to_dict(tlv.decode_one(other.get_data(0x5FC102)[0], 0x53))[0x34] != fields[0x34]


def test_ccc(card):
    """CCC: F0 card identifier (GSC-IS RID, FF 02, 14 bytes from the serial) and the fixed version fields."""
    body, sw = card.get_data(0x5FC107)
    fields = tlv.to_dict(tlv.decode_one(body, 0x53))
    assert sw == 0x9000 and fields[0xF0][:7] == bytes.fromhex("a000000116ff02") and len(fields[0xF0]) == 21
    assert fields[0xF1] == b"\x21" and fields[0xFE] == b""


@pytest.mark.parametrize("slot, tag", [("9a", 0x5FC105), ("9c", 0x5FC10A), ("9d", 0x5FC10B), ("9e", 0x5FC101)])
def test_certificate_objects(card, slot, tag):
    """Each slot's certificate object is 53{70 DER, 71 00, FE}, read through 61xx/GET RESPONSE when long."""
    body, sw = card.get_data(tag)
    assert sw == 0x9000
    fields = tlv.to_dict(tlv.decode_one(body, 0x53))
    assert fields == {0x70: CERTS[slot], 0x71: b"\x00", 0xFE: b""}


def test_missing_objects_are_6a82():
    """A slot without a certificate, an unused object, a tag outside the PIV range: 6A82."""
    c = FakeCard(certs=False)
    c.select()
    for tag in (0x5FC105, 0x5FC10C, 0x5FC106, 0x5FC17F, 0x5F10):
        assert c.get_data(tag) == (b"", 0x6A82)


def test_get_data_parameters(card):
    """GET DATA needs P1P2 3FFF and a 5C tag list with nothing after it."""
    assert card.send(0xCB, 0x3F, 0x00, tlv.encode(0x5C, b"\x7e"), le=256) == (b"", 0x6A86)
    assert card.send(0xCB, 0x3F, 0xFF, tlv.encode(0x5D, b"\x7e"), le=256) == (b"", 0x6A80)
    assert card.send(0xCB, 0x3F, 0xFF, tlv.encode(0x5C, b"\x7e") + b"\x00", le=256) == (b"", 0x6A80)
    assert card.send(0xCB, 0x3F, 0xFF, b"\x5c\x05\x7e", le=256) == (b"", 0x6A80)


# ================================================================ GET RESPONSE


def test_long_response_in_61xx_chunks(card):
    """A certificate object longer than 256 bytes comes as 256 + 61xx, then GET RESPONSE until 9000."""
    body, sw = card.send(0xCB, 0x3F, 0xFF, tlv.encode(0x5C, tlv.tag_bytes(0x5FC105)), le=256)
    full = card.applet.certificate_object(CERTS["9a"])
    assert len(full) > 512
    assert body == full[:256] and sw == 0x6100  # 256 or more still to come
    got, sizes = body, []
    while sw != 0x9000:
        left = len(full) - len(got)
        assert sw == 0x6100 | (left if left < 256 else 0)  # SW2: what is left, 00 for 256 or more
        more, sw = card.send(0xC0, 0, 0, le=256)
        sizes.append(len(more))
        got += more
    assert got == full
    assert sizes[:-1] == [256] * (len(sizes) - 1) and sizes[-1] == (len(full) % 256 or 256)


def test_get_response_with_small_le_and_exact_61xx(card):
    """Le below the remainder gives that many bytes; SW2 counts what is left (below 256)."""
    full = card.applet.certificate_object(CERTS["9c"])
    body, sw = card.send(0xCB, 0x3F, 0xFF, tlv.encode(0x5C, tlv.tag_bytes(0x5FC10A)), le=0x10)
    got = body
    assert len(body) == 0x10
    while sw != 0x9000:
        expected_left = len(full) - len(got)
        assert sw == 0x6100 | (expected_left if expected_left < 256 else 0)
        more, sw = card.send(0xC0, 0, 0, le=0x20)
        assert len(more) == min(0x20, expected_left)
        got += more
    assert got == full


def test_extended_le_returns_everything_at_once(card):
    """An extended Le (as OpenSC may send) returns the whole object in one response."""
    full = card.applet.certificate_object(CERTS["9a"])
    assert card.send(0xCB, 0x3F, 0xFF, tlv.encode(0x5C, tlv.tag_bytes(0x5FC105)), le=65536, extended=True) == (
        full, 0x9000)


def test_get_response_without_pending_data(card):
    """GET RESPONSE with nothing pending is 6985; another command discards what was pending; P1P2 must be 0."""
    assert card.send(0xC0, 0, 0, le=256) == (b"", 0x6985)
    _body, sw = card.send(0xCB, 0x3F, 0xFF, tlv.encode(0x5C, tlv.tag_bytes(0x5FC105)), le=256)
    assert sw == 0x6100
    assert card.send(0xC0, 1, 0, le=256)[1] == 0x6A86
    assert card.verify(None) == 0x63C3
    assert card.send(0xC0, 0, 0, le=256) == (b"", 0x6985)


# ================================================================ chaining


def _put_data(card: FakeCard, tag: int, content: bytes) -> bytes:
    return tlv.encode(0x5C, tlv.tag_bytes(tag)) + tlv.encode(0x53, content)


def _chained(card: FakeCard, ins: int, p1: int, p2: int, data: bytes, cuts: list[int], le=None) -> tuple[bytes, int]:
    """Send ``data`` in blocks ending at ``cuts`` (CLA 10 on all but the last block)."""
    start = 0
    for end in cuts:
        assert card.send(ins, p1, p2, data[start:end], cla=0x10) == (b"", 0x9000)
        start = end
    return card.send(ins, p1, p2, data[start:], le=le)


def test_chaining_split_at_every_boundary(card):
    """PUT DATA of a certificate split into two blocks at every byte boundary stores the same object every time."""
    assert card.mgmt_auth() == 0x9000
    content = tlv.encode_many([(0x70, CERTS["9c"]), (0x71, b"\x00"), (0xFE, b"")])
    data = _put_data(card, 0x5FC10A, content)
    for cut in range(1, len(data)):
        card.stores.clear()
        assert _chained(card, 0xDB, 0x3F, 0xFF, data, [cut]) == (b"", 0x9000), cut
        assert [(s.kind, s.name, s.value) for s in card.stores] == [(ItemKind.CERT, "9c", CERTS["9c"])]


@pytest.mark.parametrize("block", [1, 7, 64, 200, 255])
def test_chaining_in_uniform_blocks(card, block):
    """A GENERAL AUTHENTICATE (RSA) sent in blocks of any size gives a valid signature, as OpenSC's chaining does."""
    assert card.verify(PIN) == 0x9000
    digest = hashlib.sha256(b"chained").digest()
    data = tlv.encode(0x7C, tlv.encode_many([(0x82, b""), (0x81, _pkcs1_block(digest))]))
    cuts = list(range(block, len(data), block))
    body, sw = _chained(card, 0x87, 0x07, 0x9A, data, cuts, le=256)
    while sw >> 8 == 0x61:
        more, sw = card.send(0xC0, 0, 0, le=256)
        body += more
    assert sw == 0x9000
    sig = tlv.to_dict(tlv.decode_one(body, 0x7C))[0x82]
    RSA_KEY.public_key().verify(sig, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))


def test_chain_interrupted_by_another_command(card):
    """A different command in the middle of a chain abandons it: the last block alone is then malformed."""
    assert card.mgmt_auth() == 0x9000
    data = _put_data(card, 0x5FC109, b"printed")
    assert card.send(0xDB, 0x3F, 0xFF, data[:4], cla=0x10) == (b"", 0x9000)
    assert card.verify(None) == 0x63C3
    assert card.send(0xDB, 0x3F, 0xFF, data[4:])[1] == 0x6A80
    assert card.stores == []


def test_chaining_refused_for_select_and_too_long(card):
    """CLA 10 on SELECT is 6884; a chain beyond the buffer is 6A84 and forgotten."""
    assert card.send(0xA4, 0x04, 0x00, piv.PIV_AID, cla=0x10) == (b"", 0x6884)
    assert card.mgmt_auth() == 0x9000
    block = bytes(255)
    sw = 0x9000
    for _ in range(piv.MAX_CHAIN // 255 + 1):
        sw = card.send(0xDB, 0x3F, 0xFF, block, cla=0x10)[1]
        if sw != 0x9000:
            break
    assert sw == 0x6A84
    assert card.send(0xDB, 0x3F, 0xFF, _put_data(card, 0x5FC109, b"x")) == (b"", 0x9000)


# ================================================================ VERIFY, PIN and PUK


def test_pin_status_counts_and_lockout(card):
    """Wrong PINs count down 63C2, 63C1, 63C0; then 6983 even for the right PIN; status without data reports it."""
    assert card.verify(None) == 0x63C3
    assert card.verify(b"000000") == 0x63C2
    assert card.verify(None) == 0x63C2
    assert card.verify(b"000000") == 0x63C1
    assert card.verify(PIN) == 0x9000  # a match resets the counter
    assert card.verify(None) == 0x9000
    assert card.secret("piv-pin").tries_left == 3
    for expected in (0x63C2, 0x63C1, 0x63C0):
        assert card.verify(b"999999") == expected
    assert card.verify(PIN) == 0x6983
    assert card.verify(None) == 0x6983
    assert card.secret("piv-pin").tries_left == 0
    assert [n.event for n in card.notices][-2:] == ["wrong-pin", "pin-blocked"]


def test_every_try_is_stored_once_before_it_is_answered(card):
    """A VERIFY with data makes exactly one store, before the answer: the counter back at 3 after a match, 2 after a mismatch."""
    card.verify(PIN)
    assert [apdu.decode_secret(s.value).tries_left for s in card.stores] == [3]
    card.stores.clear()
    card.verify(b"111111")
    assert [apdu.decode_secret(s.value).tries_left for s in card.stores] == [2]
    card.stores.clear()
    card.verify(PIN)  # a match at 2 tries left stores 3 again: still one store
    assert [apdu.decode_secret(s.value).tries_left for s in card.stores] == [3]


def _effects_until_the_store(pin: bytes) -> list:
    """The effects a VERIFY with ``pin`` yields up to and including its store (a fresh applet and card)."""
    card = FakeCard()
    card.send(0xA4, 0x04, 0x00, piv.PIV_AID)
    seen = []
    gen = card.applet.process(apdu.command(0, 0x20, 0x00, 0x80, apdu.pad_pin(pin)))
    value = None
    while True:
        effect = gen.send(value)
        seen.append(effect)
        if isinstance(effect, piv.Store):
            return seen
        value = card.perform(effect)


def test_a_match_and_a_mismatch_look_the_same_until_stored(card):
    """
    Tearing: an attacker who kills the card (or cuts its link) the moment a
    store starts must learn nothing and lose the try. Up to and including
    the store, a right and a wrong PIN yield the same effects, and the same
    store (same item, same length): no notice, no answer, no skipped or
    extra store tells them apart.
    """
    right, wrong = _effects_until_the_store(PIN), _effects_until_the_store(b"000000")
    assert [type(e) for e in right] == [type(e) for e in wrong]
    assert [(e.kind, e.name) for e in right if isinstance(e, piv.Store)] == \
        [(e.kind, e.name) for e in wrong if isinstance(e, piv.Store)]
    assert len(right[-1].value) == len(wrong[-1].value)
    assert not any(isinstance(e, piv.Notice) for e in right + wrong)


def test_no_free_guesses_when_the_store_fails(card):
    """If the try cannot be stored (server down) the answer is 6581 whatever the PIN, and nothing is verified."""
    card.fail_stores = True
    assert card.verify(b"000000") == 0x6581
    assert card.verify(PIN) == 0x6581
    assert not card.applet.pin_verified
    # the same notice for both (the failed store), no "wrong-pin": the result never left the card
    assert [n.event for n in card.notices] == ["effect-failed", "effect-failed"]
    assert card.notices[0] == card.notices[1]
    card.fail_stores = False
    assert card.verify(None) == 0x63C3


def test_verify_lengths_and_references(card):
    """PIN blocks are 8 bytes (6A80 otherwise); unknown key references are 6A88; P1 other than 00/FF is 6A86."""
    assert card.send(0x20, 0x00, 0x80, b"123456")[1] == 0x6A80
    assert card.send(0x20, 0x00, 0x96, apdu.pad_pin(PIN))[1] == 0x6A88
    assert card.send(0x20, 0x01, 0x80, apdu.pad_pin(PIN))[1] == 0x6A86
    assert card.verify(None) == 0x63C3


def test_verify_reset_select_and_power_clear_the_pin(card):
    """VERIFY P1=FF, a new SELECT (YubiKey behaviour, what yubico-piv-tool relies on) and power off/reset clear the PIN."""
    assert card.verify(PIN) == 0x9000
    card.select()
    assert card.verify(None) == 0x63C3
    assert card.verify(PIN) == 0x9000
    assert card.send(0xA4, 0x04, 0x00, bytes.fromhex("d27600012401"))[1] == 0x6A82  # a failed SELECT changes nothing
    assert card.verify(None) == 0x9000
    assert card.send(0x20, 0xFF, 0x80) == (b"", 0x9000)
    assert card.verify(None) == 0x63C3
    assert card.verify(PIN) == 0x9000
    card.applet.reset()
    card.select()
    assert card.verify(None) == 0x63C3


def test_puk_status_by_verify(card):
    """VERIFY 81 with no data reports the PUK's tries; PUK verification grants nothing."""
    assert card.verify(None, 0x81) == 0x63C3
    assert card.verify(PUK, 0x81) == 0x9000
    assert card.verify(None) == 0x63C3


def test_change_pin_and_puk(card):
    """CHANGE REFERENCE DATA: the old value is checked (counted), the new one must be 6-8 characters."""
    assert card.send(0x24, 0, 0x80, apdu.pad_pin(b"000000") + apdu.pad_pin(b"222222"))[1] == 0x63C2
    assert card.send(0x24, 0, 0x80, apdu.pad_pin(PIN) + apdu.pad_pin(b"22"))[1] == 0x6A80
    assert card.send(0x24, 0, 0x80, apdu.pad_pin(PIN) + apdu.pad_pin(b"22222222"))[1] == 0x9000
    assert card.secret("piv-pin") == apdu.SecretRecord(apdu.pad_pin(b"22222222"), 3, 3)
    assert card.verify(PIN) == 0x63C2
    assert card.verify(b"22222222") == 0x9000
    assert card.send(0x24, 0, 0x81, apdu.pad_pin(PUK) + apdu.pad_pin(b"87654321"))[1] == 0x9000
    assert card.verify(None, 0x81) == 0x63C3
    assert card.send(0x24, 0, 0x80, b"short")[1] == 0x6A80


def test_unblock_with_the_puk(card):
    """RESET RETRY COUNTER: a wrong PUK counts down to 6983; the right one sets a new PIN with full tries."""
    for _ in range(3):
        card.verify(b"000000")
    assert card.verify(PIN) == 0x6983
    assert card.send(0x2C, 0, 0x80, apdu.pad_pin(b"00000000") + apdu.pad_pin(b"777777"))[1] == 0x63C2
    assert card.send(0x2C, 0, 0x80, apdu.pad_pin(PUK) + apdu.pad_pin(b"777777"))[1] == 0x9000
    assert card.verify(None) == 0x63C3
    assert card.verify(b"777777") == 0x9000
    assert card.verify(None, 0x81) == 0x63C3
    for expected in (0x63C2, 0x63C1, 0x63C0, 0x6983):
        assert card.send(0x2C, 0, 0x80, apdu.pad_pin(b"00000000") + apdu.pad_pin(b"777777"))[1] == expected
    assert card.send(0x2C, 0, 0x81, apdu.pad_pin(PUK) + apdu.pad_pin(b"777777"))[1] == 0x6A88


# ================================================================ GENERAL AUTHENTICATE


def test_rsa_sign_is_a_raw_private_operation(card):
    """Alg 07 on 9A: the padded block OpenSC sends comes back as a PKCS#1 v1.5 signature that verifies."""
    assert card.verify(PIN) == 0x9000
    digest = hashlib.sha256(b"data").digest()
    sig, sw = card.general_authenticate(0x07, 0x9A, 0x81, _pkcs1_block(digest))
    assert sw == 0x9000 and len(sig) == 256
    RSA_KEY.public_key().verify(sig, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))


def test_rsa_decrypt_round_trip(card):
    """Alg 07 on 9D with a ciphertext returns the padded plaintext (the host strips PKCS#1 v1.5 padding)."""
    card.verify(PIN)
    ct = RSA_KEY.public_key().encrypt(b"secret message", padding.PKCS1v15())
    block, sw = card.general_authenticate(0x07, 0x9D, 0x81, ct)
    assert sw == 0x9000 and block[:2] == b"\x00\x02"
    assert block[block.index(b"\x00", 2) + 1 :] == b"secret message"


@pytest.mark.parametrize("slot", [0x9C, 0x9E])
def test_ecdsa_returns_a_der_signature(card, slot):
    """Alg 11: the hash OpenSC sends is signed; 82 holds a DER ECDSA-Sig-Value that verifies."""
    card.verify(PIN)
    digest = hashlib.sha256(b"ec data").digest()
    sig, sw = card.general_authenticate(0x11, slot, 0x81, digest)
    assert sw == 0x9000 and sig[0] == 0x30
    EC_KEY.public_key().verify(sig, digest, ec.ECDSA(Prehashed(hashes.SHA256())))


def test_ecdsa_hash_lengths(card):
    """A SHA-384 hash is truncated to 256 bits, a SHA-1 hash used as its integer value, as ECDSA prescribes."""
    card.verify(PIN)
    long = hashlib.sha384(b"x").digest()
    sig, sw = card.general_authenticate(0x11, 0x9C, 0x81, long)
    assert sw == 0x9000
    EC_KEY.public_key().verify(sig, long[:32], ec.ECDSA(Prehashed(hashes.SHA256())))
    short = hashlib.sha1(b"x").digest()
    sig, sw = card.general_authenticate(0x11, 0x9C, 0x81, short)
    EC_KEY.public_key().verify(sig, short.rjust(32, b"\x00"), ec.ECDSA(Prehashed(hashes.SHA256())))


def test_ecdh(card):
    """Alg 11 with 85 (a peer point): 82 holds the shared x-coordinate, as cryptography computes it."""
    card.verify(PIN)
    peer = ec.derive_private_key(12345, ec.SECP256R1())
    point = peer.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    secret, sw = card.general_authenticate(0x11, 0x9D if False else 0x9C, 0x85, point)
    assert sw == 0x9000 and secret == peer.exchange(ec.ECDH(), EC_KEY.public_key())
    bad = point[:-1] + bytes([point[-1] ^ 1])
    assert card.general_authenticate(0x11, 0x9C, 0x85, bad)[1] == 0x6A80


@pytest.mark.parametrize("slot, alg", [(0x9A, 0x07), (0x9C, 0x11), (0x9D, 0x07)])
def test_private_keys_need_the_pin(card, slot, alg):
    """9A, 9C and 9D refuse with 6982 until the PIN is verified; no key operation runs."""
    data = _pkcs1_block(bytes(32)) if alg == 0x07 else bytes(32)
    assert card.general_authenticate(alg, slot, 0x81, data)[1] == 0x6982
    assert card.ops == 0


def test_card_authentication_key_needs_no_pin(card):
    """9E (card authentication) signs without the PIN."""
    assert card.general_authenticate(0x11, 0x9E, 0x81, bytes(32))[1] == 0x9000


def test_general_authenticate_refusals(card):
    """Wrong algorithm 6A86, unknown slot or missing key 6A88, malformed template or block 6A80."""
    card.verify(PIN)
    assert card.general_authenticate(0x11, 0x9A, 0x81, bytes(32))[1] == 0x6A86
    assert card.general_authenticate(0x07, 0x82, 0x81, bytes(256))[1] == 0x6A88
    assert card.general_authenticate(0x07, 0x9A, 0x81, bytes(255))[1] == 0x6A80
    assert card.general_authenticate(0x07, 0x9A, 0x81, b"\xff" * 256)[1] == 0x6A80  # not below the modulus
    assert card.send(0x87, 0x07, 0x9A, b"\x7c\x02\x81\x00\x00")[1] == 0x6A80
    assert card.send(0x87, 0x07, 0x9A, tlv.encode(0x7C, tlv.encode(0x81, bytes(256))))[1] == 0x6A80  # no 82
    del card.items[(ItemKind.KEY, "9d")]
    assert card.general_authenticate(0x07, 0x9D, 0x81, bytes(256))[1] == 0x6A88


# ================================================================ management key


def test_mutual_authentication_with_the_default_key(card):
    """yubico-piv-tool's witness/challenge exchange with the default 3DES key succeeds and the card proves the key."""
    assert card.mgmt_auth() == 0x9000
    assert card.applet.mgmt.authenticated()


def test_wrong_management_key_is_refused(card):
    """A wrong key returns the wrong witness: 6982, and PUT DATA / GENERATE stay refused."""
    assert card.mgmt_auth(bytes(24)) == 0x6982
    assert not card.applet.mgmt.authenticated()
    assert card.send(0xDB, 0x3F, 0xFF, _put_data(card, 0x5FC109, b"x"))[1] == 0x6982


def test_challenge_response_authentication(card):
    """OpenSC's one-way form: 81 00 asks a challenge, 82 E(K, challenge) answers it."""
    body, sw = card.send(0x87, 0x03, 0x9B, tlv.encode(0x7C, tlv.encode(0x81, b"")), le=256)
    challenge = tlv.to_dict(tlv.decode_one(body, 0x7C))[0x81]
    assert sw == 0x9000 and len(challenge) == 8
    answer = crypto.mgmt_cipher(0x03, DEFAULT_MGMT, challenge, True)
    assert card.send(0x87, 0x03, 0x9B, tlv.encode(0x7C, tlv.encode(0x82, answer))) == (b"", 0x9000)
    assert card.applet.mgmt.authenticated()
    # an unsolicited answer drops the status
    assert card.send(0x87, 0x03, 0x9B, tlv.encode(0x7C, tlv.encode(0x82, answer)))[1] == 0x6982
    assert not card.applet.mgmt.authenticated()


def test_management_key_algorithm_must_match(card):
    """P1 must name the stored key's algorithm (03 by default)."""
    assert card.send(0x87, 0x08, 0x9B, tlv.encode(0x7C, tlv.encode(0x80, b"")), le=256)[1] == 0x6A86


def test_set_management_key_to_aes(card):
    """SET MANAGEMENT KEY (YubiKey FF) needs authentication; afterwards only the new AES-128 key authenticates."""
    new = bytes(range(16))
    assert card.send(0xFF, 0xFF, 0xFF, bytes([0x08, 0x9B, 16]) + new)[1] == 0x6982
    assert card.mgmt_auth() == 0x9000
    assert card.send(0xFF, 0xFF, 0xFF, bytes([0x08, 0x9B, 15]) + new[:15])[1] == 0x6A80
    assert card.send(0xFF, 0xFF, 0xFF, bytes([0x08, 0x9B, 16]) + new) == (b"", 0x9000)
    card.applet.reset()
    card.select()
    assert card.send(0x87, 0x03, 0x9B, tlv.encode(0x7C, tlv.encode(0x80, b"")), le=256)[1] == 0x6A86
    assert card.mgmt_auth(new, 0x08) == 0x9000


def test_management_status_cleared_on_reset(card):
    """Power off or reset drops the management-key authentication."""
    card.mgmt_auth()
    card.applet.reset()
    card.select()
    assert not card.applet.mgmt.authenticated()


def test_mgmt_machine_transitions():
    """The Automat machine: only an outstanding witness or challenge can be accepted; reset always clears."""
    m = piv._MgmtMachine(piv._MgmtCore())
    assert m.accept() is False and m.pending() is None
    m.witness_sent(b"w" * 8)
    assert m.pending() == ("witness", b"w" * 8) and not m.authenticated()
    assert m.accept() is True and m.authenticated() and m.pending() is None
    m.challenge_sent(b"c" * 8)
    assert not m.authenticated()
    m.reset()
    assert m.accept() is False


# ================================================================ GENERATE, PUT DATA


def test_generate_needs_the_management_key(card):
    """GENERATE ASYMMETRIC KEY PAIR without management-key authentication: 6982, no key made."""
    before = dict(card.items)
    assert card.send(0x47, 0x00, 0x9A, tlv.encode(0xAC, tlv.encode(0x80, b"\x07")), le=256)[1] == 0x6982
    assert card.items == before


def test_generate_rsa_and_ec(card):
    """RSA-2048: 7F49{81 modulus, 82 exponent} (over 256 bytes: 61xx); P-256: 7F49{86 point}; the new key signs."""
    card.mgmt_auth()
    body, sw = card.get_all(0x47, 0x00, 0x9A, tlv.encode(0xAC, tlv.encode(0x80, b"\x07")))
    assert sw == 0x9000
    pub = tlv.to_dict(tlv.decode_one(body, 0x7F49))
    assert len(pub[0x81]) == 256 and pub[0x82] == b"\x01\x00\x01"
    assert crypto.public_numbers(card.items[(ItemKind.KEY, "9a")][2])["rsa"] == (pub[0x81], pub[0x82])
    body, sw = card.get_all(0x47, 0x00, 0x9E, tlv.encode(0xAC, tlv.encode(0x80, b"\x11")))
    point = tlv.to_dict(tlv.decode_one(body, 0x7F49))[0x86]
    assert sw == 0x9000 and len(point) == 65 and point[0] == 4
    assert card.items[(ItemKind.KEY, "9e")][1] is KeyAlg.P256
    sig, sw = card.general_authenticate(0x11, 0x9E, 0x81, bytes(32))
    key = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    key.verify(sig, bytes(32), ec.ECDSA(Prehashed(hashes.SHA256())))


def test_generate_refusals(card):
    """An unknown algorithm or template is 6A80; a reference that is no key slot (9A/9C/9D/9E, 82-95) is 6A88; P1 not 00 is 6A86."""
    card.mgmt_auth()
    assert card.send(0x47, 0x00, 0x9A, tlv.encode(0xAC, tlv.encode(0x80, b"\x13")))[1] == 0x6A80
    assert card.send(0x47, 0x00, 0x9A, tlv.encode(0xAB, tlv.encode(0x80, b"\x07")))[1] == 0x6A80
    assert card.send(0x47, 0x00, 0x96, tlv.encode(0xAC, tlv.encode(0x80, b"\x07")))[1] == 0x6A88
    assert card.send(0x47, 0x01, 0x9A, tlv.encode(0xAC, tlv.encode(0x80, b"\x07")))[1] == 0x6A86


def test_put_data_certificate_and_delete(card):
    """PUT DATA stores a certificate object's DER for its slot; an empty object deletes it (then 6A82)."""
    card.mgmt_auth()
    content = tlv.encode_many([(0x70, CERTS["9e"]), (0x71, b"\x00"), (0xFE, b"")])
    assert card.send(0xDB, 0x3F, 0xFF, _put_data(card, 0x5FC105, content)) == (b"", 0x9000)
    assert tlv.to_dict(tlv.decode_one(card.get_data(0x5FC105)[0], 0x53))[0x70] == CERTS["9e"]
    assert card.send(0xDB, 0x3F, 0xFF, _put_data(card, 0x5FC105, b"")) == (b"", 0x9000)
    assert card.get_data(0x5FC105) == (b"", 0x6A82)


def test_put_data_refusals(card):
    """Compressed certificates, discovery, tags outside PIV, trailing TLVs and missing 53 are 6A80."""
    card.mgmt_auth()
    compressed = tlv.encode_many([(0x70, b"gzip"), (0x71, b"\x01")])
    assert card.send(0xDB, 0x3F, 0xFF, _put_data(card, 0x5FC105, compressed))[1] == 0x6A80
    assert card.send(0xDB, 0x3F, 0xFF, _put_data(card, 0x7E, b""))[1] == 0x6A80
    assert card.send(0xDB, 0x3F, 0xFF, _put_data(card, 0x5FC17F, b"x"))[1] == 0x6A80
    assert card.send(0xDB, 0x3F, 0xFF, tlv.encode(0x5C, tlv.tag_bytes(0x5FC109)))[1] == 0x6A80
    assert card.send(0xDB, 0x3F, 0xFF, _put_data(card, 0x5FC109, b"x") + b"\x01\x00")[1] == 0x6A80
    assert card.stores == []


def test_put_data_objects_and_pin_protected_reads(card):
    """Other objects are stored as they are: a new CHUID replaces the generated one; printed info needs the PIN to read."""
    card.mgmt_auth()
    assert card.send(0xDB, 0x3F, 0xFF, _put_data(card, 0x5FC102, b"\x34\x01\x01")) == (b"", 0x9000)
    assert card.get_data(0x5FC102) == (tlv.encode(0x53, b"\x34\x01\x01"), 0x9000)
    assert card.send(0xDB, 0x3F, 0xFF, _put_data(card, 0x5FC109, b"\x01\x02name")) == (b"", 0x9000)
    assert card.get_data(0x5FC109) == (b"", 0x6982)
    card.verify(PIN)
    assert card.get_data(0x5FC109) == (tlv.encode(0x53, b"\x01\x02name"), 0x9000)
    assert (ItemKind.DATA, "piv-5fc109") in card.items


def test_failed_store_is_6581_and_changes_nothing(card):
    """If syncing fails the card answers 6581 (memory failure)."""
    card.mgmt_auth()
    card.fail_stores = True
    assert card.send(0xDB, 0x3F, 0xFF, _put_data(card, 0x5FC109, b"x"))[1] == 0x6581
    assert ("effect-failed" in [n.event for n in card.notices])


# ================================================================ YubiKey extensions


def test_version_and_serial(card):
    """GET VERSION answers 3 bytes; GET SERIAL a 4-byte number derived from the serial (stable)."""
    assert card.send(0xFD, 0, 0, le=256) == (bytes(card.applet.version), 0x9000)
    serial, sw = card.send(0xF8, 0, 0, le=256)
    assert sw == 0x9000 and len(serial) == 4 and serial == card.send(0xF8, 0, 0, le=256)[0]


# ================================================================ the glue: vsc.card.vpcd on a CardSession

from twisted.internet.testing import StringTransport  # noqa: E402
from twisted.protocols.basic import Int16StringReceiver  # noqa: E402

from vsc.card import vpcd  # noqa: E402
from vsc.card.config import CardConfig  # noqa: E402
from vsc.card.protected import PlainItem, seal_envelope  # noqa: E402
from vsc.card.session import LifeState  # noqa: E402
from tests.cardfakes import MemoryStorage, in_use_session, leave_use, release  # noqa: E402
from tests.cardfakes import done as cardfakes_done  # noqa: E402


@pytest.fixture
def session(tmp_path):
    """An in-use CardSession on a real CardMemory; its storage records every stored change (no server)."""
    protection_key = bytes(range(32))
    items = [PlainItem(ItemKind.KEY, slot, der, alg, PUBLIC[slot]) for slot, (der, alg) in KEYS.items()]
    items += [PlainItem(ItemKind.CERT, slot, CERTS[slot]) for slot in KEYS]
    envelope = seal_envelope(SERIAL, protection_key, items, Drbg(b"seal"))
    cfg = CardConfig(home=tmp_path, server="tcp:127.0.0.1:1", server_key="SHA256:unused", serial=SERIAL)
    s = in_use_session(cfg, MemoryStorage(SERIAL, envelope, protection_key, Drbg(b"load")), Drbg(b"session"))
    yield s
    release(s)


class SockRecorder:
    def __init__(self):
        self.calls = []

    def setsockopt(self, *args):
        self.calls.append(args)


class VpcdTransport(StringTransport):
    def __init__(self):
        super().__init__()
        self.sock = SockRecorder()

    def getHandle(self):
        return self.sock


def _link(session):
    card = vpcd.PivCard(session, Drbg(b"glue"))
    proto = vpcd.VpcdFactory(card).buildProtocol(None)
    transport = VpcdTransport()
    proto.makeConnection(transport)
    return proto, transport


class VpcdPeer(Int16StringReceiver):
    """vpcd's end of the link: the same 2-byte length framing, collecting payloads (fed by hand or by a reactor)."""

    def __init__(self):
        self.got: list[bytes] = []

    def stringReceived(self, payload: bytes) -> None:
        self.got.append(payload)


def vpcd_payloads(data: bytes) -> list[bytes]:
    """The payloads in bytes the card wrote (whole messages only)."""
    peer = VpcdPeer()
    peer.dataReceived(data)
    assert peer._unprocessed == b"", "the card wrote part of a message"
    return peer.got


def _exchange(proto, transport, *payloads: bytes) -> list[bytes]:
    transport.clear()
    proto.dataReceived(b"".join(apdu.encode_vpcd(p) for p in payloads))
    return vpcd_payloads(transport.value())


def test_vpcd_messages_split_at_every_offset(session):
    """VpcdProtocol (Int16StringReceiver) answers pipelined messages cut at every offset exactly as when sent whole, in order."""
    sel = apdu.command(0, 0xA4, 4, 0, piv.PIV_AID[:9], 256)
    stream = b"".join(apdu.encode_vpcd(p) for p in (b"\x04", b"\x01", sel, b"\x04"))
    proto, transport = _link(session)
    proto.dataReceived(stream)
    whole = vpcd_payloads(transport.value())
    assert whole[0] == whole[2] == vpcd.ATR and apdu.parse_response(whole[1])[1] == 0x9000 and len(whole) == 3
    for i in range(len(stream) + 1):
        proto, transport = _link(session)
        proto.dataReceived(stream[:i])
        proto.dataReceived(stream[i:])
        assert vpcd_payloads(transport.value()) == whole, f"split at {i}"


def test_vpcd_control_messages(session):
    """04 answers the ATR at any time; 00/01/02 answer nothing and clear the PIN state; APDUs are answered framed."""
    proto, transport = _link(session)
    assert _exchange(proto, transport, b"\x04") == [vpcd.ATR]
    assert _exchange(proto, transport, b"\x01", b"\x02") == []
    sel = apdu.command(0, 0xA4, 4, 0, piv.PIV_AID[:9], 256)
    verify = apdu.command(0, 0x20, 0, 0x80, apdu.pad_pin(PIN))
    status = apdu.command(0, 0x20, 0, 0x80)
    answers = _exchange(proto, transport, sel, verify, b"\x04", status)
    assert [apdu.parse_response(a)[1] for a in (answers[0], answers[1], answers[3])] == [0x9000, 0x9000, 0x9000]
    assert answers[2] == vpcd.ATR
    assert _exchange(proto, transport, b"\x00", b"\x01", sel, status)[1] == b"\x63\xc3"


def test_quickack_after_every_read(session):
    """TCP_QUICKACK is set on connect and after every read (the 44 ms delayed-ACK pitfall)."""
    import socket

    proto, transport = _link(session)
    n = len(transport.sock.calls)
    for _ in range(3):
        proto.dataReceived(apdu.encode_vpcd(b"\x04")[:1])
    assert len(transport.sock.calls) == n + 3
    assert set(transport.sock.calls) == {(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)}


def test_glue_signs_with_the_session_key_and_keeps_order(session):
    """Pipelined APDUs while the session is busy are answered in order once it is free; the RSA signature verifies."""
    proto, transport = _link(session)
    sel = apdu.command(0, 0xA4, 4, 0, piv.PIV_AID[:9], 256)
    _exchange(proto, transport, sel, apdu.command(0, 0x20, 0, 0x80, apdu.pad_pin(PIN)))
    digest = hashlib.sha256(b"glue").digest()
    data = tlv.encode(0x7C, tlv.encode_many([(0x82, b""), (0x81, _pkcs1_block(digest))]))
    session._oplock.acquire()
    transport.clear()
    proto.dataReceived(apdu.encode_vpcd(apdu.command(0, 0x87, 0x07, 0x9A, data, 65536, extended=True))
                       + apdu.encode_vpcd(b"\x04"))
    assert transport.value() == b""
    session._oplock.release()
    sign, atr = vpcd_payloads(transport.value())
    body, sw = apdu.parse_response(sign)
    assert sw == 0x9000 and atr == vpcd.ATR
    RSA_KEY.public_key().verify(tlv.to_dict(tlv.decode_one(body, 0x7C))[0x82], digest, padding.PKCS1v15(),
                                Prehashed(hashes.SHA256()))


def test_glue_private_key_operation_is_answered_at_once_when_the_card_is_free(session):
    """With no operation holding the card, GENERAL AUTHENTICATE finishes in PivCard.begin (no coroutine to
    await: the key is used under the session's lock, taken and released synchronously) and verifies; a block
    OpenSSL refuses is 6A80 the same way; a busy card still defers it."""
    card = vpcd.PivCard(session, Drbg(b"now"))
    sel = apdu.command(0, 0xA4, 4, 0, piv.PIV_AID[:9], 256)
    assert card.begin(sel)[1] is None
    response, rest = card.begin(apdu.command(0, 0x20, 0, 0x80, apdu.pad_pin(PIN)))
    assert rest is not None  # VERIFY stores the retry counter (a sync): it waits
    cardfakes_done(rest)
    digest = hashlib.sha256(b"at once").digest()
    data = tlv.encode(0x7C, tlv.encode_many([(0x82, b""), (0x81, _pkcs1_block(digest))]))
    response, rest = card.begin(apdu.command(0, 0x87, 0x07, 0x9A, data, 65536, extended=True))
    assert rest is None and not session.busy
    body, sw = apdu.parse_response(response)
    assert sw == 0x9000
    RSA_KEY.public_key().verify(tlv.to_dict(tlv.decode_one(body, 0x7C))[0x82], digest, padding.PKCS1v15(),
                                Prehashed(hashes.SHA256()))
    too_big = tlv.encode(0x7C, tlv.encode_many([(0x82, b""), (0x81, b"\xff" * 256)]))  # >= the modulus
    response, rest = card.begin(apdu.command(0, 0x87, 0x07, 0x9A, too_big, 65536, extended=True))
    assert rest is None and apdu.parse_response(response)[1] == 0x6A80 and not session.busy
    session._oplock.acquire()
    response, rest = card.begin(apdu.command(0, 0x87, 0x07, 0x9A, data, 65536, extended=True))
    assert response is None and rest is not None  # waits for the holder
    rest.close()
    session._oplock.release()


def test_vpcd_reads_skip_the_client_service_wrappers_but_connection_lost_does_not(session):
    """Behind ClientService (an endpoint's _WrappingProtocol around ClientService's proxy) the transport's
    protocol hands reads straight to VpcdProtocol.dataReceived; connectionLost still passes the proxy, whose
    notification is what makes ClientService reconnect."""
    from twisted.application._client_service import _ReconnectingProtocolProxy
    from twisted.internet.defer import Deferred
    from twisted.internet.endpoints import _WrappingProtocol
    from twisted.python.failure import Failure

    card = vpcd.PivCard(session, Drbg(b"wrap"))
    proto = vpcd.VpcdFactory(card).buildProtocol(None)
    lost = []
    outer = _WrappingProtocol(Deferred(), _ReconnectingProtocolProxy(proto, lost.append))
    transport = VpcdTransport()
    transport.protocol = outer
    outer.makeConnection(transport)
    assert outer.dataReceived == proto.dataReceived
    outer.dataReceived(apdu.encode_vpcd(b"\x04"))
    assert vpcd_payloads(transport.value()) == [vpcd.ATR]
    outer.connectionLost(Failure(ConnectionError("vpcd went away")))
    assert len(lost) == 1 and not proto.connected


def test_glue_persists_the_retry_counter(session):
    """A wrong PIN is stored through put_item (synced) and a fresh PivCard on the same memory sees the counter."""
    proto, transport = _link(session)
    sel = apdu.command(0, 0xA4, 4, 0, piv.PIV_AID[:9], 256)
    answers = _exchange(proto, transport, sel, apdu.command(0, 0x20, 0, 0x80, apdu.pad_pin(b"000000")))
    assert answers[1] == b"\x63\xc2" and len(session.storage.stored) == 1
    proto2, transport2 = _link(session)
    assert _exchange(proto2, transport2, sel, apdu.command(0, 0x20, 0, 0x80))[1] == b"\x63\xc2"


def test_glue_sync_failure_is_6581(session):
    """When the sync fails the session undoes the change and the APDU is answered 6581."""
    proto, transport = _link(session)
    session.storage.fail_store = "server unreachable"
    sel = apdu.command(0, 0xA4, 4, 0, piv.PIV_AID[:9], 256)
    answers = _exchange(proto, transport, sel, apdu.command(0, 0x20, 0, 0x80, apdu.pad_pin(b"000000")))
    assert answers[1] == b"\x65\x81"
    session.storage.fail_store = None
    assert _exchange(proto, transport, apdu.command(0, 0x20, 0, 0x80)) == [b"\x63\xc3"]


def test_glue_generate_stores_the_key(session):
    """GENERATE through the glue stores the new key with put_item; the key then signs via with_key."""
    proto, transport = _link(session)
    card = proto.card
    card.applet.selected = True
    card.applet.mgmt.witness_sent(b"w" * 8)
    card.applet.mgmt.accept()
    old = session.memory.items()
    (answer,) = _exchange(proto, transport, apdu.command(0, 0x47, 0, 0x9E, tlv.encode(0xAC, tlv.encode(0x80, b"\x11")),
                                                         256))
    body, sw = apdu.parse_response(answer)
    assert sw == 0x9000 and len(session.storage.stored) == 1
    point = tlv.to_dict(tlv.decode_one(body, 0x7F49))[0x86]
    public = [p for k, n, a, p in session.memory.items() if k is ItemKind.KEY and n == "9e"][0]
    assert crypto.public_numbers(public)["ec"] == point and old != session.memory.items()


def test_glue_card_not_inserted(session):
    """After the card left use, key and item effects fail with 6F00 rather than touching wiped memory."""
    proto, transport = _link(session)
    sel = apdu.command(0, 0xA4, 4, 0, piv.PIV_AID[:9], 256)
    _exchange(proto, transport, sel)
    leave_use(session, LifeState.REMOVING)
    assert _exchange(proto, transport, apdu.command(0, 0x20, 0, 0x80, apdu.pad_pin(PIN))) == [b"\x6f\x00"]


def test_certificate_helpers(session):
    """put_certificate checks the certificate is for the slot's key; get_certificate returns it."""
    import pytest_twisted  # noqa: F401 - only to be sure the plugin exists; the coroutine completes synchronously
    from twisted.internet.defer import ensureDeferred

    from vsc.card.session import CardError

    d = ensureDeferred(vpcd.put_certificate(session, "9a", CERTS["9d"]))  # same RSA key in 9a and 9d
    assert d.called and len(session.storage.stored) == 1
    assert vpcd.get_certificate(session, "9a") == CERTS["9d"]
    failures = []
    ensureDeferred(vpcd.put_certificate(session, "9a", CERTS["9c"])).addErrback(failures.append)
    assert failures and failures[0].check(CardError)
    failures.clear()
    ensureDeferred(vpcd.put_certificate(session, "9a", b"not a cert")).addErrback(failures.append)
    assert failures and failures[0].check(CardError)


# ================================================================ crypto used by the card


def test_rsa_private_block_matches_the_textbook_operation():
    """The PIV private operation gives exactly m^d mod n for a PKCS#1 block and a raw one, and refuses blocks of the wrong size or not below n (more in tests/test_crypto_rsa.py)."""
    der, _ = KEYS["9a"]
    nums = RSA_KEY.private_numbers()
    n = nums.public_numbers.n
    for block in (_pkcs1_block(bytes(32)), b"\x00\x02" + bytes(range(1, 255))):
        m = int.from_bytes(block, "big")
        with crypto.PrivateKeyHandle(der) as key:
            assert crypto.rsa_private_block(key, block) == pow(m, nums.d, n).to_bytes(256, "big")
    with crypto.PrivateKeyHandle(der) as key:
        with pytest.raises(crypto.CryptoError):
            crypto.rsa_private_block(key, bytes(255))
        with pytest.raises(crypto.CryptoError):
            crypto.rsa_private_block(key, b"\xff" * 256)


def test_management_cipher_known_answer():
    """3DES with the PIV default key (K1=K2=K3 = single DES) and AES-128 ECB: known answers, and decrypt inverts."""
    assert crypto.mgmt_cipher(0x03, DEFAULT_MGMT, bytes(8)).hex() == "b073dc3fb209536d"
    key = bytes.fromhex("000102030405060708090a0b0c0d0e0f")
    pt = bytes.fromhex("00112233445566778899aabbccddeeff")
    assert crypto.mgmt_cipher(0x08, key, pt).hex() == "69c4e0d86a7b0430d8cdb78070b4c55a"  # FIPS-197 C.1
    assert crypto.mgmt_cipher(0x08, key, crypto.mgmt_cipher(0x08, key, pt), encrypt=False) == pt
    with pytest.raises(crypto.CryptoError):
        crypto.mgmt_cipher(0x08, key, bytes(8))


def test_csr_built_by_the_wire_layer_verifies():
    """tlv.csr_info/csr with a signature over SHA-256(info) is a PKCS#10 request OpenSSL's parser accepts as valid."""
    for slot, alg in (("9a", tlv.ALG_SHA256_RSA), ("9c", tlv.ALG_ECDSA_SHA256)):
        der, _ = KEYS[slot]
        info = tlv.csr_info(crypto.name_der("/CN=alice/O=Example\\/Org"), crypto.public_der_of(der))
        with crypto.PrivateKeyHandle(der) as key:
            sig = key.sign_digest(crypto.sha256(info))
        pem = crypto.csr_pem(tlv.csr(info, alg, sig))
        assert b"BEGIN CERTIFICATE REQUEST" in pem
        with pytest.raises(crypto.CryptoError):
            crypto.csr_pem(tlv.csr(info, alg, sig[:-1] + bytes([sig[-1] ^ 1])))
    with pytest.raises(ValueError):
        crypto.parse_subject("CN=x")
    with pytest.raises(ValueError):
        crypto.parse_subject("/XX=x")


def test_self_signed_certificate_uses_the_injected_time():
    """The enrolment certificate: CN as given, validity from the injected time, the key's own public key."""
    from cryptography import x509

    cert = x509.load_der_x509_certificate(CERTS["9c"])
    assert cert.subject.rfc4514_string() == f"CN={SERIAL} 9c"
    assert int(cert.not_valid_before_utc.timestamp()) == 1_700_000_000 - 300
    assert crypto.certificate_public_der(CERTS["9c"]) == PUBLIC["9c"]


# ================================================================ listen mode (vpcd reversed mode), on a real reactor

import pytest_twisted  # noqa: E402


@pytest_twisted.ensureDeferred
async def test_listen_mode_serves_one_vpcd_and_stop_disconnects(session):
    """
    --pcsc listen:ENDPOINT: the card listens for vpcd (reversed mode) on
    loopback, answers the ATR, refuses a second simultaneous reader, and
    stop() closes the connection (the card leaves the reader).
    """
    from twisted.internet import reactor
    from twisted.internet.defer import Deferred
    from twisted.internet.endpoints import TCP4ClientEndpoint
    from twisted.internet.protocol import Factory

    class Reader(VpcdPeer):
        def __init__(self):
            super().__init__()
            self.waiting: Deferred | None = None
            self.lost = Deferred()

        def stringReceived(self, payload):
            super().stringReceived(payload)
            if self.waiting is not None:
                d, self.waiting = self.waiting, None
                d.callback(self.got.pop(0))

        def ask(self, payload: bytes) -> Deferred:
            self.waiting = Deferred()
            self.transport.write(apdu.encode_vpcd(payload))
            return self.waiting

        def connectionLost(self, reason):
            self.lost.callback(None)

    link = vpcd.PcscLink(reactor, session, "listen:tcp:0:interface=127.0.0.1", Drbg(b"listen"))
    port = await link.start()
    try:
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port, timeout=5)
        first = await endpoint.connect(Factory.forProtocol(Reader))
        assert await first.ask(b"\x04") == vpcd.ATR
        sel = apdu.command(0, 0xA4, 4, 0, piv.PIV_AID[:9], 256)
        assert apdu.parse_response(await first.ask(sel))[1] == 0x9000
        second = await endpoint.connect(Factory.forProtocol(Reader))
        await second.lost  # one card, one reader
    finally:
        await link.stop()
    await first.lost


def test_a_lost_connection_frees_the_reader_slot(session):
    """After vpcd's connection is lost (pcscd restarted) the factory accepts the reconnection."""
    card = vpcd.PivCard(session, Drbg(b"slot"))
    factory = vpcd.VpcdFactory(card)
    first = factory.buildProtocol(None)
    first.makeConnection(VpcdTransport())
    assert factory.buildProtocol(None) is None  # one card, one reader
    from twisted.python.failure import Failure
    from twisted.internet.error import ConnectionLost

    first.connectionLost(Failure(ConnectionLost()))
    assert factory.active is None
    assert factory.buildProtocol(None) is not None


# ---------------------------------------------------------------- PIN policy and random numbers (issue 12)


def _with_policy(card: FakeCard, text: str) -> FakeCard:
    from vsc.wire import pinpolicy

    card.items[(ItemKind.PIN, pinpolicy.POLICY_ITEM)] = (pinpolicy.encode_policy(pinpolicy.parse_text(text)),
                                                         KeyAlg.NONE, b"")
    return card


def test_default_policy_is_yubikeys(card):
    """The enrolment default (YubiKey's): 9A once (one VERIFY, many signatures), 9C always (one VERIFY per signature), 9E never."""
    _with_policy(card, "")
    assert card.general_authenticate(0x11, 0x9E, 0x81, bytes(32))[1] == 0x9000
    assert card.general_authenticate(0x07, 0x9A, 0x81, _pkcs1_block(bytes(32)))[1] == 0x6982
    assert card.verify(PIN) == 0x9000
    for _ in range(2):
        assert card.general_authenticate(0x07, 0x9A, 0x81, _pkcs1_block(bytes(32)))[1] == 0x9000
    assert card.general_authenticate(0x11, 0x9C, 0x81, bytes(32))[1] == 0x6982  # the VERIFY was used by 9A
    assert card.verify(PIN) == 0x9000
    assert card.general_authenticate(0x11, 0x9C, 0x81, bytes(32))[1] == 0x9000
    assert card.general_authenticate(0x11, 0x9C, 0x81, bytes(32))[1] == 0x6982  # consumed


def test_card_without_a_policy_keeps_its_piv_rule(card):
    """A card enrolled before policies existed: 9A, 9C, 9D once (one VERIFY, many operations), 9E never."""
    assert card.general_authenticate(0x11, 0x9C, 0x81, bytes(32))[1] == 0x6982
    assert card.verify(PIN) == 0x9000
    for _ in range(2):
        assert card.general_authenticate(0x11, 0x9C, 0x81, bytes(32))[1] == 0x9000


def test_policy_never_once_always_as_stored(card):
    """A stored policy rules: 9A never signs without a VERIFY, 9E always needs one per use, 9D once until reset."""
    _with_policy(card, "9a=never,9d=once,9e=always")
    ops_before = card.ops
    assert card.general_authenticate(0x07, 0x9A, 0x81, _pkcs1_block(bytes(32)))[1] == 0x9000
    assert card.general_authenticate(0x11, 0x9E, 0x81, bytes(32))[1] == 0x6982
    assert card.general_authenticate(0x07, 0x9D, 0x81, _pkcs1_block(bytes(32)))[1] == 0x6982
    assert card.verify(PIN) == 0x9000
    assert card.general_authenticate(0x11, 0x9E, 0x81, bytes(32))[1] == 0x9000
    assert card.general_authenticate(0x11, 0x9E, 0x81, bytes(32))[1] == 0x6982
    assert card.general_authenticate(0x07, 0x9D, 0x81, _pkcs1_block(bytes(32)))[1] == 0x9000
    card.applet.reset()
    card.select()
    assert card.general_authenticate(0x07, 0x9D, 0x81, _pkcs1_block(bytes(32)))[1] == 0x6982
    assert card.ops == ops_before + 3


def test_blocked_pin_refuses_every_pin_slot_even_when_verified(card):
    """A PIN blocked elsewhere (the record at 0 tries) refuses 9A with 6983 although this session verified; 9E (never) still signs."""
    assert card.verify(PIN) == 0x9000
    rec = card.secret(pins.USER_PIN)
    card.items[(ItemKind.PIN, pins.USER_PIN)] = (apdu.encode_secret(apdu.SecretRecord(rec.value, 0, rec.max_tries)),
                                                 KeyAlg.NONE, b"")
    ops = card.ops
    assert card.general_authenticate(0x07, 0x9A, 0x81, _pkcs1_block(bytes(32)))[1] == 0x6983
    assert card.ops == ops
    assert card.general_authenticate(0x11, 0x9E, 0x81, bytes(32))[1] == 0x9000


@pytest.mark.parametrize("p1, size", [(0x00, 8), (0x08, 16), (0x0A, 16), (0x0C, 16)])
def test_random_challenge_as_opensc_asks(card, p1, size):
    """00 87 P1 9B 04 7C 02 81 00 with an algorithm other than the management key's: 7C { 81 random } of the block size."""
    body, sw = card.raw(bytes([0x00, 0x87, p1, 0x9B, 0x04, 0x7C, 0x02, 0x81, 0x00]))
    assert sw == 0x9000
    value = tlv.to_dict(tlv.decode_one(body, 0x7C))[0x81]
    assert len(value) == size
    second = tlv.to_dict(tlv.decode_one(card.raw(bytes([0x00, 0x87, p1, 0x9B, 0x04, 0x7C, 0x02, 0x81, 0x00]))[0],
                                        0x7C))[0x81]
    assert second != value


def test_random_challenge_keeps_the_management_authentication(card):
    """Random numbers asked between a management-key authentication and PUT DATA do not drop the authentication."""
    assert card.mgmt_auth() == 0x9000
    assert card.raw(bytes.fromhex("0087009B047C028100"))[1] == 0x9000
    assert card.applet.mgmt.authenticated()
    assert card.send(0xDB, 0x3F, 0xFF, tlv.encode(0x5C, tlv.tag_bytes(0x5FC102)) + tlv.encode(0x53, b"x"))[1] == 0x9000


def test_unknown_challenge_algorithm_is_6a86(card):
    """A challenge for an algorithm that is no management-key algorithm is 6A86 (as before)."""
    assert card.raw(bytes.fromhex("0087079B047C028100"))[1] == 0x6A86


def test_deselect_ends_the_pin_verification(card):
    """deselect() (another application selected by a router) clears the PIN status and the selection; 9A needs a VERIFY again."""
    assert card.verify(PIN) == 0x9000
    card.applet.deselect()
    assert not card.applet.pin_verified and not card.applet.selected
    assert card.verify(None) == 0x6D00  # nothing but SELECT until PIV is selected again
    assert card.select()[1] == 0x9000
    assert card.general_authenticate(0x07, 0x9A, 0x81, _pkcs1_block(bytes(32)))[1] == 0x6982


def test_generate_with_yubikeys_pin_policy_tag(card):
    """GENERATE with AA 01 (yubico-piv-tool --pin-policy=never) sets the slot's policy with the new key; AA 05 is 6A80."""
    assert card.mgmt_auth() == 0x9000
    template = tlv.encode(0xAC, tlv.encode_many([(0x80, b"\x11"), (0xAA, b"\x05")]))
    assert card.get_all(0x47, 0x00, 0x9C, template)[1] == 0x6A80
    template = tlv.encode(0xAC, tlv.encode_many([(0x80, b"\x11"), (0xAA, b"\x01")]))
    assert card.get_all(0x47, 0x00, 0x9C, template)[1] == 0x9000
    from vsc.wire import pinpolicy

    stored = pinpolicy.decode_policy(card.items[(ItemKind.PIN, pinpolicy.POLICY_ITEM)][0])
    assert stored.text() == "9a=once,9c=never,9d=once,9e=never"
    assert card.general_authenticate(0x11, 0x9C, 0x81, bytes(32))[1] == 0x9000  # no VERIFY: never
