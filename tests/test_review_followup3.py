"""
Review follow-up 3: suspicions earlier reviews reported without proof,
each proved here with a test that failed before its fix.
"""

from __future__ import annotations

import os

import pytest

from vsc import crypto
from vsc.card.session import CardError, LifeState
from tests.test_review_daemon import rig  # noqa: F401 - the fixture
from vsc.protocol.lifecycle import Action, CardFacts, Operation, RequestFacts, State, classify, decide
from vsc.wire.ops import AuthResponse, ChangePassword, KdfParams, Op, OpRequest, OpResult, Status
from tests.cardfakes import FakeServer, done, release
from tests.test_card_storage import SERIAL, _envelope, _runs, _server_storage, _session


# ---------------------------------------------------------------- a COMMIT whose outcome is unknown


class CommitLostServer(FakeServer):
    """
    The fake server of tests.test_card_storage, deciding insert, sync,
    password change and remove with the real Figure 4 table
    (vsc.protocol.lifecycle.classify / decide, as vsc.server.store does on
    the row it locks) and carrying the decision out as the store does. For
    the operations named in ``lose``, the decision is carried out (the
    database committed) but the answer is INTERNAL: what the server's
    machine answers (server_ops ``store_failed``) when its PostgreSQL
    connection drops during the COMMIT, which succeeded.
    """

    def __init__(self, *a, lose=(), **kw):
        super().__init__(*a, **kw)
        self.lose = list(lose)
        self.state = State.IDLE
        self.session_hash: bytes | None = None
        self.last_session: bytes | None = None
        self.muk: bytes | None = None
        self.pending_insert = b""  # the insert secret of the insert being authenticated

    def facts(self) -> CardFacts:
        return CardFacts(state=self.state, version=self.version, session_hash=self.session_hash,
                         last_session=self.last_session, muk=self.muk, protected=self.envelope,
                         verifier=self.verifier, kdf=self.kdf.encode())

    def _decide(self, op: Operation, req: RequestFacts):
        decision = decide(self.state, op, classify(op, self.facts(), req))
        a = decision.action
        if a is Action.CHECK_OUT:
            self.state, self.muk, self.session_hash, self.last_session = (State.IN_USE, req.muk, req.session_hash,
                                                                          req.session_hash)
        elif a in (Action.STORE, Action.STORE_PASSWORD, Action.CHECK_IN):
            self.envelope, self.version = req.protected, self.version + 1
            if a is Action.STORE_PASSWORD:
                self.verifier, self.kdf = req.verifier, KdfParams.decode(req.kdf)
            if a is Action.CHECK_IN:
                self.state, self.muk, self.session_hash = State.IDLE, None, None
        elif a is Action.CHECK_IN_AGAIN:
            self.state, self.muk, self.session_hash = State.IDLE, None, None
        if decision.status is Status.OK and op in self.lose:
            self.lose.remove(op)  # committed; the answer is lost with the database connection
            return OpResult(status=Status.INTERNAL)
        version = self.version if decision.status in (Status.OK, Status.VERSION_CONFLICT) else 0
        if op is Operation.INSERT and decision.status is Status.OK:
            return OpResult(status=Status.OK, version=self.version, protected=self.envelope)
        return OpResult(status=decision.status, version=version)

    def answer(self, msg):
        sha = crypto.sha256
        if isinstance(msg, OpRequest) and msg.op is Op.INSERT:
            self.pending_insert = msg.insert_secret
            return super().answer(msg)
        if isinstance(msg, AuthResponse):
            checked = super().answer(msg)
            if checked.status is not Status.OK:
                return checked
            return self._decide(Operation.INSERT, RequestFacts(session_hash=sha(self.pending_insert), muk=msg.muk))
        if isinstance(msg, OpRequest) and msg.op is Op.ATTACH:
            return OpResult(status=Status.OK if sha(msg.insert_secret) == self.session_hash else Status.REFUSED,
                            version=self.version)
        if isinstance(msg, OpRequest) and msg.op in (Op.SYNC, Op.REMOVE):
            op = Operation.SYNC if msg.op is Op.SYNC else Operation.REMOVE
            (self.syncs if op is Operation.SYNC else self.removes).append(msg.protected)
            return self._decide(op, RequestFacts(session_hash=sha(msg.insert_secret), version=msg.version,
                                                 protected=msg.protected))
        if isinstance(msg, ChangePassword):
            self.passwords.append(msg)
            return self._decide(Operation.PASSWORD, RequestFacts(
                session_hash=sha(msg.insert_secret), version=msg.version, protected=msg.protected,
                verifier=msg.verifier, kdf=msg.kdf))
        raise AssertionError(f"unexpected {msg!r}")


