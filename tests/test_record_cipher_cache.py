"""
vsc.crypto.aead's shared AEAD objects: record ciphers keep only their keys,
and a cipher whose OpenSSL object left the small shared cache still seals and
opens exactly as before (the cache changes memory, never the bytes).
"""

from __future__ import annotations

import pytest

from vsc.crypto import CryptoError
from vsc.crypto.aead import AEADRecordCipher, _aead

SEQ = (7).to_bytes(8, "big")


@pytest.mark.parametrize("algorithm", ["aes256-gcm", "chacha20-poly1305"])
def test_a_cipher_works_after_its_object_was_evicted(algorithm):
    """Seal with one cipher, push 300 other keys through the 256-entry cache, open with a fresh cipher of the same key: same plaintext; a wrong AAD still fails."""
    key, iv = bytes(range(32)), bytes(range(12))
    sealer = AEADRecordCipher(algorithm, key, iv)
    sealed = sealer.seal(SEQ, b"record", b"aad")
    for i in range(300):
        AEADRecordCipher(algorithm, i.to_bytes(32, "big"), iv).seal(SEQ, b"x", b"")
    assert _aead.cache_info().currsize <= 256
    opener = AEADRecordCipher(algorithm, key, iv)
    assert opener.open(SEQ, sealed, b"aad") == b"record"
    assert sealer.seal(SEQ, b"record", b"aad") == sealed  # same key, nonce and AAD: same bytes
    with pytest.raises(CryptoError):
        opener.open(SEQ, sealed, b"other aad")


def test_bad_keys_and_algorithms_are_refused_at_construction():
    """A key of the wrong length or an unknown algorithm is refused when the cipher is made, as before."""
    with pytest.raises(ValueError):
        AEADRecordCipher("aes256-gcm", b"short", bytes(12))
    with pytest.raises(ValueError):
        AEADRecordCipher("rot13", bytes(32), bytes(12))
