"""
Single block ciphers: the PIV card management key (SP 800-78-4: 3DES or AES,
one ECB block per challenge) and single DES-CBC for the patent's legacy
suite (pycryptodome: OpenSSL 3 offers single DES only through its legacy
provider).
"""

from __future__ import annotations

from Crypto.Cipher import DES as _DES
from cryptography.hazmat.decrepit.ciphers.algorithms import TripleDES
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from vsc.crypto.errors import CryptoError

#: PIV algorithm identifiers of the card management key (SP 800-78-4 table 6-2)
PIV_MGMT_3DES = 0x03
PIV_MGMT_AES128 = 0x08
PIV_MGMT_AES192 = 0x0A
PIV_MGMT_AES256 = 0x0C
_MGMT_KEY_SIZES = {PIV_MGMT_3DES: 24, PIV_MGMT_AES128: 16, PIV_MGMT_AES192: 24, PIV_MGMT_AES256: 32}


def mgmt_block_size(alg: int) -> int:
    """The challenge size of a management-key algorithm: 8 (3DES) or 16 (AES)."""
    if alg not in _MGMT_KEY_SIZES:
        raise CryptoError(f"unknown management key algorithm {alg:#04x}")
    return 8 if alg == PIV_MGMT_3DES else 16


def mgmt_key_size(alg: int) -> int:
    if alg not in _MGMT_KEY_SIZES:
        raise CryptoError(f"unknown management key algorithm {alg:#04x}")
    return _MGMT_KEY_SIZES[alg]


def mgmt_cipher(alg: int, key, block: bytes, encrypt: bool = True) -> bytes:
    """
    One ECB block under the card management key: 3DES (three-key EDE; the
    PIV default key has K1=K2=K3, which OpenSSL accepts) or AES.
    """
    if len(key) != mgmt_key_size(alg) or len(block) != mgmt_block_size(alg):
        raise CryptoError("management key or block has the wrong size")
    algorithm = TripleDES(bytes(key)) if alg == PIV_MGMT_3DES else algorithms.AES(bytes(key))
    ctx = Cipher(algorithm, modes.ECB())
    op = ctx.encryptor() if encrypt else ctx.decryptor()
    return op.update(block) + op.finalize()


def des_cbc_encrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    """Single DES-CBC (56-bit; the patent's legacy channel [0078] only). ``data`` is already padded."""
    return _DES.new(key, _DES.MODE_CBC, iv=iv).encrypt(data)


def des_cbc_decrypt(key: bytes, iv: bytes, data: bytes) -> bytes:
    return _DES.new(key, _DES.MODE_CBC, iv=iv).decrypt(data)
