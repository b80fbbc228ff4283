"""
Deterministic unit tests of the card (no network): the protected memory of
[0027]-[0030] (CardMemory), the password derivation of Figure 9 [0085] and
its scrypt replacement, the MUK of [0031] from a fake /sys and /proc, the
machine lock of [0054] across processes, and CardSession's polling
([0031]-[0033]) and sync-before-acknowledge on a twisted Clock with the
server replaced by fakes.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from twisted.internet.task import Clock

from vsc import crypto
from vsc.card import machine, ops
from vsc.card.config import CardConfig
from vsc.card.machine import MachineLock, MachineLockHeld, compute_muk, muk_sources
from vsc.card.memory import LockedBuffer, ScratchPool, scratch
from vsc.card.protected import CardMemory, PlainItem, seal_envelope
from vsc.card.session import LifeState
from vsc.net.channel import ChannelClosedError
from vsc.wire import ErrorCode
from vsc.wire.errors import WireError
from vsc.wire.ops import KdfAlg, KdfParams, Status
from vsc.wire.protected import ItemKind, KeyAlg, decode_counter, encode_counter
from tests.cardfakes import FakeServer, done as _done, inline_worker, release

SERIAL = "unit-1"
PROTECTION_KEY = bytes(range(32))


def _counter_rand():
    """A deterministic RandomBytes: distinct values, the same on every run."""
    state = {"n": 0}

    def rand(n: int) -> bytes:
        out = b""
        while len(out) < n:
            state["n"] += 1
            out += hashlib.sha256(b"unit-rand" + state["n"].to_bytes(8, "big")).digest()
        return out[:n]

    return rand


@pytest.fixture(scope="module")
def ec_der() -> bytes:
    return crypto.generate_private_der("p256")


def _envelope(ec_der: bytes, counter: int = 5, data: bytes = b"confidential data object", serial: str = SERIAL,
              key: bytes = PROTECTION_KEY) -> bytes:
    items = [
        PlainItem(ItemKind.KEY, "9c", ec_der, KeyAlg.P256, crypto.public_der_of(ec_der)),
        PlainItem(ItemKind.COUNTER, "runs", encode_counter(counter)),
        PlainItem(ItemKind.DATA, "note", data),
    ]
    return seal_envelope(serial, key, items, _counter_rand())


def _read(mem: CardMemory, kind: ItemKind, name: str) -> bytes:
    with mem.open(kind, name) as view:
        return bytes(view)


# ---------------------------------------------------------------- CardMemory


def test_memory_load_opens_every_item_and_export_round_trips(ec_der):
    """load → every item opens to its plaintext; export re-seals (new ciphertext) to an envelope that loads the same."""
    env = _envelope(ec_der)
    mem = CardMemory.load(SERIAL, env, PROTECTION_KEY, _counter_rand())
    try:
        assert sorted((k, n) for k, n, _a, _p in mem.items()) == [
            (ItemKind.KEY, "9c"), (ItemKind.COUNTER, "runs"), (ItemKind.DATA, "note")]
        assert _read(mem, ItemKind.KEY, "9c") == ec_der
        assert decode_counter(_read(mem, ItemKind.COUNTER, "runs")) == 5
        assert _read(mem, ItemKind.DATA, "note") == b"confidential data object"
        exported = mem.export()
        assert exported != env and ec_der not in exported and b"confidential data object" not in exported
    finally:
        mem.wipe()
    again = CardMemory.load(SERIAL, exported, PROTECTION_KEY)
    try:
        assert _read(again, ItemKind.KEY, "9c") == ec_der
        assert _read(again, ItemKind.DATA, "note") == b"confidential data object"
        assert dict((n, p) for _k, n, _a, p in again.items())["9c"] == crypto.public_der_of(ec_der)
    finally:
        again.wipe()


def test_memory_put_revert_discard(ec_der):
    """put returns the old sealed item: revert restores it (or removes a new item); discard keeps the new value."""
    mem = CardMemory.load(SERIAL, _envelope(ec_der), PROTECTION_KEY)
    try:
        old = mem.put(ItemKind.COUNTER, "runs", encode_counter(4))
        assert decode_counter(_read(mem, ItemKind.COUNTER, "runs")) == 4
        mem.revert(ItemKind.COUNTER, "runs", old)
        assert decode_counter(_read(mem, ItemKind.COUNTER, "runs")) == 5

        old = mem.put(ItemKind.COUNTER, "runs", encode_counter(3))
        mem.discard(old)
        assert old.buf._mm is None  # the replaced value's locked buffer is zeroed and unmapped
        assert decode_counter(_read(mem, ItemKind.COUNTER, "runs")) == 3

        assert mem.put(ItemKind.DATA, "new", b"fresh") is None
        mem.revert(ItemKind.DATA, "new", None)
        assert not mem.has(ItemKind.DATA, "new")

        # a KEY replaced without a public key keeps its algorithm and public key
        public = crypto.public_der_of(ec_der)
        mem.discard(mem.put(ItemKind.KEY, "9c", ec_der))
        assert [(a, p) for k, n, a, p in mem.items() if n == "9c"] == [(KeyAlg.P256, public)]
    finally:
        mem.wipe()


def test_memory_is_locked_and_wipe_zeroes_and_unmaps(ec_der):
    """Every buffer is mlock'ed (as root); wipe frees all of them and later opens fail; zero() really zeroes."""
    mem = CardMemory.load(SERIAL, _envelope(ec_der), PROTECTION_KEY)
    if os.geteuid() == 0:
        assert mem.locked
    buffers = [h.buf for h in mem._items.values()] + [mem._data_key.buf, mem._temp]
    mem.wipe()
    assert mem.wiped and all(b._mm is None for b in buffers)
    with pytest.raises(RuntimeError):
        mem.export()
    with pytest.raises((RuntimeError, KeyError)):
        _read(mem, ItemKind.KEY, "9c")

    buf = LockedBuffer(100)
    buf.view[:] = b"\xaa" * 100
    buf.zero()
    assert bytes(buf.view) == bytes(100)
    buf.free()
    buf.free()  # idempotent


