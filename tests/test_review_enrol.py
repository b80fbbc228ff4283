"""
Rules of enrolment and administration (vsc.protocol.server_ops's enrolment,
vsc.server.store, vsc.server.service, vsc.cli.admin) that an adversarial
review found broken, each with how it was broken; they hold since the fix.
Deterministic: a fixed clock, a real SQLite Store on a temporary file driven
by hand.
"""

from __future__ import annotations

from tests.test_review_server import _drive, _store
from tests.test_server_ops import AUTH_INFO, KDF, Now, machine
from vsc.protocol import auth
from vsc.protocol.lockout import LockoutPolicy, SourceLimits
from vsc.wire.ops import EnrolRequest, Status

STRANGER = "198.51.100.7"


def _enrol(serial: str, code: str, verifier: bytes = b"V" * 32) -> EnrolRequest:
    return EnrolRequest(serial=serial, code=code, verifier=verifier, kdf=KDF, protected=b"P", registration=b"")


# ---------------------------------------------------------------- 1. refused enrolments and the history


def test_a_stranger_cannot_grow_the_history_without_bound_with_enrolment_requests(tmp_path):
    """
    Rule (docs/admin.md §9, §9a; docs/security.md "holding"): a stranger who
    keeps asking cannot grow the history without bound; requests that prove
    nothing are counted for their source, and once it is throttled its
    refusals are only logged.

    An enrolment proves itself with the one-time code. Before the fix every
    refused enrolment (a wrong, used or expired code; a serial that was never
    issued) was a permanent history row, written in its own fsynced
    transaction, and never counted for its source: one unauthenticated
    channel wrote a row per request, for any serial it named (300 rows for
    300 requests here). Now a refused enrolment counts for its source, and
    once the source is throttled its refusals are only logged: at most
    ``source_threshold`` rows, the same answer to every request, and the
    owner's enrolment with the right code from the same (throttled) address
    still goes through.
    """
    now = Now()
    store = _store(tmp_path, now)
    store.issue("bob", auth.code_hash("RIGHT-CODE"), AUTH_INFO, 3600)
    policy = LockoutPolicy()
    limits = SourceLimits(policy, now)
    before = len(store.history())
    stranger = machine(now=now, peer=f"{STRANGER}:2000", limits=limits)
    for i in range(150):
        for serial in ("bob", f"no-such-{i}"):
            replies = _drive(stranger, stranger.message(_enrol(serial, f"GUESS-{i}")), store)
            assert [r.status for r in replies] == [Status.REFUSED]  # recorded or not, the same answer
    grown = len(store.history()) - before
    assert grown <= policy.source_threshold, f"{grown} history rows written for one unauthenticated source"
    assert store.get("bob") is None and store.enrolment("bob") is not None
    # the owner, behind the same address, enrols with the right code as ever, and it is recorded
    owner = machine(now=now, peer=f"{STRANGER}:3000", limits=limits)
    replies = _drive(owner, owner.message(_enrol("bob", "RIGHT-CODE")), store)
    assert [r.status for r in replies] == [Status.OK]
    assert store.get("bob") is not None and store.history("bob")[-1].op == "enrol"


def test_enrolments_refused_as_bad_requests_cannot_grow_the_history_without_bound():
    """
    The same rule for an enrolment whose material cannot be made: under a
    ``keyfile`` policy, an EnrolRequest without a registration is refused
    BAD_REQUEST before any code is checked. Before the fix each one was a
    history row (LogRefusal) and never counted for its source, so a stranger
    with no code at all wrote one row per request (300 here). Now it counts
    for the source like a wrong code, and once the source is throttled the
    refusal is only logged; the answer stays BAD_REQUEST.
    """
    from vsc.protocol.cardstore import LogRefusal
    from vsc.protocol.server_ops import IssueMaterial, Logged, OpsPolicy, Reply
    from vsc.wire.ops import AuthMethod

    now = Now()
    policy = OpsPolicy(impl_auth=(AuthMethod.KEYFILE,))
    limits = SourceLimits(policy.lockout, now)
    stranger = machine(policy=policy, now=now, peer=f"{STRANGER}:2000", limits=limits)
    rows = 0
    for i in range(150):
        for serial in ("bob", f"no-such-{i}"):
            effects = stranger.message(_enrol(serial, f"GUESS-{i}"))
            assert [type(e) for e in effects] == [IssueMaterial]
            effects = stranger.material_refused("keyfile authentication is required, but the card sent no registration")
            if effects and isinstance(effects[0], LogRefusal):
                rows += 1
                effects = stranger.stored(None)
            assert all(isinstance(e, (Logged, Reply)) for e in effects)
            assert effects[-1].message.status is Status.BAD_REQUEST
    assert rows <= policy.lockout.source_threshold, f"{rows} history rows written for one unauthenticated source"


