"""
Review of the card daemon (``twistd -n vsc-card``: vsc.card.daemon) as a
process that runs for weeks and is stopped by SIGTERM in any phase: the
documented end state and exit status (docs/card.md "Exit status of
``twistd vsc-card``"), the machine lock released, nothing left serving.

The daemon is driven with a Clock-based fake reactor (``FakeReactor``): the
control socket's listening port, the runtime-dir check and the machine key
are replaced by stand-ins, the storage is tests.cardfakes.MemoryStorage.
``reactor.stop()`` is what SIGTERM does first; ``daemon.stopService()`` is
what twistd runs next (its Deferred is what the reactor waits for before it
shuts down). An ``os._exit`` trigger "after shutdown" is how the daemon
leaves with its own status (twistd would otherwise re-raise SIGTERM).
"""

from __future__ import annotations

import os

import pytest
from twisted.internet import error
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from vsc.card import control
from vsc.card import daemon as daemon_mod
from vsc.card.config import CardConfig
from vsc.card.machine import MachineLock
from vsc.card.protected import PlainItem, seal_envelope
from vsc.card.session import EXIT_STORAGE, CardError, CardSession, LifeState
from vsc.wire.protected import ItemKind, encode_counter
from tests.cardfakes import MemoryStorage

SERIAL = "daemon-1"
KEY = bytes(range(32))


class FakeReactor(Clock):
    """A Clock with the reactor-core calls CardDaemon makes; ``stop`` behaves like Twisted's (once only)."""

    def __init__(self):
        super().__init__()
        self.running = True
        self._stopped = False
        self.triggers: list[tuple] = []

    def stop(self):
        if self._stopped:
            raise error.ReactorNotRunning("Can't stop reactor that isn't running.")
        self._stopped = True

    def addSystemEventTrigger(self, phase, event, fn, *args):
        self.triggers.append((phase, event, fn, args))

    def callWhenRunning(self, fn, *args):
        fn(*args)

    def exit_status(self):
        """The status the process would leave with: the first exit "after shutdown" trigger; None: none."""
        for phase, event, fn, args in self.triggers:
            if (phase, event) == ("after", "shutdown") and getattr(fn, "__name__", "") in ("_exit", "_exit_process"):
                return args[0]
        return None

    def shut_down(self):
        """Run the "after shutdown" triggers, as the reactor does last."""
        for phase, event, fn, args in list(self.triggers):
            if (phase, event) == ("after", "shutdown"):
                fn(*args)


class FakePort:
    def __init__(self):
        self.listening = True

    def stopListening(self):
        self.listening = False
        return succeed(None)