def test_scratch_pool_reuses_zeroed_locked_buffers():
    """A buffer given back is zeroed before reuse and taken again without a new mapping; at most ``keep`` stay spare."""
    pool = ScratchPool(keep=2)
    a = pool.take(100)
    assert a.size >= 100 and a.size % mmap.PAGESIZE == 0 and bytes(a.view) == bytes(a.size)
    if os.geteuid() == 0:
        assert a.locked
    a.view[:100] = b"\xaa" * 100
    pool.give(a)
    assert a._mm is not None and bytes(a.view) == bytes(a.size) and pool.spare() == 1
    assert pool.take(4000) is a and pool.spare() == 0  # the same page count: the spare one
    b, c = pool.take(10), pool.take(10)
    for buf in (a, b, c):
        pool.give(buf)
    assert pool.spare() == 2 and c._mm is None  # the third was freed (zeroed and unmapped), not kept
    big = pool.take(mmap.PAGESIZE + 1)
    assert big.size == 2 * mmap.PAGESIZE and big is not a and big is not b
    pool.give(big)
    pool.clear()
    assert pool.spare() == 0 and a._mm is None and b._mm is None and big._mm is None


def test_memory_open_uses_the_pool_and_zeroes_after_each_operation(ec_der):
    """open() decrypts into a pooled locked buffer that is zeroed when the operation ends, and reuses it next time."""
    mem = CardMemory.load(SERIAL, _envelope(ec_der), PROTECTION_KEY)
    try:
        with mem.open(ItemKind.KEY, "9c") as view:
            assert bytes(view) == ec_der
            buf = view.obj  # the mmap behind the view
        spare = [b for bs in scratch._spare.values() for b in bs if b._mm is buf]
        assert len(spare) == 1 and bytes(spare[0].view) == bytes(spare[0].size)
        with mem.open(ItemKind.KEY, "9c") as view:
            assert view.obj is buf  # taken again from the pool
    finally:
        mem.wipe()