# ---------------------------------------------------------------- 2. no private-key work for a request that proved nothing



def keyfile_harness(tmp_path):
    """
    A server Harness under a master-key + keyfile policy with SERIAL's
    enrolment code issued, counting the RSA signatures its registrar makes:
    (harness, code, signatures).
    """
    from tests.test_server_ops import SERIAL, Harness
    from vsc.protocol.server_ops import OpsPolicy
    from vsc.server.policy import Policy, code_hash, new_enrolment_code
    from vsc.wire.ops import AuthMethod

    h = Harness(tmp_path, OpsPolicy(impl_auth=(AuthMethod.MASTER_KEY, AuthMethod.KEYFILE)))
    code = new_enrolment_code()
    h.store.issue(SERIAL, code_hash(code), Policy().initial_auth_info(), 3600)
    signatures = []
    sign = h.factory.registrar.sign
    h.factory.registrar.sign = lambda data: signatures.append(data) or sign(data)
    return h, code, signatures


def test_a_wrong_enrolment_code_costs_the_server_no_signature(tmp_path):
    """
    Rule (docs/admin.md §9a): until an operation has shown its authority (an
    enrolment code here) the server spends little on it; private-key work is
    rate-limited per source (the handshake) and never done for free.

    Under a ``keyfile`` policy the server makes a card's keyfile at
    enrolment: an RSA signature with the server's key, on the same worker
    pool as every database call. Before the fix it did so before it looked
    at the code: every EnrolRequest with a made-up code and any
    well-formed registration cost one RSA signature, and one channel (one
    handshake) could send them one after another without limit, filling the
    pool the owners' inserts wait on. Now the code (or, for a retried
    enrolment, the stored card's verifier) is checked first, with a plain
    read, and nothing is signed for a request that shows neither: 40
    refused enrolments sign nothing, and the owner's enrolment with the
    right code is signed once and gets its keyfile.
    """
    from tests.test_implauth import registration
    from tests.test_server_ops import SERIAL, result_of
    from vsc.card import ops as card_ops
    from vsc.crypto import system_random
    from vsc.server.policy import new_enrolment_code

    h, code, signatures = keyfile_harness(tmp_path)
    client, _, _ = h.connect()
    kdf = card_ops.new_kdf(system_random, log2_n=10)
    keys = card_ops.derive_keys("pw", kdf)
    for i in range(20):
        for serial in (SERIAL, f"no-such-{i}"):
            d = h.run(card_ops.enrol(client, serial, new_enrolment_code(), keys, kdf, b"P",
                                     registration=registration(keys, serial)))
            d.addErrback(lambda f: f.trap(card_ops.OperationRefused))
            result_of(d)
    signed = len(signatures)
    assert signed == 0, f"{signed} keyfiles signed for 40 enrolments with made-up codes"
    result = result_of(h.run(card_ops.enrol(client, SERIAL, code, keys, kdf, b"P",
                                            registration=registration(keys, SERIAL))))
    assert result.status is Status.OK and result.registration
    assert len(signatures) == 1 and "keyfile" in h.store.get(SERIAL).auth_info
    # the same enrolment retried (its answer lost) is still signed for: the stored card is this very enrolment
    from vsc.protocol import auth as auth_

    verifier = auth_.verifier_for(keys.auth_key, kdf.alg)
    reg = registration(keys, SERIAL)
    assert h.store.may_enrol(SERIAL, b"", verifier, kdf.encode(), b"P", reg)
    assert not h.store.may_enrol(SERIAL, b"", b"\0" * 32, kdf.encode(), b"P", reg)
    result = result_of(h.run(card_ops.enrol(client, SERIAL, code, keys, kdf, b"P",
                                            registration=registration(keys, SERIAL))))
    assert result.status is Status.OK and result.registration and len(signatures) == 2


