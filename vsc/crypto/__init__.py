"""
Every cryptographic primitive vsc uses, and the only package that imports a
crypto library (``cryptography``, pycryptodome, ``hashlib``, ``hmac``,
``secrets``; tests/test_layers.py enforces it).

Organised by primitive:

=============== ==============================================================
errors          CryptoError, the one exception a failed check raises
random          the randomness source (``RandomBytes``, ``system_random``)
hashes          SHA-256, MD5 (legacy only), HMAC-SHA256, constant-time compare,
                key fingerprints — ``hashlib``/``hmac`` only, so it is cheap
kdf             HKDF-SHA256 and scrypt
aead            record ciphers (AES-GCM, ChaCha20-Poly1305, AES-CBC+HMAC, the
                patent's DES-CBC+MD5), AES-GCM one-shot and in place
block           single block ciphers: the PIV card management key (3DES/AES)
                and the legacy suite's single DES
rsa             RSA: server key, OAEP, PSS, PKCS#1 v1.5, the PIV raw operation
ec              X25519, ECDSA, ECDH (P-256, P-384)
keys            card key pairs: generation, loading for one operation
                (``PrivateKeyHandle``), public key forms, signature checks
x509            certificates, subjects, certification requests
vendor          a software vendor's Ed25519 licence-signing key
otp             HOTP/TOTP
_libcrypto      a private ctypes binding to the system's libcrypto.so.3 (RSA
                without padding)
=============== ==============================================================

Which library does what, and why (figures from the project's 2-vCPU machine,
../shared/reference/anchors.md):

* ``cryptography`` (OpenSSL) for every private-key operation and for the
  record ciphers: RSA-OAEP decryption is ~3x faster than pycryptodome, AES-GCM
  with a reused key object ~100x faster per small record, and OpenSSL cleanses
  key material when a key object is freed (``OPENSSL_cleanse``), which
  pure-Python key objects cannot do.
* ``pycryptodome`` where an operation must take *injected* randomness (the
  OAEP seed in key transport: ``cryptography`` draws it from OpenSSL's RNG and
  cannot reproduce test vectors), and for single DES, which the patent's
  legacy suite needs and OpenSSL 3 only offers through its legacy provider.
* ``hashlib``/``hmac`` (OpenSSL underneath) for hashes and HMAC: importing them
  costs a millisecond where ``cryptography`` costs ~60, and the CLI hashes the
  data it asks the card to sign.
  The ``vsc card`` request path goes one step lighter (``sha256_light``):
  CPython's built-in SHA-256 module for small inputs, without loading
  libcrypto at all.
* the system's ``libcrypto.so.3`` through ``ctypes`` (``_libcrypto``) for one
  operation ``cryptography`` does not offer: the RSA private operation on an
  already padded block, which a PIV card performs for GENERAL AUTHENTICATE
  (the host pads). Doing it in Python integers put the private exponent and
  primes into Python objects that are never zeroed, and is neither blinded
  by OpenSSL nor constant time. The binding decodes the key straight out of
  the caller's locked buffer with the ASN.1 item decoders
  (``d2i_PKCS8_PRIV_KEY_INFO``, ``d2i_RSAPrivateKey``), which parse in place
  and cleanse what they copy: ``d2i_AutoPrivateKey`` goes through OpenSSL 3's
  decoder framework, which reads the DER into heap buffers and frees about
  twenty copies of it per load without cleansing them (measured with a free()
  audit, tests/test_memory_scan.py). It then runs ``EVP_PKEY_decrypt`` with
  ``RSA_NO_PADDING`` (blinded, constant-time exponentiation, a CRT fault
  check) and frees the key, which clears its numbers. PKCS#1 v1.5 signature
  blocks for SHA-1/224/256/384/512 are recognised and signed through
  ``cryptography`` instead (same bytes, its usual path).
  tests/test_memory_scan.py checks the result in a running card daemon:
  after PIV PKCS#1 v1.5 and PSS signatures and a decipher, no d, p, q (nor
  dP, dQ, qInv, in either byte order) is found in its memory, and no heap
  block holding a piece of them is freed uncleansed.

Nothing here invents a primitive: every construction is a standard one
(RSA-OAEP-SHA256, RSA-PSS, PKCS#1 v1.5, HKDF-SHA256, HMAC-SHA256, AES-GCM,
ChaCha20-Poly1305, AES-CBC + HMAC encrypt-then-MAC, X25519, ECDSA, Ed25519,
scrypt, HOTP) or the patent's own (DES-CBC + MD5).

``from vsc import crypto; crypto.sha256(...)`` works for every name in
``__all__``; a name's submodule is imported on first use (PEP 562), so
``crypto.sha256`` costs ``hashlib`` only and never ``cryptography``.
"""