def test_a_remove_whose_commit_was_lost_is_retried_identically_and_converges(tmp_path):
    """
    Rule (vsc.protocol.lifecycle, docs/protocol.md §10.13): a remove is
    retried identically (same insert secret, version and upload) and the
    retry is answered "ok" whether or not the first was stored; the card is
    in use on at most one machine ([0054]). Broken: a PostgreSQL connection
    that drops during the COMMIT of a check-in (the COMMIT succeeded) makes
    the server answer INTERNAL ("nothing was changed"); the card stayed in
    use, and the owner's next ``vsc card remove`` exported a fresh upload
    (new nonces), which the now idle card's row refuses (REFUSED): the card
    kept serving its keys on this machine while the server had it idle,
    free to be inserted on another. Now ServerStorage sends the identical
    request once more on INTERNAL; the table answers it "ok" (idle, identical
    retry) and the card is removed here as it is on the server.
    """
    server = CommitLostServer(SERIAL, "pw", _envelope, lose=[Operation.REMOVE])
    session = _session(tmp_path, _server_storage(tmp_path, server))
    done(session.insert("pw"))
    done(session.counter("runs", -1))
    try:
        done(session.remove("test"))
    except Exception:
        # what the owner then does: remove again
        with pytest.raises(Exception):
            done(session.remove("again"))
        assert not (session.usable and server.state is State.IDLE), \
            "the card is in use on this machine while the server has it idle (free for another machine)"
        raise
    assert session.life is LifeState.IDLE and not session.lock.held
    assert server.state is State.IDLE and _runs(server.envelope, server.protection_key) == 2
    assert len(server.removes) == 2 and server.removes[0] == server.removes[1]  # the identical retry


def test_a_sync_whose_commit_was_lost_is_retried_and_the_card_stays_in_step(tmp_path):
    """
    Rule (vsc.card.session ``_modify``): a change is acknowledged only once
    the storage has it, and undone otherwise, so card and server agree.
    Broken: a sync committed but answered INTERNAL (the database connection
    dropped during the COMMIT) was undone on the card while the server kept
    it (a rental counter stepped on the server but not on the card; a new
    key stored on the server while the owner was told it failed); from then
    on every change and the remove were refused VERSION_CONFLICT (the card
    is one version behind): stuck in use until a recover, after which the
    next insert brings back the change the owner was told had failed. Now
    the identical sync is sent once more and answered "ok" (identical
    retry): the change stands on both sides.
    """
    server = CommitLostServer(SERIAL, "pw", _envelope, lose=[Operation.SYNC])
    session = _session(tmp_path, _server_storage(tmp_path, server))
    done(session.insert("pw"))
    assert done(session.counter("runs", -1)) == 2
    assert done(session.counter("runs")) == 2 and _runs(server.envelope, server.protection_key) == 2
    done(session.counter("runs", -1))  # the next change is stored, not a conflict
    done(session.remove("test"))
    assert server.state is State.IDLE and _runs(server.envelope, server.protection_key) == 1