# ---------------------------------------------------------------- 3. the data directory: created, or trusted only if safe


NOBODY = 65534


def _umask(mask: int):
    import contextlib
    import os

    @contextlib.contextmanager
    def cm():
        old = os.umask(mask)
        try:
            yield
        finally:
            os.umask(old)

    return cm()


def test_init_writes_the_config_with_the_database_password_for_its_owner_only(tmp_path):
    """
    Rule (docs/admin.md §2, §4; docs/security.md "Other users"): nothing of
    the server's data directory that holds a secret is readable by other
    local users. ``vsc-server.ini`` may hold the database URL with its
    password (``postgresql://vsc:PASSWORD@HOST/vsc``: vsc redacts it in every
    message for that reason).

    ``init`` wrote the config with ``open(path, "w")``: mode 0666 & ~umask,
    0644 under the usual umask 022. In a data directory that already
    existed (an administrator's ``mkdir /var/lib/vsc``, mode 0755), every
    local user could read the database password. Now the config is created
    new (O_EXCL, never through a link planted there) with mode 0600.
    """
    import os
    import stat

    from vsc.server import config

    d = tmp_path / "srv"
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    with _umask(0o022):
        config.init(d, database="postgresql://vsc:s3cret@127.0.0.1:5432/vsc", key_bits=2048)
    ini = d / config.CONFIG_NAME
    assert "s3cret" in ini.read_text()
    mode = stat.S_IMODE(os.stat(ini).st_mode)
    assert mode & 0o077 == 0, f"{ini} is mode {mode:o}: other local users read the database password"


def test_init_refuses_a_data_directory_another_user_can_write(tmp_path):
    """
    Rule (docs/admin.md §2: "Whoever holds server-key.pem can impersonate
    the server to every card"; docs/security.md: other users of the same
    machine get nothing): the data directory is the server's own.

    ``init`` used ``mkdir(exist_ok=True)`` and went on in whatever directory
    it found: one another local user had made (``/srv/vsc`` created in
    advance by ``nobody``), or one anyone can write (mode 0777). That user
    can then rename ``server-key.pem`` away and put a key of its own in its
    place (the directory is theirs, the 0600 file does not help), or point
    ``vsc-server.ini`` at another database. Now ``init`` refuses such a
    directory with one line and creates nothing in it.
    """
    import os

    import pytest

    from vsc.server import config

    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o777)
    for d in (theirs, shared):
        with pytest.raises(config.ConfigError) as e:
            config.init(d, key_bits=2048)
        assert str(d) in str(e.value) and "\n" not in str(e.value)
        assert os.listdir(d) == []


# ---------------------------------------------------------------- 4. the one-time code stays off the command line


