"""
Implementation authentication beyond the embedded Master key (Figure 8,
503/504): keyfile authentication [0044]-[0047], the one-time algorithm
[0049]-[0052], and the reader-less device of [0005]-[0006], [0015] (TOTP).
Pure functions shared by the card (which answers) and the server (which
issues material at enrolment and checks answers); randomness and time are
injected.

Keyfile design. The patent's keyfile is signed with the VSC Server's private
key and encrypted with a proprietary symmetric algorithm, and the card
decrypts it, checks the signature, and uses as1 in place of Master in the
Figure 10 exchange. Here:

* signature: RSA-PSS-SHA256 by the server's own RSA key, over
  (serial, the card's slot 9e public key, as1, issue time). The signed
  keyfile names its signer's public key; a card accepts it only if that
  key's fingerprint is the one it pinned at enrolment, so a keyfile cannot
  be forged by anyone but the server.
* encryption "so only that card can read as1": sealed (X25519 + HKDF-SHA256 +
  AES-256-GCM, the ECIES/HPKE-base pattern) to an X25519 key pair the card
  DERIVES FROM ITS PASSWORD'S PROTECTION KEY (Figure 9). Why not RSA-OAEP to
  one of the card's own keys: those live inside the protected information,
  which the card only receives after the insert this keyfile authenticates.
  Why not AES-GCM under a protection-key-derived secret: the server would
  have to be given that secret; with a key pair it only ever sees a public
  key. So the keyfile is useless without the owner's password, and it can
  be kept in HOME (it is not secret there); a password change re-seals it
  locally (the signature, over the plaintext, stays valid).

The server keeps as1 (auth_info["keyfile"]["as1"]) to check the answer.
"""

from __future__ import annotations

import base64
import json
import math
from typing import Callable, Iterable
from urllib.parse import quote

import attrs

from vsc import crypto
from vsc.protocol import onetime_agent
from vsc.wire import WireError
from vsc.wire.onetime_agent import X_SIZE, Y_SIZE, AgentChallenge, agent_aad
from vsc.wire.implauth import (
    AS1_SIZE,
    TOTP_SECRET_SIZE,
    EnrolReply,
    KeyfileBody,
    Registration,
    SealedKeyfile,
    SignedKeyfile,
    TotpAnswer,
    keyfile_mac_input,
    keyfile_seal_info,
)
from vsc.wire.ops import AuthMethod, MasterResponse

TOTP_PERIOD = 30
TOTP_DIGITS = 6
TOTP_WINDOW = 1  # the current step and one on either side


class ImplAuthError(Exception):
    """Implementation-authentication material is missing, malformed or fails a check (message is user-facing)."""


class KeyfileError(ImplAuthError):
    pass


# ---------------------------------------------------------------- keyfile [0044]-[0046]


def seal_private(protection_key: bytes, serial: str) -> bytes:
    """The card's keyfile-seal X25519 private key, derived from its protection key (Figure 9)."""
    return crypto.hkdf_extract_expand(b"vsc1 keyfile seal key", protection_key, serial.encode("utf-8"), 32)


def seal_public(protection_key: bytes, serial: str) -> bytes:
    return crypto.x25519_public(seal_private(protection_key, serial))


def _seal_key(shared: bytes, info: bytes) -> bytes:
    return crypto.hkdf_extract_expand(b"vsc1 keyfile seal", shared, info, 32)


def seal_keyfile(signed: bytes, serial: str, recipient: bytes, rand: crypto.RandomBytes) -> bytes:
    """Seal a signed keyfile to the card's X25519 public key ``recipient``."""
    eph_private = rand(32)
    ephemeral = crypto.x25519_public(eph_private)
    info = keyfile_seal_info(serial, ephemeral, recipient)
    key = _seal_key(crypto.x25519_shared(eph_private, recipient), info)
    nonce = rand(12)
    return SealedKeyfile(ephemeral=ephemeral, nonce=nonce, sealed=crypto.aes_gcm_seal(key, nonce, signed, info)).encode()


def unseal_keyfile(sealed: bytes, serial: str, protection_key: bytes) -> bytes:
    """The signed keyfile inside ``sealed``; KeyfileError if it is not this card's and this password's."""
    try:
        outer = SealedKeyfile.decode(sealed)
    except WireError as e:
        raise KeyfileError(f"the keyfile is malformed ({e})") from None
    private = seal_private(protection_key, serial)
    info = keyfile_seal_info(serial, outer.ephemeral, crypto.x25519_public(private))
    try:
        key = _seal_key(crypto.x25519_shared(private, outer.ephemeral), info)
        return crypto.aes_gcm_open(key, outer.nonce, outer.sealed, info)
    except crypto.CryptoError:
        raise KeyfileError(
            f"the keyfile does not decrypt with this password's key (wrong password, tampered keyfile, "
            f"or a keyfile of another card than {serial})"
        ) from None