from __future__ import annotations

import importlib

try:  # CPython's own SHA-256 module (hashlib's fallback without OpenSSL): see sha256_light
    from _sha2 import sha256 as _builtin_sha256  # Python 3.12+
except ImportError:
    try:
        from _sha256 import sha256 as _builtin_sha256  # Python 3.11
    except ImportError:  # pragma: no cover - another interpreter
        _builtin_sha256 = None

#: sha256_light hashes up to this many bytes itself; more go to hashlib (OpenSSL is faster per byte)
LIGHT_SHA256_MAX = 1 << 20

#: public name -> the submodule that defines it
_WHERE: dict[str, str] = {}
for _module, _names in {
    "errors": ("CryptoError",),
    "random": ("RandomBytes", "system_random", "token_urlsafe"),
    "hashes": ("sha256", "sha384", "md5", "hmac_sha256", "constant_time_equal", "fingerprint", "is_fingerprint"),
    "kdf": ("hkdf_extract_expand", "hkdf_extract", "hkdf_expand", "scrypt", "scrypt_refusal"),
    "aead": ("RecordCipher", "AEADRecordCipher", "CBCHMACRecordCipher", "LegacyDESMD5RecordCipher",
             "GCM_NONCE", "GCM_TAG", "gcm_seal_into", "gcm_open_into", "gcm_seal_joined_into", "gcm_open_joined_into",
             "aes_gcm_seal", "aes_gcm_open"),
    "block": ("PIV_MGMT_3DES", "PIV_MGMT_AES128", "PIV_MGMT_AES192", "PIV_MGMT_AES256",
              "mgmt_block_size", "mgmt_key_size", "mgmt_cipher"),
    "rsa": ("RSAPrivateKey", "RSAPublicKey", "rsa_pss_sign", "rsa_pss_verify", "rsa_encrypt",
            "rsa_private_block", "pkcs1_signature_hash", "pkcs1_sign_payload", "rsa_private_der_from_parts",
            "rsa_private_der_from_crt"),
    "ec": ("X25519Ephemeral", "x25519_public", "x25519_shared", "ecdsa_sign_hash", "ecdsa_der_to_rs",
           "p256_private_der_from_scalar", "p384_private_der_from_scalar"),
    "keys": ("KEY_RSA2048", "KEY_P256", "KEY_P384", "KEY_ED25519", "KEY_X25519", "PrivateKeyHandle", "generate_private_der",
             "public_der_of",
             "public_pem", "public_kind", "public_numbers", "public_der_from_pem", "verify_sha256",
             "ssh_public_parts"),
    "x509": ("parse_subject", "name_der", "self_signed_certificate", "certificate_der",
             "certificate_public_der", "certificate_pem", "certificate_subject", "csr_pem",
             "attestation_ca_certificate", "attestation_certificate"),
    "vendor": ("vendor_keygen", "vendor_sign", "vendor_public_der", "vendor_verify"),
    "otp": ("hotp_sha1",),
}.items():
    for _name in _names:
        _WHERE[_name] = _module
del _module, _names, _name

SUBMODULES = ("errors", "random", "hashes", "kdf", "aead", "block", "rsa", "ec", "keys", "x509", "vendor", "otp")

__all__ = sorted(_WHERE) + list(SUBMODULES)


def sha256_light(data) -> bytes:
    """
    SHA-256 for the ``vsc card`` request path (the control socket's name,
    the digest ``vsc card sign`` sends): the same function as ``sha256``,
    through CPython's built-in SHA-256 module, because importing ``hashlib``
    loads OpenSSL's libcrypto (~3 ms, a sixth of a whole ``vsc card status``
    process; issue 15, bench/startup.py). Inputs over LIGHT_SHA256_MAX bytes
    go to ``sha256``. tests/test_cli.py checks both give the same digests.
    """
    if _builtin_sha256 is None or len(data) > LIGHT_SHA256_MAX:
        return __getattr__("sha256")(data)
    return _builtin_sha256(data).digest()


def __getattr__(name: str):
    """Import the submodule that defines ``name`` on first use, and keep the name here for the next lookup."""
    if name in SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
