"""
The OpenPGP card application without a network: the sans-IO applet
(vsc.protocol.openpgp) behind the application router (vsc.protocol.router)
next to the PIV applet, driven with ``run_sync`` over a dictionary of items,
and the fixed-layout data objects of vsc.wire.openpgp.

Deterministic: key generation hands out fixed keys (the RSA test key of
tests/vectors, a P-256 key from a fixed scalar), randomness is a counter
DRBG, and signatures are checked with ``cryptography`` directly.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import attrs
import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa, x25519
from cryptography.hazmat.primitives.asymmetric.utils import Prehashed, encode_dss_signature

from vsc import crypto
from vsc.protocol import openpgp, pins, piv, router
from vsc.protocol.applet import Clear, EffectFailed, Generate, KeyInfo, Load, Notice, PrivateOp, Store, run_sync
from vsc.wire import apdu, tlv
from vsc.wire import openpgp as wire
from vsc.wire.errors import WireError
from vsc.wire.protected import ItemKind, KeyAlg

SERIAL = "pgp-unit-1"
VECTORS = Path(__file__).parent / "vectors"
AID6 = bytes.fromhex("d27600012401")
PW1 = b"123456"
PW3 = b"12345678"
SHA256_PREFIX = bytes.fromhex("3031300d060960864801650304020105000420")


def _der(key) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


RSA_KEY = serialization.load_pem_private_key((VECTORS / "test-server-key-rsa2048.pem").read_bytes(), None)
EC_KEY = ec.derive_private_key(0x5EED5EED5EED5EED5EED5EED5EED5EED5EED5EED5EED5EED5EED5EED5EED5EED, ec.SECP256R1())
ED_KEY = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
X_KEY = x25519.X25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
FIXED = {KeyAlg.RSA2048: _der(RSA_KEY), KeyAlg.P256: _der(EC_KEY), KeyAlg.ED25519: _der(ED_KEY),
         KeyAlg.X25519: _der(X_KEY)}


class Drbg:
    def __init__(self, seed: bytes = b"openpgp tests"):
        self.seed, self.counter = seed, 0

    def __call__(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            self.counter += 1
            out += hashlib.sha256(self.seed + self.counter.to_bytes(8, "big")).digest()
        return out[:n]


class FakeCard:
    """PIV and OpenPGP behind the router, their effects performed on a dictionary (as vsc.card.vpcd does)."""

    def __init__(self):
        self.items: dict[tuple[ItemKind, str], tuple[bytes, KeyAlg, bytes]] = {}
        self.stores: list[Store] = []
        self.notices: list[Notice] = []
        self.fail_stores = False
        self.rand = Drbg()
        self.pgp = openpgp.OpenPgpApplet(SERIAL, self.rand)
        self.piv = piv.PivApplet(SERIAL, self.rand)
        self.router = router.AppletRouter([(router.piv_matches, self.piv), (openpgp.matches, self.pgp)])

    def perform(self, effect):
        if isinstance(effect, Load):
            item = self.items.get((effect.kind, effect.name))
            if item is None:
                return None
            return effect.derive(item[0]) if effect.derive is not None else item[0]
        if isinstance(effect, Store):
            if self.fail_stores:
                raise EffectFailed("server unreachable", 0x6581)
            self.stores.append(effect)
            self.items[(effect.kind, effect.name)] = (bytes(effect.value), effect.alg, effect.public)
            return None
        if isinstance(effect, KeyInfo):
            item = self.items.get((ItemKind.KEY, effect.slot))
            return (item[1], item[2]) if item else None
        if isinstance(effect, PrivateOp):
            der = self.items[(ItemKind.KEY, effect.slot)][0]
            with crypto.PrivateKeyHandle(der) as key:
                try:
                    if effect.op == "rsa-pkcs1":
                        return crypto.pkcs1_sign_payload(key, effect.data)
                    if effect.op == "rsa-decrypt":
                        return key.decrypt(effect.data, "pkcs1")
                    if effect.op == "ecdsa":
                        return crypto.ecdsa_sign_hash(key, effect.data)
                    if effect.op == "eddsa":
                        return key.eddsa_sign(effect.data)
                    if effect.op == "x25519":
                        return key.x25519(effect.data)
                    return key.ecdh(effect.data)
                except (crypto.CryptoError, ValueError) as e:
                    raise EffectFailed(str(e), 0x6A80) from None
        if isinstance(effect, Generate):
            der = FIXED[effect.alg]
            public = crypto.public_der_of(der)
            self.items[(ItemKind.KEY, effect.slot)] = (der, effect.alg, public)
            return public
        if isinstance(effect, Clear):
            if self.fail_stores:
                raise EffectFailed("server unreachable", 0x6581)
            self.items = {k: v for k, v in self.items.items() if not k[1].startswith(effect.prefix)}
            return None
        if isinstance(effect, Notice):
            self.notices.append(effect)
            return None
        raise AssertionError(effect)

    def raw(self, data: bytes) -> tuple[bytes, int]:
        return apdu.parse_response(run_sync(self.router.process(data), self.perform))

    def send(self, ins, p1=0, p2=0, data=b"", le=None, cla=0, extended=False) -> tuple[bytes, int]:
        return self.raw(apdu.command(cla, ins, p1, p2, data, le, extended))

    def get_all(self, ins, p1=0, p2=0, data=b"", le=256) -> tuple[bytes, int]:
        body, sw = self.send(ins, p1, p2, data, le)
        while sw >> 8 == 0x61:
            more, sw = self.send(0xC0, 0, 0, le=(sw & 0xFF) or 256)
            body += more
        return body, sw

    def select(self) -> int:
        return self.send(0xA4, 0x04, 0x00, AID6)[1]

    def verify(self, ref: int, pin: bytes) -> int:
        return self.send(0x20, 0x00, ref, pin)[1]

    def get_data(self, tag: int) -> tuple[bytes, int]:
        return self.get_all(0xCA, tag >> 8, tag & 0xFF)

    def generate(self, crt: int) -> tuple[bytes, int]:
        return self.get_all(0x47, 0x80, 0x00, bytes([crt, 0]))


@pytest.fixture
def card() -> FakeCard:
    c = FakeCard()
    assert c.select() == 0x9000
    return c


def _app_data(card) -> dict[int, bytes]:
    body, sw = card.get_data(0x6E)
    assert sw == 0x9000
    outer = tlv.to_dict(tlv.decode_one(body, 0x6E))  # the DO with its own tag, as a YubiKey answers
    outer.update(tlv.to_dict(outer.pop(0x73)))
    return outer


def _rsa_public(template: bytes) -> rsa.RSAPublicKey:
    fields = tlv.to_dict(tlv.decode_one(template, 0x7F49))
    return rsa.RSAPublicNumbers(int.from_bytes(fields[0x82], "big"), int.from_bytes(fields[0x81], "big")).public_key()


# ---------------------------------------------------------------- selection and data objects


def test_select_and_aid():
    """Nothing but SELECT answers before the application is selected; the AID is 16 bytes: version 3.4, a serial."""
    c = FakeCard()
    assert c.send(0xCA, 0x00, 0x4F)[1] == 0x6D00  # the PIV applet is current: it does not know GET DATA CA
    assert c.select() == 0x9000
    aid, sw = c.get_data(0x4F)
    assert sw == 0x9000 and len(aid) == 16 and aid[:6] == AID6 and aid[6:8] == b"\x03\x04"
    other = openpgp.OpenPgpApplet("another serial")
    assert other.aid[10:14] != aid[10:14]  # the serial part follows the card's serial


def test_application_related_data(card):
    """6E carries the AID, historical bytes (chaining + extended length), 7F74, C0, RSA-2048 C1-C3, the C4 bytes
    and (inside 73, as on a YubiKey 5) 7F66."""
    d = _app_data(card)
    assert d[0x4F] == card.pgp.aid
    assert d[0x5F52] == bytes.fromhex("00730000e0059000")
    assert d[0x7F74] == bytes.fromhex("810120")
    assert d[0x7F66] == bytes.fromhex("02020bfe02020bfe")
    caps = wire.ExtendedCapsSchema.parse(d[0xC0])
    assert caps.flags & wire.EXT_GET_CHALLENGE and caps.flags & wire.EXT_KEY_IMPORT
    assert d[0xC1] == d[0xC2] == d[0xC3] == bytes.fromhex("010800001100")
    status = wire.parse_pw_status(d[0xC4])
    assert status == wire.PwStatus(False, 8, 32, 32, 3, 3, 3)  # the resetting code is the PUK: its 3 tries
    assert d[0xC5] == bytes(60) and d[0xC6] == bytes(60) and d[0xCD] == bytes(12)


def test_cardholder_and_url_need_pw3_to_write(card):
    """PUT DATA name/URL is refused without PW3; with it they are stored (synced) and read back (65, 5F50)."""
    assert card.send(0xDA, 0x00, 0x5B, b"Doe<<John")[1] == 0x6982
    assert card.verify(0x83, PW3) == 0x9000
    assert card.send(0xDA, 0x00, 0x5B, b"Doe<<John")[1] == 0x9000
    assert card.send(0xDA, 0x5F, 0x50, b"https://example.org/key.asc")[1] == 0x9000
    holder = tlv.to_dict(tlv.decode_one(card.get_data(0x65)[0], 0x65))
    assert holder[0x5B] == b"Doe<<John" and holder[0x5F35] == b"9"
    assert card.get_data(0x5F50) == (b"https://example.org/key.asc", 0x9000)
    assert (ItemKind.DATA, "pgp-do-5b") in card.items
    assert card.send(0xDA, 0x00, 0x5B, b"x" * 40)[1] == 0x6700


# ---------------------------------------------------------------- PINs: one PIN with PIV


def test_pw1_is_the_piv_pin_and_blocks_on_both(card):
    """Three wrong PW1 block it; the PIV VERIFY of the same card then answers 6983 too (one record, one counter)."""
    assert card.verify(0x81, b"000000") == 0x63C2
    assert card.verify(0x82, b"000000") == 0x63C1
    assert card.verify(0x81, b"000000") == 0x63C0
    assert card.verify(0x81, PW1) == 0x6983
    assert wire.parse_pw_status(card.get_data(0xC4)[0]).pw1_tries == 0
    assert card.send(0xA4, 0x04, 0x00, piv.PIV_AID)[1] == 0x9000
    assert card.send(0x20, 0x00, 0x80, apdu.pad_pin(PW1))[1] == 0x6983
    assert apdu.decode_secret(card.items[(ItemKind.PIN, pins.USER_PIN)][0]).tries_left == 0


def test_piv_pin_change_is_pw1(card):
    """A PIN changed through PIV is PW1: the old one is refused by OpenPGP VERIFY, the new one accepted."""
    assert card.send(0xA4, 0x04, 0x00, piv.PIV_AID)[1] == 0x9000
    assert card.send(0x24, 0x00, 0x80, apdu.pad_pin(PW1) + apdu.pad_pin(b"654321"))[1] == 0x9000
    assert card.select() == 0x9000
    assert card.verify(0x82, PW1) == 0x63C2
    assert card.verify(0x82, b"654321") == 0x9000


def test_change_pw1_and_pw3(card):
    """CHANGE REFERENCE DATA: PW1 old||new (the PIV record, FF-padded), PW3 old||new; a wrong old spends a try."""
    assert card.send(0x24, 0x00, 0x81, PW1 + b"13572468")[1] == 0x9000
    assert apdu.decode_secret(card.items[(ItemKind.PIN, pins.USER_PIN)][0]).value == b"13572468"
    assert card.send(0x24, 0x00, 0x81, b"999999" + b"11223344")[1] == 0x63C2
    assert card.verify(0x81, b"13572468") == 0x9000
    assert card.send(0x24, 0x00, 0x81, b"13572468" + b"123")[1] == 0x6A80  # too short a new PW1
    assert card.send(0x24, 0x00, 0x83, PW3 + b"admin-secret")[1] == 0x9000
    assert card.verify(0x83, PW3) == 0x63C2
    assert card.verify(0x83, b"admin-secret") == 0x9000


def test_the_puk_is_the_resetting_code_and_pw3_cannot_reset_pw1(card):
    """The resetting code is the card's PIV PUK (value and counter; C4 shows its tries): RESET RETRY COUNTER
    P1=00 with the PUK sets a new PW1, a wrong one is counted on the PUK. PW3 cannot reset PW1 or set a reset
    code of its own (6985): whoever knows PW3 (public on a new card and after a factory reset) would choose the
    PIV PIN."""
    for _ in range(3):
        card.verify(0x82, b"000000")
    assert wire.parse_pw_status(card.get_data(0xC4)[0]).rc_tries == 3
    assert card.verify(0x83, PW3) == 0x9000
    assert card.send(0x2C, 0x02, 0x81, b"445566")[1] == 0x6985
    assert card.send(0xDA, 0x00, 0xD3, b"resetcode")[1] == 0x6985
    assert card.send(0x2C, 0x00, 0x81, b"87654321" + b"112233")[1] == 0x63C2  # a wrong PUK, counted
    assert wire.parse_pw_status(card.get_data(0xC4)[0]).rc_tries == 2
    assert card.send(0x2C, 0x00, 0x81, pins.DEFAULT_PUK + b"112233")[1] == 0x9000
    assert card.verify(0x82, b"112233") == 0x9000
    assert wire.parse_pw_status(card.get_data(0xC4)[0]).rc_tries == 3


def test_failed_store_compares_nothing(card):
    """When the try cannot be stored VERIFY answers 6581, wrong or right, and the counter is unchanged."""
    card.fail_stores = True
    assert card.verify(0x81, b"000000") == 0x6581
    assert card.verify(0x81, PW1) == 0x6581
    card.fail_stores = False
    assert wire.parse_pw_status(card.get_data(0xC4)[0]).pw1_tries == 3


# ---------------------------------------------------------------- keys and private-key operations


def _gen_rsa(card, crt: int) -> rsa.RSAPublicKey:
    body, sw = card.generate(crt)
    assert sw == 0x9000
    return _rsa_public(body)


def test_generate_needs_pw3_and_returns_the_public_key(card):
    """GENERATE 47 80 needs PW3; the answer is 7F49 {81 n, 82 e} of the new key; 47 81 reads it back."""
    assert card.generate(0xB6)[1] == 0x6982
    assert card.get_all(0x47, 0x81, 0x00, b"\xb6\x00")[1] == 0x6A88
    assert card.verify(0x83, PW3) == 0x9000
    pub = _gen_rsa(card, 0xB6)
    assert pub.public_numbers() == RSA_KEY.public_key().public_numbers()
    assert card.get_all(0x47, 0x81, 0x00, b"\xb6\x00")[0] == card.pgp.public_key_template(
        crypto.public_der_of(FIXED[KeyAlg.RSA2048]))
    assert (ItemKind.KEY, "pgp-sig") in card.items


def test_signature_counter_and_pw1_once(card):
    """PSO:CDS signs a DigestInfo (PKCS#1 v1.5), the counter in 7A counts it; PW1 is valid for one signature."""
    card.verify(0x83, PW3)
    pub = _gen_rsa(card, 0xB6)
    digest = hashlib.sha256(b"message").digest()
    assert card.send(0x2A, 0x9E, 0x9A, SHA256_PREFIX + digest, le=256)[1] == 0x6982
    assert card.verify(0x81, PW1) == 0x9000
    sig, sw = card.send(0x2A, 0x9E, 0x9A, SHA256_PREFIX + digest, le=256)
    assert sw == 0x9000
    pub.verify(sig, digest, padding.PKCS1v15(), Prehashed(hashes.SHA256()))
    assert tlv.to_dict(tlv.decode_one(card.get_data(0x7A)[0], 0x7A))[0x93] == b"\x00\x00\x01"
    assert card.send(0x2A, 0x9E, 0x9A, SHA256_PREFIX + digest, le=256)[1] == 0x6982  # used up
    assert card.send(0xDA, 0x00, 0xC4, b"\x01")[1] == 0x9000  # several signatures per verification
    card.verify(0x81, PW1)
    for _ in range(2):
        assert card.send(0x2A, 0x9E, 0x9A, SHA256_PREFIX + digest, le=256)[1] == 0x9000
    assert tlv.to_dict(tlv.decode_one(card.get_data(0x7A)[0], 0x7A))[0x93] == b"\x00\x00\x03"
    assert wire.parse_pw_status(card.get_data(0xC4)[0]).pw1_multiple is True


def test_pin_blocked_elsewhere_drops_the_verification(card):
    """PW1 verified, then blocked on another path (the record's counter at 0): signing and decryption answer 6983."""
    card.verify(0x83, PW3)
    _gen_rsa(card, 0xB6)
    _gen_rsa(card, 0xB8)
    assert card.verify(0x81, PW1) == 0x9000 and card.verify(0x82, PW1) == 0x9000
    rec = apdu.decode_secret(card.items[(ItemKind.PIN, pins.USER_PIN)][0])
    card.items[(ItemKind.PIN, pins.USER_PIN)] = (apdu.encode_secret(attrs.evolve(rec, tries_left=0)), KeyAlg.NONE, b"")
    assert card.send(0x2A, 0x9E, 0x9A, SHA256_PREFIX + bytes(32), le=256)[1] == 0x6983
    assert card.send(0x2A, 0x80, 0x86, b"\x00" + bytes(256), le=256, extended=True)[1] == 0x6982  # dropped already
    assert tlv.to_dict(tlv.decode_one(card.get_data(0x7A)[0], 0x7A))[0x93] == b"\x00\x00\x00"


def test_counter_is_stored_before_the_signature(card):
    """The incremented counter is a Store that precedes the private-key operation; a failed store signs nothing."""
    card.verify(0x83, PW3)
    _gen_rsa(card, 0xB6)
    card.verify(0x81, PW1)
    card.fail_stores = True
    assert card.send(0x2A, 0x9E, 0x9A, SHA256_PREFIX + bytes(32), le=256)[1] == 0x6581
    card.fail_stores = False
    assert tlv.to_dict(tlv.decode_one(card.get_data(0x7A)[0], 0x7A))[0x93] == b"\x00\x00\x00"


@pytest.mark.parametrize("how", ["extended", "chained"])
def test_decipher_rsa(card, how):
    """PSO:DECIPHER 00 || cryptogram (257 bytes: extended Lc or command chaining) gives the PKCS#1 v1.5 plaintext."""
    card.verify(0x83, PW3)
    pub = _gen_rsa(card, 0xB8)
    ct = pub.encrypt(b"session key", padding.PKCS1v15())
    data = b"\x00" + ct
    assert card.send(0x2A, 0x80, 0x86, data, le=256, extended=True)[1] == 0x6982
    assert card.verify(0x82, PW1) == 0x9000
    if how == "extended":
        assert card.send(0x2A, 0x80, 0x86, data, le=65536, extended=True) == (b"session key", 0x9000)
    else:
        assert card.send(0x2A, 0x80, 0x86, data[:200], cla=0x10)[1] == 0x9000
        assert card.send(0x2A, 0x80, 0x86, data[200:], le=256) == (b"session key", 0x9000)


def test_internal_authenticate_rsa(card):
    """INTERNAL AUTHENTICATE pads what the host sends (type 1) and signs it with the authentication key, PW1 82."""
    card.verify(0x83, PW3)
    pub = _gen_rsa(card, 0xA4)
    challenge = SHA256_PREFIX + hashlib.sha256(b"ssh session").digest()
    assert card.send(0x88, 0, 0, challenge, le=256)[1] == 0x6982
    card.verify(0x82, PW1)
    sig, sw = card.send(0x88, 0, 0, challenge, le=256)
    assert sw == 0x9000
    assert pub.recover_data_from_signature(sig, padding.PKCS1v15(), None) == challenge
    assert card.send(0x88, 0, 0, bytes(103), le=256)[1] == 0x6A80  # over 40 % of the modulus


def test_p256_keys(card):
    """With C1/C2 set to ECDSA/ECDH P-256: the signature is r||s over the hash, DECIPHER is ECDH's shared x."""
    card.verify(0x83, PW3)
    assert card.send(0xDA, 0x00, 0xC1, wire.ec_attributes(wire.ALGO_ECDSA, wire.OID_P256))[1] == 0x9000
    assert card.send(0xDA, 0x00, 0xC2, wire.ec_attributes(wire.ALGO_ECDH, wire.OID_P256))[1] == 0x9000
    assert card.send(0xDA, 0x00, 0xC2, wire.ec_attributes(wire.ALGO_EDDSA, b"\x2b\x06\x01\x04\x01\xda\x47\x0f\x01"))[1] \
        == 0x6A80
    point = tlv.decode_one(tlv.decode_one(card.generate(0xB6)[0], 0x7F49), 0x86)
    pub = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point)
    card.generate(0xB8)
    card.verify(0x81, PW1)
    digest = hashlib.sha256(b"ec").digest()
    sig, sw = card.send(0x2A, 0x9E, 0x9A, digest, le=256)
    assert sw == 0x9000 and len(sig) == 64
    pub.verify(encode_dss_signature(int.from_bytes(sig[:32], "big"), int.from_bytes(sig[32:], "big")), digest,
               ec.ECDSA(Prehashed(hashes.SHA256())))
    eph = ec.generate_private_key(ec.SECP256R1())
    eph_point = eph.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    card.verify(0x82, PW1)
    shared, sw = card.send(0x2A, 0x80, 0x86, tlv.encode(0xA6, tlv.encode(0x7F49, tlv.encode(0x86, eph_point))), le=256)
    assert sw == 0x9000 and shared == eph.exchange(ec.ECDH(), pub)


