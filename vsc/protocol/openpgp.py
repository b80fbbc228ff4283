"""
The OpenPGP card application (OpenPGP Smart Card Application 3.4, "the
spec") of a Virtual Smart Card, sans-IO, next to PIV on the same card: what
GnuPG's scdaemon (app-openpgp.c) speaks — ``gpg --card-status``,
``gpg --card-edit`` (generate, passwd, name, url, ...), signing, decryption
and ssh authentication through gpg-agent.

``OpenPgpApplet.process(apdu)`` is a generator of effects exactly like
vsc.protocol.piv (vsc.protocol.applet): every key, PIN, counter and data
object is read from the protected information per command, and every change
is a ``Store`` that the glue syncs to the server before the response goes
out. In memory: the selection, the three verification states (PW1 for
signing "81", PW1 for the rest "82", PW3 "83"), the chaining and GET
RESPONSE buffers.

One PIN state: PW1 IS the card's user PIN (vsc.protocol.pins.USER_PIN, the
PIV PIN: same value, same retry counter), so it has 6 to 8 characters (C4
says 8) and a PIN blocked through PIV is blocked here and the other way
round. The resetting code is the card's PIV PUK in the same way (only the
PUK resets the PIV PIN), so RESET RETRY COUNTER takes the PUK and PW3
cannot reset PW1 (P1=02 and PUT DATA D3 answer 6985). PW3 (admin PIN,
default 12345678) is a record of its own (pins.OPENPGP_PW3). All are
checked the shared store-before-answer way (vsc.protocol.pins.check_secret).

Keys: signature (B6, item "pgp-sig"), decryption (B8, "pgp-dec"),
authentication (A4, "pgp-aut"), RSA-2048, NIST P-256 (ECDSA / ECDH) or
Curve25519 (Ed25519 / Cv25519): algorithm attributes C1-C3, changeable
with PW3. Instructions: SELECT, GET DATA (CA),
PUT DATA (DA, and DB with the extended header list for key import), VERIFY
(20), CHANGE REFERENCE DATA (24), RESET RETRY COUNTER (2C), GENERATE
ASYMMETRIC KEY PAIR (47), PSO (2A: COMPUTE DIGITAL SIGNATURE 9E9A and
DECIPHER 8086), INTERNAL AUTHENTICATE (88), GET CHALLENGE (84), GET RESPONSE
(C0), SELECT DATA (A5: the certificate of each key), YubiKey's GET VERSION
(F1), TERMINATE DF (E6) and ACTIVATE FILE (44): the factory reset GnuPG's
``factory-reset`` performs, which removes every item of the application but
not PW1 (the card's PIN). Command chaining and extended lengths both work
(historical bytes).

Identity: the data objects answer as a YubiKey 5's (5F52, C0, 7F74, 7F66,
F9, RSA attributes with e length 17), and the AID is a YubiKey's
(manufacturer 0006, serial in BCD) stored with the card's first key; a card
that held keys before keeps its FF56 AID, which GnuPG's key stubs name
(aid_for).

One responsibility (and so one module despite its length): the OpenPGP card application.
"""

from __future__ import annotations

from typing import Any, Generator

from vsc import crypto
from vsc.protocol import pins
from vsc.protocol.applet import (
    CommandFront,
    SW_BLOCKED,
    SW_CONDITIONS,
    SW_INS,
    SW_NOT_FOUND,
    SW_OK,
    SW_REF_NOT_FOUND,
    SW_SECURITY,
    SW_WRONG_DATA,
    SW_WRONG_LENGTH,
    SW_WRONG_P1P2,
    Clear,
    Effect,
    Generate,
    KeyInfo,
    Load,
    Notice,
    PrivateOp,
    Step,
    Store,
)
from vsc.wire import apdu, tlv
from vsc.wire import openpgp as wire
from vsc.wire.apdu import ApduError, Command, SecretRecord
from vsc.wire.errors import WireError
from vsc.wire.protected import ItemKind, KeyAlg

INS_SELECT = 0xA4
INS_GET_DATA = 0xCA
INS_PUT_DATA = 0xDA
INS_PUT_DATA_ODD = 0xDB
INS_VERIFY = 0x20
INS_CHANGE = 0x24
INS_RESET_RETRY = 0x2C
INS_GENERATE = 0x47
INS_PSO = 0x2A
INS_INTERNAL_AUTH = 0x88
INS_GET_CHALLENGE = 0x84
INS_GET_RESPONSE = 0xC0
INS_TERMINATE = 0xE6
INS_ACTIVATE = 0x44
INS_SELECT_DATA = 0xA5  # which occurrence of 7F21 (one per key) GET DATA and PUT DATA use
INS_GET_VERSION = 0xF1  # YubiKey: the firmware version, as PIV's INS FD reports it
SW_TERMINATED = 0x6285  # SELECT: the application is in its termination state

CHAINABLE = frozenset({INS_PUT_DATA, INS_PUT_DATA_ODD, INS_VERIFY, INS_CHANGE, INS_RESET_RETRY, INS_PSO,
                       INS_INTERNAL_AUTH, INS_GENERATE})
#: 7F66 and C0 as a YubiKey 5 states them (7F66 02 02 0B FE 02 02 0B FE; C0 7D 00 0B FE 08 00 00 FF 00 00: a
#: YubiKey 5 NFC's application related data in the openpgp-card crate's test_tlv_yubi5, src/tlv.rs)
MAX_COMMAND = 0x0BFE
MAX_RESPONSE = 0x0BFE
MAX_CHAIN = 4 * 1024
MAX_CHALLENGE = 0x0BFE
MAX_CERT = 0x0800
MAX_SPECIAL = 0x00FF

PW1, PW1_OTHER, PW3 = 0x81, 0x82, 0x83
PW1_MAX = 8  # the PIV PIN's limit: PW1 is that PIN
PW1_MIN = 6
PW3_MIN, PW3_MAX = 8, 32
RC_MAX = 32  # C4's maximum resetting-code length (the resetting code is the PUK: 8)
DEFAULT_PW1 = b"123456"
DEFAULT_PW3 = b"12345678"
DEFAULT_TRIES = pins.DEFAULT_TRIES

