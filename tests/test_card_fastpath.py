"""
The card's per-operation paths made leaner for issue 15 (branch card2), each
checked against what it replaced or against its contract: the joined
AES-GCM calls of the card memory's temporary-key layer, CardMemory.open's
context manager, LockedBuffer.zero's two ways of writing zeros, the control
client's kernel-bounded waits (SO_RCVTIMEO / SO_SNDTIMEO), the vpcd frame
splitter, the PIV applet's INS table, and bench/latency.py's alternated
APDU round-trip rounds. Deterministic: fixed inputs, no clock except the
client's timeouts (bounded generously).
"""

from __future__ import annotations

import pickle
import random
import socket
import threading
import time
from pathlib import Path

import pytest
from twisted.protocols.basic import Int16StringReceiver

from tests.fakecard import FakeCardSocket, fake_home  # noqa: F401  (a fixture)
from vsc import crypto
from vsc.card import client
from vsc.card.memory import LockedBuffer, scratch
from vsc.card.protected import CardMemory
from vsc.crypto.errors import CryptoError
from vsc.wire import ampbox, apdu
from vsc.wire import control as wc
from vsc.wire.protected import ItemKind, KeyAlg

# ---------------------------------------------------------------- the temporary-key layer


def test_joined_gcm_writes_what_the_cipher_interface_writes_and_refuses_a_tampered_item():
    """gcm_seal_joined_into gives gcm_seal_into's ciphertext followed by its tag (same key, nonce, AAD);
    gcm_open_joined_into restores the plaintext from locked memory, and a flipped bit anywhere is CryptoError."""
    key = LockedBuffer(32)
    key.view[:] = bytes(range(32))
    nonce, aad, plain = b"n" * 12, b"temp aad", bytes(range(256)) * 5
    classic = bytearray(len(plain) + 16)
    tag = crypto.gcm_seal_into(key.view, nonce, plain, classic, aad)
    joined = LockedBuffer(len(plain) + 16)
    crypto.gcm_seal_joined_into(key.view, nonce, plain, joined.view, aad)
    assert bytes(joined.view) == bytes(classic[:len(plain)]) + tag
    out = LockedBuffer(len(plain))
    assert crypto.gcm_open_joined_into(key.view, nonce, joined.view, out.view, aad) == len(plain)
    assert bytes(out.view) == plain
    for where in (0, len(plain) - 1, len(plain) + 15):  # the ciphertext's ends and the tag
        joined.view[where] ^= 1
        with pytest.raises(CryptoError, match="failed authentication"):
            crypto.gcm_open_joined_into(key.view, nonce, joined.view, out.view, aad)
        joined.view[where] ^= 1
    with pytest.raises(CryptoError):
        crypto.gcm_open_joined_into(key.view, nonce, joined.view, out.view, b"other aad")
    for b in (key, joined, out):
        b.free()


def _memory() -> CardMemory:
    mem = CardMemory("fast-1", crypto.system_random)
    mem.put(ItemKind.KEY, "9a", bytes(range(200)) * 6, KeyAlg.RSA2048, b"pub")
    mem.put(ItemKind.PIN, "empty", b"")
    return mem


def test_card_memory_open_yields_the_item_and_gives_its_buffer_back_zeroed():
    """``with memory.open(...) as view`` is the item's plaintext (an empty item too); on leaving, the view
    is released and the pooled locked buffer is back on the spare list, all zeros."""
    mem = _memory()
    try:
        scratch.clear()
        with mem.open(ItemKind.KEY, "9a") as view:
            assert bytes(view) == bytes(range(200)) * 6
            held = view
        with pytest.raises(ValueError):
            bytes(held)  # released
        assert scratch.spare() == 1
        buf = scratch.take(1200)
        assert bytes(buf.view) == bytes(buf.size)
        scratch.give(buf)
        with mem.open(ItemKind.PIN, "empty") as view:
            assert bytes(view) == b""
        with pytest.raises(KeyError):
            mem.open(ItemKind.KEY, "9c")
    finally:
        mem.wipe()