def test_curve25519_keys(card):
    """Ed25519 (C1, C3) and Cv25519 (C2): the public keys are 32 raw bytes, the signature is Ed25519 over the data,
    DECIPHER is X25519 (with or without GnuPG's 40 prefix); a Curve25519 key import is refused."""
    card.verify(0x83, PW3)
    ed_attr = wire.ec_attributes(wire.ALGO_EDDSA, wire.OID_ED25519)
    assert card.send(0xDA, 0x00, 0xC1, ed_attr + b"\xff")[1] == 0x9000  # an import-format byte is dropped
    assert card.get_data(0xC1)[0] == ed_attr
    assert card.send(0xDA, 0x00, 0xC3, ed_attr)[1] == 0x9000
    assert card.send(0xDA, 0x00, 0xC2, wire.ec_attributes(wire.ALGO_ECDH, wire.OID_CV25519))[1] == 0x9000
    assert card.send(0xDA, 0x00, 0xC2, ed_attr)[1] == 0x6A80  # EdDSA cannot decrypt
    raw = tlv.decode_one(tlv.decode_one(card.generate(0xB6)[0], 0x7F49), 0x86)
    assert raw == ED_KEY.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    card.generate(0xB8)
    card.generate(0xA4)
    card.verify(0x81, PW1)
    digest = hashlib.sha256(b"ed").digest()
    sig, sw = card.send(0x2A, 0x9E, 0x9A, digest, le=256)
    assert sw == 0x9000 and len(sig) == 64
    ED_KEY.public_key().verify(sig, digest)
    card.verify(0x82, PW1)
    ssh_data = bytes(range(200))
    sig, sw = card.send(0x88, 0, 0, ssh_data, le=256)
    assert sw == 0x9000
    ED_KEY.public_key().verify(sig, ssh_data)
    eph = x25519.X25519PrivateKey.from_private_bytes(bytes(range(100, 132)))
    eph_pub = eph.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    expected = eph.exchange(X_KEY.public_key())
    for point in (eph_pub, b"\x40" + eph_pub):
        data = tlv.encode(0xA6, tlv.encode(0x7F49, tlv.encode(0x86, point)))
        assert card.send(0x2A, 0x80, 0x86, data, le=256) == (expected, 0x9000)
    body = tlv.encode(0x4D, tlv.encode_many([(0xB6, b""), (0x7F48, bytes.fromhex("9220")), (0x5F48, bytes(32))]))
    assert card.send(0xDB, 0x3F, 0xFF, body)[1] == 0x6985