def test_a_password_change_whose_commit_was_lost_is_not_taken_for_refused(tmp_path):
    """
    Rule (vsc.card.storage ``change_password``): a password change the
    server may have stored keeps both keyfiles and the card's new wrap only
    once it is known stored; a refused one (nothing changed) discards the
    re-sealed keyfile. Broken: INTERNAL was taken for "refused, nothing
    changed" although the server answers it when its database connection
    drops during the COMMIT that stored the new verifier: the card kept the
    old wrap and said the old password stays, the re-sealed keyfile was
    deleted, and every later sync and the remove were refused
    VERSION_CONFLICT; after a recover only the new password opens the card,
    and a keyfile sealed for it no longer exists. Now the identical change
    is sent once more (answered "ok": identical retry) and the change stands.
    """
    server = CommitLostServer(SERIAL, "pw", _envelope, lose=[Operation.PASSWORD])
    session = _session(tmp_path, _server_storage(tmp_path, server))
    done(session.insert("pw"))
    assert done(session.change_password("pw", "new pw")) == server.version == 2
    done(session.counter("runs", -1))
    done(session.remove("test"))
    assert server.state is State.IDLE
    again = _session(tmp_path, _server_storage(tmp_path, server))
    done(again.insert("new pw"))
    assert done(again.counter("runs")) == 2
    release(again)


def test_an_insert_whose_commit_was_lost_does_not_leave_the_card_held_by_its_own_insert(tmp_path):
    """
    Rule (Figure 6; vsc.protocol.lifecycle: an insert retried with the same
    insert secret and MUK is answered "ok"): an insert reported failed left
    nothing held. Broken: a check-out committed but answered INTERNAL (the
    database connection dropped during the COMMIT) made the card say "insert
    refused: the server failed; nothing was changed" and exit, while the
    server had the card in use by this very insert; every later insert was
    refused IN_USE ("in use on another machine") until a recover. Now the
    insert is asked once more with the same insert secret and MUK, which the
    table answers "ok" (identical retry): the card is in use here, as on the
    server.
    """
    server = CommitLostServer(SERIAL, "pw", _envelope, lose=[Operation.INSERT])
    session = _session(tmp_path, _server_storage(tmp_path, server))
    done(session.insert("pw"))
    assert session.life is LifeState.IN_USE and server.state is State.IN_USE
    assert done(session.counter("runs")) == 3
    done(session.remove("test"))
    assert server.state is State.IDLE


# ---------------------------------------------------------------- the control socket's box reader


def _boxes_that_are_not_requests():
    from vsc.wire import ampbox
    from vsc.wire import control as wc

    refused = wc.request(wc.PUBLIC_KEY, 1, {"slot": "9x"})
    del refused[wc.ASK]
    return {
        "empty box": b"\x00\x00",
        "no _command": ampbox.encode_box({wc.ASK: b"7", b"slot": b"9a"}),
        "an _answer to nothing": ampbox.encode_box({wc.ANSWER: b"7"}),
        "an _error to nothing": ampbox.encode_box({wc.ERROR: b"7", wc.ERROR_CODE: b"X", wc.ERROR_DESCRIPTION: b"d"}),
        "unknown command, no _ask": ampbox.encode_box({wc.COMMAND: b"Nope"}),
        "refused command, no _ask": ampbox.encode_box(refused),
    }


@pytest.mark.parametrize("name", list(_boxes_that_are_not_requests()))
def test_a_control_box_that_is_not_a_request_is_one_log_line_not_a_traceback(name):
    """
    Rule (vsc.card.control ``_refuse_connection``; "one line, never a
    traceback"): whatever a local process sends on the owner's control
    socket is answered, or the connection is closed with one log line.
    Broken: a box without ``_command`` (an empty box, an ``_answer`` or
    ``_error`` to a request the daemon never made) went to AMP's dispatch,
    which raised (NoEmptyBoxes, KeyError) out of the daemon's own box reader
    into the reactor: a traceback in the card's log ("Unhandled Error")
    per such box; and a command sent without ``_ask`` that was refused (or
    unknown) logged AMP's "Amp server or network failure unhandled ...
    Dropping connection!" with the traceback. Now each closes the connection
    with one warning line, and nothing is raised into the reactor.
    """
    from twisted.internet.testing import StringTransport
    from twisted.logger import globalLogPublisher

    from tests.test_control import FakeSession
    from vsc.card import control

    events = []
    globalLogPublisher.addObserver(events.append)
    try:
        proto = control.ControlProtocol(FakeSession())
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(_boxes_that_are_not_requests()[name])  # raised into the reactor before
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert not [e for e in events if e.get("log_failure") is not None], "a traceback was logged"
    warned = [e for e in events if e.get("log_namespace", "").startswith("vsc.card.control")
              and e.get("log_level").name == "warn"]
    assert len(warned) == 1 and transport.disconnecting and transport.value() == b""


