"""
Second follow-up review: suspicions earlier reviewers left unproven, each proved with a test that failed on
the code before its fix (or argued in the review's report not to be a defect).
"""

from __future__ import annotations

import pytest


# ---------------------------------------------------------------- 2. a TOTP code is accepted once, copies included


def test_a_totp_code_used_on_a_card_is_used_up_for_its_duplicate(tmp_path):
    """
    Rule (docs/admin.md `impl_auth`, `totp`: "each code is accepted once"; [0102] duplicate: a copy of the
    same information). How it was broken: `vsc admin duplicate` copies the card's auth_info, TOTP seed and
    last used step included, and each card then kept its own last step. A code accepted for card A (the
    owner's insert, seen over the shoulder or typed into a phishing page) was fresh again for its copy B,
    which the same password opens. Now the cards holding one TOTP seed share its replay state: a step used
    on any of them is used on all (history "TOTP code already used"), and a later step is good on either.
    """
    from tests.test_store import CODE, MUK_A, SESSION_A, SESSION_B, VERIFIER, enrol, h, insert
    from vsc.protocol.cardstore import RecoverCard
    from vsc.server.store import Store
    from vsc.wire.ops import Status

    store = Store(f"sqlite:///{tmp_path / 'vsc.sqlite3'}", lambda: 1_000_000.0)
    store.migrate()
    try:
        store.issue("totp-a", h(CODE), '{"methods": ["password", "totp"]}', ttl=600)
        assert enrol(store, "totp-a", extra={"totp": {"secret": "ab" * 20, "last_step": -1}}) is Status.OK
        store.duplicate("totp-a", "totp-b")
        assert insert(store, "totp-a", MUK_A, SESSION_A, totp_step=100).status is Status.OK
        out = insert(store, "totp-b", MUK_A, SESSION_B, totp_step=100)
        assert out.status is Status.REFUSED, "the code accepted for totp-a was accepted again for its copy"
        assert store.history("totp-b")[-1].detail == "TOTP code already used"
        assert insert(store, "totp-b", MUK_A, SESSION_B, totp_step=101).status is Status.OK
        # and the other way round: the step used on the copy is used on the original
        assert store.recover(RecoverCard("totp-a", MUK_A, "p", VERIFIER, totp_step=101)).status is Status.REFUSED
        assert store.recover(RecoverCard("totp-a", MUK_A, "p", VERIFIER, totp_step=102)).status is Status.OK
    finally:
        store.close()