def test_the_enrolment_code_can_be_given_without_showing_it_to_other_local_users(tmp_path, monkeypatch):
    """
    Rule (docs/security.md "Other users of the same machine": they get
    nothing; the one-time code is the only thing that proves an enrolment):
    the owner can give ``vsc card enroll`` its code the way it gives its
    password, from a file (or fd:N) or the terminal, never in argv.

    ``vsc card enroll`` took the code only as ``--code CODE`` (required), so
    it was in /proc/PID/cmdline, readable by every local user, for the whole
    enrolment (scrypt, four key pairs and their certificates, the connect:
    most of a second), next to the serial and the server's address and key
    in the same argv. Another user watching the process list could enrol the
    card first under a password of their own (the code works once): the
    owner's enrolment is then refused and the serial is theirs. Now
    ``--code-file FILE|fd:N`` reads it, and with neither option the terminal
    is asked (like the password); ``--code`` remains for scripts.
    """
    from vsc.cli import enrol, parse

    code_file = tmp_path / "alice.code"
    code_file.write_text("ABCDE-FGHIJ-KLMNO-PQRST-UVWXY-Z2345\n")
    argv = ["card", "--home", str(tmp_path / "home"), "enroll", "--server", "tcp:127.0.0.1:7390",
            "--server-key", "SHA256:x", "--serial", "alice", "--code-file", str(code_file)]
    args = parse(argv)
    assert "ABCDE" not in " ".join(argv)
    assert enrol.enrolment_code(args) == "ABCDE-FGHIJ-KLMNO-PQRST-UVWXY-Z2345"
    # with no option at all, the terminal is asked (never an echoing read of stdin)
    args = parse(argv[:-2])
    monkeypatch.setattr("vsc.cli.card._have_terminal", lambda: True)
    monkeypatch.setattr("getpass.getpass", lambda prompt: "ABCDE-FGHIJ")
    assert enrol.enrolment_code(args) == "ABCDE-FGHIJ"


# ---------------------------------------------------------------- 5. a stranger's serial in the operator's log


def test_a_serial_a_stranger_sends_cannot_forge_lines_or_escapes_in_the_servers_log(tmp_path):
    """
    Rule (docs/admin.md §6, §11: the operator reads the server's log for
    what strangers did; docs/security.md: unauthenticated peers get
    nothing): what a stranger sends cannot write lines of its own, or
    terminal escape sequences, into the server's log.

    A request's serial is any UTF-8 on the wire (up to 64 bytes; a serial
    stored by an earlier vsc may lie outside today's alphabet, so the server
    cannot simply refuse it), and the server logged it as it came
    (``"{peer}: {serial}: {event} ({detail})"`` for every refusal of a
    throttled source). A stranger sent sync requests for the serial
    ``"x\\n<a line of its choice>"`` or one holding ``ESC ]`` / ``ESC [``
    sequences: the text log (twistd's default) then had a forged line, and
    ``tail`` on the operator's terminal ran the escapes. Now a serial that
    is not printable is logged escaped (``'x\\n...'``), on one line.
    """
    from twisted.logger import formatEvent, globalLogPublisher

    from tests.test_server_ops import Harness, result_of
    from vsc.wire.ops import Op, OpRequest

    forged = "x\n2026-12-03T12:00:00 [vsc] alice destroyed\x1b]0;pwn\x07\x1b[2J"
    h = Harness(tmp_path)
    client, _, _ = h.connect()
    lines: list[str] = []

    def observe(event):
        if event.get("serial") is not None:
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        for _ in range(8):
            d = h.run(client.request(OpRequest(op=Op.SYNC, serial=forged, insert_secret=b"S" * 32, version=1,
                                               protected=b"x")))
            assert result_of(d).status is Status.REFUSED
    finally:
        globalLogPublisher.removeObserver(observe)
    assert lines, "the throttled source's refusals were not logged"
    for line in lines:
        assert "\n" not in line and "\x1b" not in line and "\x07" not in line, repr(line)


# ---------------------------------------------------------------- 6. the database password in the server's messages


def test_the_server_never_prints_the_database_password(tmp_path, capsys):
    """
    Rule (docs/admin.md §4: a database URL may hold a password; `vsc admin`
    shows it as ``***`` in every message,
    tests/test_admin.py::test_init_with_an_unreachable_postgresql_hides_the_password):
    the password is not written to a terminal or a log.

    ``twistd vsc-server`` printed the whole URL when it could not open the
    database at start-up (``vsc-server: cannot open the database
    postgresql://vsc:s3cret@...``) and, for a URL of a kind it does not
    support, the StoreError that quotes it: into twistd's stderr, which
    systemd's journal or a log file keeps, for whoever reads those. Now the
    password is ``***`` there too, as in `vsc admin`.
    """
    import pytest

    from vsc.server import config, tap

    for url in ("postgresql://vsc:s3cret@127.0.0.1:1/vsc", "mysql://vsc:s3cret@127.0.0.1:1/vsc"):
        d = tmp_path / url.split(":", 1)[0]
        config.init(d, database=url, key_bits=2048)
        options = tap.Options()
        options.parseOptions(["--data-dir", str(d)])
        with pytest.raises(SystemExit) as e:
            tap.makeService(options)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("vsc-server: ") and "vsc:***@127.0.0.1:1" in err, err
        assert "s3cret" not in err, err


