"""
The card's side of the operations (docs/protocol.md, "Operations"), over an
established CardProtocol. Also the password key derivation of Figure 9.
"""

from __future__ import annotations

import attrs
from twisted.logger import Logger

from vsc import crypto
from vsc.protocol import auth, serials
from vsc.protocol.methods import METHODS, CardSide, Credentials
from vsc.wire.ops import (
    AuthChallenge,
    AuthItem,
    AuthMethod,
    AuthResponse,
    ChangePassword,
    EnrolRequest,
    KdfAlg,
    KdfParams,
    Op,
    OpRequest,
    OpResult,
    Status,
)

#: The well-known, hard-coded SALT of the legacy derivation ([0021], [0085]).
LEGACY_SALT = b"EP0936530-VSC-SALT"


log = Logger()


class OperationRefused(Exception):
    """
    The server answered with a status other than OK. ``notes``: what this
    card could not answer (a missing or unusable keyfile, a failed agent, no
    TOTP code) — the server's refusal is the same either way; the notes say why.
    """

    def __init__(self, status: Status, what: str = "", notes: tuple = ()):
        super().__init__(f"{what}: {status.name}" if what else status.name)
        self.status = status
        self.notes = tuple(notes)


@attrs.frozen
class PasswordKeys:
    auth_key: bytes = attrs.field(repr=False)
    protection_key: bytes = attrs.field(repr=False)
    kdf: KdfParams | None = None  # what they were derived with (kept for a password change)


class WeakKdfRefused(Exception):
    """The server asked for a weaker password derivation than the one this card was enrolled with."""


class CostlyKdfRefused(WeakKdfRefused):
    """The server asked for a password derivation beyond the memory or work this card spends on one."""


class KdfSaltRefused(WeakKdfRefused):
    """The server named another salt than the one this card was enrolled with (or first inserted with)."""


def check_kdf(kdf: KdfParams, floor: str, salt: bytes = b"") -> None:
    """
    A malicious server could ask for the legacy MD5 derivation (or a cheap
    scrypt) to turn the verifier it receives into a fast offline guess. The
    card pins its derivation at enrolment and refuses anything weaker —
    before it derives or sends anything. Whatever the floor, it also refuses
    scrypt parameters beyond the memory or work it spends on one derivation
    (``crypto.scrypt_refusal``): N, r and p come from the server.

    ``salt`` is the card's pinned salt (card.ini ``kdf_salt``): the one it
    chose at enrolment, kept across password changes. A server that names
    another one — the same salt for every card, say, so that one dictionary
    pass (computable in advance) tests every card's answer at once — is
    refused before anything is derived. Empty: not pinned yet (cards
    enrolled before the pin; pinned at their next insert).
    """
    if salt and (kdf.alg is not KdfAlg.SCRYPT or not crypto.constant_time_equal(kdf.salt, salt)):
        raise KdfSaltRefused(
            "refused: the server asked for a password derivation with another salt than this card's "
            "(kdf_salt in its card.ini); a server that does this may be collecting answers it can test "
            "a password guess against many cards at once"
        )
    if kdf.alg is KdfAlg.SCRYPT:
        # whatever the floor: the server chooses N, r and p (up to 255 each) at every insert
        why = crypto.scrypt_refusal(kdf.log2_n, kdf.r, kdf.p)
        if why is not None:
            raise CostlyKdfRefused(f"refused: the server asked for a password derivation this card does not do ({why})")
    from vsc.card.config import CardConfigError, kdf_floor_cost

    try:
        minimum = kdf_floor_cost(floor)
    except CardConfigError as e:  # never "no floor": that would let the server ask for the legacy derivation
        raise WeakKdfRefused(f"refused: this card's {e}; it derives nothing until card.ini says which") from None
    if minimum is None:
        return
    if kdf.alg is not KdfAlg.SCRYPT or kdf.log2_n < minimum or kdf.r < 8 or kdf.p < 1 or len(kdf.salt) < 16:
        raise WeakKdfRefused(
            "refused: the server asked for a weaker password derivation than this card's "
            f"({kdf.alg.name.lower()}, cost 2^{kdf.log2_n}; this card needs scrypt 2^{minimum} or more)"
        )


def derive_keys(password: str, kdf: KdfParams) -> PasswordKeys:
    """
    Figure 9: legacy = MD5(password || SALT), first 64 bits authentication key,
    second 64 bits protection key. Modern: scrypt with the per-card salt,
    64 bytes split into a 256-bit authentication key and a 256-bit protection key.
    """
    pw = password.encode("utf-8")
    if kdf.alg is KdfAlg.LEGACY_MD5:
        digest = crypto.md5(pw + LEGACY_SALT)
        return PasswordKeys(digest[:8], digest[8:], kdf)
    out = crypto.scrypt(pw, kdf.salt, kdf.log2_n, kdf.r, kdf.p, 64)
    return PasswordKeys(out[:32], out[32:], kdf)


def new_kdf(rand: crypto.RandomBytes, legacy: bool = False, log2_n: int = 15, salt: bytes = b"") -> KdfParams:
    """A fresh derivation: a new random 16-byte salt, or ``salt`` (a password change keeps the card's salt)."""
    if legacy:
        return KdfParams(alg=KdfAlg.LEGACY_MD5, salt=b"", log2_n=0, r=0, p=0)
    return KdfParams(alg=KdfAlg.SCRYPT, salt=salt or rand(16), log2_n=log2_n)


