"""
A small ctypes binding to the system's OpenSSL 3 libcrypto (``libcrypto.so.3``,
Debian's libssl3) for the one operation ``cryptography`` does not offer: the
RSA private operation without padding, ``m^d mod n`` on a block the caller
has already padded (a PIV card's GENERAL AUTHENTICATE).

How the key gets into OpenSSL, and out again:

* the DER is read by OpenSSL **in place**, from the address of the caller's
  buffer (a memoryview of a locked buffer, a bytearray, or bytes); no Python
  copy of it is made;
* with the ASN.1 item decoders, not ``d2i_AutoPrivateKey``: in OpenSSL 3 the
  latter runs the decoder framework, which copies the DER into heap buffers
  (``ossl_read_der``) and frees them with ``OPENSSL_free``, uncleansed, about
  twenty times per load. ``d2i_PKCS8_PRIV_KEY_INFO`` parses in place; the
  one copy it makes (the inner RSAPrivateKey octet string) is cleansed when
  the structure is freed. ``d2i_RSAPrivateKey`` reads the numbers straight
  into BIGNUMs flagged secure and constant-time, cleared when freed;
* ``EVP_PKEY_decrypt`` with ``RSA_NO_PADDING``: OpenSSL blinds the base, uses
  constant-time exponentiation with CRT and checks the CRT result;
* ``EVP_PKEY_free`` frees the key (``BN_clear_free`` of every number, and of
  the provider's copy made for the operation).

tests/test_memory_scan.py audits every ``free()`` of this path for key bytes
and scans a card daemon after PIV operations; tests/test_crypto_rsa.py checks
the arithmetic. Every return code is checked; a failure is one CryptoError
line with OpenSSL's own reason, and OpenSSL's error queue is left empty.
"""

from __future__ import annotations

import ctypes

from vsc.crypto.errors import CryptoError

LIBRARY = "libcrypto.so.3"
NID_RSA_ENCRYPTION = 6  # rsaEncryption, also EVP_PKEY_RSA
RSA_NO_PADDING = 3
MAX_MODULUS_BYTES = 2048  # RSA-16384; anything larger is refused before allocating

_p = ctypes.c_void_p
_pp = ctypes.POINTER(ctypes.c_void_p)
_SIGNATURES = {
    # name: (restype, argtypes)
    "d2i_PKCS8_PRIV_KEY_INFO": (_p, [_p, _pp, ctypes.c_long]),
    "PKCS8_pkey_get0": (ctypes.c_int, [_pp, _pp, ctypes.POINTER(ctypes.c_int), _pp, _p]),
    "PKCS8_PRIV_KEY_INFO_free": (None, [_p]),
    "OBJ_obj2nid": (ctypes.c_int, [_p]),
    "d2i_RSAPrivateKey": (_p, [_p, _pp, ctypes.c_long]),
    "RSA_free": (None, [_p]),
    "RSA_size": (ctypes.c_int, [_p]),
    "RSA_get0_n": (_p, [_p]),
    "BN_bn2binpad": (ctypes.c_int, [_p, ctypes.c_char_p, ctypes.c_int]),
    "EVP_PKEY_new": (_p, []),
    "EVP_PKEY_assign": (ctypes.c_int, [_p, ctypes.c_int, _p]),
    "EVP_PKEY_free": (None, [_p]),
    "EVP_PKEY_CTX_new": (_p, [_p, _p]),
    "EVP_PKEY_CTX_free": (None, [_p]),
    "EVP_PKEY_decrypt_init": (ctypes.c_int, [_p]),
    "EVP_PKEY_CTX_set_rsa_padding": (ctypes.c_int, [_p, ctypes.c_int]),
    "EVP_PKEY_decrypt": (ctypes.c_int, [_p, ctypes.c_char_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_char_p,
                                        ctypes.c_size_t]),
    "ERR_get_error": (ctypes.c_ulong, []),
    "ERR_reason_error_string": (ctypes.c_char_p, [ctypes.c_ulong]),
    "ERR_clear_error": (None, []),
}


class _Library:
    """libcrypto.so.3 with every function's signature declared, loaded on first use."""

    def __init__(self) -> None:
        self._lib = None

    def get(self):
        if self._lib is None:
            try:
                lib = ctypes.CDLL(LIBRARY)
                for name, (restype, argtypes) in _SIGNATURES.items():
                    fn = getattr(lib, name)
                    fn.restype, fn.argtypes = restype, argtypes
            except (OSError, AttributeError) as e:
                raise CryptoError(f"OpenSSL 3's {LIBRARY} is not usable here (Debian package libssl3): {e}") from None
            self._lib = lib
        return self._lib


_LIBRARY = _Library()


def _fail(lib, what: str) -> CryptoError:
    """A CryptoError naming ``what`` failed and OpenSSL's first reason; empties OpenSSL's error queue."""
    reason = None
    while True:
        code = lib.ERR_get_error()
        if not code:
            break
        if reason is None:
            text = lib.ERR_reason_error_string(code)
            reason = text.decode("ascii", "replace") if text else f"error {code:#x}"
    lib.ERR_clear_error()
    return CryptoError(f"{what} (OpenSSL: {reason})" if reason else what)