def reseal_keyfile(sealed: bytes, serial: str, old_protection_key: bytes, new_protection_key: bytes,
                   rand: crypto.RandomBytes) -> bytes:
    """Password change: the same signed keyfile, sealed to the new password's key."""
    signed = unseal_keyfile(sealed, serial, old_protection_key)
    return seal_keyfile(signed, serial, seal_public(new_protection_key, serial), rand)


def sign_keyfile(body: KeyfileBody, sign: Callable[[bytes], bytes], signer: bytes) -> bytes:
    data = body.encode()
    return SignedKeyfile(body=data, signer=signer, signature=sign(data)).encode()


def open_keyfile(sealed: bytes, serial: str, protection_key: bytes, pinned: str) -> KeyfileBody:
    """
    [0046]: decrypt the keyfile, check that the pinned server key signed it and
    that it is this card's, and return it (with as1). KeyfileError otherwise.
    """
    signed_bytes = unseal_keyfile(sealed, serial, protection_key)
    try:
        signed = SignedKeyfile.decode(signed_bytes)
    except WireError as e:
        raise KeyfileError(f"the keyfile is malformed ({e})") from None
    if crypto.fingerprint(signed.signer) != pinned:
        raise KeyfileError(f"the keyfile is signed by {crypto.fingerprint(signed.signer)}, not by the pinned server key {pinned}")
    if not crypto.rsa_pss_verify(signed.signer, signed.body, signed.signature):
        raise KeyfileError("the keyfile signature does not verify against the pinned server key (tampered keyfile)")
    try:
        body = KeyfileBody.decode(signed.body)
    except WireError as e:
        raise KeyfileError(f"the signed keyfile body is malformed ({e})") from None
    if body.serial != serial:
        raise KeyfileError(f"the keyfile is for card {body.serial}, not {serial}")
    return body


def keyfile_mac(as1: bytes, ri1: bytes, ri2: bytes, serial: str) -> bytes:
    """HMAC-SHA256(as1, "vsc1 keyfile" || ri1 || ri2 || serial): Figure 10 with as1 for Master ([0046])."""
    return crypto.hmac_sha256(as1, keyfile_mac_input(ri1, ri2, serial))


def keyfile_answer(as1: bytes, ri1: bytes, serial: str, rand: crypto.RandomBytes) -> bytes:
    ri2 = rand(32)
    return MasterResponse(ri2=ri2, mac=keyfile_mac(as1, ri1, ri2, serial)).encode()


def check_keyfile(as1: bytes, ri1: bytes, serial: str, answer: bytes) -> bool:
    try:
        resp = MasterResponse.decode(answer)
    except WireError:
        return False
    return crypto.constant_time_equal(resp.mac, keyfile_mac(as1, ri1, resp.ri2, serial))


# ---------------------------------------------------------------- one-time algorithm [0049]-[0051]


@attrs.frozen
class AgentIssue:
    """A challenge for the card, and the x the server expects back."""

    data: bytes
    x: bytes = attrs.field(repr=False)


def agent_challenge(serial: str, rand: crypto.RandomBytes) -> AgentIssue:
    """[0050]: a fresh f (program), random x and y; w = E[x, f(y)] with E = AES-256-GCM under HKDF(f(y))."""
    program = onetime_agent.generate_bytes(rand)
    y, x, nonce = rand(Y_SIZE), rand(X_SIZE), rand(12)
    key = onetime_agent.derive_key(onetime_agent.execute(program, y), serial)
    w = crypto.aes_gcm_seal(key, nonce, x, agent_aad(serial, y))
    return AgentIssue(AgentChallenge(program=program, y=y, nonce=nonce, w=w).encode(), x)


def agent_answer(data: bytes, serial: str) -> bytes:
    """The card: run f on y, derive the key, x = D[w, f(y)]. AgentError or CryptoError if impossible."""
    try:
        ch = AgentChallenge.decode(data)
    except WireError as e:
        raise onetime_agent.AgentError(f"malformed agent challenge: {e}") from None
    key = onetime_agent.derive_key(onetime_agent.execute(ch.program, ch.y), serial)
    return crypto.aes_gcm_open(key, ch.nonce, ch.w, agent_aad(serial, ch.y))


def check_agent(expected_x: bytes, answer: bytes) -> bool:
    return len(answer) == X_SIZE and crypto.constant_time_equal(answer, expected_x)


# ---------------------------------------------------------------- TOTP, the reader-less device [0005], [0015]


def totp_code(secret: bytes, step: int, digits: int = TOTP_DIGITS) -> str:
    return crypto.hotp_sha1(secret, step, digits)


