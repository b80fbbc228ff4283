"""
Rules of the server (vsc.server.service, vsc.server.admission,
vsc.server.store, vsc.protocol.server_ops) that hold against an
*authenticated* but hostile card owner on a multi-tenant server, which an
adversarial review found broken, each with how it was broken; they hold
since the fix. Deterministic: a task.Clock, a real SQLite Store on a
temporary file, a manual pool run by hand, iosim connections.
"""

from __future__ import annotations

from tests.test_server_ops import MASTER, MUK, SECRET, SERIAL, Harness, result_of, server_key
from vsc.card import ops as card_ops
from vsc.protocol.lifecycle import State
from vsc.protocol.suites import ChannelConfig
from vsc.server.admission import Admission, AdmissionLimits
from vsc.server.service import ServerFactory
from vsc.wire.ops import Status

# ---------------------------------------------------------------- helpers


def _harness(tmp_path, **limits) -> Harness:
    """Test_server_ops's Harness with admission (the limits on connections nothing has authenticated on)."""
    h = Harness(tmp_path)
    admission = Admission(AdmissionLimits(**limits), h.clock.seconds)  # no pool: decryptions run inline
    h.factory = ServerFactory(ChannelConfig(), server_key(), h.clock, backend=h.backend,
                              ops_policy=h.factory.ops_policy, master=MASTER, admission=admission)
    return h


def _inserted(h: Harness):
    """The owner's card enrolled and inserted on one channel; returns that channel."""
    owner, _, _ = h.connect()
    keys = h.enrol(owner)
    result, _ = result_of(h.run(card_ops.insert(owner, SERIAL, "pw", MUK, SECRET, MASTER, keys=keys)))
    assert result.status is Status.OK and h.store.get(SERIAL).state is State.IN_USE
    return owner


# ---------------------------------------------------------------- 1. authenticated channels per card


def test_an_owner_cannot_hold_unbounded_authenticated_channels_of_one_card(tmp_path):
    """
    Rule (docs/admin.md §9a, docs/protocol.md §9.3): what a connection may
    hold is bounded — unauthenticated ones by ``max_unauthenticated`` (fitted
    to the open-file limit, so that strangers "can never take every
    descriptor"), authenticated ones by the cards that exist: a card uses one
    channel at a time (vsc.card.storage reconnects and ATTACHes when its
    channel drops).

    Before the fix: a channel that ATTACHed (or passed any operation) leaves
    the unauthenticated count and is counted nowhere else, with 1 MiB frames
    and a 600 s idle timer that every ECHO_REQUEST restarts. So the owner of
    one in-use card (or anyone holding its insert secret) opens connection
    after connection, ATTACHes each with the insert secret (no history row,
    no store write), and holds them all: here 12 channels of one card stay
    open, without limit, until the server's descriptors are gone and accept()
    fails for every other owner. Now at most ``max_channels_per_card``
    authenticated channels of a serial stay open: the oldest is closed when
    another authenticates for it (so the card's own reconnection always gets
    in), and the newest keeps working.
    """
    h = _harness(tmp_path, handshake_burst=100)
    owner = _inserted(h)
    cap = h.factory.admission.limits.max_channels_per_card
    extra = []
    for _ in range(12):
        client, server, _ = h.connect()
        assert result_of(h.run(card_ops.attach(client, SERIAL, SECRET))).status is Status.OK
        extra.append((client, server))
    h.settle()
    open_channels = [c for c, s in [(owner, None)] + extra if not c.channel.closed]
    assert len(open_channels) <= cap, f"{len(open_channels)} authenticated channels of one card held open"
    # the newest channel is the card's: it keeps working
    newest, _ = extra[-1]
    assert result_of(h.run(card_ops.sync(newest, SERIAL, SECRET, 1, b"PROTECTED-2"))).version == 2
    # and a closed channel's place is given back: no protocol is left registered for the serial
    h.clock.advance(0)
    held = h.factory.authenticated.get(SERIAL, {})
    assert len(held) <= cap and all(not p.channel.closed for p in held.values())


# ---------------------------------------------------------------- 2. the enrolment retry's signature