def test_card_memory_refuses_a_tampered_item_and_still_gives_the_buffer_back():
    """A sealed item changed in memory fails authentication (CryptoError), and the buffer it was being
    decrypted into goes back to the pool zeroed, not left mapped with partial plaintext."""
    mem = _memory()
    try:
        scratch.clear()
        held = mem._items[(ItemKind.KEY, "9a")]
        held.buf.view[3] ^= 0x80
        with pytest.raises(CryptoError):
            mem.open(ItemKind.KEY, "9a")
        assert scratch.spare() == 1
        buf = scratch.take(held.length)
        assert bytes(buf.view) == bytes(buf.size)
        scratch.give(buf)
    finally:
        mem.wipe()


def test_a_view_that_outlives_the_operation_is_zeroed_not_reused():
    """If a caller keeps a view of the plaintext past the block, leaving it raises BufferError and the buffer
    is zeroed and not put back for reuse."""
    mem = _memory()
    try:
        scratch.clear()
        kept = []
        with pytest.raises(BufferError):
            with mem.open(ItemKind.KEY, "9a") as view:
                kept.append(pickle.PickleBuffer(view))  # holds a buffer exported by the view itself
        assert bytes(kept[0].raw()) == bytes(1200) and scratch.spare() == 0
        kept[0].release()
    finally:
        mem.wipe()


# ---------------------------------------------------------------- LockedBuffer.zero


def test_zero_clears_exactly_the_range_asked_by_either_way():
    """Within the view (copied from a zero buffer) and beyond it (memset over the rest of the page), only
    ``start`` to ``end`` becomes zero; ``zero()`` clears the whole mapping."""
    buf = LockedBuffer(100)  # one page mapped, a view of 100 bytes
    whole = memoryview(buf._mm)
    try:
        whole[:] = b"\xff" * len(whole)
        buf.zero(10, 50)
        assert bytes(whole[:10]) == b"\xff" * 10 and bytes(whole[10:50]) == bytes(40)
        assert bytes(whole[50:]) == b"\xff" * (len(whole) - 50)
        buf.zero(90, 200)  # past the view: memset
        assert bytes(whole[50:90]) == b"\xff" * 40 and bytes(whole[90:200]) == bytes(110)
        assert bytes(whole[200:]) == b"\xff" * (len(whole) - 200)
        buf.zero(300, 300)  # empty
        buf.zero()
        assert bytes(whole) == bytes(len(whole))
    finally:
        whole.release()
        buf.free()


# ---------------------------------------------------------------- the control client's waits


def test_socket_wait_is_a_timeval_never_zero():
    """socket_wait is the struct timeval of SO_RCVTIMEO (seconds, microseconds); 0 s becomes 1 us, not 'forever'."""
    import sys

    def tv(sec, usec):
        return sec.to_bytes(8, sys.byteorder) + usec.to_bytes(8, sys.byteorder)

    assert wc.socket_wait(1.5) == tv(1, 500000)
    assert wc.socket_wait(30) == tv(30, 0)
    assert wc.socket_wait(0) == tv(0, 1)


def _rcvtimeo(sock) -> bytes:
    return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, 16)


def test_the_client_socket_blocks_with_kernel_bounded_waits(fake_home):  # noqa: F811
    """Once connected the client's socket is blocking (no Python timeout: no poll before each send and
    receive) with SO_RCVTIMEO / SO_SNDTIMEO at the client's timeout; requests are answered as before."""
    card = FakeCardSocket(fake_home, lambda command, args: {b"value": args[b"delta"]})
    try:
        with client.ControlClient(fake_home, timeout=2.5) as c:
            assert c._sock.gettimeout() is None
            assert _rcvtimeo(c._sock) == wc.socket_wait(2.5)
            assert c._sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, 16) == wc.socket_wait(2.5)
            assert c.call(wc.COUNTER, name="n", delta=3)["value"] == 3
    finally:
        card.close()


