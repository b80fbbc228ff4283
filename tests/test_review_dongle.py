"""
Rules of the card on a PKCS#11 token (dongle mode, claim 10: vsc.dongle,
vsc.cli.dongle) that an adversarial review found broken, each with how it
was broken; they hold since the fix.

The token tests use SoftHSM2 through the lab of tests/test_dongle.py (a
token directory of their own, python-pkcs11 in a short subprocess); they
skip like those tests when SoftHSM2 or python-pkcs11 is missing.
"""

from __future__ import annotations

import os

import pytest

from tests.test_dongle import dongle_stack, enrolled, lab, template  # noqa: F401  (fixtures)


# ================================================================ 1. the token PIN stays out of card.ini


@pytest.mark.parametrize("uri", [
    "pkcs11:token=t?module-path=/m.so&pin-value=7391",  # RFC 7512's own form: pin-value= is a query attribute
    "pkcs11:pin-value=7391;token=t;module-path=/m.so",  # pin-value= first
    "pkcs11:token=t;module-path=/m.so;pin-value=7391",
    "pkcs11:token=t;pin-value=7391?module-path=/m.so",
])
def test_enroll_and_replace_strip_the_token_pin_of_every_uri_form_before_card_ini(uri):
    """
    `vsc dongle enroll` and `replace --home` write the token URI to card.ini
    ("no secrets here") without its pin-value= (docs/dongle.md), so the
    token PIN does not end up in a settings file, its backups and copies.

    Broken: the PIN was stripped only from `;`-separated attributes after the
    first one. TokenRef.parse takes pin-value= also as the first attribute
    and in RFC 7512's query form (`?...&pin-value=`, which the docs accept),
    and those forms went to card.ini with the PIN in them.

    (Since test 6, a pin-value= on the command line is refused outright; the
    same strip_pin finds it there, in every form.)
    """
    from vsc.dongle.token import TokenError, TokenRef

    _strip_pin = TokenRef.strip_pin

    stripped = _strip_pin(uri)
    assert "7391" not in stripped and "pin-value" not in stripped, stripped
    ref = TokenRef.parse(stripped, "1")  # the same token and module, the PIN from elsewhere
    assert (ref.module, ref.token_label, ref.pin) == ("/m.so", "t", "1")
    with pytest.raises(TokenError, match="no token PIN"):
        TokenRef.parse(stripped)
    plain = "pkcs11:token=t;module-path=/m.so"
    assert _strip_pin(plain) == plain  # a URI without a PIN is written as given


# ================================================================ 2. objects anyone can make on the token


PLANT = """
    # a party WITHOUT the token PIN: a read-write public session (no login) on the owner's token
    s = pkcs11.lib(ref.module).get_token(token_label=ref.token_label).open(rw=True)
    try:
        for label in (PROTECTED_LABEL, KDF_LABEL):
            s.create_object({Attribute.CLASS: ObjectClass.DATA, Attribute.LABEL: label,
                             Attribute.APPLICATION: "vsc:999999", Attribute.VALUE: b"planted",
                             Attribute.TOKEN: True, Attribute.PRIVATE: False})
        s.generate_key(KeyType.AES, 256, label=DONGLE_KEY_LABEL, store=True,
                       template={Attribute.PRIVATE: False, Attribute.SENSITIVE: False, Attribute.ENCRYPT: True})
    finally:
        s.close()
"""


def test_public_objects_planted_without_the_token_pin_neither_replace_the_card_nor_the_dongle_key(enrolled):
    """
    What the card reads from its token — the protected information, the KDF
    parameters, the DongleKey — is what was written with the token PIN. A
    party without the PIN (another local user reaching the token through
    pcscd, someone holding it for a moment) gets nothing, not even a denial
    of service.

    Broken: PKCS#11 lets a session that never logged in create *public*
    token objects. The card took any data object with its label, the highest
    `vsc:<generation>` winning, and looked its DongleKey up by label. Public
    objects `vsc-protected` / `vsc-kdf` at generation 999999 and a public AES
    key `vsc-dongle-key`, all made without the PIN, made every insert fail
    ("failed to find its DongleKey: MultipleObjectsReturned"; without the key,
    "the password does not open the card"), and the key alone stopped a
    card in use at its next check (exit 5).
    """
    lab, home, _table = enrolled
    card = lab.card(home).start()
    keys = lab.status(home)["slots"]
    card.remove()
    answer = lab.pk11("""
        with Token(ref) as tok:
            out["answer"] = tok.respond(bytes(16)).hex()
    """)["answer"]

    lab.pk11(PLANT)
    got = lab.pk11("""
        with Token(ref) as tok:  # what the card's check, insert and periodic check read
            out["protected"] = tok.read(PROTECTED_LABEL) == b"planted"
            out["kdf"] = tok.read(KDF_LABEL) == b"planted"
            try:
                out["answer"] = tok.respond(bytes(16)).hex()
            except TokenError as e:
                out["answer"] = str(e)
    """)
    assert got == {"protected": False, "kdf": False, "answer": answer}, got

    lab.card(home).start()  # a fresh insert reads the card, not the planted objects
    assert lab.status(home)["slots"] == keys
    assert lab.counter(home, "c", add=1) == 1  # and writes its next generation after them
    assert lab.pk11("""
        with Token(ref) as tok:
            out["planted"] = tok.read(PROTECTED_LABEL) == b"planted"
    """) == {"planted": False}