class HeldStorage(MemoryStorage):
    """MemoryStorage whose ``open`` waits for ``hold`` (an insert under way, e.g. on a slow server)."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.hold: Deferred | None = None

    async def open(self, password, muk):
        if self.hold is not None:
            await self.hold
        return await super().open(password, muk)


def _envelope() -> bytes:
    return seal_envelope(SERIAL, KEY, [PlainItem(ItemKind.COUNTER, "runs", encode_counter(3))], os.urandom)


@pytest.fixture
def rig(tmp_path, monkeypatch):
    """(reactor, storage, make_daemon, ports): a CardDaemon on a fake reactor; ``ports`` are the control ports."""
    reactor = FakeReactor()
    storage = HeldStorage(SERIAL, _envelope(), KEY, os.urandom)
    cfg = CardConfig(home=tmp_path, server="", server_key="", serial=SERIAL, muk_poll=60.0, clock_poll=0)
    ports: list[FakePort] = []
    locks: list[MachineLock] = []

    def session(config, reactor_, storage_, on_exit):
        lock = MachineLock(str(tmp_path / "lock"))
        locks.append(lock)
        return CardSession(config, reactor_, storage_, rand=os.urandom, muk=lambda: b"m" * 32, pid=lambda: 4242,
                           lock=lock, on_exit=on_exit)

    def listen(reactor_, path, factory, mode=0o600):
        port = FakePort()
        ports.append(port)
        return port

    monkeypatch.setattr(daemon_mod, "CardSession", session)
    monkeypatch.setattr(control, "prepare_socket_path", lambda path: None)
    monkeypatch.setattr(control, "listen", listen)

    def make():
        return daemon_mod.CardDaemon(reactor, cfg, "pw", storage)

    yield reactor, storage, make, ports
    for lock in locks:
        lock.release()


def _fired(d: Deferred) -> bool:
    box = []
    d.addBoth(lambda r: box.append(r) or r)
    return bool(box)


def _lock_free(tmp_path) -> bool:
    other = MachineLock(str(tmp_path / "lock"))
    try:
        other.acquire()
    except Exception:  # noqa: BLE001
        return False
    other.release()
    return True


def test_sigterm_while_inserting_removes_the_card_once_inserted(rig, tmp_path):
    """
    docs/card.md: "SIGTERM removes the card, then exits" (status 0: "removed
    normally"). Broken: SIGTERM while the insert was still under way (the
    server's answer not yet in) ran stopService at once — nothing to stop
    yet — and the shutdown did not wait for the insert; when it completed,
    _start went on and served the control socket after the daemon had
    stopped, and nobody ever removed the card: it stayed in use on the
    server (a recover needed), its control socket was left listening. Now
    the stop waits for the insert, serves nothing after it, and removes the
    card: checked in, idle, the machine lock released, exit status 0.
    """
    reactor, storage, make, ports = rig
    storage.hold = Deferred()
    daemon = make()
    daemon.startService()
    assert daemon.session.life is LifeState.INSERTING
    reactor.stop()  # SIGTERM
    stopped = daemon.stopService()
    assert not _fired(stopped), "the shutdown did not wait for the insert under way"
    storage.hold.callback(None)  # the server answers the insert
    assert _fired(stopped)
    assert daemon.session.life is LifeState.IDLE
    assert len(storage.checked_in) == 1
    assert not [p for p in ports if p.listening], "the control socket is served after the daemon stopped"
    assert _lock_free(tmp_path)
    assert reactor.exit_status() == 0


def test_sigterm_while_a_remove_is_under_way_waits_for_it(rig, tmp_path):
    """
    docs/card.md: `vsc card remove` (or SIGTERM) checks the card in and
    releases the lock; the daemon then exits 0 ("removed normally").
    Broken: SIGTERM while a `vsc card remove` was still checking the card in
    found the card not usable and stopped at once: the reactor shut down
    with the check-in in flight, the channel was cut, and the card was left
    in use on the server (or the daemon was killed by the signal's status
    although the remove had been asked for). Now the stop waits for the
    remove under way; the card ends idle and the status is 0.
    """
    reactor, storage, make, ports = rig
    daemon = make()
    daemon.startService()
    assert daemon.session.life is LifeState.IN_USE
    storage.hold_checkin = Deferred()
    proto = control.ControlProtocol(daemon.session, on_remove=lambda: daemon.exit(0, ""))
    removing = proto.remove()  # `vsc card remove`
    assert daemon.session.life is LifeState.REMOVING
    reactor.stop()  # SIGTERM
    stopped = daemon.stopService()
    assert not _fired(stopped), "the shutdown did not wait for the check-in under way"
    storage.hold_checkin.callback(None)
    assert _fired(removing)
    reactor.advance(0)
    assert _fired(stopped)
    assert daemon.session.life is LifeState.IDLE
    assert len(storage.checked_in) == 1
    assert _lock_free(tmp_path)
    assert reactor.exit_status() == 0


def test_sigterm_with_the_token_gone_exits_5_with_the_true_line(rig, tmp_path, capfd):
    """
    docs/card.md exit-status table: 5 = "dongle mode: the token check failed
    or the token is gone: the card was removed" (CardSession.remove: a
    storage whose ``checkin_failed`` gives a line wipes the card and exits
    5). Broken: on SIGTERM the daemon's stop caught that refusal and printed
    "remove failed: ...; recover from this machine later" — false, the card
    was wiped and is idle, there is nothing to recover — and the exit 5
    the session scheduled (a callLater) went to ``reactor.stop()`` a second
    time, which raises ReactorNotRunning: no status 5, the process left
    with SIGTERM's. Now the line says what happened and the status is 5.
    """
    reactor, storage, make, ports = rig
    daemon = make()
    daemon.startService()
    storage.fail_checkin = CardError("the token is gone")
    storage.remove_anyway = "the token is gone; every change was already on it: the card was removed"
    reactor.stop()  # SIGTERM
    stopped = daemon.stopService()
    reactor.advance(0)  # the session's exit, scheduled after its refusal was answered
    assert _fired(stopped)
    assert daemon.session.life is LifeState.IDLE
    err = capfd.readouterr().err
    assert "recover" not in err, err
    assert err.count("the card was removed") == 1, err
    assert reactor.exit_status() == EXIT_STORAGE
    assert _lock_free(tmp_path)


def test_a_control_client_that_hangs_up_before_its_data_get_is_answered_costs_no_traceback(tmp_path):
    """
    The control socket's module docstring: a DataGet answer is built in a
    locked buffer and sent from it; docs/card.md: a failure is one line, no
    traceback. A client that goes away is an ordinary event (Ctrl-C on
    `vsc card data get` while a sync holds the card). Broken: when the
    answer was ready after the client had hung up, it was written to the
    gone connection's transport (None): an AttributeError, logged with its
    traceback as "control command failed" — one per vanished client in a
    log that runs for weeks. Now the answer's locked buffer is freed and
    nothing is logged as a failure.
    """
    from twisted.internet.testing import StringTransport
    from twisted.logger import globalLogPublisher

    from tests.cardfakes import in_use_session, release
    from vsc.wire import ampbox
    from vsc.wire import control as wc

    envelope = seal_envelope(SERIAL, KEY, [PlainItem(ItemKind.DATA, "note", b"secret")], os.urandom)
    session = in_use_session(CardConfig(home=tmp_path, server="", server_key="", serial=SERIAL, muk_poll=0,
                                        clock_poll=0), MemoryStorage(SERIAL, envelope, KEY, os.urandom), os.urandom)
    failures = []

    def observe(event):
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        held = session._oplock.acquire()  # a sync (or another client's command) holds the card
        assert _fired(held)
        proto = control.ControlProtocol(session)
        transport = StringTransport()
        proto.makeConnection(transport)
        proto.dataReceived(ampbox.encode_box(wc.request(wc.DATA_GET, 7, {"name": "note"})))
        proto.connectionLost(Failure(error.ConnectionDone()))  # the client hangs up before its answer
        session._oplock.release()
        assert transport.value() == b""
        assert failures == [], failures[0].get("log_failure")
    finally:
        globalLogPublisher.removeObserver(observe)
        release(session)


def test_a_reconnected_channel_the_server_refuses_to_attach_is_closed(tmp_path):
    """
    ServerStorage: "A dropped channel is reconnected with the per-insert
    secret"; a refused ATTACH is the one-line CardError "the server no
    longer knows this insert" and the card stays in use (its changes are
    refused). Broken: the fresh channel whose ATTACH was refused was dropped
    without being closed: every refused change (a counter step, each PIN
    try over PC/SC) left one more open connection and handshake behind,
    until the server's idle timer ended it. Now it is closed at once; after
    many refused changes none of them is left open.
    """
    from tests.cardfakes import FakeServer, done, release
    from vsc.card.storage import ServerStorage

    def envelope_for(key):
        return seal_envelope(SERIAL, key, [PlainItem(ItemKind.COUNTER, "runs", encode_counter(50))], os.urandom)

    server = FakeServer(SERIAL, "pw", envelope_for)
    opened = []

    async def connect(*a, **kw):
        proto = await server.connect(*a, **kw)
        opened.append(proto)
        return proto

    cfg = CardConfig(home=tmp_path, server="tcp:127.0.0.1:9", server_key="SHA256:x", serial=SERIAL, muk_poll=0,
                     clock_poll=0, reconnect_attempts=1)
    storage = ServerStorage(cfg, Clock(), b"M" * 32, rand=os.urandom, worker=lambda fn, *a, **kw: succeed(fn(*a, **kw)),
                            connect=connect)
    session = CardSession(cfg, Clock(), storage, rand=os.urandom, muk=lambda: b"m" * 32, pid=lambda: 1,
                          lock=MachineLock(str(tmp_path / "lock")))
    try:
        done(session.insert("pw"))
        opened[0].channel.closed = True  # the live channel dropped
        server.secret = b"another insert"  # the server no longer knows this one (recovered elsewhere)
        for _ in range(20):
            with pytest.raises(CardError, match="no longer knows this insert"):
                done(session.counter("runs", -1))
        assert session.usable
        assert len(opened) == 21
        assert [p for p in opened if not p.channel.closed] == [], "refused channels left open"
    finally:
        release(session)


@pytest.mark.parametrize("how", ["sigterm", "exit-1"])
def test_the_pid_file_is_removed_when_the_daemon_leaves_with_its_own_status(rig, tmp_path, monkeypatch, how):
    """
    docs/card.md troubleshooting: "Another twistd server is running, PID N"
    means a card daemon for this home runs already (its pid file is
    HOME/twistd.pid). Broken: the daemon leaves with its own status through
    ``os._exit`` after the reactor shut down (SIGTERM's remove: 0; an
    insert refused: 1; 3, 4, 5), and twistd removes its pid file only after
    the reactor returns — never, then: every stop left HOME/twistd.pid
    naming a dead pid. Once that number was reused by any process of the
    owner (weeks later, a reboot), the next `twistd vsc-card` refused to
    start with "Another twistd server is running", or "Can't check status
    of PID" for another user's process. Now the daemon removes its own pid
    file (only if it names this process) before it leaves.
    """
    reactor, storage, make, ports = rig
    pidfile = tmp_path / "twistd.pid"
    pidfile.write_text(str(os.getpid()))
    left = []
    monkeypatch.setattr(os, "_exit", left.append)
    daemon = make()
    daemon.pidfile = str(pidfile)
    if how == "exit-1":
        daemon.startService()
        daemon.exit(1, "insert refused: test")
    else:
        daemon.startService()
        reactor.stop()
        daemon.stopService()
    reactor.shut_down()
    assert left == [1 if how == "exit-1" else 0]
    assert not pidfile.exists()


def test_a_pid_file_of_another_process_is_left_alone(rig, tmp_path, monkeypatch):
    """The pid file is removed only if it names this process (another daemon may have written it since)."""
    reactor, storage, make, ports = rig
    pidfile = tmp_path / "twistd.pid"
    pidfile.write_text("1")
    monkeypatch.setattr(os, "_exit", lambda code: None)
    daemon = make()
    daemon.pidfile = str(pidfile)
    daemon.startService()
    daemon.exit(1, "insert refused: test")
    reactor.shut_down()
    assert pidfile.read_text() == "1"


def test_the_daemon_is_told_twistds_pid_file(tmp_path, monkeypatch):
    """card_tap hands the daemon the pid file twistd writes (HOME/twistd.pid by default, --pidfile, none)."""
    from twisted.scripts._twistd_unix import ServerOptions

    from vsc.daemon.card_tap import pidfile_of

    def parsed(argv):
        monkeypatch.setattr("sys.argv", ["twistd", *argv])
        config = ServerOptions()
        config.parseOptions(argv)
        return config.subOptions

    home = tmp_path / "home"
    assert pidfile_of(parsed(["-n", "vsc-card", "--home", str(home)])) == str(home / "twistd.pid")
    monkeypatch.chdir(tmp_path)
    assert pidfile_of(parsed(["-n", "--pidfile", "p.pid", "vsc-card", "--home", str(home)])) == str(tmp_path / "p.pid")
    assert pidfile_of(parsed(["-n", "--pidfile=", "vsc-card", "--home", str(home)])) is None


def test_sigterm_during_the_clock_checks_remove_keeps_its_status_4(rig, tmp_path):
    """
    docs/card.md exit-status table: 4 = "clock check failed: the card was
    removed". SIGTERM while that remove is checking the card in waits for it
    (as for `vsc card remove`), and the status stays the clock check's 4,
    not the 0 of a SIGTERM remove.
    """
    reactor, storage, make, ports = rig
    daemon = make()
    daemon.startService()
    storage.hold_checkin = Deferred()
    reactor.advance(10_000)  # the time of day jumped
    daemon.session.poll_clock()
    assert daemon.session.life is LifeState.REMOVING
    stopped = daemon.stopService()  # SIGTERM (reactor.stop() came from nobody yet)
    storage.hold_checkin.callback(None)
    reactor.advance(0)
    assert _fired(stopped)
    assert daemon.session.life is LifeState.IDLE
    assert reactor.exit_status() == 4