def totp_now(secret: bytes, now: float, period: int = TOTP_PERIOD, digits: int = TOTP_DIGITS) -> str:
    """RFC 6238: HOTP over floor(now / period)."""
    return totp_code(secret, int(math.floor(now / period)), digits)


def check_totp(secret: bytes, answer: bytes, now: float, last_step: int,
               period: int = TOTP_PERIOD, digits: int = TOTP_DIGITS) -> int | None:
    """
    The step whose code ``answer`` is, within ±TOTP_WINDOW steps of ``now``
    and later than the last accepted step (a code is good once); else None.
    """
    try:
        code = TotpAnswer.decode(answer).code
    except WireError:
        return None
    if len(code) != digits or not code.isdigit():
        return None
    current = int(math.floor(now / period))
    found = None
    for step in range(current - TOTP_WINDOW, current + TOTP_WINDOW + 1):
        # compare every candidate (no early exit), constant time each
        if crypto.constant_time_equal(totp_code(secret, step, digits).encode(), code.encode()) and step > last_step:
            found = step
    return found


def totp_answer(code: str) -> bytes:
    return TotpAnswer(code="".join(code.split())).encode()


def otpauth_uri(secret: bytes, serial: str, issuer: str = "VSC", digits: int = TOTP_DIGITS,
                period: int = TOTP_PERIOD) -> str:
    """The provisioning URI authenticator apps read (Key Uri Format)."""
    b32 = base32(secret)
    label = quote(f"{issuer}:{serial}")
    return (f"otpauth://totp/{label}?secret={b32}&issuer={quote(issuer)}&algorithm=SHA1"
            f"&digits={digits}&period={period}")


def base32(secret: bytes) -> str:
    return base64.b32encode(secret).decode("ascii").rstrip("=")


# ---------------------------------------------------------------- the server's enrolment material


@attrs.frozen
class EnrolMaterial:
    """Merged into the new card's auth_info (server secrets), and the reply for the card (or b"")."""

    auth_info: dict = attrs.field(repr=False)
    reply: bytes = attrs.field(repr=False)


class Registrar:
    """
    Makes what a new card needs for the methods the policy requires: a signed,
    sealed keyfile with a fresh as1 (keyfile) and a TOTP seed (totp). Pure:
    signing is a function of the server key, randomness and time are injected.
    """

    def __init__(self, sign: Callable[[bytes], bytes] | None, signer: bytes, rand: crypto.RandomBytes,
                 now: Callable[[], float]):
        self.sign = sign
        self.signer = signer
        self.rand = rand
        self.now = now

    def enrol(self, serial: str, registration: bytes, methods: Iterable[AuthMethod],
              sealed_as: str | None = None) -> EnrolMaterial:
        """``sealed_as``: the serial the registration's seal key was derived with (a duplicate's original)."""
        methods = set(methods)
        info: dict = {}
        reply = EnrolReply()
        if AuthMethod.KEYFILE in methods:
            if self.sign is None:
                raise ImplAuthError("this server cannot sign keyfiles")
            if not registration:
                raise ImplAuthError("keyfile authentication is required, but the card sent no registration")
            try:
                reg = Registration.decode(registration)
            except WireError as e:
                raise ImplAuthError(f"the card's registration is malformed: {e}") from None
            if not reg.seal_key:
                raise ImplAuthError("keyfile authentication is required, but the card registered no seal key")
            as1 = self.rand(AS1_SIZE)
            body = KeyfileBody(serial=serial, card_key=reg.card_key, as1=as1, issued=int(self.now()))
            signed = sign_keyfile(body, self.sign, self.signer)
            try:
                sealed = seal_keyfile(signed, sealed_as or serial, reg.seal_key, self.rand)
            except crypto.CryptoError:  # a small-order point: the card's to fix, not a server fault
                raise ImplAuthError("the card's seal key is not a usable X25519 public key") from None
            reply = attrs.evolve(reply, keyfile=sealed)
            info["keyfile"] = {"as1": as1.hex(), "issued": body.issued}
        if AuthMethod.TOTP in methods:
            secret = self.rand(TOTP_SECRET_SIZE)
            reply = attrs.evolve(reply, totp_secret=secret, totp_digits=TOTP_DIGITS, totp_period=TOTP_PERIOD)
            info["totp"] = {"secret": secret.hex(), "last_step": -1, "digits": TOTP_DIGITS, "period": TOTP_PERIOD}
        if not info:
            return EnrolMaterial({}, b"")
        return EnrolMaterial(info, reply.encode())


def stored_material(auth_info: str) -> dict:
    """The card's auth_info JSON as a dict ({} when unreadable)."""
    try:
        value = json.loads(auth_info or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
