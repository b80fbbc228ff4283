"""
Second follow-up review: suspicions earlier reviewers left unproven, each proved with a test that failed on
the code before its fix (or argued in the review's report not to be a defect).
"""

from __future__ import annotations

import pytest


# ---------------------------------------------------------------- 2. a TOTP code is accepted once, copies included


def test_a_totp_code_used_on_a_card_is_used_up_for_its_duplicate(database_url):
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

    store = Store(database_url, lambda: 1_000_000.0)
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


# ---------------------------------------------------------------- 3. private files: written safely and durably


def _fsync_log(monkeypatch) -> list:
    """Record what each os.fsync was called on (a directory or a file) and when, relative to os.replace."""
    import os
    import stat

    events: list = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync-dir" if stat.S_ISDIR(os.fstat(fd).st_mode) else "fsync-file"))
        return real_fsync(fd)

    def replace(a, b, **kw):
        events.append("replace")
        return real_replace(a, b, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    return events


def test_the_freshness_record_is_written_like_every_private_file(tmp_path, monkeypatch):
    """
    Rule (vsc/card/freshness.py: the record is saved "atomic, fsynced"; vsc/card/paths.py write_private: "a
    new file of our own: never one another user made first"; docs/security.md "Rollback"). How it was broken:
    FreshnessStore.save wrote through a fixed HOME/freshness.tmp opened with O_CREAT|O_TRUNC and no
    O_NOFOLLOW/O_EXCL: a symlink left at that name (a restored backup, another program, anyone who could
    write HOME once) had the card truncate and overwrite the file it pointed to, and the record itself became
    that symlink. accept-rollback opened its marker the same way. And neither that nor write_private synced the
    directory after the rename, so a power loss could bring back the previous record: one generation of
    rollback protection lost. Now both go through write_private: a fresh O_EXCL|O_NOFOLLOW temporary file,
    fsynced, renamed, and the directory fsynced after the rename.
    """
    import os

    from tests.test_freshness import PK, SERIAL, envelope, step
    from vsc.card.freshness import FreshnessStore
    from vsc.card.protected import CardMemory

    victim = tmp_path / "victim"
    victim.write_text("keep me")
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    os.symlink(victim, home / "freshness.tmp")
    os.symlink(victim, home / "freshness.accept-rollback")
    store = FreshnessStore(home)
    mem = CardMemory.load(SERIAL, envelope(), PK)
    events = _fsync_log(monkeypatch)
    step(mem, store)
    assert victim.read_text() == "keep me", "the freshness record was written through a planted symlink"
    assert not (home / "freshness").is_symlink() and store.load(mem).generation == 1
    assert events[-2:] == ["replace", "fsync-dir"], f"the directory was not synced after the rename: {events}"
    store.accept_next_rollback()
    assert victim.read_text() == "keep me", "accept-rollback truncated the file its marker's symlink points to"


def test_write_private_syncs_the_directory_after_the_rename(tmp_path, monkeypatch):
    """
    Rule (vsc/card/paths.py write_private: "a crash leaves the old file or the new one"). How it was broken:
    the rename was not made durable (no fsync of the directory), so after a power loss the old card.ini, keyfile
    or token record could come back although the command had said it was written. Now the directory is fsynced
    after the rename.
    """
    from vsc.card.paths import write_private

    events = _fsync_log(monkeypatch)
    write_private(tmp_path / "card.ini", b"x")
    assert events == ["fsync-file", "replace", "fsync-dir"]


# ---------------------------------------------------------------- 4. a store call's outcome is never lost


@pytest.mark.parametrize("where", ["loaded", "stored"])
def test_an_exception_handling_a_store_result_closes_the_channel_instead_of_hanging(tmp_path, monkeypatch, where):
    """
    Rule (vsc/net/channel.py ChannelProtocol._guard: a handler that fails closes the channel with
    INTERNAL_ERROR; docs/protocol.md §10.2: a request gets its answer). How it was broken:
    vsc/server/service.py handed each store call's result on with ``addCallbacks(cb, _store_error)``: an
    exception raised while the operation machine took the result (or while its effects were carried out) went
    to no handler — an "Unhandled error in Deferred" at garbage collection, no answer, and the card's request
    waited until the channel's idle timer closed it (60 s, 600 s once authenticated), the operation machine
    stuck in the middle of an operation. Now every outcome reaches the machine once, and a failure while it is
    handled is logged and closes the channel with INTERNAL_ERROR at once: the card's request fails and it
    reconnects.
    """
    from tests.test_server_ops import SERIAL, Harness
    from vsc.net.channel import ChannelClosedError
    from vsc.protocol.server_ops import ServerOps
    from vsc.wire import ErrorCode
    from vsc.wire.ops import Op, OpRequest

    h = Harness(tmp_path)
    client, server, _pump = h.connect()
    h.enrol(client)

    def broken(self, value):
        raise RuntimeError(f"injected fault handling the {where} result")

    monkeypatch.setattr(ServerOps, where, broken)
    if where == "loaded":
        d = client.request(OpRequest(op=Op.INSERT, serial=SERIAL, insert_secret=b"S" * 32))
    else:  # a session operation: its store call's outcome goes to stored()
        d = client.request(OpRequest(op=Op.SYNC, serial=SERIAL, insert_secret=b"S" * 32, version=1,
                                     protected=b"P"))
    h.settle()
    out: list = []
    d.addBoth(out.append)
    assert out, "the card's request got no answer: the failure handling the store's result was lost"
    assert out[0].check(ChannelClosedError) and server.closeCode is ErrorCode.INTERNAL_ERROR


# ---------------------------------------------------------------- 5. enroll --force leaves nothing of the old card


def test_enroll_force_removes_what_the_previous_card_left_in_home(tmp_path, monkeypatch):
    """
    Rule (vsc/card/config.py: HOME/keyfile.vsc and keyfile.vsc.new are *the card's* keyfiles; docs/security.md
    "Rollback": a rollback is accepted only when the owner asks for it, for the next insert). How it was
    broken: `vsc card enroll --force` overwrote card.ini but left the previous card's keyfile.vsc, its pending
    keyfile.vsc.new and a pending freshness.accept-rollback in HOME. The new card then offered the old card's
    keyfiles whenever its server asked for a keyfile (sent to a server that has nothing to do with them), and
    the old owner's "accept the next rollback" applied to the new card's first older copy: a server could
    hand it back a stale generation once without the owner having asked. Now a successful enrolment removes
    them before it writes the new card's settings (and keyfile, if one is issued). The freshness records stay:
    each is keyed by its card ID and authenticated with that card's data key, so another card's is ignored.
    """
    from tests.test_server_ops import Harness, cli_enrolment, route_cli_enrolment
    from vsc.card import config as cc
    from vsc.card.freshness import ACCEPT_NAME
    from vsc.cli import enrol as enrol_cli

    h = Harness(tmp_path)
    route_cli_enrolment(h, monkeypatch)
    home = tmp_path / "home"
    assert enrol_cli.cmd_enroll(cli_enrolment(h, tmp_path, serial="alice")) == 0
    leftovers = [cc.keyfile_path(home), cc.keyfile_path(home, pending=True), home / ACCEPT_NAME]
    for path in leftovers:
        path.write_bytes(b"left by alice's card")
    args = cli_enrolment(h, tmp_path, serial="bob")
    args.force = True
    assert enrol_cli.cmd_enroll(args) == 0
    config = cc.load(home)
    assert config.settings["serial"] == "bob"
    assert [p.name for p in leftovers if p.exists()] == [], "the previous card's files are still in HOME"
    assert enrol_cli._credentials(args, config).keyfiles == ()


# ---------------------------------------------------------------- 7. a command the router answers ends a chain


def test_a_select_the_router_answers_itself_abandons_the_current_applications_chain():
    """
    Rule (ISO/IEC 7816-4 5.3.3 and 5.3.4, vsc/protocol/applet.py CommandFront: "a different header abandons
    the chain"): a command chain, and the data waiting for GET RESPONSE, belong to the commands that follow
    each other on the card; any other command received in between ends them. How it was broken: a SELECT of
    an AID no application of the card has is answered 6A82 by the router itself (vsc/protocol/router.py), so
    the selected application never saw it and kept its pending chain and response: after "VERIFY PW1 with
    '12' (chained), SELECT <unknown AID>, VERIFY PW1 with '3456'" the OpenPGP application checked '123456'
    (and accepted it), and a GET RESPONSE after the 6A82 still handed out the rest of an earlier answer.
    The same held for a SELECT of the other application that it refused. Now a command the current
    application does not see abandons its chain and its pending response.
    """
    from tests.test_openpgp import FakeCard

    card = FakeCard()
    assert card.select() == 0x9000
    unknown = bytes.fromhex("A000000099990101")
    assert card.send(0x20, 0x00, 0x81, b"12", cla=0x10)[1] == 0x9000  # first part of a chained VERIFY
    assert card.send(0xA4, 0x04, 0x00, unknown)[1] == 0x6A82
    sw = card.send(0x20, 0x00, 0x81, b"3456")[1]
    assert sw != 0x9000, "the chain begun before the SELECT was completed after it: PW1 '12'+'3456' verified"
    # a SELECT of the other application that it refuses (P2 it does not take) ends the chain too
    assert card.send(0x20, 0x00, 0x81, b"12", cla=0x10)[1] == 0x9000
    assert card.send(0xA4, 0x04, 0x7C, bytes.fromhex("A000000308"))[1] != 0x9000
    assert card.send(0x20, 0x00, 0x81, b"3456")[1] != 0x9000
    # and the rest of an answer waiting for GET RESPONSE
    body, sw = card.send(0xCA, 0x00, 0x6E, le=16)
    assert sw >> 8 == 0x61, hex(sw)
    assert card.send(0xA4, 0x04, 0x00, unknown)[1] == 0x6A82
    sw = card.send(0xC0, 0, 0, le=256)[1]
    assert sw != 0x9000 and sw >> 8 != 0x61, "the rest of the answer given before the SELECT was handed out after it"
