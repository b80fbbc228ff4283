"""
Rules of licence and copy protection (vsc.licensing, vsc.protocol.licence,
vsc.wire.license, the card's rental counters) that an adversarial review
found broken, each with how it was broken; they hold since the fix.
"""

from __future__ import annotations

import os
import threading

import attrs
import pytest

from tests.fakecard import FakeCardSocket, fake_home  # noqa: F401  (a fixture)
from tests.test_card_units import _done, ec_der, world  # noqa: F401  (fixtures)
from tests.test_licensing import card_key, vendor  # noqa: F401  (fixtures)
from tests.test_licensing import make_license as licensing_license
from vsc import crypto
from vsc.licensing import lcp
from vsc.wire.license import License

# a bounded wait for a thread of the code under test (never a sleep): long enough for a loaded machine
JOIN = 20.0


def make_license(card_public: bytes, **changes) -> License:
    """tests.test_licensing's licence, with a fixed licence ID (tests here name its counter)."""
    return licensing_license(card_public, **{"license_id": bytes(range(16)), **changes})


def signing_card(home, private_der):
    """A stand-in card daemon that holds ``private_der`` and signs every digest it is asked to."""

    def respond(command, args):
        with crypto.PrivateKeyHandle(private_der) as key:
            return {b"signature": key.sign_digest(args[b"digest"])}

    return FakeCardSocket(home, respond)


# ================================================================ 1. the Guard of a protected program fails closed


def test_guard_is_not_stalled_by_a_fifo_in_place_of_the_keyfile(vendor, card_key, fake_home, tmp_path):
    """
    Rule: a protected program's Guard re-checks the licence every interval
    and calls on_failure when the card is gone; nothing the user does to the
    keyfile may stop it from deciding.

    Broken: the Guard re-reads the keyfile with ``Path.read_text()`` on every
    check. The user starts the program with the card, replaces the keyfile
    with a FIFO (``mkfifo editor.keyfile``) and removes the card: the next
    check blocks in open(2) for ever, waiting for a writer, so the Guard
    neither re-proves nor fails, and the program runs on without the card.
    (A keyfile symlinked to /dev/zero made it read until memory ran out.)
    The keyfile must be read as a regular file of bounded size, without
    blocking, and anything else refused.
    """
    keyfile = tmp_path / "editor.keyfile"
    keyfile.write_text(lcp.issue(vendor[0], make_license(card_key[1])))
    card = signing_card(fake_home, card_key[0])
    try:
        assert lcp.check(str(keyfile), vendor[1], home=fake_home, product="editor").product == "editor"
    finally:
        card.close()  # the card is removed
    keyfile.unlink()
    os.mkfifo(keyfile)  # ... and the keyfile is now a FIFO nobody writes to
    failures: list[str] = []
    decided = threading.Event()

    def on_failure(why: str) -> None:
        failures.append(why)
        decided.set()

    guard = lcp.Guard(str(keyfile), vendor[1], interval=0.001, home=fake_home, product="editor",
                      on_failure=on_failure)
    guard.start()
    try:
        assert decided.wait(JOIN), "the Guard is stuck reading the keyfile: the program runs on without the card"
        assert len(failures) == 1 and "not a regular file" in failures[0], failures
    finally:
        guard.stop()
        if not decided.is_set():  # unblock the reader stuck in open(2) so that the thread can end
            os.close(os.open(keyfile, os.O_WRONLY))
        guard._thread.join(JOIN)


def test_check_refuses_a_keyfile_larger_than_any_keyfile(vendor, card_key, tmp_path):
    """
    Rule: a malformed licence file is refused cleanly. Broken: the whole
    file was read into memory whatever its size or kind (here 64 MiB were
    read to find no BEGIN line; ``/dev/zero`` was read until the process ran
    out of memory, a MemoryError the Guard did not catch). No keyfile is
    longer than a few KiB: a longer file, or one that is not a regular
    file, is refused unread.
    """
    big = tmp_path / "big.keyfile"
    with open(big, "wb") as f:
        f.truncate(64 << 20)  # sparse: costs no disk
    with pytest.raises(lcp.LicenseError, match="is longer than any keyfile"):
        lcp.load(big, vendor[1])
    with pytest.raises(lcp.LicenseError, match="not a regular file"):
        lcp.load("/dev/null", vendor[1])
    ok = tmp_path / "ok.keyfile"
    ok.write_text(lcp.issue(vendor[0], make_license(card_key[1], product="p" * 128, features=("f" * 64,) * 55)))
    assert lcp.load(ok, vendor[1]).product == "p" * 128  # the largest keyfile still loads


