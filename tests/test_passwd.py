"""
Password change while the card is in use (Op.PASSWORD, the ChangePassword
message): the daemon checks the old password by unwrapping the data key,
derives new keys with the card's own salt, re-wraps only the data key, re-seals the
keyfile, and the server stores the new verifier, KDF parameters and
protected information atomically (version + 1, history "password"). The
server never sees either password.

Part 1: the sans-IO server machine and the store. Part 2: end to end with a
real ``twistd -n vsc-server`` (keyfile authentication on, so the keyfile
re-seal is exercised) and a real ``twistd -n vsc-card``, driven by
``vsc card passwd``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import attrs
import pytest

from tests.integration import wait_for
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding

from tests.servers import TWISTD, VSC, Servers, _env, admin, init_data_dir, open_store
from vsc import crypto
from vsc.card import config as cc
from vsc.card import ops as card_ops
from vsc.card.protected import CardMemory, PlainItem, rewrap, seal_envelope
from vsc.protocol import auth
from vsc.protocol.cardstore import ChangeCardPassword, CheckOut, EnrolCard, LogRefusal, Outcome
from vsc.protocol.lifecycle import Operation
from vsc.protocol.server_ops import Authenticated, OpsPolicy, Reply, ServerOps
from vsc.server.store import CardState, Store
from vsc.wire import ErrorCode, WireError, decode_inner, encode_inner
from vsc.wire.ops import ChangePassword, KdfAlg, KdfParams, Op, OpRequest, OpResult, Status
from vsc.wire.protected import ItemKind

SERIAL = "card-1"
PEER = "192.0.2.7:40000"
NOW = 1_000_000.0
SECRET = b"S" * 32
OLD_KDF = KdfParams(alg=KdfAlg.SCRYPT, salt=b"o" * 16, log2_n=10)
NEW_KDF = KdfParams(alg=KdfAlg.SCRYPT, salt=b"n" * 16, log2_n=10)


def machine() -> ServerOps:
    return ServerOps(policy=OpsPolicy(), master=b"M" * 32, decoy_secret=b"D" * 32, peer=PEER, suite="aes256-gcm",
                     now=lambda: NOW)


def change(**kw) -> ChangePassword:
    fields = dict(serial=SERIAL, insert_secret=SECRET, version=4, verifier=b"V" * 32, kdf=NEW_KDF.encode(),
                  protected=b"NEW-WRAP")
    fields.update(kw)
    return ChangePassword(**fields)


# ================================================================ Part 1: wire, machine, store


def test_change_password_message_round_trips_and_needs_a_secret():
    """ChangePassword (type 0x35) is an inner message; the insert secret is exactly 32 bytes."""
    msg = change()
    assert decode_inner(encode_inner(msg)) == msg
    assert encode_inner(msg)[0] == 0x35
    with pytest.raises(WireError, match="insert_secret") as e:
        encode_inner(change(insert_secret=b""))
    assert e.value.code is ErrorCode.MALFORMED


@pytest.mark.parametrize("outcome, reply", [(Outcome(Status.OK, version=5), OpResult(status=Status.OK, version=5)),
                                            (Outcome(Status.VERSION_CONFLICT, version=9),
                                             OpResult(status=Status.VERSION_CONFLICT, version=9)),
                                            (Outcome(Status.REFUSED), OpResult(status=Status.REFUSED, version=0))])
def test_machine_hands_the_change_to_the_store(outcome, reply):
    """Like sync: nothing taken first, ONE ChangeCardPassword with the hashed insert secret, the version and the new verifier/KDF/upload; its outcome is the answer."""
    m = machine()
    assert m.message(change()) == [ChangeCardPassword(
        serial=SERIAL, session=crypto.sha256(SECRET), version=4, verifier=b"V" * 32, kdf=NEW_KDF.encode(),
        protected=b"NEW-WRAP", peer=PEER)]
    authenticated = [Authenticated(SERIAL)] if reply.status is Status.OK else []
    assert m.stored(outcome) == authenticated + [Reply(reply)]


@pytest.mark.parametrize("msg, detail", [
    (change(verifier=b"V" * 16), "verifier is 32 bytes"),
    (change(kdf=b"\x09junk"), "new KDF parameters"),
    (OpRequest(op=Op.PASSWORD, serial=SERIAL, insert_secret=SECRET), "ChangePassword message"),
], ids=["verifier-size", "bad-kdf", "op-request"])
def test_machine_refuses_nonsense_as_bad_request(msg, detail):
    """A verifier that does not fit the KDF, undecodable KDF parameters, or Op.PASSWORD in an OpRequest: BAD_REQUEST, logged, nothing stored."""
    m = machine()
    [call] = m.message(msg)
    assert isinstance(call, LogRefusal) and call.op is Operation.PASSWORD and call.result == "bad-request"
    assert detail in call.detail
    assert m.stored(None) == [Reply(OpResult(status=Status.BAD_REQUEST))]


def changed(store: Store, session: bytes, version: int) -> tuple[Status, int]:
    """The store's answer to a change to b"N"*32 / NEW_KDF / b"NEW" presenting ``session`` and based on ``version``."""
    o = store.change_password(ChangeCardPassword(SERIAL, session, version, b"N" * 32, NEW_KDF.encode(), b"NEW", PEER))
    return o.status, o.version