def test_key_import_rsa(card):
    """PUT DATA DB 3FFF with the extended header list (e, p, q) imports an RSA key that then signs."""
    nums = RSA_KEY.private_numbers()

    def b(x: int) -> bytes:
        return x.to_bytes((x.bit_length() + 7) // 8, "big")

    e, p, q = b(nums.public_numbers.e), b(nums.p), b(nums.q)
    template = bytes.fromhex("91") + bytes([len(e)]) + bytes.fromhex("928180") + bytes.fromhex("938180")
    body = tlv.encode_many([(0xB6, b""), (0x7F48, template), (0x5F48, e + p + q)])
    data = tlv.encode(0x4D, body)
    assert card.send(0xDB, 0x3F, 0xFF, data, extended=True)[1] == 0x6982
    card.verify(0x83, PW3)
    assert card.send(0xDB, 0x3F, 0xFF, data, extended=True)[1] == 0x9000
    assert card.items[(ItemKind.KEY, "pgp-sig")][2] == crypto.public_der_of(_der(RSA_KEY))
    bad = tlv.encode(0x4D, tlv.encode_many([(0xB6, b""), (0x7F48, template), (0x5F48, e + p)]))
    assert card.send(0xDB, 0x3F, 0xFF, bad, extended=True)[1] == 0x6A80


def test_fingerprints_and_times(card):
    """C7-C9 and CE-D0 take 20 and 4 bytes with PW3 and show up in C5 / CD of 6E."""
    card.verify(0x83, PW3)
    assert card.send(0xDA, 0x00, 0xC8, b"\x11" * 20)[1] == 0x9000
    assert card.send(0xDA, 0x00, 0xCE, b"\x65\x00\x00\x01")[1] == 0x9000
    assert card.send(0xDA, 0x00, 0xC7, b"\x11" * 19)[1] == 0x6A80
    d = _app_data(card)
    assert d[0xC5] == bytes(20) + b"\x11" * 20 + bytes(20)
    assert d[0xCD] == b"\x65\x00\x00\x01" + bytes(8)


def test_get_challenge_uses_the_injected_source(card):
    """GET CHALLENGE returns Le bytes of the card's randomness source (a fresh DRBG's first bytes here)."""
    body, sw = card.send(0x84, 0, 0, le=32)
    assert sw == 0x9000 and body == Drbg()(32)


def test_terminate_and_activate_is_a_factory_reset_that_keeps_the_pin(card):
    """TERMINATE DF needs PW3 (or PW3 blocked); terminated, only ACTIVATE FILE works and SELECT says 6285;
    ACTIVATE removes every OpenPGP item (keys, PW3, data objects) but PW1, the card's PIN, stays as it was."""
    assert card.send(0x24, 0x00, 0x81, PW1 + b"24681357")[1] == 0x9000
    assert card.send(0xE6, 0, 0)[1] == 0x6982
    card.verify(0x83, PW3)
    _gen_rsa(card, 0xB6)
    card.send(0xDA, 0x00, 0x5B, b"Doe<<John")
    card.send(0x24, 0x00, 0x83, PW3 + b"admin-secret")
    assert card.send(0xE6, 0, 0)[1] == 0x9000
    assert card.get_data(0x6E)[1] == 0x6985
    assert card.select() == 0x6285
    assert card.send(0x44, 0, 0)[1] == 0x9000
    assert not any(name.startswith("pgp-") for _kind, name in card.items)
    assert (ItemKind.PIN, pins.USER_PIN) in card.items
    assert card.select() == 0x9000
    assert card.get_all(0x47, 0x81, 0x00, b"\xb6\x00")[1] == 0x6A88
    assert card.verify(0x83, PW3) == 0x9000  # the default admin PIN again
    assert card.verify(0x82, b"24681357") == 0x9000  # the PIN as it was
    assert card.send(0x44, 0, 0)[1] == 0x9000  # not terminated: nothing to do


def test_terminate_once_pw3_is_blocked(card):
    """A holder who lost PW3 blocks it (three wrong tries) and may then TERMINATE DF, as gpg's factory-reset does;
    a failed sync of the factory reset answers 6581 and the application stays terminated."""
    for _ in range(3):
        card.verify(0x83, b"wrong-admin")
    assert card.send(0xE6, 0, 0)[1] == 0x9000
    card.fail_stores = True
    assert card.send(0x44, 0, 0)[1] == 0x6581
    card.fail_stores = False
    assert card.get_data(0x4F)[1] == 0x6985
    assert card.send(0x44, 0, 0)[1] == 0x9000
    assert wire.parse_pw_status(card.get_data(0xC4)[0]).pw3_tries == 3


# ---------------------------------------------------------------- the router


def test_router_unknown_aid_and_deselection(card):
    """An unknown AID is 6A82 and keeps OpenPGP selected; selecting PIV drops OpenPGP's verification."""
    assert card.verify(0x82, PW1) == 0x9000
    assert card.send(0xA4, 0x04, 0x00, bytes.fromhex("a000000527471117"))[1] == 0x6A82
    assert card.verify(0x82, b"") == 0x9000
    assert card.send(0xA4, 0x04, 0x00, piv.PIV_AID)[1] == 0x9000
    assert card.select() == 0x9000
    assert card.verify(0x82, b"") == 0x63C3


def test_router_without_openpgp():
    """A card enrolled with PIV only answers 6A82 to the OpenPGP AID."""
    r = router.AppletRouter([(router.piv_matches, piv.PivApplet(SERIAL, Drbg()))])
    resp = run_sync(r.process(apdu.command(0, 0xA4, 0x04, 0x00, AID6)), lambda e: None)
    assert apdu.parse_response(resp)[1] == 0x6A82


# ---------------------------------------------------------------- wire


def test_wire_forms():
    """PW status, algorithm attributes and the key import template round-trip; malformed input is one WireError."""
    s = wire.PwStatus(True, 8, 32, 32, 3, 0, 2)
    assert wire.parse_pw_status(wire.build_pw_status(s)) == s
    assert wire.parse_attributes(wire.rsa_attributes()) == (wire.ALGO_RSA, 2048)
    assert wire.parse_attributes(wire.ec_attributes(wire.ALGO_ECDSA, wire.OID_P256) + b"\xff") == \
        (wire.ALGO_ECDSA, wire.OID_P256)
    assert wire.ecdsa_raw(1, 2) == (1).to_bytes(32, "big") + (2).to_bytes(32, "big")
    with pytest.raises(WireError):
        wire.parse_pw_status(b"\x00" * 6)
    with pytest.raises(WireError):
        wire.parse_key_import(tlv.encode(0x4D, tlv.encode_many([(0xB6, b""), (0xB8, b""), (0x7F48, b""),
                                                                (0x5F48, b"")])))
    with pytest.raises(WireError):
        wire.decipher_rsa(b"\x02" + bytes(10))
    assert wire.decipher_rsa(b"\x00\x01\x02", 4) == b"\x00\x00\x01\x02"  # GnuPG drops leading zeros
    with pytest.raises(WireError):
        wire.decipher_rsa(b"\x00" + bytes(5), 4)
    u = b"\x40" + bytes(31)  # a key that happens to start with 40 is not a prefixed one
    assert wire.x25519_point(u) == u and wire.x25519_point(b"\x40" + u) == u
    for bad in (bytes(31), b"\x41" + bytes(32), bytes(34)):
        with pytest.raises(WireError):
            wire.x25519_point(bad)


# ---------------------------------------------------------------- the glue and the enrolment choice


def _glue_exchange(session, applications, *apdus: bytes) -> list[tuple[bytes, int]]:
    """Drive PivCard.transmit by hand: none of these APDUs stores anything, so each completes without waiting."""
    from vsc.card import vpcd

    card = vpcd.PivCard(session, Drbg(b"glue"), applications)
    out = []
    for raw in apdus:
        coro = card.transmit(raw)
        try:
            coro.send(None)
        except StopIteration as stop:
            out.append(apdu.parse_response(stop.value))
        else:
            raise AssertionError("the glue waited on something")
    return out


def test_glue_answers_select_only_for_carried_applications(tmp_path):
    """Through vsc.card.vpcd on a real session: OpenPGP answers when carried; a PIV-only card answers 6A82."""
    from tests.cardfakes import MemoryStorage, in_use_session, release
    from vsc.card.config import CardConfig
    from vsc.card.protected import seal_envelope

    envelope = seal_envelope(SERIAL, bytes(32), [], Drbg(b"seal"))
    cfg = CardConfig(home=tmp_path, server="tcp:127.0.0.1:1", server_key="SHA256:unused", serial=SERIAL)
    s = in_use_session(cfg, MemoryStorage(SERIAL, envelope, bytes(32), Drbg(b"load")), Drbg(b"session"))
    try:
        select = apdu.command(0, 0xA4, 0x04, 0x00, AID6)
        (both,) = _glue_exchange(s, ("piv", "openpgp"), select)
        (piv_only,) = _glue_exchange(s, ("piv",), select)
        assert both[1] == 0x9000 and piv_only[1] == 0x6A82
        aid, sw = _glue_exchange(s, ("openpgp",), select, apdu.command(0, 0xCA, 0x00, 0x4F, le=256))[1]
        assert sw == 0x9000 and aid[:6] == AID6
    finally:
        release(s)


def test_applications_setting():
    """card.ini 'applications': parsed in the card's order; an unknown name is one clear error; absent means both."""
    from vsc.card import config as cc

    assert cc.parse_applications("openpgp, PIV") == ("piv", "openpgp")
    with pytest.raises(cc.CardConfigError, match="pkcs15"):
        cc.parse_applications("piv,pkcs15")
    cfg = cc.CardConfig(home=Path("/nonexistent"), server="s", server_key="k", serial="x")
    assert cc.applications_of(cfg) == ("piv", "openpgp")
    assert cc.applications_of(attrs.evolve(cfg, settings={"applications": "openpgp"})) == ("openpgp",)


def test_signature_counter_is_a_rollback_floor():
    """The card's rollback floors (vsc.card.freshness) keep the signature counter: an older, lower copy is
    raised back to it when a rollback is accepted; PW3 and reset-code tries are floors like the PIN's."""
    from vsc.card.freshness import apply_floors, floors_of
    from vsc.card.protected import CardMemory, PlainItem, seal_envelope

    pk = bytes(range(32))

    def memory(count: int, pw3_tries: int) -> CardMemory:
        items = [PlainItem(ItemKind.DATA, openpgp.SIG_COUNTER, wire.encode_sig_counter(count)),
                 PlainItem(ItemKind.PIN, pins.OPENPGP_PW3,
                           apdu.encode_secret(apdu.SecretRecord(b"12345678", pw3_tries, 3)))]
        return CardMemory.load(SERIAL, seal_envelope(SERIAL, pk, items, Drbg(b"seal")), pk)

    floors = floors_of(memory(7, 1))
    old = memory(3, 3)
    assert sorted(apply_floors(old, floors)) == [pins.OPENPGP_PW3, openpgp.SIG_COUNTER]
    with old.open(ItemKind.DATA, openpgp.SIG_COUNTER) as v:
        assert wire.decode_sig_counter(v) == 7
    with old.open(ItemKind.PIN, pins.OPENPGP_PW3) as v:
        assert apdu.decode_secret(v).tries_left == 1
    newer = memory(9, 3)
    assert apply_floors(newer, floors) == [pins.OPENPGP_PW3]  # a higher count stays


def test_enrol_refuses_an_unknown_application(tmp_path):
    """'vsc card enroll --applications piv,bogus' stops with one line naming it, before asking anything."""
    import subprocess
    import sys

    vsc = Path(sys.executable).parent / "vsc"
    proc = subprocess.run([str(vsc), "card", "--home", str(tmp_path / "home"), "enroll", "--server",
                           "tcp:127.0.0.1:1", "--server-key", "SHA256:unused", "--serial", "s-1", "--code", "c",
                           "--applications", "piv,bogus"], capture_output=True, text=True, timeout=60,
                          stdin=subprocess.DEVNULL)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "bogus" in lines[0], proc.stderr
    assert not (tmp_path / "home" / "card.ini").exists()


def _run_now(coro):
    """Drive a coroutine that never has to wait (in-memory storage): its result, or its exception raised."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("the coroutine waited on something")


def test_session_clear_items_is_synced_and_undone_on_failure(tmp_path):
    """CardSession.clear_items('pgp-') removes only pgp- items in one upload; a failed upload restores them."""
    from tests.cardfakes import MemoryStorage, in_use_session, release
    from vsc.card.config import CardConfig
    from vsc.card.protected import CardMemory, PlainItem, seal_envelope
    from vsc.protocol.card_lifecycle import CardError

    items = [PlainItem(ItemKind.DATA, "pgp-do-5b", b"Doe<<John"), PlainItem(ItemKind.DATA, "notes", b"keep"),
             PlainItem(ItemKind.PIN, pins.OPENPGP_PW3, apdu.encode_secret(apdu.SecretRecord(b"12345678", 3, 3))),
             PlainItem(ItemKind.PIN, pins.USER_PIN, apdu.encode_secret(apdu.SecretRecord(apdu.pad_pin(PW1), 3, 3)))]
    envelope = seal_envelope(SERIAL, bytes(32), items, Drbg(b"seal"))
    cfg = CardConfig(home=tmp_path, server="tcp:127.0.0.1:1", server_key="SHA256:unused", serial=SERIAL)
    storage = MemoryStorage(SERIAL, envelope, bytes(32), Drbg(b"load"))
    s = in_use_session(cfg, storage, Drbg(b"session"))
    try:
        names = lambda mem: sorted(name for _k, name, _a, _p in mem.items())  # noqa: E731
        storage.fail_store = "server unreachable"
        with pytest.raises(CardError):
            _run_now(s.clear_items("pgp-"))
        assert names(s.memory) == sorted(["pgp-do-5b", "notes", pins.OPENPGP_PW3, pins.USER_PIN])
        storage.fail_store = None
        assert _run_now(s.clear_items("pgp-")) == 2
        assert names(s.memory) == sorted(["notes", pins.USER_PIN]) and len(storage.stored) == 1
        uploaded = CardMemory.load(SERIAL, storage.stored[-1], bytes(32))
        assert names(uploaded) == sorted(["notes", pins.USER_PIN])
        assert _run_now(s.clear_items("pgp-")) == 0 and len(storage.stored) == 1  # nothing to remove: no upload
    finally:
        release(s)


def test_local_api_keeps_out_of_the_openpgp_items(tmp_path):
    """The local API refuses pgp- names with one line: no signing or decrypting with its keys, no reading or
    writing its data objects (0104 needs PW3 on the card), no stepping a counter named like them."""
    from tests.cardfakes import MemoryStorage, in_use_session, release
    from vsc.card.config import CardConfig
    from vsc.card.protected import PlainItem, seal_envelope
    from vsc.protocol.card_lifecycle import CardError

    items = [PlainItem(ItemKind.DATA, "pgp-do-104", b"admin only"),
             PlainItem(ItemKind.KEY, "pgp-sig", FIXED[KeyAlg.P256], KeyAlg.P256,
                       crypto.public_der_of(FIXED[KeyAlg.P256]))]
    envelope = seal_envelope(SERIAL, bytes(32), items, Drbg(b"seal"))
    cfg = CardConfig(home=tmp_path, server="tcp:127.0.0.1:1", server_key="SHA256:unused", serial=SERIAL)
    storage = MemoryStorage(SERIAL, envelope, bytes(32), Drbg(b"load"))
    s = in_use_session(cfg, storage, Drbg(b"session"))
    try:
        for coro in (s.sign_digest("pgp-sig", bytes(32)), s.decrypt("pgp-dec", bytes(256)), s.data_get("pgp-do-104"),
                     s.data_put("pgp-do-104", b"x"), s.counter("pgp-sig-counter", 1)):
            with pytest.raises(CardError, match="belongs to the OpenPGP application"):
                _run_now(coro)
        assert storage.stored == []
    finally:
        release(s)