def _check(result, what: str, notes: tuple = ()) -> OpResult:
    if not isinstance(result, OpResult):
        raise OperationRefused(Status.BAD_REQUEST, f"{what}: unexpected {type(result).__name__}")
    if result.status is not Status.OK:
        raise OperationRefused(result.status, what, notes)
    return result


async def enrol(proto, serial: str, code: str, keys: PasswordKeys, kdf: KdfParams, protected: bytes,
                registration: bytes = b"") -> OpResult:
    result = await proto.request(
        EnrolRequest(
            serial=serial,
            code=code,
            verifier=auth.verifier_for(keys.auth_key, kdf.alg),
            kdf=kdf.encode(),
            protected=protected,
            registration=registration,
        )
    )
    return _check(result, "enrol")


def answer(challenge: AuthChallenge, serial: str, password: str, master: bytes, rand: crypto.RandomBytes,
           keys: PasswordKeys | None = None, creds: Credentials | None = None) -> tuple[list[AuthItem], PasswordKeys]:
    """
    Answer every challenge (Figure 8) with the method table shared with the
    server (vsc.protocol.methods); returns the answers and the derived
    password keys. A challenge this card cannot answer is answered empty (the
    server refuses, as for any failed method, [0084]) and the reason is
    logged and kept in ``creds.notes`` for the user.
    """
    creds = creds if creds is not None else Credentials()
    serial = serials.normalise(serial)  # every MAC input names the serial in NFC, as the server does (§10.1)
    if keys is None:
        kdf = KdfParams.decode(challenge.kdf)
        check_kdf(kdf, creds.kdf_floor, creds.kdf_salt)
        keys = derive_keys(password, kdf)
    side = CardSide(serial, keys.auth_key, keys.protection_key, master, creds, rand)
    noted = len(creds.notes)
    answers = [AuthItem(item.method, METHODS[item.method].answer(side, item.data)) for item in challenge.challenges]
    for note in creds.notes[noted:]:
        log.warn("cannot answer an implementation challenge: {why}", why=note)
    return answers, keys


async def authenticated(proto, request: OpRequest, password: str, muk: bytes, master: bytes,
                        rand: crypto.RandomBytes, keys: PasswordKeys | None = None,
                        creds: Credentials | None = None) -> tuple[OpResult, PasswordKeys | None]:
    """Send an insert/recover/destroy request, answer the challenges, return the result."""
    first = await proto.request(request)
    if isinstance(first, OpResult):  # BUSY before authentication
        return _check(first, request.op.name.lower()), keys
    if not isinstance(first, AuthChallenge):
        raise OperationRefused(Status.BAD_REQUEST, f"unexpected {type(first).__name__}")
    creds = creds if creds is not None else Credentials()
    answers, keys = answer(first, request.serial, password, master, rand, keys, creds)
    result = await proto.request(AuthResponse(responses=tuple(answers), muk=muk))
    return _check(result, request.op.name.lower(), tuple(creds.notes)), keys


async def insert(proto, serial: str, password: str, muk: bytes, insert_secret: bytes, master: bytes,
                 rand: crypto.RandomBytes = crypto.system_random, keys: PasswordKeys | None = None,
                 creds: Credentials | None = None):
    return await authenticated(proto, OpRequest(op=Op.INSERT, serial=serial, insert_secret=insert_secret),
                               password, muk, master, rand, keys, creds)


async def recover(proto, serial: str, password: str, muk: bytes, master: bytes,
                  rand: crypto.RandomBytes = crypto.system_random, keys: PasswordKeys | None = None,
                  creds: Credentials | None = None):
    return await authenticated(proto, OpRequest(op=Op.RECOVER, serial=serial), password, muk, master, rand, keys,
                               creds)


async def destroy(proto, serial: str, password: str, master: bytes, muk: bytes = b"",
                  rand: crypto.RandomBytes = crypto.system_random, keys: PasswordKeys | None = None,
                  creds: Credentials | None = None):
    return await authenticated(proto, OpRequest(op=Op.DESTROY, serial=serial), password, muk, master, rand, keys,
                               creds)


async def sync(proto, serial: str, insert_secret: bytes, version: int, protected: bytes) -> OpResult:
    result = await proto.request(
        OpRequest(op=Op.SYNC, serial=serial, insert_secret=insert_secret, version=version, protected=protected)
    )
    return _check(result, "sync")


async def attach(proto, serial: str, insert_secret: bytes) -> OpResult:
    """Op.ATTACH: a reconnected channel proves it belongs to the current insert (docs/protocol.md §10.1)."""
    result = await proto.request(OpRequest(op=Op.ATTACH, serial=serial, insert_secret=insert_secret))
    return _check(result, "attach")


async def remove(proto, serial: str, insert_secret: bytes, version: int, protected: bytes) -> OpResult:
    result = await proto.request(
        OpRequest(op=Op.REMOVE, serial=serial, insert_secret=insert_secret, version=version, protected=protected)
    )
    return _check(result, "remove")


async def change_password(proto, serial: str, insert_secret: bytes, version: int, verifier: bytes, kdf: KdfParams,
                          protected: bytes) -> OpResult:
    """Op.PASSWORD: the new verifier, KDF parameters and re-wrapped protected information."""
    result = await proto.request(
        ChangePassword(serial=serial, insert_secret=insert_secret, version=version, verifier=verifier,
                       kdf=kdf.encode(), protected=protected)
    )
    return _check(result, "password change")