@pytest.fixture
def store(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'vsc.sqlite3'}", lambda: NOW)
    s.migrate()
    s.issue(SERIAL, auth.code_hash("CODE"), '{"methods": ["password", "master-key"]}', 3600)
    assert s.enrol(EnrolCard(SERIAL, auth.code_hash("CODE"), b"O" * 32, OLD_KDF.encode(), b"OLD", b"", {},
                             PEER)).status is Status.OK
    yield s
    s.close()


def test_store_replaces_verifier_kdf_and_protected_atomically(store):
    """Only the current insert (session), based on the stored version: verifier, KDF and protected change together, version + 1, history "password"."""
    session = crypto.sha256(SECRET)
    assert changed(store, session, 1) == (Status.REFUSED, 0)
    assert store.check_out(CheckOut(SERIAL, b"M" * 32, session, {}, PEER, b"O" * 32)).status is Status.OK
    assert changed(store, b"x" * 32, 1) == (Status.REFUSED, 0)
    assert changed(store, session, 0) == (Status.VERSION_CONFLICT, 1)
    card = store.get(SERIAL)
    assert (card.verifier, card.kdf, card.protected, card.version) == (b"O" * 32, OLD_KDF.encode(), b"OLD", 1)
    assert changed(store, session, 1) == (Status.OK, 2)
    card = store.get(SERIAL)
    assert (card.verifier, card.kdf, card.protected, card.version, card.state) == (
        b"N" * 32, NEW_KDF.encode(), b"NEW", 2, CardState.IN_USE)
    # the identical change retried after a lost reply is answered ok, once
    assert changed(store, session, 1) == (Status.OK, 2)
    assert store.get(SERIAL).version == 2
    assert [(h.op, h.result) for h in store.history(SERIAL)][-2:] == [("password", "ok"), ("password", "repeat")]


def test_a_refused_password_change_is_logged_as_password(store):
    """A change is never BUSY (nothing is held before its one transaction): one presenting another insert's secret is REFUSED, changes nothing, and is in the history under op "password"."""
    session = crypto.sha256(SECRET)
    assert store.check_out(CheckOut(SERIAL, b"M" * 32, session, {}, PEER, b"O" * 32)).status is Status.OK
    assert changed(store, crypto.sha256(b"another insert"), 1) == (Status.REFUSED, 0)
    assert store.get(SERIAL).verifier == b"O" * 32
    last = store.history(SERIAL)[-1]
    assert (last.op, last.result, last.detail) == ("password", "refused", "not this card's current insert")