ROLES = ("sig", "dec", "aut")
CRT_ROLE = {0xB6: "sig", 0xB8: "dec", 0xA4: "aut"}
ATTR_TAG = {"sig": 0xC1, "dec": 0xC2, "aut": 0xC3}
FPR_TAG = {"sig": 0xC7, "dec": 0xC8, "aut": 0xC9}
CA_FPR_TAG = {"sig": 0xCA, "dec": 0xCB, "aut": 0xCC}
TIME_TAG = {"sig": 0xCE, "dec": 0xCF, "aut": 0xD0}
TAG_ROLE_ATTR = {v: k for k, v in ATTR_TAG.items()}
TAG_ATTR_ATT = 0xDA  # the attestation key's algorithm attributes (YubiKey); listed in FA only

TAG_AID, TAG_LOGIN, TAG_CARDHOLDER, TAG_APP_DATA, TAG_SECURITY = 0x4F, 0x5E, 0x65, 0x6E, 0x7A
TAG_NAME, TAG_LANG, TAG_SEX, TAG_URL, TAG_HIST = 0x5B, 0x5F2D, 0x5F35, 0x5F50, 0x5F52
TAG_CERT, TAG_EXT_LEN, TAG_EXT_CAPS, TAG_PW_STATUS = 0x7F21, 0x7F66, 0xC0, 0xC4
TAG_FPRS, TAG_CA_FPRS, TAG_TIMES, TAG_RC, TAG_SIG_COUNT = 0xC5, 0xC6, 0xCD, 0xD3, 0x93
#: general feature management (spec 4.1.3.2): 81 01 20, "button", as a YubiKey 5 answers (and as the second byte
#: of D6-D8 already said); GnuPG's scdaemon reads it for has_button ("It must be: 03 81 01 20")
TAG_FEATURES = 0x7F74
FEATURES = tlv.encode(0x81, b"\x20")
#: the KDF data object (spec 4.3.2): "81 01 00", no KDF (GnuPG card-util kdf_setup "off", yubikit KdfNone). PW1 is
#: the PIV PIN, which PIV tools send as typed: it cannot become a KDF hash, so F9 is never changed (PUT DATA 6985)
TAG_KDF = 0xF9
KDF_NONE = tlv.encode(0x81, b"\x00")
#: SELECT DATA's occurrences of 7F21 (spec 7.2.5): 00 authentication, 01 decryption, 02 signature key
CERT_OCCURRENCES = 3
TAG_ALGO_INFO = 0xFA  # algorithm information (spec 4.4.3.11): the attributes each key may take
TAG_KEY_INFO = 0xDE  # key information (spec 4.4.3.11): key reference, status (00 none, 01 generated, 02 imported)
KEY_REF = {"sig": 0x01, "dec": 0x02, "aut": 0x03}
KEY_NONE, KEY_GENERATED, KEY_IMPORTED = 0x00, 0x01, 0x02
#: user interaction flags D6-D8 (YubiKey): touch off, the card's feature a button (7F74 81 20), as a YubiKey answers
#: with touch never set; this card has no button, so none is ever asked
UIF_TAG = {"sig": 0xD6, "dec": 0xD7, "aut": 0xD8}
UIF_OFF = b"\x00\x20"
PRIVATE_DOS = (0x0101, 0x0102, 0x0103, 0x0104)

#: stored data objects (an item "pgp-do-<tag>" each): the largest value PUT DATA accepts
WRITABLE = {
    TAG_NAME: 39, TAG_LANG: 8, TAG_SEX: 1, TAG_URL: 255, TAG_LOGIN: 254, TAG_CERT: MAX_CERT,
    **{t: MAX_SPECIAL for t in PRIVATE_DOS},
    **{t: 20 for t in FPR_TAG.values()}, **{t: 20 for t in CA_FPR_TAG.values()},
    **{t: 4 for t in TIME_TAG.values()},
}
#: who may write (PW1 "82" or PW3 "83") and read (None: anyone) what
WRITE_ACCESS = {0x0101: PW1_OTHER, 0x0103: PW1_OTHER}
READ_ACCESS = {0x0103: PW1_OTHER, 0x0104: PW3}

SIG_COUNTER = "pgp-sig-counter"
#: the AID the card answered when its first OpenPGP key was made (16 bytes): GnuPG keys its stubs by the full AID
#: (agent/divert-scd.c ask_for_card compares it with strcmp), so it never changes under a key (see aid_for)
AID_ITEM = "pgp-aid"
TERMINATED = "pgp-terminated"
#: ACTIVATE FILE after TERMINATE DF removes every item of the application (keys, PW3, reset code, data objects,
#: counter); PW1 stays: it is the card's one user PIN, shared with PIV, and must not come back to a default
ITEM_PREFIX = "pgp-"
PW1_POLICY = "pgp-pw1-policy"  # C4 first byte: 00 one PSO:CDS per verification, 01 several
IMPORTED = "pgp-imported"  # the key references (one byte each) whose key was imported; any other key was generated


def do_name(tag: int) -> str:
    return f"pgp-do-{tag:x}"


def cert_name(occurrence: int) -> str:
    """7F21's item: occurrence 00 (the authentication key's, the one GET DATA reads without SELECT DATA) keeps
    the name of the single 7F21 before SELECT DATA existed."""
    return do_name(TAG_CERT) if occurrence == 0 else f"{do_name(TAG_CERT)}-{occurrence}"


def key_name(role: str) -> str:
    return f"pgp-{role}"


def attr_name(role: str) -> str:
    return f"pgp-attr-{role}"


#: the algorithms each key role may have: (algorithm id, RSA bits or curve OID) -> key kind
_ALGORITHMS = {
    "sig": {(wire.ALGO_RSA, 2048): KeyAlg.RSA2048, (wire.ALGO_ECDSA, wire.OID_P256): KeyAlg.P256,
            (wire.ALGO_EDDSA, wire.OID_ED25519): KeyAlg.ED25519},
    "dec": {(wire.ALGO_RSA, 2048): KeyAlg.RSA2048, (wire.ALGO_ECDH, wire.OID_P256): KeyAlg.P256,
            (wire.ALGO_ECDH, wire.OID_CV25519): KeyAlg.X25519},
}
_ALGORITHMS["aut"] = _ALGORITHMS["sig"]