# ================================================================ 3. the table and the issuer's record: private files


NOBODY = 65534


def test_a_table_written_where_another_user_made_its_temporary_file_first_is_still_private(tmp_path):
    """
    `vsc dongle provision|replace` write the challenge table (`--table`) and
    the issuer's record with write_private: mode 0600, the writer's own file.
    A table handed over through /tmp is a plausible place.

    Broken: write_private opened the fixed name PATH.tmp with O_CREAT and no
    O_EXCL, so a file another user made there first (in a sticky,
    world-writable directory like /tmp) was opened, written and renamed into
    place: the table (or the issuer's record, with the sealed card for an
    offline password attack) ended up in the other user's file, mode 0666,
    which that user could read and rewrite at will.
    """
    from vsc.card.paths import write_private
    from vsc.wire.dongle import ChallengeTable, decode_table, encode_table

    shared = tmp_path / "tmp"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp
    table = shared / "alice.table"
    planted = shared / "alice.table.tmp"
    planted.write_bytes(b"")
    planted.chmod(0o666)
    if os.getuid() == 0:
        os.chown(planted, NOBODY, NOBODY)  # the other user's file
    data = encode_table(ChallengeTable(serial="alice", entries=((b"c" * 16, b"r" * 16),) * 8))

    write_private(table, data)
    st = table.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (os.getuid(), 0o600), (st.st_uid, oct(st.st_mode))
    assert decode_table(table.read_bytes()).serial == "alice"
    assert not planted.exists() or planted.read_bytes() == b""  # nothing went into the other user's file


# ================================================================ 4. a token that stops answering


def test_a_token_check_that_never_answers_removes_the_card(tmp_path):
    """
    The card runs only while the dongle answers ([0105], Figure 14's 1211):
    a card whose token is gone stops within one poll interval plus one
    token round trip (docs/dongle.md).

    Broken: the periodic check waited for the token without a bound, and the
    next check is only scheduled once the last one ended. A token that stops
    answering instead of failing — a network token (USB/IP, p11-kit
    remoting) whose link dropped, a hung module, a token another process
    holds — left the check pending forever, and the card went on signing
    with no dongle for as long as the process lived (a simulated day here).
    """
    from twisted.internet.defer import Deferred
    from twisted.internet.task import Clock

    from tests.cardfakes import MemoryStorage, in_use_session, release
    from vsc.card.config import CardConfig
    from vsc.card.protected import seal_envelope
    from vsc.card.session import LifeState
    from vsc.dongle.storage import TokenCalls, TokenStorage
    from vsc.dongle.token import TokenRef
    from vsc.wire.dongle import ChallengeTable

    ref = TokenRef.parse("pkcs11:token=t;module-path=/m.so", "1")
    table = ChallengeTable(serial="dg-1", entries=((b"c" * 16, b"r" * 16),))
    config = CardConfig(home=tmp_path, server="", server_key="", serial="dg-1", muk_poll=0, clock_poll=0)
    clock, exits, calls = Clock(), [], []

    def worker(fn, *args):
        calls.append(fn)
        return Deferred()  # the token never answers

    token = TokenStorage(config, ref, table, 60.0, worker=worker, calls=TokenCalls(), clock=clock)
    storage = MemoryStorage("dg-1", seal_envelope("dg-1", b"k" * 32, [], os.urandom), b"k" * 32, os.urandom,
                            checks=token.checks())
    s = in_use_session(config, storage, os.urandom, clock, on_exit=lambda code, why: exits.append((code, why)))
    memory = s.memory
    try:
        clock.advance(60)  # the first periodic check asks the token...
        assert len(calls) == 1 and s.life is LifeState.IN_USE
        for _ in range(24 * 60):  # ...which never answers
            clock.advance(60)
            if exits:
                break
        assert s.life is LifeState.EXITED and memory.wiped, (s.life, clock.seconds())
        assert clock.seconds() <= 60 + TokenStorage.CHECK_TIMEOUT + 60, clock.seconds()
        assert len(exits) == 1 and exits[0][0] == 5, exits
        assert exits[0][1].startswith("dongle check failed: the token did not answer"), exits
        assert exits[0][1].endswith("; the card was removed"), exits
    finally:
        release(s)