# ---------------------------------------------------------------- PostgreSQL: a database host that vanishes


def test_a_postgresql_connection_notices_a_vanished_database_host_within_a_minute_or_two(pg_database_url):
    """
    Rule (vsc.server.store ``lock_timeout`` / ``idle_in_transaction``: a
    call must not hold a database thread, and the cards waiting on it, for
    long; docs/admin.md): a PostgreSQL connection whose host vanished
    without a FIN or RST (a power cut, a failover to another address, a
    network partition) fails within about a minute, like a lock wait.
    Broken: the store connected with libpq's defaults: TCP keepalive after
    the kernel's tcp_keepalive_time (7200 s here) plus 9 probes of 75 s,
    no TCP_USER_TIMEOUT: a worker thread waiting for an answer from a host
    that is gone stayed blocked for over two hours (and one whose request
    was never acknowledged for the ~15 minutes of TCP's retransmissions),
    with every card whose call it held. Now the connection asks for
    keepalive probes after 30 s idle, 3 probes 10 s apart, and a 60 s
    TCP_USER_TIMEOUT: the socket itself says so.
    """
    import socket

    from twisted.internet.task import Clock

    from vsc.server.store import Store

    store = Store(pg_database_url, Clock().seconds)
    try:
        conn = store._conn()
        with socket.socket(fileno=os.dup(conn.pgconn.socket)) as s:
            assert s.family == socket.AF_INET  # the session's cluster is on 127.0.0.1: TCP
            assert s.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            idle = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE)
            interval = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL)
            count = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT)
            user_timeout = s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT)
        assert idle + interval * count <= 120, (idle, interval, count)
        assert 0 < user_timeout <= 120_000, user_timeout
    finally:
        store.close()


def test_the_database_url_may_set_its_own_keepalive_options(pg_database_url):
    """What the operator's URL says (``?keepalives_idle=5``) wins over the store's defaults."""
    import socket

    from twisted.internet.task import Clock

    from vsc.server.store import Store

    store = Store(pg_database_url + "?keepalives_idle=5&tcp_user_timeout=7000", Clock().seconds)
    try:
        conn = store._conn()
        with socket.socket(fileno=os.dup(conn.pgconn.socket)) as s:
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 5
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 7000
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 3
    finally:
        store.close()


# ---------------------------------------------------------------- SIGTERM and a remove that fails


def test_sigterm_whose_remove_fails_leaves_with_a_documented_status(rig, tmp_path, capfd):
    """
    Rule (docs/card.md "Exit status of twistd vsc-card": every way the
    daemon leaves has a row; SIGTERM removes the card, status 0). Broken:
    SIGTERM whose remove failed (the server unreachable: the card is wiped
    here and still in use on the server) printed its line but set no
    status: twistd re-raised SIGTERM and the process died of it (143 in a
    shell) — a status the table does not list, and one systemd counts as a
    clean stop, so a unit never showed that the card was left in use on the
    server. Now it leaves with 6, documented: "stopped, but the remove
    failed: recover from this machine".
    """
    from tests.test_review_daemon import _fired, _lock_free

    reactor, storage, make, ports = rig
    daemon = make()
    daemon.startService()
    storage.fail_checkin = CardError("cannot reach the server")
    reactor.stop()  # SIGTERM
    stopped = daemon.stopService()
    reactor.advance(0)
    assert _fired(stopped)
    assert not daemon.session.usable and _lock_free(tmp_path)
    err = capfd.readouterr().err
    assert err.count("remove failed: cannot reach the server") == 1, err
    assert reactor.exit_status() == 6  # None before: no status of its own, the process died of SIGTERM
    from vsc.card.session import EXIT_REMOVE_FAILED

    assert EXIT_REMOVE_FAILED == 6
    from tests.test_review_docs import documented_statuses

    assert "remove failed" in documented_statuses("card.md", "Exit status of `twistd vsc-card`")[6]