def test_guard_fails_closed_on_an_unexpected_error(vendor, card_key, fake_home, tmp_path, monkeypatch):
    """
    Rule: the Guard fails closed: a check that cannot be completed stops the
    program (on_failure), never leaves it running unwatched.

    Broken: ``Guard._run`` caught only LicenseError. Any other exception
    from a check (here the card client cannot even make its socket: EMFILE,
    as in a program that ran out of descriptors; likewise a MemoryError)
    ended the Guard's thread silently: on_failure was never called, no
    later check ran, and the program went on without the card for as long
    as it liked.
    """
    from vsc.card import client

    keyfile = tmp_path / "editor.keyfile"
    keyfile.write_text(lcp.issue(vendor[0], make_license(card_key[1])))

    def no_socket(*a, **kw):
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(client, "call", no_socket)
    failures: list[str] = []
    guard = lcp.Guard(str(keyfile), vendor[1], interval=0.001, home=fake_home, product="editor",
                      on_failure=failures.append)
    guard.start()
    guard._thread.join(JOIN)
    guard.stop()
    assert not guard._thread.is_alive()
    assert failures == ["licence check failed: Too many open files"], failures


# ================================================================ 2. a rental keyfile the card can never fund


def test_a_rental_keyfile_is_issued_only_if_the_card_can_hold_its_counter(vendor, card_key, tmp_path, capsys):
    """
    Rule: a keyfile the vendor's generator signs works for the customer
    whose card it names (a paid rental grant funds its counter and runs).

    Broken: the card names items with at most 64 bytes, and a grant's
    counter is ``lic:PRODUCT:<16 hex>:<12 hex>`` (34 bytes + the product),
    a named one ``COUNTER:<12 hex>``. ``vsc license issue --product "Acme
    Photo Editor Professional 2026" --runs 10`` (product 35 bytes, field limit
    128) signed a keyfile whose counter can never be created: every run the
    customer paid for was refused by the card ("name has 69 items/bytes,
    allowed 0..64"). The generator must refuse such a keyfile, with one line.
    """
    from vsc import cli

    too_long = make_license(card_key[1], product="Acme Photo Editor Professional 2026", runs=10)
    with pytest.raises(ValueError, match="at most 64"):
        lcp.issue(vendor[0], too_long)
    with pytest.raises(ValueError, match="at most 64"):
        lcp.issue(vendor[0], make_license(card_key[1], counter="lic:" + "c" * 50))
    # what still fits is still issued: a 30-byte product, a 51-byte named counter, any product without a counter
    for fits in (make_license(card_key[1], product="p" * 30, runs=10),
                 make_license(card_key[1], counter="lic:" + "c" * 47),
                 make_license(card_key[1], product="p" * 128)):
        lic = lcp.loads(lcp.issue(vendor[0], fits), vendor[1])
        if lcp.is_rental(lic):
            assert len(lcp.counter_name(lic, vendor[1]).encode()) == 64
    (tmp_path / "v.key").write_bytes(vendor[0])
    (tmp_path / "card.pem").write_bytes(crypto.public_pem(card_key[1]))
    assert cli.main(["license", "issue", "--slot", "9c", "--vendor-key", str(tmp_path / "v.key"),
                     "--card-key", str(tmp_path / "card.pem"), "--out", str(tmp_path / "k"),
                     "--product", "Acme Photo Editor Professional 2026", "--runs", "10"]) == 1
    err = capsys.readouterr().err
    assert "cannot issue this keyfile" in err and err.count("\n") == 1, err
    assert not (tmp_path / "k").exists()
    # a keyfile signed some other way is refused by the card with the same reason, before anything is stored
    from vsc.protocol import licence
    from vsc.wire.license import armor, encode_body

    body = encode_body(too_long)
    text = armor(body, crypto.vendor_sign(vendor[0], body))
    with pytest.raises(lcp.LicenseError, match="cannot be used: .* at most 64"):
        licence.fund_request(text, vendor[1], {"9c": card_key[1]})


# ================================================================ 3. a rental counter the user can top up