def test_rewrap_changes_only_the_data_key_wrap():
    """The card side: the re-wrapped envelope opens with the new protection key only, with identical items; a wrong old key is a CryptoError."""
    old_pk, new_pk = crypto.sha256(b"old"), crypto.sha256(b"new")
    env = seal_envelope(SERIAL, old_pk, [PlainItem(ItemKind.DATA, "d", b"secret data")], crypto.system_random)
    with pytest.raises(crypto.CryptoError):
        rewrap(SERIAL, env, crypto.sha256(b"wrong"), new_pk, crypto.system_random)
    new_env = rewrap(SERIAL, env, old_pk, new_pk, crypto.system_random)
    with pytest.raises(crypto.CryptoError):
        CardMemory.load(SERIAL, new_env, old_pk)
    mem = CardMemory.load(SERIAL, new_env, new_pk)
    with mem.open(ItemKind.DATA, "d") as v:
        assert bytes(v) == b"secret data"
    # adopt_wrap: an export after the change carries the new wrap
    mem_old = CardMemory.load(SERIAL, env, old_pk)
    mem_old.adopt_wrap(rewrap(SERIAL, mem_old.export(), old_pk, new_pk, crypto.system_random))
    CardMemory.load(SERIAL, mem_old.export(), new_pk).wipe()
    mem.wipe()
    mem_old.wipe()


# ================================================================ Part 2: end to end

TIMEOUT = 60.0
OLD, NEW = "the old password", "a brand new password"




