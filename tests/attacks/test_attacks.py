"""
The attack suite: what an attacker on the network, with a stolen database,
or with a rogue card can and cannot do. Real server processes on 127.0.0.1;
the attacker's side runs in the test process.
"""

from __future__ import annotations

import os
import subprocess

import pytest
import pytest_twisted
from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint

from tests.servers import admin, init_data_dir, open_store, servers  # noqa: F401  (fixture)
from vsc import crypto
from vsc.card import ops
from vsc.card.connect import connect
from vsc.card.protected import PlainItem, seal_envelope
from vsc.net.channel import ChannelClosedError
from vsc.protocol.auth import DEFAULT_MASTER_KEY
from vsc.wire import ErrorCode
from vsc.wire.protected import ItemKind, KeyAlg


def _code(data_dir, serial: str) -> str:
    return admin(data_dir, "issue", serial)["code"]


async def _enrol(endpoint, fp, serial, code, password, items, legacy=False, log2_n=12):
    kdf = ops.new_kdf(os.urandom, legacy=legacy, log2_n=log2_n)
    keys = ops.derive_keys(password, kdf)
    envelope = seal_envelope(serial, keys.protection_key, items, os.urandom)
    proto = await connect(reactor, endpoint, fp)
    await ops.enrol(proto, serial, code, keys, kdf, envelope)
    proto.closeChannel()
    return keys


# ---------------------------------------------------------------- a recording / tampering relay


class _Relay(protocol.Protocol):
    """One side of a man-in-the-middle relay; ``tamper`` may rewrite bytes per direction."""

    def __init__(self, box, direction):
        self.box, self.direction, self.peer = box, direction, None
        self.pending = []

    def dataReceived(self, data):
        self.box["log"].append((self.direction, data))
        data = self.box["tamper"](self.direction, data)
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.write(data)
        else:
            self.pending.append(data)

    def connectionLost(self, reason=None):
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.loseConnection()


class _RelayFactory(protocol.Factory):
    def __init__(self, target_port, tamper=lambda d, b: b):
        self.target_port = target_port
        self.box = {"log": [], "tamper": tamper}

    def buildProtocol(self, addr):
        inbound = _Relay(self.box, "c2s")
        outbound = _Relay(self.box, "s2c")
        inbound.peer, outbound.peer = outbound, inbound

        def connected(p):
            for data in inbound.pending:
                p.transport.write(data)
            inbound.pending.clear()

        TCP4ClientEndpoint(reactor, "127.0.0.1", self.target_port).connect(
            protocol.Factory.forProtocol(lambda: outbound)).addCallback(connected)
        return inbound


async def _relay(target_port, tamper=lambda d, b: b):
    factory = _RelayFactory(target_port, tamper)
    port = await TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
    return port, factory.box


@pytest.fixture
def world(tmp_path, servers):  # noqa: F811
    data = tmp_path / "srv"
    info = init_data_dir(data)
    server = servers.start(data)
    return data, info["fingerprint"], server


@pytest_twisted.ensureDeferred
async def test_replay_of_a_captured_insert_is_refused(world):
    """Replaying every frame a card sent during a real insert, each in its turn, fails the handshake (fresh r1: HANDSHAKE_FAILED): nothing is checked out."""
    data, fp, server = world
    await _enrol(server.endpoint, fp, "victim", _code(data, "victim"), "pw", [])
    port, box = await _relay(server.port)
    via = f"tcp:127.0.0.1:{port.getHost().port}"
    proto = await connect(reactor, via, fp)
    muk, secret = os.urandom(32), os.urandom(32)
    await ops.insert(proto, "victim", "pw", muk, secret, DEFAULT_MASTER_KEY)
    r = await ops.remove(proto, "victim", secret, 1, b"after")
    assert r.version == 2
    proto.closeChannel()
    await port.stopListening()
    captured = b"".join(d for direction, d in box["log"] if direction == "c2s")
    assert len(captured) > 500

    # the attacker replays the captured card frames on a new connection, each when the card sent it (after the
    # server's previous frame), so the server judges the replayed handshake itself, not its pacing
    from vsc.wire import Deframer, decode_frame
    from vsc.wire.messages import Alert

    card_frames = list(Deframer().feed(captured))
    done = defer.Deferred()
    got = []

    class Replayer(protocol.Protocol):
        def connectionMade(self):
            self.deframer, self.queue = Deframer(), list(card_frames)

        def dataReceived(self, d):
            got.append(d)
            for frame in self.deframer.feed(d):
                if self.queue and not isinstance(decode_frame(frame), Alert):
                    self.transport.write(self.queue.pop(0))

        def connectionLost(self, reason=None):
            done.callback(None)

    await TCP4ClientEndpoint(reactor, "127.0.0.1", server.port).connect(protocol.Factory.forProtocol(Replayer))
    await done
    frames = [decode_frame(f) for f in Deframer().feed(b"".join(got))]
    assert isinstance(frames[-1], Alert) and frames[-1].code is ErrorCode.HANDSHAKE_FAILED
    store = open_store(data)
    card = store.get("victim")
    assert card.state.value == "idle" and card.version == 2
    assert [h.op for h in store.history("victim") if h.result == "ok"].count("insert") == 1
    store.close()


