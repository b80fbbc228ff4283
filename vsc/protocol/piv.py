"""
The PIV card application (NIST SP 800-73-4 part 2) of a Virtual Smart Card,
sans-IO: the reader driver / resource manager / service provider of the
patent ([0023]-[0024]) reach the card through PC/SC, so that "any smart
card-aware application can seamlessly inter-operate" ([0011]) — OpenSC's
PIV driver, yubico-piv-tool, NSS, ssh.

``PivApplet.process(apdu)`` is a generator: it yields *effects* (load or
store an item of the protected information, run a private-key operation,
generate a key pair, report an event) and receives their results; it
returns the response APDU. The glue (vsc.card.vpcd) performs the effects on
the CardSession — every store is synced to the server before the response
is sent — and tests drive it with a dictionary (``run_sync``).

What the applet keeps in memory is volatile security status only: the
selection, whether the PIN was verified, the management-key
authentication (an Automat machine), the command-chaining buffer and the
GET RESPONSE buffer. Power off and reset clear all of it. PIN, PUK, retry
counters, management key, keys and certificates live in the protected
information and are read per command.

Instructions: SELECT (A4), GET DATA (CB), VERIFY (20), CHANGE REFERENCE
DATA (24), RESET RETRY COUNTER (2C), GENERAL AUTHENTICATE (87), GENERATE
ASYMMETRIC KEY PAIR (47), PUT DATA (DB), GET RESPONSE (C0); and six
YubiKey extensions yubico-piv-tool and ykman use: GET VERSION (FD), GET SERIAL
(F8), SET MANAGEMENT KEY (FF), IMPORT ASYMMETRIC KEY (FE), GET METADATA (F7),
ATTEST (F9).

Which key needs the PIN is the card's PIN policy (vsc.wire.pinpolicy, chosen
at enrolment; decided by vsc.protocol.pins.authorize, the same decision the
ssh-agent and the local API take): never; once (a VERIFY until reset,
SELECT or deselect); always (a VERIFY right before the operation, which uses
it up). A blocked PIN (0 tries, on any path) refuses every PIN slot with
6983, even in a session that verified before. GENERAL AUTHENTICATE with
key reference 9B and an empty 81 for an algorithm other than the management
key's answers random bytes of that algorithm's block size (OpenSC's
C_GenerateRandom), leaving the management-key authentication as it was.

Anti-hammering: VERIFY, CHANGE REFERENCE DATA and RESET RETRY COUNTER store
the decremented counter BEFORE comparing; only a match stores the reset
counter. A store that fails (server unreachable) answers 6581 without
having compared anything, so cutting the network gives an attacker no
free guesses.

One responsibility (and so one module despite its length): the PIV card application.
"""

from __future__ import annotations

from typing import Any, Generator, Protocol

import attrs
from automat import TypeMachineBuilder

from vsc import crypto
from vsc.wire import apdu, tlv
from vsc.wire.apdu import ApduError, Command, ManagementKeyRecord, SecretRecord
from vsc.wire.errors import WireError
from vsc.wire.pinpolicy import RETIRED_SLOTS, encode_policy, slot_text
from vsc.wire.protected import ItemKind, KeyAlg
from vsc.protocol import pins
from vsc.protocol.applet import (  # noqa: F401  (the effects and status words are the applet framework's)
    Certify,
    CommandFront,
    SW_BLOCKED,
    SW_CHAIN_UNSUPPORTED,
    SW_CLA,
    SW_CONDITIONS,
    SW_INS,
    SW_MEMORY_FAILURE,
    SW_NO_MEMORY,
    SW_NOT_FOUND,
    SW_OK,
    SW_REF_NOT_FOUND,
    SW_SECURITY,
    SW_UNKNOWN,
    SW_WRONG_DATA,
    SW_WRONG_LENGTH,
    SW_WRONG_P1P2,
    Effect,
    EffectFailed,
    Generate,
    KeyInfo,
    Load,
    Notice,
    PrivateOp,
    Step,
    Store,
    run_sync,
)

# ---------------------------------------------------------------- constants

PIV_AID = bytes.fromhex("a000000308000010000100")
PIV_PIX = bytes.fromhex("000010000100")
MIN_AID_PREFIX = 5  # yubico-piv-tool selects with the RID only (A0 00 00 03 08)

INS_SELECT = 0xA4
INS_GET_DATA = 0xCB
INS_VERIFY = 0x20
INS_CHANGE = 0x24
INS_RESET_RETRY = 0x2C
INS_GENERAL_AUTH = 0x87
INS_GENERATE = 0x47
INS_PUT_DATA = 0xDB
INS_GET_RESPONSE = 0xC0
INS_GET_VERSION = 0xFD
INS_GET_SERIAL = 0xF8
INS_SET_MGMT = 0xFF
INS_IMPORT = 0xFE
INS_GET_METADATA = 0xF7
INS_ATTEST = 0xF9

CHAINABLE = frozenset({INS_GET_DATA, INS_VERIFY, INS_CHANGE, INS_RESET_RETRY, INS_GENERAL_AUTH, INS_GENERATE,
                       INS_PUT_DATA, INS_SET_MGMT, INS_IMPORT})
MAX_CHAIN = 16 * 1024  # a certificate object of a few kB, with room to spare
MAX_OBJECT = 12 * 1024

PIN_REF = 0x80
PUK_REF = 0x81
MGMT_REF = 0x9B
PIN_ITEM = {PIN_REF: pins.USER_PIN, PUK_REF: pins.PUK}
MGMT_ITEM = "piv-mgmt"
#: the key references whose key came in by IMPORT ASYMMETRIC KEY (one byte each); any other key was generated
#: (GENERATE, or vsc card/dongle enroll), which GET METADATA reports as its origin
ORIGIN_ITEM = "piv-imported"
#: GENERAL AUTHENTICATE challenge (random number) sizes: the algorithm's block size; 00 is 3DES (SP 800-78)
CHALLENGE_SIZE = {0x00: 8, crypto.PIV_MGMT_3DES: 8, crypto.PIV_MGMT_AES128: 16, crypto.PIV_MGMT_AES192: 16,
                  crypto.PIV_MGMT_AES256: 16}
DEFAULT_PIN = pins.DEFAULT_PIN
DEFAULT_PUK = pins.DEFAULT_PUK
DEFAULT_TRIES = pins.DEFAULT_TRIES
DEFAULT_MGMT = ManagementKeyRecord(crypto.PIV_MGMT_3DES, bytes.fromhex("010203040506070801020304050607080102030405060708"))