def test_a_keyfile_never_charges_a_counter_the_user_can_increase(vendor, card_key, fake_home):
    """
    Rule (docs/licensing.md, "Licence counters are funded only by
    keyfiles"): the runs of a rental keyfile are taken from a ``lic:``
    counter, which the card never lets the user increase.

    Broken: only ``vsc license issue`` (the CLI) checked that ``--counter``
    starts with ``lic:``. A vendor who issues keyfiles with the documented
    Python API (``lcp.issue``) and ``counter="credits"`` got a signed
    keyfile that funds and charges the counter ``credits:<vendor tag>``;
    the customer then ran ``vsc card counter credits:<tag> --add 1000000``
    (allowed: not a ``lic:`` name) and had a million paid runs. The rule
    must hold where keyfiles are made and where they are used: issue
    refuses such a keyfile, and the card and the licensing API neither
    fund nor charge a counter whose name the user could increase.
    """
    from vsc.protocol import licence
    from vsc.wire.license import armor, encode_body

    credits = make_license(card_key[1], counter="credits", runs=5)
    with pytest.raises(ValueError, match="must start with 'lic:'"):
        lcp.issue(vendor[0], credits)
    body = encode_body(credits)  # the same keyfile, signed without issue's check (an older vsc, another tool)
    text = armor(body, crypto.vendor_sign(vendor[0], body))
    lic = lcp.loads(text, vendor[1])
    with pytest.raises(lcp.LicenseError, match="must start with 'lic:'"):
        licence.fund_request(text, vendor[1], {"9c": card_key[1]})  # the card funds nothing
    asked = []
    card = FakeCardSocket(fake_home, lambda command, args: asked.append(command) or {b"name": b"credits:x", b"value": b"5"})
    try:
        with pytest.raises(lcp.LicenseError, match="must start with 'lic:'"):
            lcp.charge_sync(lic, text, vendor[1], home=fake_home)
    finally:
        card.close()
    assert asked == []  # refused before the card was asked to fund or charge anything


# ================================================================ 4. an accepted rollback refunds a whole grant


def test_an_accepted_rollback_does_not_refund_a_grant_funded_after_the_copy(tmp_path):
    """
    Rule (docs/security.md, "Rollback"): after ``vsc card accept-rollback``
    the floors still apply, "so a rollback the card can see never refunds a
    rental run".

    Broken: the floors were applied only to the counters the older copy
    holds. A copy from before a rental grant was first run has no counter
    for it: the card loaded it without one, the next ``vsc run`` funded the
    counter afresh from the keyfile, and every run spent since came back
    (here: 10 runs granted, 9 spent, 10 again after the rollback). The
    server's database restored from a backup, and the owner accepting it as
    docs/security.md says, is enough. The card must bring back a spent
    ``lic:`` counter the copy lacks at its floor.
    """
    from tests.test_freshness import PK, SERIAL, counter, envelope, step
    from vsc.card.freshness import FreshnessStore
    from vsc.card.protected import CardMemory
    from vsc.wire.protected import ItemKind, encode_counter

    store = FreshnessStore(tmp_path)
    mem = CardMemory.load(SERIAL, envelope(), PK)
    backup = step(mem, store)  # generation 1: the grant below has never been run
    grant = "lic:editor:0001020304050607:0123456789ab"
    mem.discard(mem.put(ItemKind.COUNTER, grant, encode_counter(10)))  # the first run funds it...
    step(mem, store)
    for left in range(9, 0, -1):  # ... and nine runs are spent
        mem.discard(mem.put(ItemKind.COUNTER, grant, encode_counter(left)))
        step(mem, store)
    store.accept_next_rollback()
    restored = CardMemory.load(SERIAL, backup, PK)
    _rec, lowered = store.check(restored)
    assert restored.has(ItemKind.COUNTER, grant), "the grant's counter is gone: the next run funds 10 runs again"
    assert counter(restored, grant) == 1 and grant in lowered


def test_a_rental_run_always_costs_at_least_one_unit(vendor, card_key, fake_home):
    """
    Rule: each run of a rental keyfile takes ``cost`` (at least 1) units
    from its counter; when they are spent, runs are refused.

    Broken: only the CLI refused ``--cost 0``. A keyfile made with the
    documented ``lcp.issue`` with ``runs=10, cost=0`` was signed, and each
    "charge" was a counter step of 0, which the card treats as a read:
    unlimited runs from a ten-run rental, the counter never moving. Issue
    must refuse it, and the API must not treat a zero-cost step as a charge.
    """
    from vsc.wire.license import armor, encode_body

    free = make_license(card_key[1], runs=10, cost=0)
    with pytest.raises(ValueError, match="cost"):
        lcp.issue(vendor[0], free)
    body = encode_body(free)
    text = armor(body, crypto.vendor_sign(vendor[0], body))
    asked = []
    card = FakeCardSocket(fake_home, lambda command, args: asked.append((command, dict(args))) or
                          {b"name": b"lic:x", b"value": b"10"})
    try:
        with pytest.raises(lcp.LicenseError, match="cost"):
            lcp.charge_sync(lcp.loads(text, vendor[1]), text, vendor[1], home=fake_home)
    finally:
        card.close()
    assert asked == []