@pytest_twisted.ensureDeferred
async def test_man_in_the_middle_with_another_server_key_learns_nothing(world, tmp_path, servers):  # noqa: F811
    """A server with another key at the pinned address is refused before the card sends any secret."""
    data, fp, server = world
    rogue_dir = tmp_path / "rogue"
    init_data_dir(rogue_dir)
    rogue = servers.start(rogue_dir)
    port, box = await _relay(rogue.port)
    with pytest.raises(ChannelClosedError) as e:
        await connect(reactor, f"tcp:127.0.0.1:{port.getHost().port}", fp)
    assert e.value.code is ErrorCode.SERVER_KEY_MISMATCH
    await port.stopListening()
    sent = [d for direction, d in box["log"] if direction == "c2s"]
    # only the plaintext alert left the card: no KeyTransport, so no s1/s2 and no password proof
    from vsc.wire import Deframer, decode_frame
    from vsc.wire.messages import Alert

    frames = [decode_frame(f) for f in Deframer().feed(b"".join(sent))]
    assert all(isinstance(f, Alert) for f in frames)


@pytest_twisted.ensureDeferred
async def test_relay_that_flips_a_bit_is_detected(world):
    """A relay that changes one bit of a sealed server record makes the card close with BAD_RECORD."""
    data, fp, server = world
    state = {"records": 0}

    def tamper(direction, data):
        if direction == "s2c" and data[3:4] == b"\x10":  # a RECORD frame from the server
            state["records"] += 1
            return data[:-1] + bytes([data[-1] ^ 0x01])
        return data

    port, _ = await _relay(server.port, tamper)
    proto = await connect(reactor, f"tcp:127.0.0.1:{port.getHost().port}", fp)
    from vsc.wire.messages import EchoRequest

    with pytest.raises(ChannelClosedError) as e:
        await proto.request(EchoRequest(b"x" * 40))
    assert e.value.code is ErrorCode.BAD_RECORD and state["records"] >= 1
    await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_rogue_card_with_the_wrong_master_key_is_refused_like_a_wrong_password(world):
    """A card build without the embedded Master key gets the same REFUSED as a wrong password."""
    data, fp, server = world
    await _enrol(server.endpoint, fp, "m1", _code(data, "m1"), "pw", [])
    proto = await connect(reactor, server.endpoint, fp)
    with pytest.raises(ops.OperationRefused) as rogue:
        await ops.insert(proto, "m1", "pw", os.urandom(32), os.urandom(32), os.urandom(32))
    with pytest.raises(ops.OperationRefused) as wrongpw:
        await ops.insert(proto, "m1", "nope", os.urandom(32), os.urandom(32), DEFAULT_MASTER_KEY)
    assert rogue.value.status is wrongpw.value.status is ops.Status.REFUSED
    proto.closeChannel()


