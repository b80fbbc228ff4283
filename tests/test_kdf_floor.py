"""
A card pins its password derivation at enrolment and refuses a server that
asks for a weaker one (which would turn the verifier it receives into a fast
offline guess), before it derives or sends anything.
"""

from __future__ import annotations

import pytest

from vsc.card import ops
from vsc.wire.ops import AuthChallenge, AuthItem, AuthMethod, KdfAlg, KdfParams

STRONG = KdfParams(alg=KdfAlg.SCRYPT, salt=b"s" * 16, log2_n=15)


@pytest.mark.parametrize(
    "kdf",
    [
        KdfParams(alg=KdfAlg.LEGACY_MD5, salt=b"", log2_n=0, r=0, p=0),
        KdfParams(alg=KdfAlg.SCRYPT, salt=b"s" * 16, log2_n=14),
        KdfParams(alg=KdfAlg.SCRYPT, salt=b"s" * 8, log2_n=15),
        KdfParams(alg=KdfAlg.SCRYPT, salt=b"s" * 16, log2_n=15, r=1),
    ],
    ids=["legacy", "cheaper-N", "short-salt", "small-r"],
)
def test_weaker_derivations_are_refused(kdf):
    """Legacy MD5, a smaller N, a short salt or a smaller r are each below a scrypt:15 floor."""
    with pytest.raises(ops.WeakKdfRefused, match="weaker password derivation"):
        ops.check_kdf(kdf, "scrypt:15")


def test_equal_or_stronger_is_accepted_and_no_floor_accepts_anything():
    """The enrolled parameters (or stronger) pass; a card without a floor (or a legacy card) accepts any."""
    ops.check_kdf(STRONG, "scrypt:15")
    ops.check_kdf(KdfParams(alg=KdfAlg.SCRYPT, salt=b"s" * 32, log2_n=16), "scrypt:15")
    ops.check_kdf(KdfParams(alg=KdfAlg.LEGACY_MD5, salt=b"", log2_n=0, r=0, p=0), "")
    ops.check_kdf(KdfParams(alg=KdfAlg.LEGACY_MD5, salt=b"", log2_n=0, r=0, p=0), "legacy")


def test_answer_refuses_before_deriving_anything(monkeypatch):
    """answer() checks the floor first: no key is derived and no password proof is produced for a weak challenge."""
    monkeypatch.setattr(ops, "derive_keys", lambda *a: pytest.fail("derived keys for a weak KDF"))
    weak = AuthChallenge(kdf=KdfParams(alg=KdfAlg.LEGACY_MD5, salt=b"", log2_n=0, r=0, p=0).encode(),
                         challenges=(AuthItem(AuthMethod.PASSWORD),))
    with pytest.raises(ops.WeakKdfRefused):
        ops.answer(weak, "card-1", "pw", b"m" * 32, lambda n: b"\0" * n, creds=ops.Credentials(kdf_floor="scrypt:15"))
