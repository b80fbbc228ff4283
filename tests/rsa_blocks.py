"""
TEST ONLY: padded RSA blocks as a PIV host builds them, to feed the card's
raw private operation, built independently of vsc.crypto (``cryptography``
and the RFC 8017 encodings; Python integers on PUBLIC numbers only).
"""

from __future__ import annotations

import hashlib

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

#: DigestInfo prefixes, RFC 8017 section 9.2 note 1
DIGEST_INFO = {
    "sha1": bytes.fromhex("3021300906052b0e03021a05000414"),
    "sha224": bytes.fromhex("302d300d06096086480165030402040500041c"),
    "sha256": bytes.fromhex("3031300d060960864801650304020105000420"),
    "sha384": bytes.fromhex("3041300d060960864801650304020205000430"),
    "sha512": bytes.fromhex("3051300d060960864801650304020305000440"),
}
HASHES = {"sha1": hashes.SHA1, "sha224": hashes.SHA224, "sha256": hashes.SHA256, "sha384": hashes.SHA384,
          "sha512": hashes.SHA512}


def size_of(public: rsa.RSAPublicKey) -> int:
    return (public.key_size + 7) // 8


def type1_block(k: int, payload: bytes, ps_len: int | None = None) -> bytes:
    """00 01 FF..FF 00 payload, ``k`` bytes (or with a PS of ``ps_len`` bytes)."""
    ps = k - 3 - len(payload) if ps_len is None else ps_len
    return b"\x00\x01" + b"\xff" * ps + b"\x00" + payload


def pkcs1_v15_block(k: int, hash_name: str, data: bytes) -> bytes:
    """EMSA-PKCS1-v1_5 (RFC 8017 9.2) of ``data`` with ``hash_name``."""
    return type1_block(k, DIGEST_INFO[hash_name] + hashlib.new(hash_name, data).digest())


def encoded_message(public: rsa.RSAPublicKey, signature_or_ciphertext: bytes) -> bytes:
    """x^e mod n: the padded block behind a signature (public operation)."""
    nums = public.public_numbers()
    return pow(int.from_bytes(signature_or_ciphertext, "big"), nums.e, nums.n).to_bytes(size_of(public), "big")


def pss_block(key: rsa.RSAPrivateKey, data: bytes, hash_name: str = "sha256") -> tuple[bytes, bytes]:
    """(EMSA-PSS block, the signature cryptography made of it): cryptography signs, the public exponent unwraps."""
    h = HASHES[hash_name]()
    sig = key.sign(data, padding.PSS(mgf=padding.MGF1(h), salt_length=padding.PSS.DIGEST_LENGTH), h)
    return encoded_message(key.public_key(), sig), sig


def pss_verify(public: rsa.RSAPublicKey, data: bytes, signature: bytes, hash_name: str = "sha256") -> None:
    h = HASHES[hash_name]()
    public.verify(signature, data, padding.PSS(mgf=padding.MGF1(h), salt_length=padding.PSS.AUTO), h)


def _mgf1(seed: bytes, length: int, hash_name: str) -> bytes:
    out, counter = b"", 0
    while len(out) < length:
        out += hashlib.new(hash_name, seed + counter.to_bytes(4, "big")).digest()
        counter += 1
    return out[:length]


def eme_pkcs1_v15_decode(em: bytes) -> bytes:
    """RFC 8017 7.2.2 step 3 (a test's strict check): 00 02 PS(>= 8 non-zero) 00 M -> M."""
    assert em[:2] == b"\x00\x02", em[:2].hex()
    sep = em.index(0, 2)
    assert sep >= 10
    return em[sep + 1:]


def eme_oaep_decode(em: bytes, hash_name: str = "sha256", label: bytes = b"") -> bytes:
    """RFC 8017 7.1.2 step 3: the message inside an EME-OAEP block."""
    hlen = hashlib.new(hash_name).digest_size
    assert em[0] == 0
    masked_seed, masked_db = em[1:1 + hlen], em[1 + hlen:]
    seed = bytes(a ^ b for a, b in zip(masked_seed, _mgf1(masked_db, hlen, hash_name)))
    db = bytes(a ^ b for a, b in zip(masked_db, _mgf1(seed, len(masked_db), hash_name)))
    assert db[:hlen] == hashlib.new(hash_name, label).digest()
    rest = db[hlen:].lstrip(b"\x00")
    assert rest[0] == 1
    return rest[1:]
