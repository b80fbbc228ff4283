"""
The card's side of the operations (docs/protocol.md, "Operations"), over an
established CardProtocol. Also the password key derivation of Figure 9.
"""

from __future__ import annotations

import attrs

from vsc import crypto
from vsc.protocol import auth
from vsc.wire.ops import (
    AuthChallenge,
    AuthItem,
    AuthMethod,
    AuthResponse,
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


class OperationRefused(Exception):
    """The server answered with a status other than OK."""

    def __init__(self, status: Status, what: str = ""):
        super().__init__(f"{what}: {status.name}" if what else status.name)
        self.status = status


@attrs.frozen
class PasswordKeys:
    auth_key: bytes = attrs.field(repr=False)
    protection_key: bytes = attrs.field(repr=False)


def derive_keys(password: str, kdf: KdfParams) -> PasswordKeys:
    """
    Figure 9: legacy = MD5(password || SALT), first 64 bits authentication key,
    second 64 bits protection key. Modern: scrypt with the per-card salt,
    64 bytes split into a 256-bit authentication key and a 256-bit protection key.
    """
    pw = password.encode("utf-8")
    if kdf.alg is KdfAlg.LEGACY_MD5:
        digest = crypto.md5(pw + LEGACY_SALT)
        return PasswordKeys(digest[:8], digest[8:])
    out = crypto.scrypt(pw, kdf.salt, kdf.log2_n, kdf.r, kdf.p, 64)
    return PasswordKeys(out[:32], out[32:])


def new_kdf(rand: crypto.RandomBytes, legacy: bool = False, log2_n: int = 15) -> KdfParams:
    if legacy:
        return KdfParams(alg=KdfAlg.LEGACY_MD5, salt=b"", log2_n=0, r=0, p=0)
    return KdfParams(alg=KdfAlg.SCRYPT, salt=rand(16), log2_n=log2_n)


def _check(result, what: str) -> OpResult:
    if not isinstance(result, OpResult):
        raise OperationRefused(Status.BAD_REQUEST, f"{what}: unexpected {type(result).__name__}")
    if result.status is not Status.OK:
        raise OperationRefused(result.status, what)
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
           keys: PasswordKeys | None = None) -> tuple[list[AuthItem], PasswordKeys]:
    """Answer every challenge (Figure 8); returns the answers and the derived password keys."""
    if keys is None:
        keys = derive_keys(password, KdfParams.decode(challenge.kdf))
    answers = []
    for item in challenge.challenges:
        if item.method is AuthMethod.PASSWORD:
            answers.append(AuthItem(item.method, keys.auth_key))
        elif item.method is AuthMethod.MASTER_KEY:
            answers.append(AuthItem(item.method, auth.master_answer(master, item.data, serial, rand)))
        else:
            answers.append(AuthItem(item.method, b""))  # unsupported here: fails on the server
    return answers, keys


async def authenticated(proto, request: OpRequest, password: str, muk: bytes, master: bytes,
                        rand: crypto.RandomBytes, keys: PasswordKeys | None = None) -> tuple[OpResult, PasswordKeys | None]:
    """Send an insert/recover/destroy request, answer the challenges, return the result."""
    first = await proto.request(request)
    if isinstance(first, OpResult):  # BUSY before authentication
        return _check(first, request.op.name.lower()), keys
    if not isinstance(first, AuthChallenge):
        raise OperationRefused(Status.BAD_REQUEST, f"unexpected {type(first).__name__}")
    answers, keys = answer(first, request.serial, password, master, rand, keys)
    result = await proto.request(AuthResponse(responses=tuple(answers), muk=muk))
    return _check(result, request.op.name.lower()), keys


async def insert(proto, serial: str, password: str, muk: bytes, insert_secret: bytes, master: bytes,
                 rand: crypto.RandomBytes = crypto.system_random, keys: PasswordKeys | None = None):
    return await authenticated(proto, OpRequest(op=Op.INSERT, serial=serial, insert_secret=insert_secret),
                               password, muk, master, rand, keys)


async def recover(proto, serial: str, password: str, muk: bytes, master: bytes,
                  rand: crypto.RandomBytes = crypto.system_random, keys: PasswordKeys | None = None):
    return await authenticated(proto, OpRequest(op=Op.RECOVER, serial=serial), password, muk, master, rand, keys)


async def destroy(proto, serial: str, password: str, master: bytes, muk: bytes = b"",
                  rand: crypto.RandomBytes = crypto.system_random, keys: PasswordKeys | None = None):
    return await authenticated(proto, OpRequest(op=Op.DESTROY, serial=serial), password, muk, master, rand, keys)


async def sync(proto, serial: str, insert_secret: bytes, version: int, protected: bytes) -> OpResult:
    result = await proto.request(
        OpRequest(op=Op.SYNC, serial=serial, insert_secret=insert_secret, version=version, protected=protected)
    )
    return _check(result, "sync")


async def remove(proto, serial: str, insert_secret: bytes, version: int, protected: bytes) -> OpResult:
    result = await proto.request(
        OpRequest(op=Op.REMOVE, serial=serial, insert_secret=insert_secret, version=version, protected=protected)
    )
    return _check(result, "remove")