def attributes_alg(role: str, raw: bytes) -> KeyAlg | None:
    """The key kind algorithm attributes ``raw`` name for ``role``, or None when the card does not do them."""
    try:
        return _ALGORITHMS[role].get(wire.parse_attributes(raw))
    except WireError:
        return None


def canonical_attributes(alg: KeyAlg, role: str) -> bytes:
    """The attributes the card shows for a key kind (RSA with its import format; ECC without one)."""
    for (algo, param), kind in _ALGORITHMS[role].items():
        if kind is alg:
            return wire.rsa_attributes(param) if algo == wire.ALGO_RSA else wire.ec_attributes(algo, param)
    raise ValueError(f"{alg!r} is not a {role} algorithm")


def algorithm_information() -> bytes:
    """
    FA: C1/C2/C3 entries, the attributes PUT DATA accepts for each key (RSA-2048 as yubikit writes it, e length
    17), then what a YubiKey before firmware 5.6.1 lists besides and yubikit (get_algorithm_information) removes
    with list.remove, failing if one is missing: X25519 under EdDSA in every list, Ed25519 in the decryption and
    attestation (DA) lists. This card has no attestation key: DA holds nothing else.
    """
    eddsa_ed25519 = wire.ec_attributes(wire.ALGO_EDDSA, wire.OID_ED25519)
    eddsa_x25519 = wire.ec_attributes(wire.ALGO_EDDSA, wire.OID_CV25519)
    entries = []
    for role in ROLES:
        listed = [wire.rsa_attributes(param, e_bits=17) if algo == wire.ALGO_RSA else wire.ec_attributes(algo, param)
                  for algo, param in _ALGORITHMS[role]]
        if eddsa_ed25519 not in listed:
            listed.append(eddsa_ed25519)
        entries += [(ATTR_TAG[role], a) for a in listed + [eddsa_x25519]]
    entries += [(TAG_ATTR_ATT, eddsa_ed25519), (TAG_ATTR_ATT, eddsa_x25519)]
    return tlv.encode(TAG_ALGO_INFO, b"".join(tlv.encode(t, v) for t, v in entries))


def legacy_aid(serial: str) -> bytes:
    """The AID of cards made before the Yubico form: manufacturer FF56, 4 bytes of SHA-256 over the card's serial."""
    return wire.build_aid(crypto.sha256(b"vsc openpgp\x00" + serial.encode())[:4], wire.MANUFACTURER_LEGACY)


def yubikey_serial(serial: str) -> int:
    """
    The card's serial number as a YubiKey's, at most 8 decimal digits: the number the PIV application's GET SERIAL
    (INS F8) answers (vsc.protocol.piv: SHA-256 of "vsc piv serial" and the card's serial, 31 bits) reduced to 8
    digits. Equal to it when it has 8 digits or fewer, as a YubiKey's OpenPGP and PIV serials are equal.
    """
    number = int.from_bytes(crypto.sha256(b"vsc piv serial\x00" + serial.encode())[:4], "big") & 0x7FFFFFFF
    return number % (wire.MAX_BCD_SERIAL + 1)


def yubico_aid(serial: str) -> bytes:
    """A YubiKey 5's AID: version 3.4, manufacturer 0006 (Yubico), the serial number in BCD (yubikey_serial)."""
    return wire.build_aid(wire.bcd_serial(yubikey_serial(serial)), wire.MANUFACTURER)


def aid_for(serial: str, stored: bytes | None, has_key: bool) -> bytes:
    """
    The AID a card answers: the one stored when its first key was made; else, a card holding a key made before
    the AID was stored keeps the legacy AID (its holder's GnuPG key stubs name it: another AID would leave gpg
    asking for "the card with serial number FF56 ..." until ``learn --force``); a card without a key takes the
    Yubico form.
    """
    if stored:
        try:
            wire.parse_aid(stored)
            return bytes(stored)
        except WireError:
            pass
    return legacy_aid(serial) if has_key else yubico_aid(serial)


def matches(aid: bytes) -> bool:
    """SELECT names the OpenPGP application with its RID/application (6 bytes) up to the full 16-byte AID."""
    return 6 <= len(aid) <= 16 and aid.startswith(wire.RID_APP)