ALG_RSA2048 = 0x07
ALG_P256 = 0x11
ALG_P384 = 0x14  # SP 800-78-4 table 6-2; a YubiKey 4/5 has it (yubikit KEY_TYPE.ECCP384)
ALG_PIN = 0xFF  # GET METADATA's algorithm of the PIN and the PUK

#: YubiKey GET METADATA (INS F7) tags (yubikit.piv TAG_METADATA_*) and values
TAG_METADATA_ALGO = 0x01
TAG_METADATA_POLICY = 0x02  # PIN policy, touch policy
TAG_METADATA_ORIGIN = 0x03  # 01 generated, 02 imported
TAG_METADATA_PUBLIC_KEY = 0x04  # RSA 81 modulus 82 exponent, EC 86 point (GENERATE's 7F49 content)
TAG_METADATA_IS_DEFAULT = 0x05
TAG_METADATA_RETRIES = 0x06  # total, remaining
ORIGIN_GENERATED = 0x01
ORIGIN_IMPORTED = 0x02
TOUCH_NEVER = 0x01  # vsc has no touch sensor: every key and the management key are touch policy "never"
PIV_ALG = {KeyAlg.RSA2048: ALG_RSA2048, KeyAlg.P256: ALG_P256, KeyAlg.P384: ALG_P384}
KEY_ALG = {v: k for k, v in PIV_ALG.items()}
#: an EC key's field size in bytes: the private scalar (IMPORT tag 06), the shared x (ECDH), half the point
EC_SIZE = {KeyAlg.P256: 32, KeyAlg.P384: 48}
#: the longest value GENERAL AUTHENTICATE signs with an EC key (a SHA-512 hash; the leftmost field-size bytes
#: are used, FIPS 186-4 6.4); yubico-piv-tool and yubikit truncate to the field size before sending
MAX_EC_SIGN_INPUT = 64

#: slot (key reference) -> certificate object tag; whether a key needs the PIN is the card's PIN policy
#: (vsc.wire.pinpolicy, chosen at enrolment; YubiKey's defaults 9A once, 9C always, 9D once, 9E never, and once
#: for the retired slots). The retired key-management slots 82..95 keep their certificates in 5FC10D..5FC120
#: (SP 800-73-4 part 1 table 3 "Retired X.509 Certificate for Key Management 1..20", table 4b).
SLOTS = {0x9A: 0x5FC105, 0x9C: 0x5FC10A, 0x9D: 0x5FC10B, 0x9E: 0x5FC101,
         **{ref: 0x5FC10D + i for i, ref in enumerate(RETIRED_SLOTS)}}
CERT_SLOT = {tag: slot for slot, tag in SLOTS.items()}

#: the attestation key (YubiKey slot F9; not a key slot for GENERAL AUTHENTICATE, the local API or the ssh-agent)
#: and its certificate object 5FFF01. A YubiKey's F9 holds a key certified by Yubico's PIV CA; vsc cannot, so the
#: card makes its own F9 key (RSA-2048, as a YubiKey's) and a self-signed certificate for it, the first time an
#: ATTEST needs them: an attestation from vsc chains to the card's own key, never to Yubico's root.
ATTEST_REF = 0xF9
ATTEST_KEY = "f9"
ATTEST_KEY_ALG = KeyAlg.RSA2048
TAG_ATTEST_CERT = 0x5FFF01
#: Yubico's PIV attestation extensions (developers.yubico.com/PIV/Introduction/PIV_attestation.html; a YubiKey 5's
#: certificate in Yubico.NET.SDK apdu/attest.md): firmware version (3 bytes), serial (DER INTEGER), PIN and touch
#: policy (2 bytes), form factor (1 byte; 00 "not specified": vsc is no USB device)
OID_FIRMWARE = "1.3.6.1.4.1.41482.3.3"
OID_SERIAL = "1.3.6.1.4.1.41482.3.7"
OID_POLICY = "1.3.6.1.4.1.41482.3.8"
OID_FORM_FACTOR = "1.3.6.1.4.1.41482.3.9"
FORM_FACTOR = 0x00

TAG_DISCOVERY = 0x7E
TAG_CHUID = 0x5FC102
TAG_CCC = 0x5FC107
#: objects whose read needs the PIN (SP 800-73-4 table 2): fingerprints, facial image, printed info, iris
PIN_OBJECTS = frozenset({0x5FC103, 0x5FC108, 0x5FC109, 0x5FC121})


def slot_name(ref: int) -> str:
    return slot_text(ref)


def object_name(tag: int) -> str:
    return f"piv-{tag:x}"


#: a YubiKey's own data objects, read and written like the PIV ones (yubico-piv-tool's lib/internal.h): ADMIN DATA
#: 5FFF00 (ykman's PIN-protected management key), the attestation certificate 5FFF01, MSCMAP 5FFF10 and MSROOTS
#: 5FFF11-5FFF15 (the Yubico minidriver)
YUBIKEY_OBJECTS = frozenset({0x5FFF00, 0x5FFF01, *range(0x5FFF10, 0x5FFF16)})


def valid_object_tag(tag: int) -> bool:
    return 0x5FC101 <= tag <= 0x5FC123 or tag in (0x7F61, TAG_DISCOVERY) or tag in YUBIKEY_OBJECTS


# ---------------------------------------------------------------- management-key authentication (Automat)


class MgmtInputs(Protocol):
    def witness_sent(self, witness: bytes) -> None:
        "The card sent E(K, witness) and waits for the witness back (yubico-piv-tool, SP 800-73-4 A.1)."

    def challenge_sent(self, challenge: bytes) -> None:
        "The card sent a plain challenge and waits for E(K, challenge) (OpenSC piv-tool -A)."

    def accept(self) -> bool:
        "The host's answer matched: authenticated if a witness or challenge was outstanding."

    def reset(self) -> None:
        "Power off, reset, a wrong answer: back to unauthenticated."

    def authenticated(self) -> bool:
        "Whether PUT DATA / GENERATE / SET MANAGEMENT KEY are allowed."

    def pending(self) -> tuple[str, bytes] | None:
        "The outstanding witness or challenge."


@attrs.define
class _MgmtCore:
    kind: str = ""
    value: bytes = b""