def test_memory_read_caches_a_derived_value_until_the_item_changes(ec_der):
    """read(derive=f) opens the item once and keeps f's answer; a put, a revert or a wipe makes it stale."""
    mem = CardMemory.load(SERIAL, _envelope(ec_der), PROTECTION_KEY)
    calls = []

    def first_byte(view):
        calls.append(bytes(view))
        return view[0]

    try:
        assert mem.read(ItemKind.DATA, "absent", first_byte) is None and calls == []
        assert mem.read(ItemKind.COUNTER, "runs") == encode_counter(5)  # no derive: a copy of the value
        assert mem.read(ItemKind.COUNTER, "runs", first_byte) == encode_counter(5)[0]
        assert mem.read(ItemKind.COUNTER, "runs", first_byte) == encode_counter(5)[0] and len(calls) == 1
        old = mem.put(ItemKind.COUNTER, "runs", b"\x07" + encode_counter(5)[1:])
        assert mem.read(ItemKind.COUNTER, "runs", first_byte) == 7 and len(calls) == 2
        mem.revert(ItemKind.COUNTER, "runs", old)
        assert mem.read(ItemKind.COUNTER, "runs", first_byte) == encode_counter(5)[0] and len(calls) == 3
        assert mem.read(ItemKind.COUNTER, "runs", lambda v: len(v)) == len(encode_counter(5))  # another derive
    finally:
        mem.wipe()
    assert mem._derived == {}


def test_memory_plaintext_is_never_held_sealed_under_temp(ec_der):
    """In use, the locked buffers hold items sealed under the temporary key, never the plaintext ([0027])."""
    mem = CardMemory.load(SERIAL, _envelope(ec_der), PROTECTION_KEY)
    try:
        held = b"".join(bytes(h.buf.view) for h in mem._items.values())
        assert ec_der not in held and b"confidential data object" not in held
        assert ec_der[-32:] not in held
    finally:
        mem.wipe()