def test_a_partial_answer_and_then_silence_is_no_answer_within_the_timeout(fake_home, monkeypatch):  # noqa: F811
    """Half a box and then nothing: the rest is waited for only as long as the timeout has left (NoAnswer),
    not a whole timeout more. The client's clock jumps past the 30 s deadline once the first part is in:
    the client must give up at once, without a second receive (which would wait another 30 s)."""
    import threading

    box = ampbox.encode_box({b"_answer": b"1", b"value": b"7"})
    card = FakeCardSocket(fake_home, lambda command, args: box[:5])
    readings = iter([1000.0])  # the deadline is taken at 1000 s; every later reading is past it

    class Clock:
        @staticmethod
        def monotonic() -> float:
            return next(readings, 1031.0)

    monkeypatch.setattr(client, "time", Clock)
    outcome: list = []

    def ask() -> None:
        try:
            client.call(fake_home, wc.COUNTER, 30.0, name="n", delta=0)
        except Exception as e:  # noqa: BLE001 - the outcome is asserted below
            outcome.append(e)

    try:
        worker = threading.Thread(target=ask, daemon=True)
        worker.start()
        worker.join(10)  # liveness, not speed: a second whole wait would still be blocked in recv here
        assert not worker.is_alive(), "the client waited a whole timeout again for the rest of the answer"
        assert len(outcome) == 1 and isinstance(outcome[0], client.NoAnswer)
        assert str(outcome[0]) == "the card did not answer in time"
    finally:
        card.close()


class _SlowHalves:
    """A stand-in daemon that answers ``delay`` seconds late, in two parts ``gap`` seconds apart (0: whole)."""

    def __init__(self, path: str, gap: float):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(1)
        self.gap, self.delay = gap, 0.0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self):
        conn, _ = self.sock.accept()
        with conn:
            data = b""
            while True:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
                try:
                    box, used = ampbox.decode_box(data)
                except ampbox.Incomplete:
                    continue
                data = data[used:]
                answer = ampbox.encode_box({b"_answer": box[b"_ask"], b"value": box[b"delta"]})
                time.sleep(self.delay)
                if not self.gap:
                    conn.sendall(answer)
                    continue
                conn.sendall(answer[:3])
                time.sleep(self.gap)
                conn.sendall(answer[3:])


def test_a_shortened_wait_is_restored_for_the_next_request(fake_home):  # noqa: F811
    """An answer read in two parts shortens SO_RCVTIMEO to what was left of the timeout; the next request
    sets it back to the whole timeout before it waits (else a late answer would be NoAnswer)."""
    c = client.ControlClient(fake_home, timeout=5.0)
    Path(c.path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    server = _SlowHalves(c.path, 0.05)
    try:
        with c:
            assert c.call(wc.COUNTER, name="n", delta=4)["value"] == 4
            assert c._shortened  # the second part was waited for with what was left
            c._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, wc.socket_wait(0.001))  # a nearly spent wait
            server.gap, server.delay = 0.0, 0.1
            assert c.call(wc.COUNTER, name="n", delta=5)["value"] == 5  # answered 0.1 s late: 5 s were restored
            assert _rcvtimeo(c._sock) == wc.socket_wait(5.0) and not c._shortened
    finally:
        server.sock.close()


# ---------------------------------------------------------------- the vpcd link's frames


def test_split_vpcd_reads_what_twisteds_int16_receiver_reads():
    """For random streams of vpcd frames cut into random reads, split_vpcd (carrying the rest from read to
    read) yields exactly the payloads Twisted's Int16StringReceiver yields, in order."""
    rng = random.Random(15)
    for _ in range(200):
        payloads = [rng.randbytes(rng.choice((0, 1, 2, 5, 261, 300, 1000))) for _ in range(rng.randint(1, 6))]
        stream = b"".join(apdu.encode_vpcd(p) for p in payloads)
        cuts = sorted(rng.sample(range(len(stream) + 1), min(3, len(stream) + 1)))
        reads = [stream[a:b] for a, b in zip([0] + cuts, cuts + [len(stream)])]
        twisted_got: list[bytes] = []
        ref = Int16StringReceiver()
        ref.stringReceived = twisted_got.append
        got, rest = [], b""
        for data in reads:
            ref.dataReceived(data)
            more, rest = apdu.split_vpcd(rest + data)
            got += more
        assert got == twisted_got == payloads and rest == b""


def test_split_vpcd_keeps_an_unfinished_frame():
    """A length alone, or a length and part of its payload, is kept whole for the next read."""
    assert apdu.split_vpcd(b"") == ([], b"")
    assert apdu.split_vpcd(b"\x00") == ([], b"\x00")
    assert apdu.split_vpcd(b"\x00\x03ab") == ([], b"\x00\x03ab")
    assert apdu.split_vpcd(b"\x00\x01\x04\x00\x02a") == ([b"\x04"], b"\x00\x02a")


# ---------------------------------------------------------------- PIV dispatch