class OpenPgpApplet(CommandFront):
    """One card's OpenPGP application: a dispatcher over the instructions, volatile state only."""

    CHAINABLE = CHAINABLE
    MAX_CHAIN = MAX_CHAIN

    def __init__(self, serial: str, rand: crypto.RandomBytes = crypto.system_random,
                 version: tuple[int, int, int] = (5, 4, 3)):
        self.serial = serial
        self.rand = rand
        self.version = version  # the firmware version GET VERSION answers: the PIV applet's default
        self.selected = False
        self.terminated = False
        self.verified: set[int] = set()
        self.cert_occurrence = 0
        self._chain: tuple[tuple[int, int, int], bytearray] | None = None
        self._out: bytes = b""
        self._out_pos = 0
        self._static: dict[str, bytes] = {}
        self.aid = yubico_aid(serial)  # until SELECT reads which AID this card has (aid_for)

    def reset(self) -> None:
        """Power off, reset, another application selected: the security status and buffers are cleared."""
        self.selected = False
        self.verified.clear()
        self.cert_occurrence = 0
        self._chain = None
        self._out, self._out_pos = b"", 0

    # ---------------------------------------------------------------- entry point (as vsc.protocol.piv)

    # process(): applet.CommandFront (parsing, class byte, GET RESPONSE, chaining, then _dispatch)

    def _dispatch(self, cmd: Command, data: bytes) -> Step:
        if cmd.ins == INS_SELECT:
            return (yield from self._select(cmd, data))
        if not self.selected:
            return b"", SW_INS
        if cmd.ins == INS_ACTIVATE:
            return (yield from self._activate(cmd, data))
        if self.terminated:
            return b"", SW_CONDITIONS  # nothing but ACTIVATE FILE in the termination state
        handler = {
            INS_GET_DATA: self._get_data,
            INS_PUT_DATA: self._put_data,
            INS_PUT_DATA_ODD: self._put_data_odd,
            INS_VERIFY: self._verify,
            INS_CHANGE: self._change,
            INS_RESET_RETRY: self._reset_retry,
            INS_GENERATE: self._generate,
            INS_PSO: self._pso,
            INS_INTERNAL_AUTH: self._internal_authenticate,
            INS_GET_CHALLENGE: self._get_challenge,
            INS_TERMINATE: self._terminate,
            INS_GET_VERSION: self._get_version,
            INS_SELECT_DATA: self._select_data,
        }.get(cmd.ins)
        if handler is None:
            return b"", SW_INS
        return (yield from handler(cmd, data))

    # ---------------------------------------------------------------- SELECT

    def _select(self, cmd: Command, data: bytes) -> Step:
        if cmd.p1 != 0x04 or cmd.p2 not in (0x00, 0x0C):
            return b"", SW_WRONG_P1P2
        if not matches(data):
            return b"", SW_NOT_FOUND
        self.aid = yield from self._current_aid()
        if not self.aid.startswith(data):
            return b"", SW_NOT_FOUND
        self.selected = True
        self.verified.clear()
        self.cert_occurrence = 0
        self.terminated = bool((yield Load(ItemKind.DATA, TERMINATED)))
        return b"", SW_TERMINATED if self.terminated else SW_OK

    def _current_aid(self) -> Generator[Effect, Any, bytes]:
        stored = yield Load(ItemKind.DATA, AID_ITEM)
        if stored:
            return aid_for(self.serial, bytes(stored), True)
        has_key = False
        for role in ROLES:
            has_key = has_key or (yield KeyInfo(key_name(role))) is not None
        return aid_for(self.serial, None, has_key)

    def _keep_aid(self) -> Generator[Effect, Any, None]:
        """Before a key is made: store the AID the card answers, once, so that it stays under the key."""
        stored = yield Load(ItemKind.DATA, AID_ITEM)
        if not stored:
            yield Store(ItemKind.DATA, AID_ITEM, self.aid)

    # ---------------------------------------------------------------- TERMINATE DF / ACTIVATE FILE (factory reset)

    def _terminate(self, cmd: Command, data: bytes) -> Step:
        """TERMINATE DF: with PW3 verified, or once PW3 is blocked (so a holder who lost it can start over)."""
        if (cmd.p1, cmd.p2) != (0x00, 0x00) or data:
            return b"", SW_WRONG_P1P2 if cmd.p1 or cmd.p2 else SW_WRONG_DATA
        if PW3 not in self.verified:
            pw3 = yield from self._pw3()
            if pw3.tries_left:
                return b"", SW_SECURITY
        yield Store(ItemKind.DATA, TERMINATED, b"\x01")
        self.terminated = True
        self.verified.clear()
        yield Notice("terminated", {"application": "openpgp"})
        return b"", SW_OK

    def _activate(self, cmd: Command, data: bytes) -> Step:
        """ACTIVATE FILE: in the termination state, the factory reset (every "pgp-" item removed); else nothing."""
        if (cmd.p1, cmd.p2) != (0x00, 0x00):
            return b"", SW_WRONG_P1P2
        if not self.terminated:
            return b"", SW_OK
        yield Clear(ITEM_PREFIX)
        self.terminated = False
        self.verified.clear()
        self.aid = yield from self._current_aid()  # no key left: the Yubico form from now on
        yield Notice("factory-reset", {"application": "openpgp"})
        return b"", SW_OK

    # ---------------------------------------------------------------- secrets

    def _pw1(self) -> Generator[Effect, Any, SecretRecord]:
        return (yield from pins.load_secret(pins.USER_PIN, apdu.pad_pin(DEFAULT_PW1)))

    def _pw3(self) -> Generator[Effect, Any, SecretRecord]:
        return (yield from pins.load_secret(pins.OPENPGP_PW3, DEFAULT_PW3))

    def _rc(self) -> Generator[Effect, Any, SecretRecord]:
        """
        The resetting code is the card's PIV PUK, its value and its counter,
        as PW1 is its PIV PIN: only the PUK resets the PIV PIN (SP 800-73-4).
        An OpenPGP reset code of its own, set with PW3, would let whoever
        knows PW3 choose the PIV PIN, and PW3 is public on a new card and
        after a factory reset, which anyone can start by blocking PW3.
        """
        return (yield from pins.load_secret(pins.PUK, apdu.pad_pin(pins.DEFAULT_PUK)))

    @staticmethod
    def _pw1_block(pin: bytes) -> bytes | None:
        """PW1 as the PIV PIN record holds it (8 bytes, FF padded), or None if it cannot be a PIN."""
        if not 1 <= len(pin) <= PW1_MAX or b"\xff" in pin:
            return None
        return apdu.pad_pin(pin)

    def _check(self, ref: int, value: bytes) -> Generator[Effect, Any, SecretRecord | int]:
        """PW1 or PW3 checked the shared store-before-answer way: the record, or the status word to answer."""
        if ref == PW3:
            return (yield from pins.check_secret(pins.OPENPGP_PW3, value, DEFAULT_PW3, "admin-pin"))
        block = self._pw1_block(value)
        if block is None:
            return SW_WRONG_DATA
        return (yield from pins.check_secret(pins.USER_PIN, block, apdu.pad_pin(DEFAULT_PW1), "pin"))

    def _verify(self, cmd: Command, data: bytes) -> Step:
        if cmd.p2 not in (PW1, PW1_OTHER, PW3):
            return b"", SW_REF_NOT_FOUND
        if cmd.p1 == 0xFF:  # reset the verification status (spec 7.2.2)
            if data:
                return b"", SW_WRONG_DATA
            self.verified.discard(cmd.p2)
            return b"", SW_OK
        if cmd.p1 != 0x00:
            return b"", SW_WRONG_P1P2
        if not data:  # status; PW1 blocked on another path (it is the card's PIN) is 6983 even after a VERIFY here
            rec = yield from (self._pw3() if cmd.p2 == PW3 else self._pw1())
            if rec.tries_left == 0:
                if cmd.p2 != PW3:
                    self.verified.difference_update((PW1, PW1_OTHER))
                return b"", SW_BLOCKED
            if cmd.p2 in self.verified:
                return b"", SW_OK
            return b"", 0x63C0 | min(rec.tries_left, 15)
        self.verified.discard(cmd.p2)
        result = yield from self._check(PW3 if cmd.p2 == PW3 else PW1, data)
        if isinstance(result, int):
            return b"", result
        self.verified.add(cmd.p2)
        return b"", SW_OK

    def _new_pw1(self, value: bytes) -> bytes:
        if not PW1_MIN <= len(value) <= PW1_MAX or b"\xff" in value:
            raise ApduError(SW_WRONG_DATA, "PW1 has 6 to 8 characters")
        return apdu.pad_pin(value)

    def _change(self, cmd: Command, data: bytes) -> Step:
        if cmd.p1 != 0x00 or cmd.p2 not in (PW1, PW3):
            return b"", SW_WRONG_P1P2 if cmd.p1 else SW_REF_NOT_FOUND
        if cmd.p2 == PW1:
            rec = yield from self._pw1()
            try:
                old_len = len(apdu.unpad_pin(rec.value))
            except WireError:
                old_len = len(rec.value)
        else:
            rec = yield from self._pw3()
            old_len = len(rec.value)
        old, new = data[:old_len], data[old_len:]
        # the old value is checked (and a try spent) before the new one is looked at: the answer never tells
        # the length of the current PIN for free
        result = yield from self._check(cmd.p2, old)
        if isinstance(result, int):
            self.verified.discard(cmd.p2)
            if cmd.p2 == PW1:
                self.verified.difference_update((PW1, PW1_OTHER))
            return b"", result
        if cmd.p2 == PW1:
            yield from pins.store_secret(pins.USER_PIN, SecretRecord(self._new_pw1(new), result.max_tries,
                                                                     result.max_tries))
            yield Notice("pin-changed", {"application": "openpgp"})
        else:
            if not PW3_MIN <= len(new) <= PW3_MAX:
                return b"", SW_WRONG_DATA
            yield from pins.store_secret(pins.OPENPGP_PW3, SecretRecord(new, result.max_tries, result.max_tries))
            yield Notice("admin-pin-changed", {})
        return b"", SW_OK

    def _reset_retry(self, cmd: Command, data: bytes) -> Step:
        if cmd.p2 != PW1 or cmd.p1 not in (0x00, 0x02):
            return b"", SW_WRONG_P1P2
        if cmd.p1 == 0x02:  # with PW3: refused, PW3 does not reset the card's PIN (see _rc)
            return b"", SW_CONDITIONS
        # the resetting code (the PUK: its length as stored, without the FF padding) || the new PW1: PIV's unblock
        rc = yield from self._rc()
        length = len(rc.value.rstrip(b"\xff")) or len(rc.value)
        sw = yield from pins.unblock_pin(data[:length], data[length:])
        if sw != SW_OK:
            return b"", sw
        self.verified.difference_update((PW1, PW1_OTHER))
        return b"", SW_OK

    # ---------------------------------------------------------------- data objects

    def _load_do(self, tag: int) -> Generator[Effect, Any, bytes]:
        raw = yield Load(ItemKind.DATA, do_name(tag))
        return bytes(raw) if raw else b""

    def _attributes(self, role: str) -> Generator[Effect, Any, bytes]:
        """C1-C3 in the form a YubiKey answers: stored attributes of a card from before (RSA with e length 32)
        are shown as the key kind's canonical attributes (RSA: e length 17)."""
        raw = yield Load(ItemKind.DATA, attr_name(role))
        alg = attributes_alg(role, bytes(raw)) if raw else None
        return canonical_attributes(alg, role) if alg is not None else wire.rsa_attributes(2048)

    def _pw_status(self) -> Generator[Effect, Any, bytes]:
        policy = yield Load(ItemKind.DATA, PW1_POLICY)
        pw1 = yield from self._pw1()
        rc = yield from self._rc()
        pw3 = yield from self._pw3()
        return wire.build_pw_status(wire.PwStatus(
            pw1_multiple=bool(policy) and bytes(policy) == b"\x01", pw1_max=PW1_MAX, rc_max=RC_MAX, pw3_max=PW3_MAX,
            pw1_tries=pw1.tries_left, rc_tries=rc.tries_left, pw3_tries=pw3.tries_left))

    def _sig_count(self) -> Generator[Effect, Any, int]:
        raw = yield Load(ItemKind.DATA, SIG_COUNTER)
        return wire.decode_sig_counter(raw) if raw else 0

    def _concat(self, tags: dict[str, int], size: int) -> Generator[Effect, Any, bytes]:
        values = []
        for role in ROLES:
            values.append((yield from self._load_do(tags[role])))
        return wire.per_key(values, size)

    def _cardholder(self) -> Generator[Effect, Any, bytes]:
        parts = []
        for tag in (TAG_NAME, TAG_LANG, TAG_SEX):
            value = yield from self._load_do(tag)
            if tag == TAG_SEX and not value:
                value = b"9"  # not announced (ISO 5218)
            parts.append((tag, value))
        return tlv.encode_many(parts)

    def extended_capabilities(self) -> bytes:
        flags = (wire.EXT_GET_CHALLENGE | wire.EXT_KEY_IMPORT | wire.EXT_PW_STATUS_CHANGE | wire.EXT_PRIVATE_DOS
                 | wire.EXT_ALGO_ATTR_CHANGE | wire.EXT_KDF)
        return wire.extended_capabilities(flags, MAX_CHALLENGE, MAX_CERT, MAX_SPECIAL)

    def _discretionary(self) -> Generator[Effect, Any, bytes]:
        parts = [(TAG_EXT_CAPS, self._cached("caps", self.extended_capabilities))]
        for role in ROLES:
            parts.append((ATTR_TAG[role], (yield from self._attributes(role))))
        parts.append((TAG_PW_STATUS, (yield from self._pw_status())))
        parts.append((TAG_FPRS, (yield from self._concat(FPR_TAG, 20))))
        parts.append((TAG_CA_FPRS, (yield from self._concat(CA_FPR_TAG, 20))))
        parts.append((TAG_TIMES, (yield from self._concat(TIME_TAG, 4))))
        parts.append((TAG_KEY_INFO, (yield from self._key_information())))
        parts.append((TAG_EXT_LEN, wire.extended_length_info(MAX_COMMAND, MAX_RESPONSE)))
        parts.extend((UIF_TAG[role], UIF_OFF) for role in ROLES)
        return tlv.encode_many(parts)

    def _imported(self) -> Generator[Effect, Any, bytes]:
        raw = yield Load(ItemKind.DATA, IMPORTED)
        return bytes(raw) if raw else b""

    def _set_origin(self, role: str, imported: bool) -> Generator[Effect, Any, None]:
        """Record whether ``role``'s key was imported (DE's status); stored only when it changes."""
        marked = yield from self._imported()
        ref = KEY_REF[role]
        if (ref in marked) != imported:
            refs = (set(marked) | {ref}) if imported else (set(marked) - {ref})
            yield Store(ItemKind.DATA, IMPORTED, bytes(sorted(refs)))

    def _key_information(self) -> Generator[Effect, Any, bytes]:
        """DE: 01 st 02 st 03 st, st 00 no key, 01 generated on the card, 02 imported."""
        marked = yield from self._imported()
        out = bytearray()
        for role in ROLES:
            info = yield KeyInfo(key_name(role))
            ref = KEY_REF[role]
            out += bytes([ref, KEY_NONE if info is None else KEY_IMPORTED if ref in marked else KEY_GENERATED])
        return bytes(out)

    def _application_data(self) -> Generator[Effect, Any, bytes]:
        # the order and places of a YubiKey 5's 6E: 7F74 beside the AID, 7F66 inside 73 after DE
        return tlv.encode_many([
            (TAG_AID, self.aid),
            (TAG_HIST, wire.historical_bytes()),
            (TAG_FEATURES, FEATURES),
            (0x73, (yield from self._discretionary())),
        ])

    def _get_data(self, cmd: Command, data: bytes) -> Step:
        tag = (cmd.p1 << 8) | cmd.p2
        if tag in READ_ACCESS and READ_ACCESS[tag] not in self.verified:
            return b"", SW_SECURITY
        if tag == TAG_AID:
            return self.aid, SW_OK
        # a constructed DO answers with its own tag and length, as a YubiKey does (yubikit Tlv.unpack()s 6E, 65, 7A)
        if tag == TAG_APP_DATA:
            return tlv.encode(TAG_APP_DATA, (yield from self._application_data())), SW_OK
        if tag == TAG_CARDHOLDER:
            return tlv.encode(TAG_CARDHOLDER, (yield from self._cardholder())), SW_OK
        if tag == TAG_SECURITY:
            count = yield from self._sig_count()
            return tlv.encode(TAG_SECURITY, tlv.encode(TAG_SIG_COUNT, wire.encode_sig_counter(count))), SW_OK
        if tag == TAG_HIST:
            return wire.historical_bytes(), SW_OK
        if tag == TAG_EXT_LEN:
            return wire.extended_length_info(MAX_COMMAND, MAX_RESPONSE), SW_OK
        if tag == TAG_EXT_CAPS:
            return self._cached("caps", self.extended_capabilities), SW_OK
        if tag == TAG_PW_STATUS:
            return (yield from self._pw_status()), SW_OK
        if tag in TAG_ROLE_ATTR:
            return (yield from self._attributes(TAG_ROLE_ATTR[tag])), SW_OK
        if tag == TAG_FPRS:
            return (yield from self._concat(FPR_TAG, 20)), SW_OK
        if tag == TAG_CA_FPRS:
            return (yield from self._concat(CA_FPR_TAG, 20)), SW_OK
        if tag == TAG_TIMES:
            return (yield from self._concat(TIME_TAG, 4)), SW_OK
        if tag in UIF_TAG.values():
            return UIF_OFF, SW_OK
        if tag == TAG_FEATURES:
            return FEATURES, SW_OK
        if tag == TAG_KDF:
            return KDF_NONE, SW_OK
        if tag == TAG_ALGO_INFO:
            return self._cached("algorithm-information", algorithm_information), SW_OK
        if tag == TAG_CERT:
            raw = yield Load(ItemKind.DATA, cert_name(self.cert_occurrence))
            return (bytes(raw) if raw else b""), SW_OK
        if tag in (TAG_NAME, TAG_LANG, TAG_SEX, TAG_URL, TAG_LOGIN) or tag in PRIVATE_DOS:
            value = yield from self._load_do(tag)
            if tag == TAG_SEX and not value:
                value = b"9"
            return value, SW_OK  # an empty DO is 9000 with no data
        return b"", SW_REF_NOT_FOUND

    def _put_data(self, cmd: Command, data: bytes) -> Step:
        tag = (cmd.p1 << 8) | cmd.p2
        need = WRITE_ACCESS.get(tag, PW3)
        if need not in self.verified:
            return b"", SW_SECURITY
        if tag == TAG_PW_STATUS:
            multiple = wire.parse_pw1_policy(data[:1]) if len(data) in (1, 4) else None
            if multiple is None:
                return b"", SW_WRONG_DATA
            yield Store(ItemKind.DATA, PW1_POLICY, b"\x01" if multiple else b"\x00")
            return b"", SW_OK
        if tag == TAG_RC:  # the resetting code is the PIV PUK (see _rc): changed with the PUK, not with PW3
            return b"", SW_CONDITIONS
        if tag == TAG_KDF:  # no KDF, ever (TAG_KDF): a YubiKey would also reset PW1 to 123456 here
            return b"", SW_CONDITIONS
        if tag in UIF_TAG.values():  # touch off stays off (a no-op); on, fixed or cached needs a button: none here
            return b"", SW_OK if bytes(data) == UIF_OFF else SW_WRONG_DATA
        if tag in TAG_ROLE_ATTR:
            role = TAG_ROLE_ATTR[tag]
            alg = attributes_alg(role, data)
            if alg is None:
                return b"", SW_WRONG_DATA
            info = yield KeyInfo(key_name(role))
            if info is not None and info[0] is not alg:
                # another algorithm deletes the role's key, as on a YubiKey (the signature key takes its counter
                # "pgp-sig-counter" with it, as a new key resets it); first, so no key outlives its attributes
                yield Clear(key_name(role))
                yield Notice("key-deleted", {"application": "openpgp", "key": role, "alg": alg.name.lower()})
            yield Store(ItemKind.DATA, attr_name(role), canonical_attributes(alg, role))
            return b"", SW_OK
        limit = WRITABLE.get(tag)
        if limit is None:
            return b"", SW_REF_NOT_FOUND
        if len(data) > limit:
            return b"", SW_WRONG_LENGTH
        if tag in FPR_TAG.values() or tag in CA_FPR_TAG.values():
            wire.check_fingerprint(data)
        elif tag in TIME_TAG.values():
            wire.check_timestamp(data)
        yield Store(ItemKind.DATA, cert_name(self.cert_occurrence) if tag == TAG_CERT else do_name(tag), bytes(data))
        return b"", SW_OK

    # ---------------------------------------------------------------- keys

    def _key_alg(self, role: str) -> Generator[Effect, Any, KeyAlg]:
        raw = yield from self._attributes(role)
        return attributes_alg(role, raw) or KeyAlg.RSA2048

    @staticmethod
    def public_key_template(public_der: bytes) -> bytes:
        """7F49 { 81 modulus, 82 exponent } (RSA), 7F49 { 86 point } (P-256) or { 86 32 raw bytes } (25519)."""
        nums = crypto.public_numbers(public_der)
        if "rsa" in nums:
            n, e = nums["rsa"]
            return tlv.encode(0x7F49, tlv.encode_many([(0x81, n), (0x82, e)]))
        (point,) = nums.values()
        return tlv.encode(0x7F49, tlv.encode(0x86, point))

    def _generate(self, cmd: Command, data: bytes) -> Step:
        if cmd.p1 not in (0x80, 0x81) or cmd.p2 != 0x00:
            return b"", SW_WRONG_P1P2
        items = tlv.decode(data)
        if not items or items[0].tag not in CRT_ROLE:
            return b"", SW_WRONG_DATA
        role = CRT_ROLE[items[0].tag]
        if cmd.p1 == 0x81:  # read the public key
            info = yield KeyInfo(key_name(role))
            if info is None:
                return b"", SW_REF_NOT_FOUND
            return self.public_key_template(info[1]), SW_OK
        if PW3 not in self.verified:
            return b"", SW_SECURITY
        alg = yield from self._key_alg(role)
        yield from self._keep_aid()
        public = yield Generate(key_name(role), alg)
        # after the key: if this store fails, the new key is still called imported (the cautious mistake)
        yield from self._set_origin(role, imported=False)
        if role == "sig":
            yield Store(ItemKind.DATA, SIG_COUNTER, wire.encode_sig_counter(0))
        yield Notice("key-generated", {"application": "openpgp", "key": role, "alg": alg.name.lower()})
        return self.public_key_template(public), SW_OK

    def _put_data_odd(self, cmd: Command, data: bytes) -> Step:
        """Key import: 00 DB 3F FF with the extended header list (spec 4.4.3.12)."""
        if (cmd.p1, cmd.p2) != (0x3F, 0xFF):
            return b"", SW_WRONG_P1P2
        if PW3 not in self.verified:
            return b"", SW_SECURITY
        imp = wire.parse_key_import(data)
        alg = yield from self._key_alg(imp.role)
        try:
            if alg is KeyAlg.RSA2048:
                if not all(t in imp.parts for t in (0x91, 0x92, 0x93)):
                    return b"", SW_WRONG_DATA
                der = bytearray(crypto.rsa_private_der_from_parts(imp.parts[0x91], imp.parts[0x92],
                                                                  imp.parts[0x93]))
            elif alg is KeyAlg.P256:
                if 0x92 not in imp.parts:
                    return b"", SW_WRONG_DATA
                der = bytearray(crypto.p256_private_der_from_scalar(imp.parts[0x92]))
            else:
                return b"", SW_CONDITIONS  # Curve25519 keys are generated on the card, not imported
        except crypto.CryptoError:
            return b"", SW_WRONG_DATA
        try:
            public = crypto.public_der_of(der)
            if crypto.public_kind(public) != ("rsa2048" if alg is KeyAlg.RSA2048 else "p256"):
                return b"", SW_WRONG_DATA
            # the origin before the key: if the key's store fails, the old key is called imported, never the
            # imported one generated
            yield from self._keep_aid()
            yield from self._set_origin(imp.role, imported=True)
            yield Store(ItemKind.KEY, key_name(imp.role), der, alg, public)  # sealed by the glue, then zeroed here
        finally:
            der[:] = bytes(len(der))
        if imp.role == "sig":
            yield Store(ItemKind.DATA, SIG_COUNTER, wire.encode_sig_counter(0))
        yield Notice("key-imported", {"application": "openpgp", "key": imp.role, "alg": alg.name.lower()})
        return b"", SW_OK

    # ---------------------------------------------------------------- private-key operations

    def _pw1_status(self, ref: int) -> Generator[Effect, Any, int]:
        """
        0 if PW1 was verified for ``ref`` and is not blocked now, else the status word. The PIN is the card's
        one user PIN: blocked on another path since it was verified here, it no longer counts here either.
        """
        if ref not in self.verified:
            return SW_SECURITY
        rec = yield from self._pw1()
        if rec.tries_left == 0:
            self.verified.difference_update((PW1, PW1_OTHER))
            return SW_BLOCKED
        return 0

    def _key(self, role: str) -> Generator[Effect, Any, tuple[KeyAlg, bytes]]:
        info = yield KeyInfo(key_name(role))
        if info is None:
            raise ApduError(SW_REF_NOT_FOUND, f"no {role} key")
        return info

    def _sign(self, role: str, alg: KeyAlg, data: bytes) -> Generator[Effect, Any, bytes]:
        if alg is KeyAlg.RSA2048:
            return (yield PrivateOp(key_name(role), "rsa-pkcs1", data))
        if alg is KeyAlg.ED25519:
            if not data:
                raise ApduError(SW_WRONG_DATA, "nothing to sign")
            return (yield PrivateOp(key_name(role), "eddsa", data))
        if not 1 <= len(data) <= 64:
            raise ApduError(SW_WRONG_DATA, "an ECDSA input is a hash")
        der = yield PrivateOp(key_name(role), "ecdsa", data)
        r, s = crypto.ecdsa_der_to_rs(der)
        return wire.ecdsa_raw(r, s)

    def _pso(self, cmd: Command, data: bytes) -> Step:
        if (cmd.p1, cmd.p2) == (0x9E, 0x9A):
            return (yield from self._compute_signature(data))
        if (cmd.p1, cmd.p2) == (0x80, 0x86):
            return (yield from self._decipher(data))
        return b"", SW_WRONG_P1P2

    def _compute_signature(self, data: bytes) -> Step:
        refused = yield from self._pw1_status(PW1)
        if refused:
            return b"", refused
        alg, public = yield from self._key("sig")
        if not _signable(alg, public, data):  # first: a refused input is no signature (counter, PW1 untouched)
            return b"", SW_WRONG_DATA
        policy = yield Load(ItemKind.DATA, PW1_POLICY)
        if not (policy and bytes(policy) == b"\x01"):
            self.verified.discard(PW1)  # valid for one PSO:CDS (C4 byte 1 = 00)
        count = yield from self._sig_count()
        if count >= wire.MAX_SIGNATURES:
            return b"", SW_CONDITIONS
        # the counter is stored (synced) before the signature exists
        yield Store(ItemKind.DATA, SIG_COUNTER, wire.encode_sig_counter(count + 1))
        signature = yield from self._sign("sig", alg, data)
        yield Notice("signed", {"application": "openpgp", "count": count + 1})
        return signature, SW_OK

    def _decipher(self, data: bytes) -> Step:
        refused = yield from self._pw1_status(PW1_OTHER)
        if refused:
            return b"", refused
        alg, public = yield from self._key("dec")
        if alg is KeyAlg.RSA2048:
            cryptogram = wire.decipher_rsa(data, len(crypto.public_numbers(public)["rsa"][0]))
            return (yield PrivateOp(key_name("dec"), "rsa-decrypt", cryptogram)), SW_OK
        point = wire.decipher_ecdh(data)
        if alg is KeyAlg.X25519:
            return (yield PrivateOp(key_name("dec"), "x25519", wire.x25519_point(point))), SW_OK
        if len(point) != 65 or point[0] != 0x04:
            return b"", SW_WRONG_DATA
        return (yield PrivateOp(key_name("dec"), "ecdh", point)), SW_OK

    def _internal_authenticate(self, cmd: Command, data: bytes) -> Step:
        if (cmd.p1, cmd.p2) != (0x00, 0x00):
            return b"", SW_WRONG_P1P2
        refused = yield from self._pw1_status(PW1_OTHER)
        if refused:
            return b"", refused
        alg, public = yield from self._key("aut")
        if alg is KeyAlg.RSA2048 and len(data) > len(crypto.public_numbers(public)["rsa"][0]) * 2 // 5:
            return b"", SW_WRONG_DATA  # at most 40 % of the modulus (spec 7.2.13)
        return (yield from self._sign("aut", alg, data)), SW_OK

    def _select_data(self, cmd: Command, data: bytes) -> Step:
        """
        SELECT DATA ``00 A5 occurrence 04 {60 {5C 7F21}}`` (spec 7.2.5): which of the three cardholder
        certificates GET DATA / PUT DATA 7F21 use until the next SELECT. YubiKey firmware up to 5.4.3 expects,
        and yubikit sends it, a non-standard leading length byte (06): accepted as well.
        """
        yield from ()
        if cmd.p2 != 0x04:
            return b"", SW_WRONG_P1P2
        if len(data) == 7 and data[0] == 6:
            data = data[1:]
        try:
            tag = tlv.decode_one(tlv.decode_one(data, 0x60), 0x5C)
        except WireError:
            return b"", SW_WRONG_DATA
        if tag != TAG_CERT.to_bytes(2, "big") or cmd.p1 >= CERT_OCCURRENCES:
            return b"", SW_REF_NOT_FOUND
        self.cert_occurrence = cmd.p1
        return b"", SW_OK

    def _get_version(self, cmd: Command, data: bytes) -> Step:
        """YubiKey GET VERSION (00 F1 00 00): the firmware version in BCD, which yubikit reads in every session."""
        yield from ()
        return self._cached("version", lambda: wire.firmware_version(self.version)), SW_OK

    def _get_challenge(self, cmd: Command, data: bytes) -> Step:
        yield from ()
        if cmd.p1 or cmd.p2 or data:
            return b"", SW_WRONG_P1P2 if cmd.p1 or cmd.p2 else SW_WRONG_DATA
        n = cmd.le or 0
        if not 1 <= n <= MAX_CHALLENGE:
            return b"", SW_WRONG_LENGTH
        return self.rand(n), SW_OK


def _signable(alg: KeyAlg, public: bytes, data: bytes) -> bool:
    """
    Whether the signature key can sign ``data`` as PSO:CDS gives it (what _sign and the key operation would
    refuse): an RSA PKCS#1 v1.5 payload of 1 to k - 11 bytes, a non-empty EdDSA message, an ECDSA hash of 1 to
    64 bytes. Checked before PW1 is consumed and the counter stored, as Gnuk does (openpgp.c cmd_pso).
    """
    if alg is KeyAlg.RSA2048:
        return 1 <= len(data) <= len(crypto.public_numbers(public)["rsa"][0]) - 11
    if alg is KeyAlg.ED25519:
        return bool(data)
    return 1 <= len(data) <= 64