def test_every_flipped_byte_of_an_envelope_is_detected(ec_der):
    """
    Each byte of a sealed envelope, flipped in turn, makes load fail with
    CryptoError (authentication) or WireError (framing): never wrong data,
    never another exception.
    """
    env = _envelope(ec_der)
    crypto_errors = wire_errors = 0
    for i in range(len(env)):
        bad = bytearray(env)
        bad[i] ^= 0xFF
        try:
            CardMemory.load(SERIAL, bytes(bad), PROTECTION_KEY).wipe()
        except crypto.CryptoError:
            crypto_errors += 1
        except WireError:
            wire_errors += 1
        else:
            pytest.fail(f"flipping byte {i} of {len(env)} went unnoticed")
    assert crypto_errors + wire_errors == len(env) and crypto_errors > 0 and wire_errors > 0
    # and truncation / extension / the wrong protection key
    for bad in (env[:-1], env + b"\x00", env[: len(env) // 2]):
        with pytest.raises((crypto.CryptoError, WireError)):
            CardMemory.load(SERIAL, bad, PROTECTION_KEY)
    with pytest.raises(crypto.CryptoError):
        CardMemory.load(SERIAL, env, bytes(32))


# ---------------------------------------------------------------- password KDFs


def test_legacy_md5_salt_splits_64_64_bits():
    """
    Figure 9 [0085]: MD5(password || SALT), the first 64 bits the
    authentication key, the second 64 bits the protection key.
    """
    kdf = KdfParams(alg=KdfAlg.LEGACY_MD5, salt=b"", log2_n=0, r=0, p=0)
    for password in ("pw", "correct horse battery staple", "pässwörd"):
        digest = hashlib.md5(password.encode("utf-8") + b"EP0936530-VSC-SALT").digest()
        keys = ops.derive_keys(password, kdf)
        assert len(keys.auth_key) == 8 and len(keys.protection_key) == 8
        assert keys.auth_key + keys.protection_key == digest
    # the known answer, fixed here so a change of SALT or split is caught
    keys = ops.derive_keys("pw", kdf)
    assert keys.auth_key.hex() == hashlib.md5(b"pwEP0936530-VSC-SALT").hexdigest()[:16]
    assert (keys.auth_key + keys.protection_key).hex() == "f80418cf6dabc6f4ff9c07d4e8405e25"
    assert ops.LEGACY_SALT == b"EP0936530-VSC-SALT"
    assert ops.new_kdf(_counter_rand(), legacy=True).alg is KdfAlg.LEGACY_MD5


def test_scrypt_parameters_are_honoured():
    """scrypt uses exactly the card's salt, N = 2^log2_n, r and p: 64 bytes split 32/32; each parameter matters."""
    salt = bytes(range(16))
    kdf = KdfParams(alg=KdfAlg.SCRYPT, salt=salt, log2_n=10, r=8, p=1)
    keys = ops.derive_keys("pw", kdf)
    expected = hashlib.scrypt(b"pw", salt=salt, n=1024, r=8, p=1, dklen=64)
    assert (keys.auth_key, keys.protection_key) == (expected[:32], expected[32:])
    variants = [
        KdfParams(alg=KdfAlg.SCRYPT, salt=salt, log2_n=11, r=8, p=1),
        KdfParams(alg=KdfAlg.SCRYPT, salt=salt, log2_n=10, r=4, p=1),
        KdfParams(alg=KdfAlg.SCRYPT, salt=salt, log2_n=10, r=8, p=2),
        KdfParams(alg=KdfAlg.SCRYPT, salt=salt[::-1], log2_n=10, r=8, p=1),
    ]
    for v in variants:
        got = ops.derive_keys("pw", v)
        want = hashlib.scrypt(b"pw", salt=v.salt, n=1 << v.log2_n, r=v.r, p=v.p, dklen=64)
        assert got.auth_key + got.protection_key == want != expected
    assert KdfParams.decode(kdf.encode()) == kdf  # what the server stores and sends back at insert
    new = ops.new_kdf(_counter_rand(), log2_n=12)
    assert (new.alg, new.log2_n, new.r, new.p, len(new.salt)) == (KdfAlg.SCRYPT, 12, 8, 1, 16)
    with pytest.raises(ValueError):
        ops.derive_keys("pw", KdfParams(alg=KdfAlg.SCRYPT, salt=salt, log2_n=9, r=8, p=1))


# ---------------------------------------------------------------- MUK


def _fake_root(root: Path, macs: dict, disks: dict, swap_kb: int) -> Path:
    for iface, mac in macs.items():
        d = root / "sys/class/net" / iface
        d.mkdir(parents=True, exist_ok=True)
        (d / "address").write_text(mac + "\n")
    for dev, (size, removable) in disks.items():
        d = root / "sys/block" / dev
        d.mkdir(parents=True, exist_ok=True)
        (d / "size").write_text(f"{size}\n")
        (d / "removable").write_text(f"{removable}\n")
    (root / "proc").mkdir(exist_ok=True)
    (root / "proc/meminfo").write_text(f"MemTotal:       16000000 kB\nSwapTotal:       {swap_kb} kB\nSwapFree: 1 kB\n")
    return root


MACS = {"lo": "00:00:00:00:00:00", "eth0": "52:54:00:12:34:56", "wlan0": "52:54:00:ab:cd:ef"}
DISKS = {"sda": (500118192, 0), "nvme0n1": (1000215216, 0), "loop0": (1234, 0), "ram0": (8192, 0),
         "sr0": (2097151, 1)}


def test_muk_sources_from_a_fake_sys_root(tmp_path, monkeypatch):
    """MACs without lo, fixed disks without loop/ram/removable, SwapTotal, the host name and the user."""
    monkeypatch.setattr(machine.socket, "gethostname", lambda: "card-host")
    src = muk_sources(str(_fake_root(tmp_path, MACS, DISKS, 2097148)))
    assert src["network"] == ["eth0=52:54:00:12:34:56", "wlan0=52:54:00:ab:cd:ef"]
    assert src["disks"] == ["nvme0n1=1000215216", "sda=500118192"]
    assert src["swap"] == "2097148 kB"
    assert src["hostname"] == "card-host"
    assert src["user"]
    assert len(compute_muk(src)) == 32
    # an empty root: no MACs, no disks, no swap — still a MUK (of the host name and user)
    empty = muk_sources(str(tmp_path / "nothing"))
    assert empty["network"] == [] and empty["disks"] == [] and empty["swap"] == ""


def test_muk_changes_with_host_name_mac_disk_or_swap(tmp_path, monkeypatch):
    """compute_muk is stable for the same machine and changes with each source the patent names ([0031])."""
    host = {"name": "card-host"}
    monkeypatch.setattr(machine.socket, "gethostname", lambda: host["name"])

    def muk(macs=MACS, disks=DISKS, swap=2097148, name="card-host") -> bytes:
        host["name"] = name
        root = tmp_path / hashlib.sha256(repr((macs, disks, swap)).encode()).hexdigest()[:12]
        if not root.exists():
            _fake_root(root, macs, disks, swap)
        return compute_muk(muk_sources(str(root)))

    base = muk()
    assert muk() == base
    assert muk(name="other-host") != base
    assert muk(macs=dict(MACS, eth0="52:54:00:12:34:57")) != base
    assert muk(disks=dict(DISKS, sda=(500118191, 0))) != base
    assert muk(swap=0) != base
    # what is not a fixed disk does not count
    assert muk(disks=dict(DISKS, loop0=(99, 0), sr0=(1, 1))) == base


# ---------------------------------------------------------------- machine lock


def test_machine_lock_excludes_another_process_until_it_dies(tmp_path):
    """A second process cannot take the lock while the first holds it; kill -9 the holder and it is free ([0054])."""
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(f"""
            import sys, time
            from vsc.card.machine import MachineLock
            MachineLock({str(tmp_path)!r}).acquire()
            print("locked", flush=True)
            time.sleep(60)
        """)],
        stdout=subprocess.PIPE, text=True, cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        lock = MachineLock(str(tmp_path))
        with pytest.raises(MachineLockHeld, match=f"pid {holder.pid}"):
            lock.acquire()
        assert not lock.held
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        lock.acquire()
        assert lock.held
        lock.release()
        assert not lock.held
        lock.acquire()  # released locks can be taken again
        lock.release()
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


# ---------------------------------------------------------------- CardSession on a Clock


@pytest.fixture
def world(tmp_path, ec_der):
    """An in-use card on a ServerStorage whose server is a FakeServer; the worker runs inline; time is a Clock."""
    from vsc.card.session import CardSession
    from vsc.card.storage import ServerStorage

    server = FakeServer(SERIAL, "pw", lambda key: _envelope(ec_der, key=key))
    clock = Clock()
    clock.advance(1_000_000)
    w = SimpleNamespace(server=server, clock=clock, muk=b"m" * 32, pid=4242, exits=[], tmp=tmp_path)
    cfg = CardConfig(home=tmp_path, server="tcp:127.0.0.1:9", server_key="SHA256:x", serial=SERIAL,
                     muk_poll=60.0, clock_poll=3600.0, clock_tolerance=5400.0, reconnect_attempts=1)
    w.lock = MachineLock(str(tmp_path / "lock"))
    w.storage = ServerStorage(cfg, clock, b"M" * 32, rand=_counter_rand(), worker=inline_worker,
                              connect=server.connect)
    w.session = CardSession(
        cfg, clock, w.storage, rand=_counter_rand(), muk=lambda: w.muk, pid=lambda: w.pid, lock=w.lock,
        on_exit=lambda code, why: w.exits.append((code, why)),
    )
    _done(w.session.insert("pw"))
    assert w.session.life is LifeState.IN_USE and w.lock.held
    yield w
    release(w.session)


def test_muk_change_aborts_with_exit_3_and_wipes(world):
    """[0031]: at the next MUK poll a different MUK makes the card exit (code 3) without remove, memory wiped."""
    mem = world.session.memory
    world.clock.advance(60)
    assert world.exits == [] and world.session.life is LifeState.IN_USE
    world.muk = b"n" * 32
    world.clock.advance(60)
    assert [c for c, _ in world.exits] == [3] and "machine unique key" in world.exits[0][1]
    assert world.session.life is LifeState.EXITED and world.session.memory is None and mem.wiped
    assert not world.lock.held and world.server.removes == []
    world.clock.advance(10_000)  # polling stopped
    assert len(world.exits) == 1


def test_pid_change_aborts_with_exit_3(world):
    """[0032]: a different process id at the poll makes the card exit at once (code 3), memory wiped."""
    mem = world.session.memory
    world.pid = 4243
    world.clock.advance(60)
    assert [c for c, _ in world.exits] == [3] and "process id" in world.exits[0][1]
    assert mem.wiped and world.server.removes == []


def test_clock_jump_removes_then_exits_4(world):
    """[0033]: polls an hour apart are fine; a gap beyond the tolerance (90 min) removes the card, then exit 4."""
    world.clock.advance(3600)
    world.clock.advance(3600)
    assert world.exits == []
    mem = world.session.memory
    world.clock.advance(3 * 3600)  # the next clock poll sees 3 h since the last one
    assert len(world.server.removes) == 1
    assert [c for c, _ in world.exits] == [4]
    assert world.session.life is LifeState.IDLE and mem.wiped and not world.lock.held
    uploaded = CardMemory.load(SERIAL, world.server.removes[0], world.server.protection_key)
    assert decode_counter(_read(uploaded, ItemKind.COUNTER, "runs")) == 5
    uploaded.wipe()


def test_clock_jump_exits_4_even_when_remove_fails(world):
    """The clock check exits (code 4) after the remove attempt even if the server cannot be reached."""
    world.server.remove_error = ChannelClosedError(ErrorCode.INTERNAL_ERROR, "gone")
    world.clock.advance(3600)
    world.clock.advance(3 * 3600)
    assert [c for c, _ in world.exits] == [4]
    assert world.server.removes == [] and world.session.life is LifeState.IN_USE


def test_acknowledged_change_is_what_the_server_stored(world):
    """A counter step returns only after a sync whose envelope, opened with the protection key, holds the new value."""
    assert _done(world.session.counter("runs", -1)) == 4
    assert len(world.server.syncs) == 1 and world.session.version == 2
    stored = CardMemory.load(SERIAL, world.server.syncs[-1], world.server.protection_key)
    try:
        assert decode_counter(_read(stored, ItemKind.COUNTER, "runs")) == 4
    finally:
        stored.wipe()
    _done(world.session.data_put("fresh", b"new value"))
    stored = CardMemory.load(SERIAL, world.server.syncs[-1], world.server.protection_key)
    try:
        assert _read(stored, ItemKind.DATA, "fresh") == b"new value"
    finally:
        stored.wipe()


@pytest.mark.parametrize("error", [
    ChannelClosedError(ErrorCode.INTERNAL_ERROR, "connection lost"),
    Status.VERSION_CONFLICT,
], ids=["channel-lost", "version-conflict"])
def test_failed_sync_reverts_the_change(world, error):
    """A modification whose sync fails raises CardError and is undone: nothing unstored is ever acknowledged."""
    from vsc.card.session import CardError

    world.server.sync_error = error
    with pytest.raises(CardError):
        _done(world.session.counter("runs", -1))
    with pytest.raises(CardError):
        _done(world.session.data_put("fresh", b"never stored"))
    with pytest.raises(CardError):
        _done(world.session.data_put("note", b"never stored"))
    assert _done(world.session.counter("runs", 0)) == 5
    assert not world.session.memory.has(ItemKind.DATA, "fresh")
    assert _done(world.session.data_get("note")) == b"confidential data object"
    assert world.session.version == 1 and world.server.syncs == []
    world.server.sync_error = None  # the server is back: the next change goes through
    assert _done(world.session.counter("runs", -2)) == 3


def test_counter_refuses_below_zero_and_licence_top_up(world):
    """Counters never go below zero; lic: counters cannot be increased by the owner; no sync happens for a refusal."""
    from vsc.card.session import CardError

    with pytest.raises(CardError, match="below zero"):
        _done(world.session.counter("runs", -6))
    with pytest.raises(CardError, match="licence counters"):
        _done(world.session.counter("lic:app", 1))
    assert world.server.syncs == []


def test_compiled_index_and_envelope_give_the_schemas_bytes_and_errors():
    """encode_index / encode_envelope build through the compiled twins (vsc.wire.codec.Fast): the same bytes as
    the interpreted IndexSchema / EnvelopeSchema, and a value the schema refuses is refused the same way."""
    import attrs as _attrs
    import construct as c

    from vsc.wire import protected as wp

    rand = _counter_rand()
    items = [wp.Item(ItemKind.KEY, f"9{i}", KeyAlg.P256, rand(91), wp.SealedValue(rand(12), rand(40 * i), rand(16)))
             for i in range(6)]
    for generation in (0, 1, 2**40):
        obj = dict(format=2, generation=generation, items=[dict(kind=i.kind, name=i.name, alg=i.alg, public=i.public,
                                                                value=_attrs.asdict(i.value)) for i in items])
        assert wp.encode_index(items, generation) == wp.IndexSchema.build(obj)
        assert wp.decode_index_generation(wp.encode_index(items, generation)) == (items, generation)
    wrap, index = wp.SealedValue(rand(12), rand(48), rand(16)), wp.SealedValue(rand(12), rand(300), rand(16))
    env = wp.encode_envelope(wrap, index, "unit-1")
    assert env == wp.EnvelopeSchema.build(dict(card_id="unit-1", wrap=_attrs.asdict(wrap), index=_attrs.asdict(index)))
    bad = [wp.Item(ItemKind.KEY, "n" * 65, KeyAlg.P256, b"", wp.SealedValue(rand(12), b"", rand(16)))]
    with pytest.raises(c.ConstructError) as compiled:
        wp.encode_index(bad)
    with pytest.raises(c.ConstructError) as interpreted:
        wp.IndexSchema.build(dict(format=2, generation=0, items=[dict(kind=i.kind, name=i.name, alg=i.alg,
                                                                      public=i.public, value=_attrs.asdict(i.value))
                                                                 for i in bad]))
    assert type(compiled.value) is type(interpreted.value) and str(compiled.value) == str(interpreted.value)


def test_index_key_alg_p384_is_a_new_value_and_an_unknown_one_is_refused():
    """
    KeyAlg.P384 is 5, a value no earlier index holds (1 RSA-2048, 2 P-256,
    3 Ed25519, 4 X25519 keep their numbers: docs/protocol.md's ``alg``), so
    an old record can never read as P-384 nor a P-384 one as an old type. It
    round-trips through the compiled and the interpreted schema; an index
    with a value this version does not know (6, a future key type) is
    refused as MALFORMED (StrictEnum), never loaded as some other key type.
    """
    import attrs as _attrs

    from vsc.wire import protected as wp
    from vsc.wire.errors import ErrorCode, WireError

    assert {a.name: int(a) for a in KeyAlg} == {"NONE": 0, "RSA2048": 1, "P256": 2, "ED25519": 3, "X25519": 4,
                                                "P384": 5}
    rand = _counter_rand()
    item = wp.Item(ItemKind.KEY, "9c", KeyAlg.P384, rand(120), wp.SealedValue(rand(12), rand(185), rand(16)))
    raw = wp.encode_index([item], 7)
    obj = dict(format=2, generation=7, items=[dict(kind=item.kind, name=item.name, alg=item.alg, public=item.public,
                                                   value=_attrs.asdict(item.value))])
    assert raw == wp.IndexSchema.build(obj)
    assert wp.decode_index_generation(raw) == ([item], 7)
    # the alg byte follows kind (1), the name's length (1) and the name ("9c"), after format 2 and the generation
    at = 1 + 8 + 2 + 1 + 1 + 2
    assert raw[at] == 5
    unknown = raw[:at] + b"\x06" + raw[at + 1:]
    with pytest.raises(WireError) as e:
        wp.decode_index(unknown)
    assert e.value.code is ErrorCode.MALFORMED and "KeyAlg" in str(e.value)