@attrs.define
class World:
    root: Path
    env: dict
    home: Path
    data: Path
    card: subprocess.Popen | None = None

    def vsc(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        proc = subprocess.run([str(VSC), *args], env=self.env, stdin=subprocess.DEVNULL, capture_output=True,
                              text=True, timeout=TIMEOUT, cwd=self.root)
        if check and proc.returncode != 0:
            raise AssertionError(f"vsc {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def card_cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.vsc("card", "--home", str(self.home), *args, check=check)

    def pw(self, text: str) -> str:
        path = self.root / f"pw-{abs(hash(text))}"
        path.write_text(text + "\n")
        return str(path)

    def insert(self, password: str) -> tuple[int | None, str]:
        log_path = self.root / f"card-{time.monotonic_ns()}.log"
        with open(log_path, "wb") as log:
            self.card = subprocess.Popen(
                [str(TWISTD), "-n", "--pidfile=", "vsc-card", "--home", str(self.home), "--password-file",
                 self.pw(password)],
                cwd=self.root, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def settled():
            text = log_path.read_text(errors="replace")
            if "inserted; control socket" in text:
                return (None, text)
            if self.card.poll() is not None:
                return (self.card.returncode, text)
            return None

        return wait_for(settled, TIMEOUT, "the card daemon to insert or exit")

    def remove(self) -> None:
        self.card_cmd("remove")
        assert self.card.wait(30) == 0

    def record(self):
        store = open_store(self.data)
        try:
            return store.get("erin"), store.history("erin")
        finally:
            store.close()


@pytest.fixture
def world(tmp_path):
    """A real server (Master key + keyfile authentication) and card "erin" enrolled with the old password."""
    runtime = Path(tempfile.mkdtemp(prefix="vscpw-", dir="/tmp"))
    env = dict(_env(), VSC_LOCK_DIR=str(tmp_path / "lock"), XDG_RUNTIME_DIR=str(runtime))
    servers = Servers(tmp_path / "logs")
    w = None
    try:
        data = tmp_path / "srv"
        info = init_data_dir(data, settings={"impl_auth": "master-key,keyfile", "lockout_threshold": 50})
        server = servers.start(data, "server")
        code = admin(data, "issue", "erin")["code"]
        w = World(root=tmp_path, env=env, home=tmp_path / "home", data=data)
        w.card_cmd("enroll", "--server", server.endpoint, "--server-key", info["fingerprint"], "--serial", "erin",
                   "--code", code, "--password-file", w.pw(OLD), "--scrypt-log2n", "12",
                   "--pin-policy", "9c=once")  # signs with 9C locally without a PIN (policies: tests/test_pin_*.py)
        yield w
    finally:
        if w is not None and w.card is not None and w.card.poll() is None:
            w.card.kill()
            w.card.wait(10)
        servers.close()
        shutil.rmtree(runtime, ignore_errors=True)


def _public_keys(w: World) -> dict:
    return {slot: w.card_cmd("public-key", "--slot", slot).stdout for slot in ("9a", "9c", "9d", "9e")}


def _verify(pem: str, data: bytes, signature: bytes) -> None:
    key = serialization.load_pem_public_key(pem.encode())
    if hasattr(key, "curve"):
        key.verify(signature, data, ec.ECDSA(hashes.SHA256()))
    else:
        key.verify(signature, data, padding.PKCS1v15(), hashes.SHA256())


def _sign(w: World, slot: str, data: bytes) -> bytes:
    src, out = w.root / f"in-{slot}", w.root / f"sig-{slot}"
    src.write_bytes(data)
    w.card_cmd("sign", "--slot", slot, "--in", str(src), "--out", str(out))
    return out.read_bytes()


@pytest.mark.integration
def test_password_change_end_to_end(world):
    """`vsc card passwd` while in use: a wrong current password is refused locally; the change is stored (version + 1, the card's pinned salt kept, new verifier, history "password") and the keyfile re-sealed; after remove the old password is REFUSED and the new one inserts (finishing an interrupted keyfile rename); the keys are the same and still sign."""
    rc, log = world.insert(OLD)
    assert rc is None, log
    keys_before = _public_keys(world)
    _verify(keys_before["9a"], b"before", _sign(world, "9a", b"before"))
    world.card_cmd("counter", "uses", "--add", "3")
    before, _ = world.record()
    keyfile_before = (world.home / "keyfile.vsc").read_bytes()

    wrong = world.card_cmd("passwd", "--password-file", world.pw("not the password"), "--new-password-file",
                           world.pw(NEW), check=False)
    assert wrong.returncode == 1 and "the current password is wrong" in wrong.stderr, wrong.stderr
    assert world.record()[0].verifier == before.verifier

    out = json.loads(world.card_cmd("passwd", "--password-file", world.pw(OLD), "--new-password-file",
                                    world.pw(NEW), "--json").stdout)
    after, history = world.record()
    assert out == {"changed": True, "version": before.version + 1} and after.version == before.version + 1
    assert after.verifier != before.verifier and after.kdf == before.kdf  # the salt is pinned on every machine
    old_kdf, new_kdf = KdfParams.decode(before.kdf), KdfParams.decode(after.kdf)
    assert bytes.fromhex(cc.load(world.home).settings["kdf_salt"]) == new_kdf.salt
    assert after.verifier == auth.verifier_for(card_ops.derive_keys(NEW, new_kdf).auth_key, new_kdf.alg)
    assert (history[-1].op, history[-1].result) == ("password", "ok")
    # the keyfile was re-sealed for the new password (the insert below needs it: keyfile authentication is on)
    assert not (world.home / "keyfile.vsc.new").exists()
    assert (world.home / "keyfile.vsc").read_bytes() != keyfile_before

    # still in use: a modification after the change is synced on top of it
    world.card_cmd("counter", "uses", "--add", "1")
    world.remove()

    # a crash between the server storing the change and the keyfile rename: the old keyfile is still in
    # place and the re-sealed one pending; the next insert uses the one the accepted password opens
    resealed = (world.home / "keyfile.vsc").read_bytes()
    (world.home / "keyfile.vsc").write_bytes(keyfile_before)
    (world.home / "keyfile.vsc.new").write_bytes(resealed)

    rc, log = world.insert(OLD)
    assert rc == 1 and "insert refused: refused" in log, log
    rc, log = world.insert(NEW)
    assert rc is None, log
    assert (world.home / "keyfile.vsc").read_bytes() == resealed and not (world.home / "keyfile.vsc.new").exists()
    assert _public_keys(world) == keys_before
    for slot in ("9a", "9e"):
        _verify(keys_before[slot], b"after " + slot.encode(), _sign(world, slot, b"after " + slot.encode()))
    assert json.loads(world.card_cmd("counter", "uses", "--json").stdout)["value"] == 4
    world.remove()
    steps = [(h.op, h.result) for h in world.record()[1]]
    assert steps[steps.index(("password", "ok")):] == [
        ("password", "ok"), ("sync", "ok"), ("remove", "ok"), ("insert", "refused"), ("insert", "ok"), ("remove", "ok")]