def test_the_piv_ins_table_names_the_applets_own_handlers():
    """PivApplet._dispatch's table (built once) maps each INS to the PivApplet method of that command."""
    from vsc.protocol import piv

    names = {piv.INS_GET_DATA: "_get_data", piv.INS_VERIFY: "_verify", piv.INS_CHANGE: "_change",
             piv.INS_RESET_RETRY: "_reset_retry", piv.INS_GENERAL_AUTH: "_general_authenticate",
             piv.INS_GENERATE: "_generate", piv.INS_PUT_DATA: "_put_data", piv.INS_GET_VERSION: "_get_version",
             piv.INS_GET_SERIAL: "_get_serial", piv.INS_SET_MGMT: "_set_mgmt", piv.INS_IMPORT: "_import_key",
             piv.INS_GET_METADATA: "_get_metadata", piv.INS_ATTEST: "_attest"}
    assert {ins: fn.__name__ for ins, fn in piv._HANDLERS.items()} == names
    assert all(getattr(piv.PivApplet, name) is piv._HANDLERS[ins] for ins, name in names.items())


# ---------------------------------------------------------------- bench/latency.py's alternated round trip


def test_alternated_rounds_give_each_rounds_ratio_and_their_median():
    """Each round's p50s and ratio (ours / the no-op card's), the median of the rounds' ratios as the figure,
    and each side's samples pooled; the Targets row shows the median and every round."""
    from bench import __main__ as runner
    from bench import latency

    rounds = [{"card": [0.10, 0.11, 0.12], "noop": [0.08, 0.08, 0.09]},
              {"card": [0.20, 0.21, 0.22], "noop": [0.10, 0.10, 0.10]},
              {"card": [0.09, 0.09, 0.09], "noop": [0.09, 0.09, 0.09]}]
    alt = latency.alternated_rounds(rounds)
    assert [round(r["ratio"], 3) for r in alt["rounds"]] == [1.375, 2.1, 1.0]
    assert alt["ratio"] == pytest.approx(1.375)
    assert alt["card"]["n"] == alt["noop"]["n"] == 9
    res = {"pcsc": {"roundtrip": alt["card"], "roundtrip_rounds": alt["rounds"], "roundtrip_ratio": alt["ratio"]},
           "pcsc_floor": alt["noop"]}
    row = [t for t in latency.targets(res) if t["target"].startswith("APDU round trip")][0]
    assert row["ratio"] == 1.375 and row["met"] is True and "median of 3 alternated rounds" in row["floor_name"]
    got = runner.target_apdu_roundtrip({"latency": res})
    assert got[3] == "1.38 (median of 3 rounds: 1.38, 2.10, 1.00)" and got[4] == "**yes**"


def test_the_local_api_row_shows_the_cross_process_reference_beside_the_floor():
    """The local API target is still its figure / the in-process load-and-sign floor; the minimal server
    process's time (measured alternated in the same client) is shown beside it, with ours as a multiple of it."""
    from bench import __main__ as runner
    from bench import latency

    def p(v):
        return {"n": 10, "p50": v, "p95": v, "min": v}

    res = {"amp": {"9a": p(0.60)}, "floor": {"load_sign_9a": p(0.45), "held_sign_9a": p(0.23), "ipc_sign_9a": p(0.50)}}
    row = latency.targets(res)[0]
    assert row["ratio"] == pytest.approx(0.60 / 0.45, abs=1e-3) and "0.500 ms (ours 1.20x that)" in row["floor_name"]
    got = runner.target_local_api({"latency": res})
    assert got[3] == "1.33" and "0.500 ms (ours 1.20×)" in got[2]


def test_the_reference_signer_signs_what_the_card_would():
    """bench/latency.py's minimal server process (forked, on a socketpair) answers a digest with a signature
    that verifies under the key's public half, and exits when the socket closes."""
    import hashlib
    import os

    from bench import latency

    der = crypto.generate_private_der(crypto.KEY_P256)
    sock, pid = latency._ipc_signer(der)
    try:
        digest = hashlib.sha256(b"reference").digest()
        sig = latency._ipc_sign(sock, digest)
        assert crypto.verify_sha256(crypto.public_der_of(der), b"reference", sig)
    finally:
        sock.close()
        assert os.waitpid(pid, 0)[1] == 0