# ---------------------------------------------------------------- a second daemon and the first one's sockets


def test_a_second_daemon_never_deletes_the_running_daemons_sockets(tmp_path, monkeypatch):
    """
    Not a defect (a guard for the report's argument): Twisted's unix.Port
    removes its socket file when it stops (and, only with ``wantPID``, a
    stale one when it starts), so a second ``twistd vsc-card`` for the same
    home must never get as far as listening on the running daemon's path.
    Before listening, vsc.card.control.prepare_socket_path connects to
    whatever socket is there: one that answers is refused ("a card daemon
    already serves ..."), left alone; only one nothing listens on (a crashed
    daemon's) is removed. The second daemon then meets the machine lock
    (vsc.card.machine) at insert, before any listen; the first removes its
    sockets before it releases that lock, so no later daemon's socket can be
    the file a stopping daemon unlinks.
    """
    import socket
    from pathlib import Path

    from vsc.card.control import prepare_socket_path
    from vsc.card.paths import runtime_dir
    from vsc.card.session import CardError as SessionCardError

    base = tmp_path / "run"
    base.mkdir(mode=0o700)
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(base))
    path = Path(runtime_dir()) / "card-test.sock"
    prepare_socket_path(path)  # creates the runtime dir, 0700
    live = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    live.bind(str(path))
    live.listen(1)
    try:
        with pytest.raises(SessionCardError, match="a card daemon already serves"):
            prepare_socket_path(path)
        assert path.exists()
    finally:
        live.close()
    assert path.exists()  # closed without unlink: what a crashed daemon leaves
    prepare_socket_path(path)
    assert not path.exists()


# ---------------------------------------------------------------- the TOTP duplicate scan


def test_the_totp_seed_lookup_of_every_totp_authentication_uses_an_index(tmp_path):
    """
    Rule (vsc.server.store ``_totp_fresh``: each TOTP code is accepted once
    across every copy holding the same seed; docs/benchmarks.md measures
    the server with up to 18,000 cards): the look-up of the other copies holding a
    card's TOTP seed runs inside every TOTP insert, recover and destroy,
    under the transaction's write lock. It is ``auth_info LIKE '%seed%'``:
    a scan of every card's row. Measured with 100,000 cards (auth_info of
    ~540 bytes, as a keyfile + TOTP card's): ~150 ms per authentication on
    SQLite (whose BEGIN IMMEDIATE holds the one write lock meanwhile: at
    most ~6 TOTP authentications a second, every other write waiting) and
    ~135 ms on PostgreSQL, growing with the number of cards; an indexed
    equality look-up of the same seed takes 0.1-0.6 ms. Shown here on
    SQLite by the query plan of the statement it runs. Now (schema 3) each
    card's row holds an indexed tag of its seed (``totp_tag``: SHA-256 of
    it, not a second copy), written with auth_info by every write of it and
    filled in by the migration, and the copies are looked up by it
    (tests/test_review_totpidx.py: the tag after every kind of write, the
    index on PostgreSQL, the migration).
    """
    from twisted.internet.task import Clock

    from tests.test_server_ops import record
    from vsc.server.store import Store

    store = Store(f"sqlite:///{tmp_path / 'vsc.sqlite3'}", Clock().seconds)
    try:
        store.migrate()
        seen: list[str] = []
        conn = store._conn()
        conn.set_trace_callback(seen.append)
        card = record(auth_info='{"totp": {"secret": "00112233445566778899aabbccddeeff00112233", "last_step": 5}}')
        with store._txn() as cur:
            assert store._totp_fresh(cur, card, 9)
        conn.set_trace_callback(None)
        scans = [sql for sql in seen if sql.lstrip().upper().startswith("SELECT")
                 and "SCAN cards" in " ".join(str(r[-1]) for r in conn.execute("EXPLAIN QUERY PLAN " + sql))]
        assert scans == [], scans
    finally:
        store.close()