def _build_mgmt():
    b = TypeMachineBuilder(MgmtInputs, _MgmtCore)
    none = b.state("unauthenticated")
    witness = b.state("witness_sent")
    challenge = b.state("challenge_sent")
    done = b.state("authenticated")

    for state in (none, witness, challenge, done):

        @state.upon(MgmtInputs.witness_sent).to(witness)
        def send_witness(m: MgmtInputs, core: _MgmtCore, w: bytes) -> None:
            core.kind, core.value = "witness", w

        @state.upon(MgmtInputs.challenge_sent).to(challenge)
        def send_challenge(m: MgmtInputs, core: _MgmtCore, c: bytes) -> None:
            core.kind, core.value = "challenge", c

        @state.upon(MgmtInputs.reset).to(none)
        def reset(m: MgmtInputs, core: _MgmtCore) -> None:
            core.kind, core.value = "", b""

    for state in (witness, challenge):

        @state.upon(MgmtInputs.accept).to(done)
        def accept(m: MgmtInputs, core: _MgmtCore) -> bool:
            core.kind, core.value = "", b""
            return True

        @state.upon(MgmtInputs.pending).loop()
        def outstanding(m: MgmtInputs, core: _MgmtCore) -> tuple[str, bytes] | None:
            return core.kind, core.value

        state.upon(MgmtInputs.authenticated).loop().returns(False)

    none.upon(MgmtInputs.accept).loop().returns(False)
    done.upon(MgmtInputs.accept).to(none).returns(False)  # an answer nobody asked for drops the status
    none.upon(MgmtInputs.pending).loop().returns(None)
    done.upon(MgmtInputs.pending).loop().returns(None)
    none.upon(MgmtInputs.authenticated).loop().returns(False)
    done.upon(MgmtInputs.authenticated).loop().returns(True)
    return b.build()


_MgmtMachine = _build_mgmt()


# ---------------------------------------------------------------- the applet