# ================================================================ 5. refusals that repeat the URI


def test_a_refused_token_uri_is_not_echoed_with_its_pin():
    """
    The token PIN is never printed or logged: a refusal of the token URI
    names what is wrong, not the URI's pin-value=.

    Broken: a URI that did not start with `pkcs11:` (a typo: `pkcs11;`,
    `pkcs:`) was refused as "not a pkcs11: URI: '<the whole URI>'", PIN
    included, on stderr and in the daemon's log (twistd vsc-card with
    card.ini's token written by `enroll --keep-pin-in-uri`).
    """
    from vsc.dongle.token import TokenError, TokenRef

    for uri in ("pkcs11;token=t;module-path=/m.so;pin-value=7391", "pkcs:token=t?pin-value=7391",
                "PKCS11:token=t;pin-value=7391"):
        with pytest.raises(TokenError, match="not a pkcs11: URI") as e:
            TokenRef.parse(uri)
        assert "7391" not in str(e.value), str(e.value)


# ================================================================ 6. the token PIN on a command line


@pytest.mark.parametrize("uri", ["pkcs11:token=t;module-path=/m.so;pin-value=7391",
                                 "pkcs11:token=t?module-path=/m.so&pin-value=7391"])
def test_a_token_pin_on_the_command_line_is_refused(tmp_path, uri):
    """
    The token PIN never sits on a command line: every local user can read a
    process's arguments (ps, /proc/PID/cmdline) for as long as it runs, and
    with the PIN another user reaches the DongleKey and the card's objects
    on a token attached to this machine (shared through pcscd).

    Broken: `twistd vsc-card --dongle URI` (running for hours) and `vsc
    dongle provision|enroll|replace --token URI` took pin-value= from the
    URI, and the "no token PIN" refusal even told the user to add it there.
    Now a pin-value= on a command line is refused with one line before any
    token is touched; the PIN comes from --token-pin-file (or card.ini, which
    `enroll --keep-pin-in-uri` writes from that file).
    """
    from vsc.card import config as cc
    from vsc.cli import CommandError
    from vsc.cli.dongle import _ref
    from vsc.dongle.config import TABLE_NAME, dongle_setup
    from vsc.dongle.token import TokenError, TokenRef
    from vsc.wire.dongle import ChallengeTable, encode_table

    pin = tmp_path / "pin"
    pin.write_text("7391\n")
    with pytest.raises(CommandError, match="--token-pin-file") as e:
        _ref(uri, None)
    assert "7391" not in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(CommandError, match="--token-pin-file"):
        _ref(uri, str(pin))  # refused even when the file gives the PIN too: it is on the command line already
    assert _ref("pkcs11:token=t;module-path=/m.so", str(pin)).pin == "7391"

    home = tmp_path / "home"
    cc.save(home, mode="dongle", serial="dg-1", token="pkcs11:token=t;module-path=/m.so", table=TABLE_NAME)
    (home / TABLE_NAME).write_bytes(encode_table(ChallengeTable(serial="dg-1", entries=((b"c" * 16,) * 2,))))
    with pytest.raises(ValueError, match="--token-pin-file") as e:
        dongle_setup(cc.load(home), uri, str(pin))  # twistd vsc-card --dongle URI
    assert "7391" not in str(e.value)
    assert dongle_setup(cc.load(home), "pkcs11:token=t;module-path=/m.so", str(pin))[0].pin == "7391"
    cc.save(home, mode="dongle", serial="dg-1", token=uri, table=TABLE_NAME)  # card.ini: enroll --keep-pin-in-uri
    assert dongle_setup(cc.load(home), None, None)[0].pin == "7391"
    with pytest.raises(TokenError, match="no token PIN") as e:
        TokenRef.parse("pkcs11:token=t;module-path=/m.so")
    assert "pin-value" not in str(e.value)  # no advice to put it on a command line


# ================================================================ 7. a token pulled in the middle of an insert