@pytest_twisted.ensureDeferred
async def test_online_guessing_is_throttled_but_cannot_lock_the_owner_out(world, tmp_path):
    """
    Online guessing from one address: after the default threshold (5) of
    wrong passwords on a serial, that address's next answer — even the right
    password — is refused without being evaluated (no history row, the
    failure count stays 5: hammering neither counts nor extends anything);
    the owner's last machine (the MUK of the card's last insert) still
    inserts with the right password, from the very same address, at once.
    """
    data, fp, server = world
    keys = await _enrol(server.endpoint, fp, "g1", _code(data, "g1"), "right", [])
    owner_muk = os.urandom(32)
    proto = await connect(reactor, server.endpoint, fp)
    secret = os.urandom(32)
    r, _ = await ops.insert(proto, "g1", "right", owner_muk, secret, DEFAULT_MASTER_KEY, keys=keys)
    assert r.status is ops.Status.OK
    assert (await ops.remove(proto, "g1", secret, r.version, r.protected)).status is ops.Status.OK
    for i in range(5):  # the default threshold
        with pytest.raises(ops.OperationRefused) as e:
            await ops.insert(proto, "g1", f"guess-{i}", os.urandom(32), os.urandom(32), DEFAULT_MASTER_KEY)
        assert e.value.status is ops.Status.REFUSED
    rows = len(admin(data, "history", "g1")["history"])
    with pytest.raises(ops.OperationRefused) as e:
        await ops.insert(proto, "g1", "right", os.urandom(32), os.urandom(32), DEFAULT_MASTER_KEY)
    assert e.value.status is ops.Status.REFUSED
    assert len(admin(data, "history", "g1")["history"]) == rows  # refused unevaluated: nothing written
    shown = admin(data, "show", "g1")
    assert (shown["failures"], shown["machine_failures"], shown["state"]) == (5, 0, "idle")
    r, _ = await ops.insert(proto, "g1", "right", owner_muk, os.urandom(32), DEFAULT_MASTER_KEY, keys=keys)
    assert r.status is ops.Status.OK
    proto.closeChannel()


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
@pytest_twisted.ensureDeferred
async def test_stolen_database_dump_holds_no_plaintext(backend, tmp_path, servers, request):  # noqa: F811
    """
    A full dump of the server's database (SQLite file + WAL, or pg_dump) holds
    none of: the private key DER, a data object's plaintext, the password, or
    either password key; it does hold the verifier (a positive control that
    the search works). (The offline cost of one password guess for each key
    derivation is a figure: ``python -m bench.kdf``.)
    """
    if backend == "postgresql":
        url = request.getfixturevalue("pg_database_url")
        data = tmp_path / "srv"
        init_data_dir(data, database=url)
    else:
        data = tmp_path / "srv"
        url = None
        init_data_dir(data)
    fp = admin(data, "fingerprint")["fingerprint"]
    server = servers.start(data)
    der = crypto.generate_private_der("rsa2048")
    secret = os.urandom(48)
    password = "correct horse battery staple " + os.urandom(4).hex()
    items = [PlainItem(ItemKind.KEY, "9a", der, KeyAlg.RSA2048, crypto.public_der_of(der)),
             PlainItem(ItemKind.DATA, "note", secret)]
    modern = await _enrol(server.endpoint, fp, "s1", _code(data, "s1"), password, items, log2_n=15)
    legacy = await _enrol(server.endpoint, fp, "s2", _code(data, "s2"), password, items, legacy=True)

    if backend == "sqlite":
        dump = b"".join(p.read_bytes() for p in data.glob("vsc.sqlite3*"))
    else:
        pg_dump = next(iter(sorted(__import__("glob").glob("/usr/lib/postgresql/*/bin/pg_dump"))), "pg_dump")
        dump = subprocess.run([pg_dump, "--data-only", url], capture_output=True, check=True, timeout=60).stdout
        dump += subprocess.run([pg_dump, "--format=custom", url], capture_output=True, check=True, timeout=60).stdout
    assert len(dump) > 4096
    needles = {"private key DER": der, "data object": secret, "password": password.encode(),
               "modern auth key": modern.auth_key, "modern protection key": modern.protection_key,
               "legacy auth key": legacy.auth_key, "legacy protection key": legacy.protection_key}
    if backend == "postgresql":  # pg_dump writes bytea as hex text
        needles.update({k + " (hex)": v.hex().encode() for k, v in list(needles.items())})
    found = [name for name, n in needles.items() if n in dump]
    assert found == []
    verifier = crypto.sha256(modern.auth_key)
    assert verifier in dump or verifier.hex().encode() in dump  # the search does find what is there