def test_an_enrolment_that_is_not_the_stored_one_costs_no_signature_and_tells_nothing(tmp_path):
    """
    Rule (docs/admin.md §9a; vsc.protocol.server_ops ``IssueMaterial``): an
    enrolment's keyfile (an RSA signature on the database pool) is made only
    for a request that may enrol: its code is valid, or it *is* the
    enrolment that made the card, retried after its answer was lost. Online
    guesses are evaluated only within the lockout buckets (docs/security.md
    "Online guessing"), and a refusal looks the same whatever its reason.

    Before the fix ``Store.may_enrol`` let a retry through on the verifier
    alone, while ``Store.enrol`` refuses anything but the identical
    enrolment (verifier, KDF, protected information, registration). So a
    request with a made-up code, its own upload and the verifier of the
    card's password was signed for, then refused: an RSA signature spent for
    a refusal, from any channel (no limit, no handshake token), and one a
    stranger could time. For a card enrolled and not yet inserted (idle,
    version 1), under a ``keyfile`` policy, the extra milliseconds of a
    signature told a right password guess (the KDF parameters come with any
    challenge) from a wrong one, on every request, throttled source or not:
    a guessing oracle outside the lockout. Now only the identical enrolment
    is signed for: the right guess, like a wrong one, signs nothing, and
    the owner's retried enrolment is still signed for and answered.
    """
    from tests.test_implauth import registration
    from tests.test_review_enrol import keyfile_harness
    from vsc.crypto import system_random
    from vsc.server.policy import new_enrolment_code

    h, code, signatures = keyfile_harness(tmp_path)
    owner, _, _ = h.connect()
    kdf = card_ops.new_kdf(system_random, log2_n=10)
    keys = card_ops.derive_keys("pw", kdf)
    reg = registration(keys, SERIAL)
    assert result_of(h.run(card_ops.enrol(owner, SERIAL, code, keys, kdf, b"P", registration=reg))).status is Status.OK
    assert len(signatures) == 1

    stranger, _, _ = h.connect()
    for guess in ("wrong", "pw"):  # the card's KDF parameters, as any challenge gives them
        guessed = card_ops.derive_keys(guess, kdf)
        d = h.run(card_ops.enrol(stranger, SERIAL, new_enrolment_code(), guessed, kdf, b"NOT THE CARD'S",
                                 registration=registration(guessed, SERIAL)))
        d.addErrback(lambda f: f.trap(card_ops.OperationRefused))
        result_of(d)
        assert len(signatures) == 1, f"a refused enrolment with the {guess!r} password was signed for"
    assert h.store.get(SERIAL).protected == b"P"

    # the owner's enrolment retried (its answer lost) is still signed for and answered with a keyfile
    result = result_of(h.run(card_ops.enrol(owner, SERIAL, code, keys, kdf, b"P", registration=reg)))
    assert result.status is Status.OK and result.registration and len(signatures) == 2


# ---------------------------------------------------------------- 3. history rows per authenticated request (open)


def test_an_owner_cannot_grow_the_history_without_bound(tmp_path):
    """
    Rule (docs/security.md: other owners of a multi-tenant server get no
    denial of service from one of them; docs/admin.md §9a bounds what a
    stranger's requests write): what one card's requests make the server
    store should be bounded per card, or one owner fills the database's disk
    (STORAGE_FULL for every owner) or the history every audit reads.

    Broken: the protected information is replaced in place (one upload per
    card, at most 512 KiB), but every request of the card's holder wrote a
    permanent history row and none is throttled (``Store._session``:
    ``holder or e.record``). Even a sync retried identically, which changes
    nothing, is a "repeat" row: 500 of them from one channel wrote 500 rows,
    and nothing stopped 500 000. The history now keeps a card's newest
    ``history_per_card`` rows (10,000 by default; 100 here), pruned in the
    same transaction every HISTORY_PRUNE_EVERY rows; every row is still
    written (the audit trail and the fault checkers' "repeat" lines), and the
    newest ones are never the ones pruned.
    """
    from tests.test_review_server import _challenge, _drive, _store
    from tests.test_server_ops import Now, answer, machine, request
    from vsc.wire.ops import Op

    now = Now()
    from vsc.server import store as store_module

    store = _store(tmp_path, now)
    store.history_per_card = 100
    owner = machine(now=now, peer="198.51.100.7:1000")
    assert _drive(owner, owner.message(answer(_challenge(owner, store))), store)[0].status is Status.OK
    sync = request(Op.SYNC, insert_secret=SECRET, version=1, protected=b"P2")
    assert _drive(owner, owner.message(sync), store)[0].version == 2
    before = len(store.history(SERIAL))
    for _ in range(500):
        assert _drive(owner, owner.message(sync), store)[0].status is Status.OK  # the identical retry
    kept = store.history(SERIAL)
    assert len(kept) <= 100 + store_module.HISTORY_PRUNE_EVERY, f"{len(kept)} history rows kept for one card"
    assert len(kept) >= 100 and kept[-1].op == "sync" and kept[-1].result == "repeat"  # the newest stay
    assert [e.id for e in kept] == sorted(e.id for e in kept) and len(kept) < before + 500