# ---------------------------------------------------------------- 7. replace --policy fresh: all or nothing


def test_replace_fresh_that_cannot_issue_the_new_code_destroys_nothing(tmp_path, capsys):
    """
    Rule (docs/admin.md §7 replace; "every vsc admin failure is one line
    and a non-zero exit"): a command that fails changes nothing; replace
    ``--policy duplicate`` copies first so that a refused copy leaves the
    card alone.

    ``replace --policy fresh`` destroyed the card first and only then issued
    the replacement's code. When the code could not be issued (the default
    ``SERIAL-r1`` looks like a serial that exists, ``SERIAL-rl``; or a
    ``--new-serial`` that does) the command failed with one line, but the
    card was already destroyed (final) and no replacement existed. Now the
    code is issued first: a refusal leaves the card as it was.
    """
    import time

    from vsc.cli import main
    from vsc.protocol.cardstore import EnrolCard
    from vsc.server import config
    from vsc.server.store import Store

    d = tmp_path / "srv"
    config.init(d, key_bits=2048)
    store = Store(config.load(d).database_url, time.time)  # clock-ok: the CLI uses wall time too
    store.migrate()
    try:
        store.issue("lost", auth.code_hash("C1"), AUTH_INFO, 3600)
        assert store.enrol(EnrolCard("lost", auth.code_hash("C1"), b"v" * 32, KDF, b"P", b"", {}, "p")).status \
            is Status.OK
        store.issue("lost-rl", auth.code_hash("C2"), AUTH_INFO, 3600)
    finally:
        store.close()
    for extra in ([], ["--new-serial", "LOST-RL"]):
        assert main(["admin", "--data-dir", str(d), "replace", "lost", "--policy", "fresh", *extra]) != 0
        err = capsys.readouterr().err
        assert err.startswith("vsc: ") and "looks like" in err, err
        store = Store(config.load(d).database_url, time.time)  # clock-ok
        try:
            assert store.get("lost").state.value == "idle", "the card was destroyed by a replace that failed"
        finally:
            store.close()


# ---------------------------------------------------------------- 8. issue --code-file: all or nothing


def test_issue_to_a_code_file_that_exists_leaves_the_earlier_code_working(tmp_path, capsys):
    """
    Rule (docs/admin.md §7 issue, Troubleshooting: ``FILE exists; not
    overwriting it`` is a refusal): a command that fails changes nothing.

    ``issue SERIAL --code-file FILE`` stored the new code (which replaces
    the serial's earlier one) and only then found that FILE existed: it
    failed with that line, the new code was shown to no one, and the code
    the owner had already been given no longer worked. Now the file is
    created first: when it exists nothing is issued, and the earlier code
    still works.
    """
    import json
    import time

    from vsc.cli import main
    from vsc.server import config
    from vsc.server.store import Store

    d = tmp_path / "srv"
    config.init(d, key_bits=2048)
    assert main(["admin", "--data-dir", str(d), "issue", "bob", "--json"]) == 0
    first = json.loads(capsys.readouterr().out)["code"]
    taken = tmp_path / "bob.code"
    taken.write_text("something else\n")
    assert main(["admin", "--data-dir", str(d), "issue", "bob", "--code-file", str(taken)]) != 0
    assert "exists" in capsys.readouterr().err
    assert taken.read_text() == "something else\n"
    store = Store(config.load(d).database_url, time.time)  # clock-ok: the CLI uses wall time too
    try:
        assert store.enrolment("bob")[0] == auth.code_hash(first), "the code the owner holds was replaced"
    finally:
        store.close()