@pytest.mark.parametrize("step", ["read", "bind", "write"])
def test_a_token_that_fails_in_the_middle_of_an_insert_is_refused_with_one_clear_line(tmp_path, step):
    """
    A refused insert says why in one line (docs/dongle.md, "Messages"); a
    token pulled mid-way fails like the check does: "the token failed: X".

    Broken: only the Figure 14 check turned a PKCS#11 error other than
    TokenError (python-pkcs11 raises DeviceRemoved, TokenNotPresent, ...
    once a session is open and the token goes) into a refusal. The same
    error while reading the card, binding it to the DongleKey or writing
    back a restored card escaped as a bare exception, which the daemon could
    only report as "internal error (see the card daemon's log)".
    """
    from twisted.internet.defer import ensureDeferred, maybeDeferred

    from tests.cardfakes import SCRYPT_CHEAP
    from vsc.card import ops
    from vsc.card.config import CardConfig
    from vsc.card.protected import seal_envelope
    from vsc.dongle.storage import TokenCalls, TokenStorage
    from vsc.dongle.token import TokenRef
    from vsc.protocol.card_lifecycle import CardError
    from vsc.wire.dongle import ChallengeTable

    class DeviceRemoved(Exception):
        """What python-pkcs11 raises (an exception with no message) when the token goes mid-session."""

    def pulled(*args):
        raise DeviceRemoved()

    kdf = ops.new_kdf(os.urandom, log2_n=SCRYPT_CHEAP)
    keys = ops.derive_keys("pw", kdf)
    envelope = seal_envelope("dg-1", keys.protection_key, [], os.urandom)  # as replace leaves it: not yet bound
    calls = dict(check=lambda *a: True, read=lambda ref: (envelope, kdf.encode()), bind=lambda *a: b"b" * 32,
                 write=lambda *a: None)
    calls[step] = pulled
    config = CardConfig(home=tmp_path, server="", server_key="", serial="dg-1", muk_poll=0, clock_poll=0)
    token = TokenStorage(config, TokenRef.parse("pkcs11:token=t;module-path=/m.so", "1"),
                         ChallengeTable(serial="dg-1", entries=((b"c" * 16, b"r" * 16),)), 60.0,
                         worker=lambda fn, *a: maybeDeferred(fn, *a), calls=TokenCalls(**calls))
    failures = []
    ensureDeferred(token.open("pw", b"m" * 32)).addErrback(failures.append)
    assert len(failures) == 1
    error = failures[0].value
    assert isinstance(error, CardError), repr(error)
    assert "the token failed: DeviceRemoved" in str(error) and "\n" not in str(error), str(error)


class _Reactor:
    """callFromThread only: what detached_worker needs; the calls are queued and run by the test."""

    def __init__(self):
        self.queued = []

    def callFromThread(self, fn, *args):
        self.queued.append((fn, args))

    def run_queued(self):
        for fn, args in self.queued:
            fn(*args)
        self.queued.clear()


def test_a_hung_token_call_does_not_hold_the_process_at_shutdown():
    """
    After a check gives up on a token that does not answer, the card
    process exits (status 5). The token calls ran on the reactor's thread
    pool, which shutdown joins: a call that hangs for ever kept the process
    up after the card said it was exiting (found by an adversarial review).
    The daemon's worker runs each call on a daemon thread that shutdown does
    not wait for, and hands results back through callFromThread; a result
    that comes after the caller gave up is dropped.
    """
    import threading

    from twisted.internet.defer import CancelledError

    from vsc.dongle.storage import detached_worker

    reactor = _Reactor()
    worker = detached_worker(reactor)
    release, seen = threading.Event(), []

    def hung():
        seen.append(threading.current_thread())
        release.wait(20)
        return "late"

    d = worker(hung)
    for _ in range(2000):  # the thread has started (a bounded wait for it, not a sleep in the code under test)
        if seen:
            break
        threading.Event().wait(0.005)
    assert seen and seen[0].daemon and seen[0] is not threading.main_thread()
    assert seen[0].name == "vsc-token"
    failures = []
    d.addErrback(lambda f: failures.append(f.check(CancelledError)))
    d.cancel()  # the check's timeout gives up on it
    release.set()
    seen[0].join(20)
    reactor.run_queued()  # the late answer is dropped, not an AlreadyCalledError
    assert failures == [CancelledError]

    ok, bad = worker(lambda a, b=0: a + b, 2, b=3), worker(lambda: 1 // 0)
    for t in threading.enumerate():
        if t.name == "vsc-token":
            t.join(20)
    reactor.run_queued()
    results = []
    ok.addCallback(results.append)
    bad.addErrback(lambda f: results.append(f.check(ZeroDivisionError)))
    assert results == [5, ZeroDivisionError]


def test_card_ini_is_written_private(tmp_path):
    """
    ``vsc dongle enroll --keep-pin-in-uri`` keeps the token's PIN in
    card.ini's token URI. card.ini was written with the process's umask
    (usually 0644): any local user could read the PIN. It is written 0600
    like every other file of the card's HOME, through paths.write_private
    (a temporary file of our own, never one another user made first).
    """
    import stat

    from vsc.card import config as cc

    home = tmp_path / "card"
    old = os.umask(0o022)
    try:
        cc.save(home, mode="dongle", serial="dg-1", token="pkcs11:token=t;pin-value=1234")
    finally:
        os.umask(old)
    st = (home / cc.CARD_INI).stat()
    assert stat.S_IMODE(st.st_mode) == 0o600
    assert "pin-value=1234" in (home / cc.CARD_INI).read_text()
    assert [p.name for p in home.iterdir()] == [cc.CARD_INI]  # no temporary file left behind
