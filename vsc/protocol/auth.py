"""
Authentication computations shared by the card (which answers) and the
server (which checks): owner authentication [0039]/[0086] and the embedded
Master key challenge-response of Figure 10 [0087]. Pure functions.
"""

from __future__ import annotations

from vsc import crypto
from vsc.wire.ops import AuthMethod, KdfAlg, KdfParams, MasterResponse, master_input

METHOD_NAMES = {
    "password": AuthMethod.PASSWORD,
    "master-key": AuthMethod.MASTER_KEY,
    "keyfile": AuthMethod.KEYFILE,
    "one-time-agent": AuthMethod.ONE_TIME_AGENT,
    "totp": AuthMethod.TOTP,
}
METHOD_LABELS = {v: k for k, v in METHOD_NAMES.items()}

#: The Master key embedded in every card built from this source tree ([0042]).
#: A deployment builds its cards with its own secret Master key (docs/admin.md):
#: set VSC_MASTER_KEY_FILE for both the server and the card processes.
DEFAULT_MASTER_KEY = crypto.sha256(b"vsc default Master key - replace it in a deployment")


def load_master_key(path: str | None) -> bytes:
    """A Master key file holds 32 bytes as 64 hex digits; no path means the built-in default."""
    if not path:
        return DEFAULT_MASTER_KEY
    with open(path) as f:
        text = f.read(200).strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:  # not fromhex's words: they name no file
        raise ValueError(f"{path}: a Master key is 32 bytes (64 hex digits), and this file holds something else") \
            from None
    if len(key) != 32:
        raise ValueError(f"{path}: a Master key is 32 bytes (64 hex digits)")
    return key


def code_hash(code: str) -> bytes:
    """
    What the server stores and compares for an enrolment code (§10.4): SHA-256 of the UTF-8 of its
    upper-cased letters and digits, everything else dropped. The codes vsc issues are base32 (A-Z, 2-7).
    """
    normal = "".join(ch for ch in code.upper() if ch.isalnum())
    return crypto.sha256(normal.encode("utf-8"))

LEGACY_VERIFIER_SIZE = 16  # MD5(auth key), [0039]
VERIFIER_SIZE = 32  # SHA-256(auth key)


def verifier_for(auth_key: bytes, alg: KdfAlg) -> bytes:
    """What the server stores: a hash of the authentication key, never the key."""
    if alg is KdfAlg.LEGACY_MD5:
        return crypto.md5(auth_key)
    return crypto.sha256(auth_key)


def check_password(verifier: bytes, presented_key: bytes) -> bool:
    """Compare the presented authentication key against the stored verifier (constant time)."""
    if len(verifier) == LEGACY_VERIFIER_SIZE:
        candidate = crypto.md5(presented_key)
    else:
        candidate = crypto.sha256(presented_key)
    return crypto.constant_time_equal(candidate, verifier)


def master_mac(master: bytes, ri1: bytes, ri2: bytes, serial: str) -> bytes:
    """HMAC-SHA256(Master, "vsc1 master-key" || ri1 || ri2 || serial) — Figure 10 with a modern MAC."""
    return crypto.hmac_sha256(master, master_input(ri1, ri2, serial))


def master_answer(master: bytes, ri1: bytes, serial: str, rand: crypto.RandomBytes) -> bytes:
    ri2 = rand(32)
    return MasterResponse(ri2=ri2, mac=master_mac(master, ri1, ri2, serial)).encode()


def check_master(master: bytes, ri1: bytes, serial: str, answer: bytes) -> bool:
    resp = MasterResponse.decode(answer)
    return crypto.constant_time_equal(resp.mac, master_mac(master, ri1, resp.ri2, serial))


def decoy_kdf(secret: bytes, serial: str) -> bytes:
    """
    KDF parameters for a serial that does not exist: stable per serial and
    shaped like real ones, so a challenge does not reveal whether it exists.
    """
    salt = crypto.hmac_sha256(secret, b"decoy-salt:" + serial.encode("utf-8"))[:16]
    return KdfParams(alg=KdfAlg.SCRYPT, salt=salt).encode()


def decoy_verifier(secret: bytes, serial: str) -> bytes:
    return crypto.hmac_sha256(secret, b"decoy-verifier:" + serial.encode("utf-8"))