# ---------------------------------------------------------------- 9. a lost enrolment reply


def test_an_enrolment_whose_reply_is_lost_is_retried_and_the_card_is_made(tmp_path, monkeypatch):
    """
    Rule (docs/admin.md §7 issue: the code "works once"; vsc.server.store
    ``enrol``: "the same enrolment retried after its answer was lost ... is
    answered OK again"): an enrolment the server stored is never left
    half-made because its answer did not arrive.

    ``vsc card enroll`` sent its EnrolRequest once. When the connection
    dropped after the server had stored the card but before its OK arrived
    (a network attacker needs to drop one record), the command failed
    (``CLOSE_NOTIFY: connection lost``) and wrote no ``card.ini``: the
    code was used up, the card existed on the server under the owner's
    password, and running enroll again made new keys, so its request was no
    longer "the same" and was refused. The owner was kept out until an
    administrator destroyed the card and issued a new code. Now enroll
    sends the identical request again on a new channel, which the server
    answers OK, and the card is made.
    """
    from tests.test_server_ops import Harness, cli_enrolment, result_of
    from vsc.cli import enrol as enrol_cli

    h = Harness(tmp_path)
    args = cli_enrolment(h, tmp_path)
    channels = []
    real_enrol = h.store.enrol

    def enrol_and_lose_the_answer(e):
        outcome = real_enrol(e)
        if len(channels) == 1:  # the first channel: stored, then the answer is lost with the connection
            server = channels[0]
            server.transport.write = server.transport.writeSequence = lambda data: None
            server.transport.loseConnection()
        return outcome

    async def connect(reactor, endpoint, fingerprint, config, *rest, **kw):
        client, server, _ = h.connect()
        channels.append(server)
        return client

    monkeypatch.setattr(h.store, "enrol", enrol_and_lose_the_answer)
    monkeypatch.setattr("vsc.card.connect.connect", connect)
    monkeypatch.setattr(enrol_cli, "run_async", lambda run: result_of(h.run(run(h.clock))))
    home = tmp_path / "home"
    assert enrol_cli.cmd_enroll(args) == 0
    assert len(channels) == 2 and (home / "card.ini").exists()
    assert [(e.op, e.result) for e in h.store.history("alice")] == [("issue", "ok"), ("enrol", "ok"),
                                                                    ("enrol", "repeat")]


def test_bad_password_changes_and_password_op_requests_cannot_grow_the_history_without_bound(tmp_path):
    """
    The same rule for the other requests refused before they prove
    anything: an OpRequest(op=PASSWORD) (a password change is its own
    message) and a ChangePassword whose new KDF parameters or verifier are
    malformed. Each was a history row and never counted for its source, so a
    stranger wrote one row per request (300 here; left open by the review of
    enrolment, fixed with it). They now count for the source, and once it is
    throttled they are only logged; the answer stays BAD_REQUEST.
    """
    from vsc.wire.ops import ChangePassword, Op, OpRequest

    now = Now()
    store = _store(tmp_path, now)
    limits = SourceLimits(LockoutPolicy(), now)
    before = len(store.history())
    stranger = machine(now=now, peer=f"{STRANGER}:2000", limits=limits)
    for i in range(100):
        for request in (OpRequest(op=Op.PASSWORD, serial=f"s-{i}", insert_secret=b"S" * 32),
                        ChangePassword(serial="bob", insert_secret=b"S" * 32, version=1, verifier=b"V" * 32,
                                       kdf=b"not kdf parameters", protected=b"P"),
                        ChangePassword(serial=f"s-{i}", insert_secret=b"S" * 32, version=1, verifier=b"V" * 3,
                                       kdf=KDF, protected=b"P")):
            replies = _drive(stranger, stranger.message(request), store)
            assert [r.status for r in replies] == [Status.BAD_REQUEST]  # recorded or not, the same answer
    grown = len(store.history()) - before
    assert grown <= LockoutPolicy().source_threshold, f"{grown} history rows written for one unauthenticated source"