class PivApplet(CommandFront):
    """One card's PIV application: a dispatcher over the instructions, volatile state only."""

    CHAINABLE = CHAINABLE
    MAX_CHAIN = MAX_CHAIN

    def __init__(self, serial: str, rand: crypto.RandomBytes = crypto.system_random,
                 version: tuple[int, int, int] = (5, 4, 3)):
        self.serial = serial
        self.rand = rand
        self.version = version
        self.mgmt = _MgmtMachine(_MgmtCore())
        self.selected = False
        self.pin_verified = False
        self.pin_fresh = False  # a VERIFY not yet consumed by a private-key operation (PIN policy "always")
        self._chain: tuple[tuple[int, int, int], bytearray] | None = None
        self._out: bytes = b""
        self._out_pos = 0
        self._static: dict[str, bytes] = {}  # answers that never change (built once: construct is not free)

    # -- volatile state

    def reset(self) -> None:
        """Power off, power on, warm reset: every security status and buffer is cleared ([SP 800-73-4 3.1])."""
        self.selected = False
        self.pin_verified = False
        self.pin_fresh = False
        self.mgmt.reset()
        self._chain = None
        self._out, self._out_pos = b"", 0

    def deselect(self) -> None:
        """
        Another application on the card was selected (an application router):
        PIV's security status ends as on reset — a PIN verified for PIV is not
        verified any more when PIV is selected again (PIN policy "once").
        """
        self.reset()

    # -- entry point

    # process(): applet.CommandFront (parsing, class byte, GET RESPONSE, chaining, then _dispatch)

    # -- response buffering (61xx / GET RESPONSE): applet.ResponseBuffer

    # -- dispatch

    def _dispatch(self, cmd: Command, data: bytes) -> Step:
        if cmd.ins == INS_SELECT:
            return (yield from self._select(cmd, data))
        if not self.selected:
            return b"", SW_INS  # nothing but SELECT before the application is selected
        handler = _HANDLERS.get(cmd.ins)  # built once (below the class), not per APDU
        if handler is None:
            return b"", SW_INS
        return (yield from handler(self, cmd, data))

    # ---------------------------------------------------------------- SELECT

    def _select(self, cmd: Command, data: bytes) -> Step:
        yield from ()
        if cmd.p1 != 0x04 or cmd.p2 not in (0x00, 0x0C):
            return b"", SW_WRONG_P1P2
        if not (MIN_AID_PREFIX <= len(data) <= len(PIV_AID) and PIV_AID.startswith(data)):
            return b"", SW_NOT_FOUND  # the current selection is unchanged (ISO 7816-4 7.1.1)
        # Every successful SELECT starts a fresh security status, as a YubiKey does: yubico-piv-tool relies on
        # it to read the PIN retry counter, and every PC/SC client (each OpenSC process selects the AID when it
        # connects) starts unauthenticated. SP 800-73-4 3.1.1 would keep the status on re-selection; OpenSC
        # re-verifies from its PIN cache when a card answers 6982, so nothing breaks either way.
        self.selected = True
        self.pin_verified = False
        self.pin_fresh = False
        self.mgmt.reset()
        if cmd.p2 == 0x0C:
            return b"", SW_OK
        return self._cached("apt", self.application_property_template), SW_OK

    @staticmethod
    def application_property_template() -> bytes:
        """
        A YubiKey 5's answer, byte for byte: 61 11 { 4F 06 PIX, 79 07 { 4F 05 RID } } (no label, no
        algorithm list, the coexistent tag allocation authority as the RID, where SP 800-73-4 3.1.1 would
        give 50 and AC and the whole AID): a tool that tells cards apart by their SELECT answer sees one.
        """
        return tlv.encode(0x61, tlv.encode_many([
            (0x4F, PIV_PIX),
            (0x79, tlv.encode(0x4F, PIV_AID[:5])),
        ]))

    # ---------------------------------------------------------------- GET DATA / PUT DATA

    @staticmethod
    def _object_tag(cmd: Command, data: bytes) -> tuple[int, bytes]:
        if (cmd.p1, cmd.p2) != (0x3F, 0xFF):
            raise ApduError(SW_WRONG_P1P2)
        items = tlv.decode(data)
        if not items or items[0].tag != 0x5C:
            raise ApduError(SW_WRONG_DATA, "no tag list")
        tag = tlv.parse_tag(items[0].value)
        rest = tlv.encode_many(items[1:]) if len(items) > 1 else b""
        return tag, rest

    def _get_data(self, cmd: Command, data: bytes) -> Step:
        tag, rest = self._object_tag(cmd, data)
        if rest:
            return b"", SW_WRONG_DATA
        if tag == TAG_DISCOVERY:
            return self._cached("discovery", self.discovery), SW_OK
        if not valid_object_tag(tag):
            return b"", SW_NOT_FOUND
        if tag in PIN_OBJECTS and not self.pin_verified:
            return b"", SW_SECURITY
        if tag in CERT_SLOT:
            cert = yield Load(ItemKind.CERT, slot_name(CERT_SLOT[tag]))
            if not cert:
                return b"", SW_NOT_FOUND
            return self.certificate_object(bytes(cert)), SW_OK
        stored = yield Load(ItemKind.DATA, object_name(tag))
        if stored:
            return tlv.encode(0x53, bytes(stored)), SW_OK
        if tag == TAG_CHUID:
            return self._cached("chuid", lambda: tlv.encode(0x53, self.chuid())), SW_OK
        if tag == TAG_CCC:
            return self._cached("ccc", lambda: tlv.encode(0x53, self.ccc())), SW_OK
        return b"", SW_NOT_FOUND

    @staticmethod
    def certificate_object(cert_der: bytes) -> bytes:
        """53 { 70 certificate, 71 CertInfo (00: not compressed), FE error detection code }."""
        return tlv.encode(0x53, tlv.encode_many([(0x70, cert_der), (0x71, b"\x00"), (0xFE, b"")]))

    @staticmethod
    def discovery() -> bytes:
        """7E { 4F PIV AID, 5F2F PIN usage policy 40 00: the application PIN only }."""
        return tlv.encode(TAG_DISCOVERY, tlv.encode_many([(0x4F, PIV_AID), (0x5F2F, b"\x40\x00")]))

    def _id_bytes(self, label: bytes, n: int) -> bytes:
        return crypto.sha256(b"vsc piv " + label + b"\x00" + self.serial.encode())[:n]

    def guid(self) -> bytes:
        """An RFC 4122 version-8 style GUID derived from the serial (OpenSC's serial number of the card)."""
        g = bytearray(self._id_bytes(b"guid", 16))
        g[6] = (g[6] & 0x0F) | 0x80
        g[8] = (g[8] & 0x3F) | 0x80
        return bytes(g)

    def fascn(self) -> bytes:
        """A non-federal FASC-N (agency code 9999) whose credential and person identifier follow the serial."""
        digits = str(int.from_bytes(self._id_bytes(b"fascn", 8), "big")).rjust(16, "0")[-16:]
        return apdu.encode_fascn("9999", "9999", digits[:6], "0", "1", digits[6:16], "1", "0000", "1")

    def chuid(self) -> bytes:
        """CHUID content: FASC-N, GUID, expiration date, an empty issuer signature, error detection code."""
        return tlv.encode_many([(0x30, self.fascn()), (0x34, self.guid()), (0x35, b"20991231"), (0x3E, b""),
                                (0xFE, b"")])

    def ccc(self) -> bytes:
        """Card Capability Container (the layout YubiKeys use; card identifier from the serial)."""
        card_id = bytes.fromhex("a000000116ff02") + self._id_bytes(b"ccc", 14)
        return tlv.encode_many([
            (0xF0, card_id), (0xF1, b"\x21"), (0xF2, b"\x21"), (0xF3, b""), (0xF4, b"\x00"), (0xF5, b"\x10"),
            (0xF6, b""), (0xF7, b""), (0xFA, b""), (0xFB, b""), (0xFC, b""), (0xFD, b""), (0xFE, b""),
        ])

    def _put_data(self, cmd: Command, data: bytes) -> Step:
        tag, rest = self._object_tag(cmd, data)
        if not self.mgmt.authenticated():
            return b"", SW_SECURITY
        items = tlv.decode(rest)
        if len(items) != 1 or items[0].tag != 0x53:
            return b"", SW_WRONG_DATA
        content = items[0].value
        if len(content) > MAX_OBJECT:
            return b"", SW_NO_MEMORY
        if tag == TAG_DISCOVERY or not valid_object_tag(tag):
            return b"", SW_WRONG_DATA
        if tag in CERT_SLOT:
            cert = b""
            if content:
                fields = tlv.to_dict(content, allowed=(0x70, 0x71, 0xFE))
                if 0x70 not in fields or fields.get(0x71, b"\x00") not in (b"\x00", b""):
                    return b"", SW_WRONG_DATA  # compressed certificates are not supported
                cert = fields[0x70]
            yield Store(ItemKind.CERT, slot_name(CERT_SLOT[tag]), cert)
            yield Notice("certificate-stored", {"slot": slot_name(CERT_SLOT[tag]), "bytes": len(cert)})
            return b"", SW_OK
        yield Store(ItemKind.DATA, object_name(tag), content)
        return b"", SW_OK

    # ---------------------------------------------------------------- PIN and PUK

    def _load_secret(self, ref: int) -> Generator[Effect, Any, SecretRecord]:
        return (yield from pins.load_secret(PIN_ITEM[ref], apdu.pad_pin(DEFAULT_PIN if ref == PIN_REF else DEFAULT_PUK)))

    def _store_secret(self, ref: int, rec: SecretRecord) -> Step:
        yield from pins.store_secret(PIN_ITEM[ref], rec)
        return b"", SW_OK

    def _check_secret(self, ref: int, block: bytes) -> Generator[Effect, Any, SecretRecord | int]:
        """The PIN or PUK checked the shared way (vsc.protocol.pins): the record, or the status word to answer."""
        default = apdu.pad_pin(DEFAULT_PIN if ref == PIN_REF else DEFAULT_PUK)
        return (yield from pins.check_secret(PIN_ITEM[ref], block, default, "pin" if ref == PIN_REF else "puk"))

    @staticmethod
    def _new_value(block: bytes) -> bytes:
        """A new PIN or PUK block: 6 to 8 bytes, FF padded."""
        try:
            value = apdu.unpad_pin(block)
        except WireError:
            raise ApduError(SW_WRONG_DATA, "not an FF-padded 8-byte block") from None
        if len(value) < 6:
            raise ApduError(SW_WRONG_DATA, "a PIN or PUK has 6 to 8 characters")
        return bytes(block)

    def _verify(self, cmd: Command, data: bytes) -> Step:
        if cmd.p1 == 0xFF:  # reset the verification status (SP 800-73-4 3.2.1)
            if data:
                return b"", SW_WRONG_DATA
            if cmd.p2 == PIN_REF:
                self.pin_verified = self.pin_fresh = False
            return b"", SW_OK
        if cmd.p1 != 0x00 or cmd.p2 not in (PIN_REF, PUK_REF):
            return b"", SW_REF_NOT_FOUND if cmd.p1 == 0x00 else SW_WRONG_P1P2
        if not data:  # status: verified, or tries left; blocked (on any path) is 6983 even after a VERIFY here
            rec = yield from self._load_secret(cmd.p2)
            if rec.tries_left == 0:
                return b"", SW_BLOCKED
            if cmd.p2 == PIN_REF and self.pin_verified:
                return b"", SW_OK
            return b"", 0x63C0 | min(rec.tries_left, 15)
        if len(data) != 8:
            return b"", SW_WRONG_DATA
        if cmd.p2 == PIN_REF:
            self.pin_verified = self.pin_fresh = False
        result = yield from self._check_secret(cmd.p2, data)
        if isinstance(result, int):
            return b"", result
        if cmd.p2 == PIN_REF:
            self.pin_verified = self.pin_fresh = True
        return b"", SW_OK

    def _change(self, cmd: Command, data: bytes) -> Step:
        if cmd.p1 != 0x00 or cmd.p2 not in (PIN_REF, PUK_REF):
            return b"", SW_REF_NOT_FOUND if cmd.p1 == 0x00 else SW_WRONG_P1P2
        if len(data) != 16:
            return b"", SW_WRONG_DATA
        # the current value first, whatever the new one (a YubiKey answers 63Cx, and the try counts)
        result = yield from self._check_secret(cmd.p2, data[:8])
        if isinstance(result, int):
            if cmd.p2 == PIN_REF:
                self.pin_verified = self.pin_fresh = False
            return b"", result
        new = self._new_value(data[8:])
        yield from self._store_secret(cmd.p2, SecretRecord(new, result.max_tries, result.max_tries))
        yield Notice("pin-changed" if cmd.p2 == PIN_REF else "puk-changed", {})
        if cmd.p2 == PIN_REF:
            self.pin_verified = True
        return b"", SW_OK

    def _reset_retry(self, cmd: Command, data: bytes) -> Step:
        if cmd.p1 != 0x00 or cmd.p2 != PIN_REF:
            return b"", SW_REF_NOT_FOUND if cmd.p1 == 0x00 else SW_WRONG_P1P2
        if len(data) != 16:
            return b"", SW_WRONG_DATA
        # the PUK first, whatever the new PIN (yubikit blocks the PUK with 16 bytes of FF and expects 63Cx)
        result = yield from self._check_secret(PUK_REF, data[:8])
        if isinstance(result, int):
            return b"", result
        new = self._new_value(data[8:])
        pin = yield from self._load_secret(PIN_REF)
        yield from self._store_secret(PIN_REF, SecretRecord(new, pin.max_tries, pin.max_tries))
        yield Notice("pin-unblocked", {})
        self.pin_verified = self.pin_fresh = False
        return b"", SW_OK

    # ---------------------------------------------------------------- management key

    def _load_mgmt(self) -> Generator[Effect, Any, ManagementKeyRecord]:
        raw = yield Load(ItemKind.PIN, MGMT_ITEM)
        return apdu.decode_mgmt(raw) if raw else DEFAULT_MGMT

    def _mgmt_authenticate(self, cmd: Command, fields: dict[int, bytes]) -> Step:
        rec = yield from self._load_mgmt()
        if cmd.p1 != rec.alg and set(fields) == {0x81} and fields[0x81] == b"" and cmd.p1 in CHALLENGE_SIZE:
            # a request for random bytes (OpenSC's piv_get_challenge: 00 87 00 9B 04 7C 02 81 00) with another
            # algorithm than the management key's: it cannot start an authentication, so the authentication
            # state is left as it is; the bytes come from the kernel (the injected random source)
            n = CHALLENGE_SIZE[cmd.p1]
            return tlv.encode(0x7C, tlv.encode(0x81, self.rand(n))), SW_OK
        # 00 is 3DES too (SP 800-78-4 table 6-2; a YubiKey takes it for a 3DES key: Yubico's PIV APDU docs)
        if cmd.p1 != rec.alg and not (cmd.p1 == 0x00 and rec.alg == crypto.PIV_MGMT_3DES):
            self.mgmt.reset()
            return b"", SW_WRONG_P1P2
        bs = crypto.mgmt_block_size(rec.alg)
        witness, challenge, response = fields.get(0x80), fields.get(0x81), fields.get(0x82)
        if witness == b"" and challenge is None and response is None:
            w = self.rand(bs)
            self.mgmt.witness_sent(w)
            return tlv.encode(0x7C, tlv.encode(0x80, crypto.mgmt_cipher(rec.alg, rec.key, w, True))), SW_OK
        if challenge == b"" and witness is None and response is None:
            c = self.rand(bs)
            self.mgmt.challenge_sent(c)
            return tlv.encode(0x7C, tlv.encode(0x81, c)), SW_OK
        pending = self.mgmt.pending()
        if witness is not None and challenge is not None and response in (None, b""):
            ok = (pending is not None and pending[0] == "witness" and len(witness) == bs and len(challenge) == bs
                  and crypto.constant_time_equal(witness, pending[1]))
            if not ok or not self.mgmt.accept():
                self.mgmt.reset()
                yield Notice("management-key-refused", {})
                return b"", SW_SECURITY
            return tlv.encode(0x7C, tlv.encode(0x82, crypto.mgmt_cipher(rec.alg, rec.key, challenge, True))), SW_OK
        if response and witness is None and challenge is None:
            ok = (pending is not None and pending[0] == "challenge" and len(response) == bs
                  and crypto.constant_time_equal(response, crypto.mgmt_cipher(rec.alg, rec.key, pending[1], True)))
            if not ok or not self.mgmt.accept():
                self.mgmt.reset()
                yield Notice("management-key-refused", {})
                return b"", SW_SECURITY
            return b"", SW_OK
        self.mgmt.reset()
        return b"", SW_WRONG_DATA

    def _set_mgmt(self, cmd: Command, data: bytes) -> Step:
        """YubiKey SET MANAGEMENT KEY: ``00 FF FF FF|FE  alg 9B len key``."""
        if cmd.p1 != 0xFF or cmd.p2 not in (0xFF, 0xFE):
            return b"", SW_WRONG_P1P2
        if not self.mgmt.authenticated():
            return b"", SW_SECURITY
        if len(data) < 3 or data[1] != MGMT_REF or data[2] != len(data) - 3:
            return b"", SW_WRONG_DATA
        alg, key = data[0], data[3:]
        try:
            if len(key) != crypto.mgmt_key_size(alg):
                return b"", SW_WRONG_DATA
        except crypto.CryptoError:
            return b"", SW_WRONG_DATA
        yield Store(ItemKind.PIN, MGMT_ITEM, apdu.encode_mgmt(ManagementKeyRecord(alg, key)))
        yield Notice("management-key-changed", {"alg": alg})
        return b"", SW_OK

    # ---------------------------------------------------------------- GENERAL AUTHENTICATE

    def _general_authenticate(self, cmd: Command, data: bytes) -> Step:
        try:
            fields = tlv.to_dict(tlv.decode_one(data, 0x7C), allowed=(0x80, 0x81, 0x82, 0x85))
        except WireError:
            return b"", SW_WRONG_DATA
        if cmd.p2 == MGMT_REF:
            return (yield from self._mgmt_authenticate(cmd, fields))
        if cmd.p2 not in SLOTS:
            return b"", SW_REF_NOT_FOUND
        slot = slot_name(cmd.p2)
        info = yield KeyInfo(slot)
        if info is None:
            return b"", SW_REF_NOT_FOUND
        alg, _public = info
        if PIV_ALG.get(alg) != cmd.p1:
            return b"", SW_WRONG_P1P2
        if fields.get(0x82, None) != b"":
            return b"", SW_WRONG_DATA
        challenge, point = fields.get(0x81), fields.get(0x85)
        if (challenge is None) == (point is None) or fields.get(0x80) is not None:
            return b"", SW_WRONG_DATA
        sw, policy = yield from pins.authorize(cmd.p2, self.pin_verified, self.pin_fresh)
        if sw != SW_OK:
            yield Notice("pin-required" if sw == SW_SECURITY else "pin-blocked-refused",
                         {"slot": slot, "policy": policy.name.lower()})
            return b"", sw
        self.pin_fresh = False  # a VERIFY counts for one operation only (what PIN policy "always" asks for)
        if alg is KeyAlg.RSA2048:
            if point is not None or len(challenge) != 256:
                return b"", SW_WRONG_DATA
            op, arg = "rsa", challenge
        elif point is not None:
            # the uncompressed point on the slot's curve: 04 X Y, 65 bytes (P-256) or 97 (P-384)
            if len(point) != 1 + 2 * EC_SIZE[alg] or point[0] != 0x04:
                return b"", SW_WRONG_DATA
            op, arg = "ecdh", point
        else:
            # a hash shorter than the field is signed as its integer value (yubikit sends a SHA-256 hash to a
            # P-384 key unpadded), a longer one truncated to the field size
            if not 1 <= len(challenge) <= MAX_EC_SIGN_INPUT:
                return b"", SW_WRONG_DATA
            op, arg = "ecdsa", challenge
        result = yield PrivateOp(slot, op, arg)
        return tlv.encode(0x7C, tlv.encode(0x82, result)), SW_OK

    # ---------------------------------------------------------------- GENERATE ASYMMETRIC KEY PAIR

    def _generate(self, cmd: Command, data: bytes) -> Step:
        if cmd.p1 != 0x00 or cmd.p2 not in SLOTS:
            return b"", SW_WRONG_P1P2 if cmd.p1 else SW_REF_NOT_FOUND
        if not self.mgmt.authenticated():
            return b"", SW_SECURITY
        try:
            template = tlv.to_dict(tlv.decode_one(data, 0xAC), allowed=(0x80, 0x81, 0xAA, 0xAB))
        except WireError:
            return b"", SW_WRONG_DATA
        alg = KEY_ALG.get(int.from_bytes(template.get(0x80, b""), "big") if len(template.get(0x80, b"")) == 1 else -1)
        if alg is None:
            return b"", SW_WRONG_DATA
        # YubiKey's PIN policy tag (yubico-piv-tool --pin-policy): 00 default (the card's policy stays), 01 never,
        # 02 once, 03 always — set with the new key, behind the management key, as a YubiKey does
        pin_policy = template.get(0xAA)
        if not self._valid_pin_policy(pin_policy):
            return b"", SW_WRONG_DATA
        slot = slot_name(cmd.p2)
        public = yield Generate(slot, alg)
        yield Notice("key-generated", {"slot": slot, "alg": alg.name.lower()})
        yield from self._set_pin_policy(cmd.p2, pin_policy)
        # after the key: if this store fails, the new key is still called imported (the cautious mistake)
        yield from self._set_origin(cmd.p2, imported=False)
        return tlv.encode(0x7F49, self.public_key_body(public)), SW_OK

    @staticmethod
    def public_key_body(public: bytes) -> bytes:
        """A public key as GENERATE's 7F49 and GET METADATA's 04 carry it: RSA 81 modulus 82 exponent, EC 86 point."""
        nums = crypto.public_numbers(public)
        if "rsa" in nums:
            n, e = nums["rsa"]
            return tlv.encode_many([(0x81, n), (0x82, e)])
        return tlv.encode(0x86, nums["ec"])

    def _imported_slots(self) -> Generator[Effect, Any, bytes]:
        raw = yield Load(ItemKind.PIN, ORIGIN_ITEM)
        return bytes(raw) if raw else b""

    def _set_origin(self, ref: int, imported: bool) -> Generator[Effect, Any, None]:
        """Record whether slot ``ref``'s key was imported (GET METADATA's origin); stored only when it changes."""
        marked = yield from self._imported_slots()
        if (ref in marked) != imported:
            slots = (set(marked) | {ref}) if imported else (set(marked) - {ref})
            yield Store(ItemKind.PIN, ORIGIN_ITEM, bytes(sorted(slots)))

    @staticmethod
    def _valid_pin_policy(pin_policy: bytes | None) -> bool:
        return pin_policy is None or (len(pin_policy) == 1 and pin_policy[0] <= pins.PinPolicy.ALWAYS)

    def _set_pin_policy(self, ref: int, pin_policy: bytes | None) -> Generator[Effect, Any, None]:
        """A new key's PIN policy (tag AA: 00 default, the slot keeps its policy; 01 never, 02 once, 03 always)."""
        if pin_policy and pin_policy[0]:
            policy = yield from pins.load_policy()
            chosen = pins.PinPolicy(pin_policy[0])
            yield Store(ItemKind.PIN, pins.POLICY_ITEM, encode_policy(policy.with_slot(ref, chosen)))
            yield Notice("pin-policy-set", {"slot": slot_name(ref), "policy": chosen.name.lower()})

    # ---------------------------------------------------------------- IMPORT ASYMMETRIC KEY (YubiKey)

    def _import_key(self, cmd: Command, data: bytes) -> Step:
        """
        YubiKey IMPORT ASYMMETRIC KEY: ``00 FE alg slot`` with RSA-2048's CRT
        parts (01 p, 02 q, 03 dP, 04 dQ, 05 qInv; exponent 65537) or the EC
        private scalar (06; P-384: exactly 48 bytes, as yubico-piv-tool and
        yubikit send it), optional PIN policy AA and touch policy
        AB (accepted, no touch here); behind the management key, as
        GENERATE. The key is sealed into the slot like a generated one.
        """
        if cmd.p2 not in SLOTS:
            return b"", SW_REF_NOT_FOUND
        alg = KEY_ALG.get(cmd.p1)
        if alg is None:
            return b"", SW_WRONG_P1P2
        if not self.mgmt.authenticated():
            return b"", SW_SECURITY
        parts = tlv.to_dict(data, allowed=(0x01, 0x02, 0x03, 0x04, 0x05, 0x06, 0xAA, 0xAB))
        pin_policy = parts.pop(0xAA, None)
        parts.pop(0xAB, None)
        if not self._valid_pin_policy(pin_policy):
            return b"", SW_WRONG_DATA
        rsa = alg is KeyAlg.RSA2048
        if set(parts) != ({0x01, 0x02, 0x03, 0x04, 0x05} if rsa else {0x06}):
            return b"", SW_WRONG_DATA
        if alg is KeyAlg.P384 and len(parts[0x06]) != EC_SIZE[alg]:
            return b"", SW_WRONG_DATA
        try:
            if rsa:
                der = bytearray(crypto.rsa_private_der_from_crt(*(parts[t] for t in (0x01, 0x02, 0x03, 0x04, 0x05))))
            elif alg is KeyAlg.P384:
                der = bytearray(crypto.p384_private_der_from_scalar(parts[0x06]))
            else:
                der = bytearray(crypto.p256_private_der_from_scalar(parts[0x06]))
        except crypto.CryptoError:
            return b"", SW_WRONG_DATA
        slot = slot_name(cmd.p2)
        try:
            public = crypto.public_der_of(der)
            kind = {KeyAlg.RSA2048: crypto.KEY_RSA2048, KeyAlg.P256: crypto.KEY_P256, KeyAlg.P384: crypto.KEY_P384}
            if crypto.public_kind(public) != kind[alg]:
                return b"", SW_WRONG_DATA
            # the origin before the key: if the key's store fails, the old key is called imported, never the
            # imported one generated
            yield from self._set_origin(cmd.p2, imported=True)
            yield Store(ItemKind.KEY, slot, der, alg, public)  # sealed by the glue, then zeroed here
        finally:
            der[:] = bytes(len(der))
        yield Notice("key-imported", {"slot": slot, "alg": alg.name.lower()})
        yield from self._set_pin_policy(cmd.p2, pin_policy)
        return b"", SW_OK

    # ---------------------------------------------------------------- GET METADATA (YubiKey)

    def _get_metadata(self, cmd: Command, data: bytes) -> Step:
        """
        YubiKey GET METADATA (firmware 5.3+): ``00 F7 00 ref``, no PIN nor
        management key needed; the answer is a set of TLVs (yubikit.piv
        PivSession.get_pin_metadata / get_management_key_metadata /
        get_slot_metadata; Yubico.NET.SDK apdu/metadata.md):

        * 80 PIN, 81 PUK: 01 algorithm FF, 05 default (01: still 123456 /
          12345678), 06 retries (limit, left);
        * 9B management key: 01 algorithm (03 3DES, 08/0A/0C AES), 02 policy
          (PIN policy 00: none applies, touch 01 never), 05 default (01: the
          key bytes are 0102..08 three times, whatever the algorithm);
        * 9A/9C/9D/9E and the retired 82-95: 01 algorithm (07 RSA-2048, 11 P-256, 14 P-384), 02 policy (the
          slot's PIN policy, touch 01 never), 03 origin (01 generated, 02
          imported), 04 public key (81 n 82 e, or 86 point).

        An empty slot (a retired slot without a key), and every other
        reference, answer 6A88; P1 other than 00 answers 6A86.
        """
        if cmd.p1 != 0x00:
            return b"", SW_WRONG_P1P2
        ref = cmd.p2
        if ref in (PIN_REF, PUK_REF):
            rec = yield from self._load_secret(ref)
            default = apdu.pad_pin(DEFAULT_PIN if ref == PIN_REF else DEFAULT_PUK)
            is_default = crypto.constant_time_equal(rec.value, default)
            return tlv.encode_many([
                (TAG_METADATA_ALGO, bytes([ALG_PIN])),
                (TAG_METADATA_IS_DEFAULT, b"\x01" if is_default else b"\x00"),
                (TAG_METADATA_RETRIES, bytes([rec.max_tries, rec.tries_left])),
            ]), SW_OK
        if ref == MGMT_REF:
            rec = yield from self._load_mgmt()
            is_default = crypto.constant_time_equal(rec.key, DEFAULT_MGMT.key)
            return tlv.encode_many([
                (TAG_METADATA_ALGO, bytes([rec.alg])),
                (TAG_METADATA_POLICY, bytes([0x00, TOUCH_NEVER])),
                (TAG_METADATA_IS_DEFAULT, b"\x01" if is_default else b"\x00"),
            ]), SW_OK
        if ref not in SLOTS:
            return b"", SW_REF_NOT_FOUND
        info = yield KeyInfo(slot_name(ref))
        if info is None or info[0] not in PIV_ALG or not info[1]:
            return b"", SW_REF_NOT_FOUND
        alg, public = info
        policy = (yield from pins.load_policy()).of(ref)
        imported = ref in (yield from self._imported_slots())
        return tlv.encode_many([
            (TAG_METADATA_ALGO, bytes([PIV_ALG[alg]])),
            (TAG_METADATA_POLICY, bytes([int(policy), TOUCH_NEVER])),
            (TAG_METADATA_ORIGIN, bytes([ORIGIN_IMPORTED if imported else ORIGIN_GENERATED])),
            (TAG_METADATA_PUBLIC_KEY, self.public_key_body(bytes(public))),
        ]), SW_OK

    # ---------------------------------------------------------------- YubiKey extensions

    def _get_version(self, cmd: Command, data: bytes) -> Step:
        yield from ()
        return apdu.Version.build(dict(major=self.version[0], minor=self.version[1], patch=self.version[2])), SW_OK

    def serial_number(self) -> int:
        """The YubiKey serial number (GET SERIAL, the attestation's 1.3.6.1.4.1.41482.3.7), derived from the serial."""
        return int.from_bytes(self._id_bytes(b"serial", 4), "big") & 0x7FFFFFFF

    def _get_serial(self, cmd: Command, data: bytes) -> Step:
        yield from ()
        return apdu.Serial32.build(self.serial_number()), SW_OK

    # ---------------------------------------------------------------- ATTEST (YubiKey)

    def _attest(self, cmd: Command, data: bytes) -> Step:
        """
        YubiKey ATTEST (firmware 4.3+): ``00 F9 slot 00``, no PIN nor
        management key needed (yubico-piv-tool -a attest, ykman piv keys
        attest). The answer is an X.509 certificate, plain DER: the slot's
        public key, subject "YubiKey PIV Attestation <slot>", issuer and
        validity those of the F9 certificate (object 5FFF01), a random
        16-byte serial, Yubico's extensions 3.3 firmware, 3.7 serial, 3.8
        (PIN policy, touch policy) and 3.9 form factor, signed by the F9 key
        with SHA-256 (developers.yubico.com PIV_attestation; Yubico.NET.SDK
        apdu/attest.md). A key that came in by IMPORT and an empty slot answer
        6A80, as a YubiKey (Yubico.NET.SDK issue 9: "no private key in the
        slot" or "imported"; go-piv maps Attest's 6A80 to ErrNotFound); a P1
        that is no key slot, or P2 other than 00, answers 6A86.

        The F9 key is the card's own (made here, on the first ATTEST that
        needs it: a card enrolled before attestation existed gets one without
        re-enrolment, and enrolment stays as fast as before); it is sealed
        and synced like any key, its self-signed certificate is written to
        5FFF01 (synced) before the first attestation is answered.
        """
        if cmd.p1 not in SLOTS or cmd.p2 != 0x00:
            return b"", SW_WRONG_P1P2
        slot = slot_name(cmd.p1)
        info = yield KeyInfo(slot)
        if info is None or info[0] not in PIV_ALG or not info[1]:
            return b"", SW_WRONG_DATA
        if cmd.p1 in (yield from self._imported_slots()):
            return b"", SW_WRONG_DATA  # only a key generated on the card is attested
        policy = (yield from pins.load_policy()).of(cmd.p1)
        issuer = yield from self._attestation_certificate()
        serial = self.serial_number()
        extensions = (
            (OID_FIRMWARE, bytes(self.version)),
            (OID_SERIAL, tlv.encode(0x02, serial.to_bytes(serial.bit_length() // 8 + 1, "big"))),  # DER INTEGER
            (OID_POLICY, bytes([int(policy), TOUCH_NEVER])),
            (OID_FORM_FACTOR, bytes([FORM_FACTOR])),
        )
        cert = yield Certify(ATTEST_KEY, f"YubiKey PIV Attestation {slot}", self._certificate_serial(),
                             bytes(info[1]), issuer, extensions)
        yield Notice("key-attested", {"slot": slot})
        return bytes(cert), SW_OK

    def _certificate_serial(self) -> int:
        """A random positive 16-byte certificate serial number (what a YubiKey's attestations carry)."""
        return (int.from_bytes(self.rand(16), "big") >> 1) | (1 << 120)

    def _attestation_certificate(self) -> Generator[Effect, Any, bytes]:
        """
        The F9 certificate (5FFF01) the attestation is issued under; the F9
        key and its self-signed certificate are made first if the card has
        none (a new key: whatever 5FFF01 held belongs to no key here). A
        5FFF01 that is not a certificate object answers 6A80.
        """
        info = yield KeyInfo(ATTEST_KEY)
        stored = None
        if info is None:
            yield Generate(ATTEST_KEY, ATTEST_KEY_ALG)  # sealed and synced by the glue
            yield Notice("attestation-key-generated", {"alg": ATTEST_KEY_ALG.name.lower()})
        else:
            stored = yield Load(ItemKind.DATA, object_name(TAG_ATTEST_CERT))
        if stored:
            try:
                fields = tlv.to_dict(bytes(stored), allowed=(0x70, 0x71, 0xFE))
            except WireError:
                fields = {}
            if not fields.get(0x70):
                raise ApduError(SW_WRONG_DATA, "5FFF01 is not a certificate object")
            return fields[0x70]
        cert = yield Certify(ATTEST_KEY, f"vsc PIV Attestation {self.serial}", self._certificate_serial())
        yield Store(ItemKind.DATA, object_name(TAG_ATTEST_CERT),
                    tlv.encode_many([(0x70, bytes(cert)), (0x71, b"\x00"), (0xFE, b"")]))
        yield Notice("attestation-certificate-stored", {"bytes": len(cert)})
        return bytes(cert)


#: PivApplet._dispatch's handler of each INS after SELECT (a dict of bound methods per APDU cost about 1 us)
_HANDLERS = {
    INS_GET_DATA: PivApplet._get_data,
    INS_VERIFY: PivApplet._verify,
    INS_CHANGE: PivApplet._change,
    INS_RESET_RETRY: PivApplet._reset_retry,
    INS_GENERAL_AUTH: PivApplet._general_authenticate,
    INS_GENERATE: PivApplet._generate,
    INS_PUT_DATA: PivApplet._put_data,
    INS_GET_VERSION: PivApplet._get_version,
    INS_GET_SERIAL: PivApplet._get_serial,
    INS_SET_MGMT: PivApplet._set_mgmt,
    INS_IMPORT: PivApplet._import_key,
    INS_GET_METADATA: PivApplet._get_metadata,
    INS_ATTEST: PivApplet._attest,
}