# ================================================================ 5. the vendor tag is 48 bits


def test_a_vendor_key_with_a_colliding_tag_cannot_prefund_the_real_vendors_counter(world, vendor, monkeypatch):
    """
    Rule (docs/licensing.md): "a grant signed with another vendor key never
    funds a counter the real vendor's keyfiles charge".

    How it broke: the tag is the first 12 hex digits (48 bits) of SHA-256
    of the vendor's public key, and it was all that separated the counters
    of two vendor keys: the card funded whatever counter a keyfile signed by
    *any* key named. An attacker who grinds Ed25519 keys until one has the
    vendor's tag (2^48 tries on average: days on GPUs, once per vendor, and
    the key can then be published) signs a copy of a customer's rental
    grant (same product and licence id, 2^32 - 1 runs) and funds it before
    the first real run: the real keyfile then found its counter funded and
    charged it for ever. The grind is stood in for here by making the tag
    function collide. The card now records the whole vendor key on a counter
    it funds, and a fund request with another key (the API makes one before
    every charge) is refused.
    """
    from vsc.card.session import CardError
    from vsc.protocol import licence
    from vsc.wire.protected import ItemKind, decode_counter

    session = world.session
    card_public = session.memory.public_of(ItemKind.KEY, "9c")
    attacker_private, attacker_public = crypto.vendor_keygen()
    real_tag = licence.vendor_tag(vendor[1])
    monkeypatch.setattr(licence, "vendor_tag", lambda pem: real_tag)  # the 2^48 grind, assumed done
    grant = make_license(card_public, runs=10)
    real_text = lcp.issue(vendor[0], grant)
    forged_text = lcp.issue(attacker_private, attrs.evolve(grant, runs=2**32 - 1))  # same product and id
    name, runs = _done(session.fund_counter(forged_text, attacker_public))
    assert (name, runs) == (licence.counter_name(grant, vendor[1]), 2**32 - 1)  # the same name: the tags collide
    with pytest.raises(CardError, match="another vendor key"):
        _done(session.fund_counter(real_text, vendor[1]))
    with session.memory.open(ItemKind.COUNTER, name) as v:
        assert decode_counter(v) == 2**32 - 1  # untouched, and never charged by the real program


def test_a_counter_keeps_its_vendor_key_when_runs_are_spent(world, vendor):
    """
    The vendor key a card records on a rental counter survives every charge
    (a counter step keeps the item's public part): the real vendor's keyfile
    funds, is charged, and is accepted again; another key is refused after
    the charges as before them; a keyfile that only draws on a shared
    counter (``counter`` without runs) funds nothing.
    """
    from vsc.card.session import CardError
    from vsc.protocol import licence
    from vsc.wire.protected import ItemKind

    session = world.session
    card_public = session.memory.public_of(ItemKind.KEY, "9c")
    text = lcp.issue(vendor[0], make_license(card_public, runs=3))
    name, left = _done(session.fund_counter(text, vendor[1]))
    assert left == 3 and session.memory.public_of(ItemKind.COUNTER, name) == licence.vendor_binding(vendor[1])
    assert _done(session.counter(name, -1)) == 2
    assert _done(session.fund_counter(text, vendor[1])) == (name, 2)  # never topped up
    assert session.memory.public_of(ItemKind.COUNTER, name) == licence.vendor_binding(vendor[1])
    other_private, other_public = crypto.vendor_keygen()
    drawer = make_license(card_public, counter="lic:shared", license_id=bytes(16))
    with pytest.raises(CardError, match="no counter"):
        _done(session.fund_counter(lcp.issue(vendor[0], drawer), vendor[1]))
    assert not session.memory.has(ItemKind.COUNTER, licence.counter_name(drawer, vendor[1]))
    with pytest.raises(CardError, match="does not verify"):
        _done(session.fund_counter(text, other_public))