class _Borrowed:
    """The address of a buffer's bytes, for as long as the ``with`` lasts (no copy is made)."""

    def __init__(self, buf):
        self._buf = buf
        self._export = None

    def __enter__(self) -> tuple[int, int]:
        buf = self._buf
        if isinstance(buf, bytes):
            # a bytes object's own storage; it stays alive through self._buf
            return ctypes.cast(ctypes.c_char_p(buf), ctypes.c_void_p).value, len(buf)
        view = memoryview(buf)
        if view.readonly or not view.c_contiguous or view.itemsize != 1:
            view.release()
            raise TypeError("the key must be bytes or a writable, contiguous byte buffer")
        n = view.nbytes
        view.release()
        if n == 0:
            return 0, 0
        self._export = (ctypes.c_char * n).from_buffer(buf)
        return ctypes.addressof(self._export), n

    def __exit__(self, *exc) -> None:
        # drop the buffer export at once: a locked buffer is released (and its
        # mmap closed) right after the operation, which an export would refuse
        self._export = None


def _load_rsa(lib, address: int, length: int):
    """An RSA* from PKCS#8 PrivateKeyInfo or PKCS#1 RSAPrivateKey DER at ``address``; the caller frees it."""
    if length == 0:
        raise CryptoError("the private key is empty")
    start = address
    cursor = ctypes.c_void_p(start)
    p8 = lib.d2i_PKCS8_PRIV_KEY_INFO(None, ctypes.byref(cursor), length)
    if p8:
        try:
            if cursor.value - start != length:
                raise CryptoError("the private key has bytes after its end")
            alg, inner, inner_len = ctypes.c_void_p(), ctypes.c_void_p(), ctypes.c_int()
            if lib.PKCS8_pkey_get0(ctypes.byref(alg), ctypes.byref(inner), ctypes.byref(inner_len), None, p8) != 1:
                raise _fail(lib, "the private key does not parse")
            if lib.OBJ_obj2nid(alg) != NID_RSA_ENCRYPTION:
                raise CryptoError("raw RSA needs an RSA key")
            inner_start = inner.value
            rsa = lib.d2i_RSAPrivateKey(None, ctypes.byref(inner), inner_len.value)
            if not rsa:
                raise _fail(lib, "the RSA private key does not parse")
            if inner.value - inner_start != inner_len.value:
                lib.RSA_free(rsa)
                raise CryptoError("the RSA private key has bytes after its end")
            return rsa
        finally:
            lib.PKCS8_PRIV_KEY_INFO_free(p8)  # cleanses its copy of the inner key
    lib.ERR_clear_error()  # not PKCS#8: try PKCS#1
    cursor = ctypes.c_void_p(start)
    rsa = lib.d2i_RSAPrivateKey(None, ctypes.byref(cursor), length)
    if not rsa:
        raise _fail(lib, "the private key is neither PKCS#8 nor an RSA private key")
    if cursor.value - start != length:
        lib.RSA_free(rsa)
        raise CryptoError("the private key has bytes after its end")
    return rsa


def rsa_private_no_padding(private_der, block: bytes) -> bytes:
    """
    ``block^d mod n`` inside OpenSSL, with the key read in place from
    ``private_der`` (PKCS#8 or PKCS#1 DER: bytes, or a writable buffer such as
    a memoryview of locked memory). ``block`` must be exactly the modulus
    length and smaller than the modulus; the result has the modulus length.
    """
    lib = _LIBRARY.get()
    block = bytes(block)
    with _Borrowed(private_der) as (address, length):
        rsa = _load_rsa(lib, address, length)
        pkey = ctx = None
        try:
            size = lib.RSA_size(rsa)
            if not 0 < size <= MAX_MODULUS_BYTES:
                raise CryptoError("the RSA key has an unsupported size")
            if len(block) != size:
                raise CryptoError(f"the block must be {size} bytes (the modulus length), not {len(block)}")
            modulus = ctypes.create_string_buffer(size)
            if lib.BN_bn2binpad(lib.RSA_get0_n(rsa), modulus, size) != size:
                raise _fail(lib, "cannot read the RSA modulus")
            if block >= modulus.raw:  # same length, big-endian: byte order is numeric order
                raise CryptoError("the block is not smaller than the modulus")
            pkey = lib.EVP_PKEY_new()
            if not pkey:
                raise _fail(lib, "OpenSSL could not allocate a key")
            if lib.EVP_PKEY_assign(pkey, NID_RSA_ENCRYPTION, rsa) != 1:
                raise _fail(lib, "OpenSSL could not take the RSA key")
            rsa = None  # owned by pkey now
            ctx = lib.EVP_PKEY_CTX_new(pkey, None)
            if not ctx:
                raise _fail(lib, "OpenSSL could not set up the RSA operation")
            if lib.EVP_PKEY_decrypt_init(ctx) != 1:
                raise _fail(lib, "OpenSSL could not start the RSA operation")
            if lib.EVP_PKEY_CTX_set_rsa_padding(ctx, RSA_NO_PADDING) <= 0:
                raise _fail(lib, "OpenSSL refused RSA without padding")
            out = ctypes.create_string_buffer(size)
            out_len = ctypes.c_size_t(size)
            if lib.EVP_PKEY_decrypt(ctx, out, ctypes.byref(out_len), block, size) != 1:
                raise _fail(lib, "the RSA private operation failed")
            if out_len.value != size:
                raise CryptoError("the RSA private operation returned a short result")
            return out.raw
        finally:
            if ctx:
                lib.EVP_PKEY_CTX_free(ctx)
            if pkey:
                lib.EVP_PKEY_free(pkey)
            if rsa:
                lib.RSA_free(rsa)
