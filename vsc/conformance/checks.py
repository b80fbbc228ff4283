"""
The server-mode checks, one async function each, taking the run's
``ServerHarness``; a check returns when the server behaved as
docs/protocol.md says and raises ``Failed`` (one line) when it did not.
Which checks run, under which name and for which § of the spec:
vsc.conformance.items.

One responsibility (and so one module despite its length): the server-mode checks, each short and
independent; a file per check group would only scatter the shared harness calls.
"""

from __future__ import annotations

import attrs

from vsc import crypto
from vsc.card import ops
from vsc.conformance.raw import Failed, RawCard, expect
from vsc.conformance.server import ServerHarness
from vsc.protocol import auth
from vsc.protocol.suites import ForwardSecrecy
from vsc.wire import (
    CARD_TO_SERVER,
    MAX_HANDSHAKE_BODY,
    SERVER_TO_CARD,
    ErrorCode,
    decode_frame,
    encode_frame,
    encode_inner,
    record_aad,
    seq_bytes,
)
from vsc.wire.codec import MAGIC, MAX_FRAME_BODY, PROTOCOL_VERSION, FrameHeaderSchema, build_header
from vsc.wire.messages import (
    Alert,
    ClientFinished,
    EchoReply,
    EchoRequest,
    Hello,
    KeyTransport,
    SessionSecrets,
    Suite,
)
from vsc.wire.ops import (
    AuthChallenge,
    AuthItem,
    AuthMethod,
    AuthResponse,
    ChangePassword,
    Op,
    OpRequest,
    OpResult,
    Status,
)


# ---------------------------------------------------------------- handshake


async def handshake(h: ServerHarness, suite: Suite, fs: ForwardSecrecy) -> None:
    card = await h.raw(suites=(suite,), fs=fs)
    try:
        try:
            await card.handshake()
        except Failed:
            pass
        if card.channel.established:
            data = h.rand(48)
            card.write(card.seal(EchoRequest(data)))
            frame = await card.next_frame()
            effects = card.channel.receive_frame(frame)
            got = [e.message for e in effects if hasattr(e, "message")]
            expect(got == [EchoReply(data)], f"echo came back as {got}")
            return
        code = card.closed.code if card.closed else None
        if suite is Suite.DES_CBC_MD5 and not h.allow_insecure:
            expect(code is ErrorCode.INSECURE_SUITE_REFUSED, f"des-cbc-md5 must be refused unless enabled, got {code}")
        elif fs is ForwardSecrecy.REQUIRE:
            expect(code is ErrorCode.FORWARD_SECRECY_REQUIRED, f"handshake failed: {code}")
        else:
            raise Failed(f"handshake failed: {code}")
    finally:
        card.close()


async def wrong_pin(h: ServerHarness) -> None:
    card = RawCard(h.reactor, h.endpoint, "SHA256:" + "A" * 43, h.cfg())
    await card.open()
    hello = await card.next_frame()
    card._effects(card.channel.receive_frame(hello))
    expect(card.closed is not None and card.closed.code is ErrorCode.SERVER_KEY_MISMATCH, "a wrong pin went unnoticed")
    card.close()


async def _kt_with(h: ServerHarness, secrets_fn) -> None:
    card = await h.raw()
    hello_frame = await card.next_frame()
    hello = decode_frame(hello_frame)
    assert isinstance(hello, Hello)
    secrets = secrets_fn(hello)
    ct = crypto.RSAPublicKey(hello.server_key).oaep_encrypt(secrets.encode(), h.rand) if secrets else h.rand(
        crypto.RSAPublicKey(hello.server_key).bits // 8)
    kt = KeyTransport(r2=secrets.r2 if secrets else h.rand(32), suites=(Suite.AES256_GCM,), ciphertext=ct)
    card.write(encode_frame(kt))
    await _expect_alert(card, ErrorCode.HANDSHAKE_FAILED)


async def wrong_r1(h: ServerHarness) -> None:
    await _kt_with(h, lambda hello: SessionSecrets(r1=h.rand(32), r2=h.rand(32), s1=h.rand(32), s2=h.rand(32)))


async def garbage_kt(h: ServerHarness) -> None:
    await _kt_with(h, lambda hello: None)


async def downgrade(h: ServerHarness) -> None:
    card = await h.raw(suites=(Suite.AES256_GCM, Suite.CHACHA20_POLY1305))

    def strip(kt_frame: bytes) -> bytes:
        kt = decode_frame(kt_frame)
        return encode_frame(attrs.evolve(kt, suites=(Suite.CHACHA20_POLY1305,)))

    try:
        await card.handshake(tamper_kt=strip)
    except Failed:
        pass
    if card.closed is None:
        await card.expect_close(ErrorCode.KEY_CONFIRMATION_FAILED)
    expect(card.closed.code is ErrorCode.KEY_CONFIRMATION_FAILED, f"downgrade not detected: {card.closed}")
    card.close()


# ---------------------------------------------------------------- frames and records


async def tampered(h: ServerHarness) -> None:
    card = await h.established()
    rec = bytearray(card.seal(EchoRequest(b"x" * 32)))
    rec[-1] ^= 1
    card.write(bytes(rec))
    await card.expect_close(ErrorCode.BAD_RECORD)


async def replayed(h: ServerHarness) -> None:
    card = await h.established()
    rec = card.seal(EchoRequest(b"once"))
    card.write(rec)
    card._effects(card.channel.receive_frame(await card.next_frame()))
    card.write(rec)
    await card.expect_close(ErrorCode.REPLAYED_RECORD)


async def reordered(h: ServerHarness) -> None:
    card = await h.established()
    first, second = card.seal(EchoRequest(b"1")), card.seal(EchoRequest(b"2"))
    card.write(second + first)
    await card.expect_close(ErrorCode.OUT_OF_ORDER_RECORD)


async def oversized(h: ServerHarness) -> None:
    card = await h.established()
    card.write(FrameHeaderSchema.build(dict(magic=MAGIC, version=PROTOCOL_VERSION, type=0x10, length=MAX_FRAME_BODY + 1)))
    await card.expect_close(ErrorCode.FRAME_TOO_LARGE)


async def truncated(h: ServerHarness) -> None:
    card = await h.raw()
    await card.next_frame()
    card.write(build_header(0x02, 400) + b"\x00" * 100)
    card.proto.transport.loseWriteConnection() if hasattr(card.proto.transport, "loseWriteConnection") else card.close()
    await card.proto.lost
    other = await h.established()  # the server still serves everyone else
    other.close()


async def _after_hello_expect_alert(h: ServerHarness, data: bytes, code: ErrorCode) -> None:
    """Send ``data`` once the server's HELLO is in; the server must answer a plaintext ALERT(code)."""
    card = await h.raw()
    await card.next_frame()
    card.write(data)
    await _expect_alert(card, code)


async def _expect_alert(card, code: ErrorCode) -> None:
    frame = await card.next_frame()
    msg = decode_frame(frame) if isinstance(frame, bytes) else frame
    expect(isinstance(msg, Alert) and msg.code is code, f"expected {code.name}, got {msg!r}")
    card.close()


async def bad_magic(h: ServerHarness) -> None:
    await _after_hello_expect_alert(h, b"XX\x01\x02\x00\x00\x00\x00", ErrorCode.MALFORMED)


async def unknown_type(h: ServerHarness) -> None:
    await _after_hello_expect_alert(h, build_header(0x7E, 0), ErrorCode.UNKNOWN_TYPE)


async def big_echo(h: ServerHarness) -> None:
    proto = await h.connect()
    data = h.rand(32768)  # within the 64 KiB an unauthenticated channel may carry (§9.3)
    reply = await proto.request(EchoRequest(data))
    expect(reply == EchoReply(data), "32 KiB echo came back different")
    proto.closeChannel()


# ---------------------------------------------------------------- operations


async def life_cycle(h: ServerHarness) -> None:
    serial, _ = await h.enrolled()
    muk, secret = h.rand(32), h.rand(32)
    r = await h.insert(serial, muk, secret)
    expect(r.version == 1 and r.protected.startswith(b"opaque"), "download differs from what was enrolled")
    proto = await h.connect()
    r = await ops.sync(proto, serial, secret, 1, b"v2")
    expect(r.version == 2, f"sync gave version {r.version}")
    r = await ops.remove(proto, serial, secret, 2, b"v3")
    expect(r.version == 3, f"remove gave version {r.version}")
    proto.closeChannel()
    r = await h.insert(serial, h.rand(32), h.rand(32))
    expect(r.protected == b"v3", "the removed upload was not what the next insert downloaded")


async def repeat_insert(h: ServerHarness) -> None:
    serial, _ = await h.enrolled()
    muk, secret = h.rand(32), h.rand(32)
    a = await h.insert(serial, muk, secret)
    b = await h.insert(serial, muk, secret)
    expect((a.version, a.protected) == (b.version, b.protected), "a repeated insert gave a different check-out")


async def second_insert(h: ServerHarness) -> None:
    serial, _ = await h.enrolled()
    await h.insert(serial, h.rand(32), h.rand(32))
    st = await h.status(h.insert(serial, h.rand(32), h.rand(32)))
    expect(st is Status.IN_USE, f"expected IN_USE, got {st.name}")


async def recover(h: ServerHarness) -> None:
    serial, _ = await h.enrolled()
    muk = h.rand(32)
    await h.insert(serial, muk, h.rand(32))
    proto = await h.connect()
    st = await h.status(ops.recover(proto, serial, "conformance", h.rand(32), h.master))
    expect(st is Status.MUK_MISMATCH, f"recover from another machine: expected MUK_MISMATCH, got {st.name}")
    st = await h.status(ops.recover(proto, serial, "conformance", muk, h.master))
    expect(st is Status.OK, f"recover from the same machine: expected OK, got {st.name}")
    st = await h.status(ops.recover(proto, serial, "conformance", muk, h.master))
    expect(st is Status.NOT_IN_USE, f"recover when idle: expected NOT_IN_USE, got {st.name}")
    proto.closeChannel()


async def idle_refusals(h: ServerHarness) -> None:
    serial, _ = await h.enrolled()
    proto = await h.connect()
    st = await h.status(ops.remove(proto, serial, h.rand(32), 1, b"x"))
    expect(st is Status.REFUSED, f"remove when idle: expected REFUSED, got {st.name}")
    st = await h.status(ops.sync(proto, serial, h.rand(32), 1, b"x"))
    expect(st is Status.REFUSED, f"sync when idle: expected REFUSED, got {st.name}")
    proto.closeChannel()


async def destroy(h: ServerHarness) -> None:
    serial, _ = await h.enrolled()
    await h.insert(serial, h.rand(32), h.rand(32))
    proto = await h.connect()
    st = await h.status(ops.destroy(proto, serial, "conformance", h.master))
    expect(st is Status.OK, f"destroy from in-use: {st.name}")
    for name, coro in (("insert", ops.insert(proto, serial, "conformance", h.rand(32), h.rand(32), h.master)),
                       ("recover", ops.recover(proto, serial, "conformance", h.rand(32), h.master)),
                       ("destroy", ops.destroy(proto, serial, "conformance", h.master))):
        st = await h.status(coro)
        expect(st is Status.DESTROYED, f"{name} after destroy: expected DESTROYED, got {st.name}")
    proto.closeChannel()


async def uniform_refusal(h: ServerHarness) -> None:
    serial, _ = await h.enrolled()
    answers = []
    for s, pw in ((serial, "wrong password"), ("conf-nobody-" + h.rand(4).hex(), "conformance")):
        proto = await h.connect()
        first = await proto.request(OpRequest(op=Op.INSERT, serial=s, insert_secret=h.rand(32)))
        expect(isinstance(first, AuthChallenge), f"expected a challenge, got {type(first).__name__}")
        answers_, _ = ops.answer(first, s, pw, h.master, h.rand)
        result = await proto.request(AuthResponse(responses=tuple(answers_), muk=h.rand(32)))
        answers.append(result)
        proto.closeChannel()
    expect(all(isinstance(a, OpResult) and a.status is Status.REFUSED for a in answers), f"got {answers}")
    expect(answers[0] == answers[1], "a wrong password and an unknown serial were refused differently")


async def wrong_master(h: ServerHarness) -> None:
    serial, _ = await h.enrolled()
    st = await h.status(h.insert(serial, h.rand(32), h.rand(32), master=h.rand(32)))
    expect(st is Status.REFUSED, f"expected REFUSED, got {st.name}")


async def reused_code(h: ServerHarness) -> None:
    serial, code = h.new_card()
    kdf = ops.new_kdf(h.rand)
    keys = ops.derive_keys("x", kdf)
    proto = await h.connect()
    await ops.enrol(proto, serial, code, keys, kdf, b"first")
    st = await h.status(ops.enrol(proto, serial, code, keys, kdf, b"second"))
    expect(st is Status.REFUSED, f"expected REFUSED, got {st.name}")
    proto.closeChannel()


async def unanswered_challenge_holds_nothing(h: ServerHarness) -> None:
    """A stranger's open challenge on a serial must not block the owner's insert of it (§10.2)."""
    serial, _ = await h.enrolled()
    holder = await h.connect()
    first = await holder.request(OpRequest(op=Op.INSERT, serial=serial, insert_secret=h.rand(32)))
    expect(isinstance(first, AuthChallenge), "expected a challenge")
    st = await h.status(h.insert(serial, h.rand(32), h.rand(32)))
    holder.closeChannel()
    expect(st is Status.OK, f"an unanswered challenge held the serial: the owner's insert got {st.name}")


async def late_answer(h: ServerHarness) -> None:
    serial, _ = await h.enrolled()
    proto = await h.connect()
    first = await proto.request(OpRequest(op=Op.INSERT, serial=serial, insert_secret=h.rand(32)))
    expect(isinstance(first, AuthChallenge), "expected a challenge")
    t0 = h.reactor.seconds()
    result = await proto.nextMessage()  # the server must give up by itself
    waited = h.reactor.seconds() - t0
    expect(isinstance(result, OpResult) and result.status is Status.TIMEOUT, f"expected TIMEOUT, got {result!r}")
    expect(h.auth_deadline * 0.8 <= waited <= h.auth_deadline + 5,
           f"TIMEOUT came {waited:.1f} s after the challenge; the deadline is {h.auth_deadline:g} s")
    proto.closeChannel()
    st = await h.status(h.insert(serial, h.rand(32), h.rand(32)))
    expect(st is Status.OK, f"after a timeout the card must still be idle; insert gave {st.name}")




# ================================================================ issue 14: every security-relevant rule
#
# Each check below is one rule of docs/protocol.md, checked the way an attacker
# would try to break it; items.py names the § and §12 identifiers.

_TAG = {Suite.AES256_GCM: 16, Suite.CHACHA20_POLY1305: 16, Suite.AES256_CBC_HMAC_SHA256: 32, Suite.DES_CBC_MD5: 16}
_BLOCK = {Suite.AES256_GCM: 1, Suite.CHACHA20_POLY1305: 1, Suite.AES256_CBC_HMAC_SHA256: 16, Suite.DES_CBC_MD5: 8}


def _header(msg_type: int, length: int) -> bytes:
    """A frame header with any length (build_header refuses to announce more than MAX_FRAME_BODY)."""
    return FrameHeaderSchema.build(dict(magic=MAGIC, version=PROTOCOL_VERSION, type=msg_type, length=length))


def _record(seq: int, sealed: bytes) -> bytes:
    return build_header(0x10, 8 + len(sealed)) + seq.to_bytes(8, "big") + sealed


async def _suite_card(h: ServerHarness, suite: Suite) -> RawCard:
    card = await h.raw(suites=(suite,), fs=ForwardSecrecy.OFF)
    await card.handshake()
    expect(card.channel.established, f"{suite.label}: handshake failed: {card.closed}")
    return card


async def _bad_record(h: ServerHarness, suite: Suite, make, code: ErrorCode, what: str) -> None:
    """On a fresh channel of ``suite``: ``make(card)`` gives the bytes to send; the server must close with ``code``."""
    card = await _suite_card(h, suite)
    try:
        card.write(make(card))
        try:
            await card.expect_close(code)
        except Failed as e:
            raise Failed(f"{suite.label}, {what}: {e}") from None
    finally:
        card.close()


def _echo_sealed(card: RawCard) -> tuple[int, bytes]:
    frame = card.seal(EchoRequest(b""))
    return int.from_bytes(frame[8:16], "big"), frame[16:]


async def record_integrity(h: ServerHarness, suite: Suite) -> None:
    """
    §7.4-§7.6, §8: every byte of a sealed record — IV, ciphertext and each byte of
    the tag — flipped alone is BAD_RECORD; so is a record sealed for the other
    direction (reflection: the AAD's direction byte, which alone separates the
    directions of des-cbc-md5's one key).
    """
    probe = await _suite_card(h, suite)
    _, sealed = _echo_sealed(probe)
    probe.close()
    for i in range(len(sealed)):
        def flip(card, i=i):
            seq, s = _echo_sealed(card)
            return _record(seq, s[:i] + bytes([s[i] ^ 0x01]) + s[i + 1:])
        part = "tag" if i >= len(sealed) - _TAG[suite] else "body"
        await _bad_record(h, suite, flip, ErrorCode.BAD_RECORD, f"byte {i} of {len(sealed)} ({part}) flipped")

    def reflected(card):
        keys = card.channel._core.keys
        return _record(0, keys.server_to_card.seal(seq_bytes(0), encode_inner(EchoRequest(b"")),
                                                   record_aad(SERVER_TO_CARD, 0)))
    await _bad_record(h, suite, reflected, ErrorCode.BAD_RECORD, "a record sealed for server->card sent back")


async def record_lengths(h: ServerHarness, suite: Suite) -> None:
    """§7.4-§7.6: a truncated tag (one byte short, no tag), an extended one (a byte, a block more) and an empty sealed part are BAD_RECORD."""
    tag, block = _TAG[suite], _BLOCK[suite]
    cuts = {
        "tag one byte short": lambda s: s[:-1],
        "tag removed": lambda s: s[:-tag],
        "one byte appended": lambda s: s + b"\x00",
        "a block appended after the tag": lambda s: s + bytes(max(block, tag)),
        "tag doubled": lambda s: s + s[-tag:],
        "nothing sealed": lambda s: b"",
    }
    for what, cut in cuts.items():
        def make(card, cut=cut):
            seq, s = _echo_sealed(card)
            return _record(seq, cut(s))
        await _bad_record(h, suite, make, ErrorCode.BAD_RECORD, what)


async def replay_window(h: ServerHarness) -> None:
    """§8: no window at all — the record just accepted, and one three records back, replayed, are REPLAYED_RECORD."""
    for back in (1, 3):
        card = await h.established()
        try:
            sent = []
            for i in range(back):
                rec = card.seal(EchoRequest(bytes([i])))
                sent.append(rec)
                card.write(rec)
                card._effects(card.channel.receive_frame(await card.next_frame()))
            card.write(sent[-back])
            try:
                await card.expect_close(ErrorCode.REPLAYED_RECORD)
            except Failed as e:
                raise Failed(f"a record {back} back replayed: {e}") from None
        finally:
            card.close()


async def reorder_window(h: ServerHarness) -> None:
    """§8: a record one ahead (one dropped), far ahead (seq 2^63) or with its seq field flipped is OUT_OF_ORDER_RECORD."""
    for what in ("one ahead", "2^63 ahead", "seq byte 0 flipped", "seq byte 7 flipped"):
        card = await h.established()
        try:
            if what == "one ahead":
                card.seal(EchoRequest(b"dropped"))
                data = card.seal(EchoRequest(b"next"))
            elif what == "2^63 ahead":
                card.channel._core.send_seq = 1 << 63
                data = card.seal(EchoRequest(b"far"))
            else:
                frame = bytearray(card.seal(EchoRequest(b"x")))
                frame[8 + (0 if what.endswith("0 flipped") else 7)] ^= 0x01
                data = bytes(frame)
            card.write(data)
            try:
                await card.expect_close(ErrorCode.OUT_OF_ORDER_RECORD)
            except Failed as e:
                raise Failed(f"{what}: {e}") from None
        finally:
            card.close()


async def kt_length(h: ServerHarness) -> None:
    """§5.3, §6.5: a key-transport ciphertext one byte shorter or longer than the modulus is HANDSHAKE_FAILED, like an undecryptable one."""
    for delta in (-1, 1):
        card = await h.raw()
        hello = decode_frame(await card.next_frame())
        k = crypto.RSAPublicKey(hello.server_key).bits // 8
        secrets = SessionSecrets(r1=hello.r1, r2=h.rand(32), s1=h.rand(32), s2=h.rand(32))
        ct = crypto.RSAPublicKey(hello.server_key).oaep_encrypt(secrets.encode(), h.rand)
        ct = ct[:-1] if delta < 0 else ct + b"\x00"
        card.write(encode_frame(KeyTransport(r2=secrets.r2, suites=(Suite.AES256_GCM,), ciphertext=ct)))
        try:
            await _expect_alert(card, ErrorCode.HANDSHAKE_FAILED)
        except Failed as e:
            raise Failed(f"a {k + delta}-byte ciphertext for a {k}-byte modulus: {e}") from None


async def alert_not_answered(h: ServerHarness) -> None:
    """§9.2: an ALERT is never answered — with a known code, an unknown code (99) or a short body; before and after establishment."""
    for body in (b"\x00\x12", b"\x00\x63", b"\x00"):
        for established in (False, True):
            if established:
                card = await h.established()
            else:
                card = await h.raw()
                await card.next_frame()
            card.write(build_header(0x05, len(body)) + body)
            try:
                await card.expect_silence_then_close()
            except Failed as e:
                raise Failed(f"ALERT {body.hex()} {'after' if established else 'before'} establishment: {e}") from None
            finally:
                card.close()


async def close_not_answered(h: ServerHarness) -> None:
    """§9.2: a sealed CLOSE — CLOSE_NOTIFY or an unknown code — ends the channel and is never answered."""
    for inner in (b"\x20\x00\x00", b"\x20\x00\x63"):
        card = await h.established()
        keys = card.channel._core.keys
        card.write(_record(0, keys.card_to_server.seal(seq_bytes(0), inner, record_aad(CARD_TO_SERVER, 0))))
        try:
            await card.expect_silence_then_close()
        except Failed as e:
            raise Failed(f"CLOSE {inner[1:].hex()}: {e}") from None
        finally:
            card.close()


async def unsolicited_echo_reply(h: ServerHarness) -> None:
    """§5.8: an ECHO_REPLY nobody asked for is ignored (not UNEXPECTED_MESSAGE): the channel still answers an echo after it."""
    card = await h.established()
    try:
        card.write(card.seal(EchoReply(b"unsolicited")))
        got = await card.request(EchoRequest(b"still there?"))
        expect(got == EchoReply(b"still there?"), f"expected the echo, got {got!r}")
    finally:
        card.close()


async def out_of_place_types(h: ServerHarness) -> None:
    """§3 step 6, §8 step 5, F7: an inner-only type as a frame and a frame type in a record are UNEXPECTED_MESSAGE whatever the body."""
    for body in (b"", b"\x01\x02"):
        card = await h.established()
        card.write(build_header(0x31, len(body)) + body)
        try:
            await card.expect_close(ErrorCode.UNEXPECTED_MESSAGE)
        except Failed as e:
            raise Failed(f"OP_REQUEST as a frame, body {body.hex() or 'empty'}: {e}") from None
        finally:
            card.close()
    for inner in (b"\x05", b"\x01" + b"\x00" * 3):
        card = await h.established()
        keys = card.channel._core.keys
        card.write(_record(0, keys.card_to_server.seal(seq_bytes(0), inner, record_aad(CARD_TO_SERVER, 0))))
        try:
            await card.expect_close(ErrorCode.UNEXPECTED_MESSAGE)
        except Failed as e:
            raise Failed(f"frame type {inner[0]:#04x} in a record: {e}") from None
        finally:
            card.close()


async def unexpected_operation_message(h: ServerHarness) -> None:
    """§10.2, O8: an AUTH_RESPONSE without a challenge, and an OP_RESULT from a card, close with UNEXPECTED_MESSAGE."""
    for msg in (AuthResponse(responses=(AuthItem(AuthMethod.PASSWORD, b""),), muk=b""), OpResult(status=Status.OK)):
        card = await h.established()
        card.write(card.seal(msg))
        try:
            await card.expect_close(ErrorCode.UNEXPECTED_MESSAGE)
        except Failed as e:
            raise Failed(f"{type(msg).__name__} out of place: {e}") from None
        finally:
            card.close()


# ---------------------------------------------------------------- frame limits and idle timers (§3, §9.3)


async def handshake_frame_limit(h: ServerHarness) -> None:
    """§3, §9.3: before establishment a header announcing 4097 bytes is FRAME_TOO_LARGE at once (no body sent); 4096 is read."""
    card = await h.raw()
    await card.next_frame()
    card.write(build_header(0x02, MAX_HANDSHAKE_BODY + 1))
    await _expect_alert(card, ErrorCode.FRAME_TOO_LARGE)
    card = await h.raw()
    await card.next_frame()
    card.write(build_header(0x7E, MAX_HANDSHAKE_BODY) + bytes(MAX_HANDSHAKE_BODY))
    await _expect_alert(card, ErrorCode.UNKNOWN_TYPE)


async def unauthenticated_frame_limit(h: ServerHarness) -> None:
    """§9.3: established but unauthenticated, a record of exactly the limit is served and a header one byte over is FRAME_TOO_LARGE."""
    limit = h.settings.unauthenticated_body
    card = await h.established()
    try:
        data = h.rand(min(limit - (8 + 5 + 16), 65536))  # an AES-GCM ECHO_REQUEST record of (up to) the limit
        got = await card.request(EchoRequest(data), timeout=30)
        expect(got == EchoReply(data), "the echo at the limit came back different")
        card.write(_header(0x10, limit + 1))
        await card.expect_close(ErrorCode.FRAME_TOO_LARGE)
    finally:
        card.close()


async def _raw_insert(h: ServerHarness, card: RawCard, serial: str, muk: bytes, secret: bytes,
                      password: str = "conformance") -> OpResult:
    first = await card.request(OpRequest(op=Op.INSERT, serial=serial, insert_secret=secret))
    expect(isinstance(first, AuthChallenge), f"expected a challenge, got {first!r}")
    answers, _ = ops.answer(first, serial, password, h.master, h.rand)
    result = await card.request(AuthResponse(responses=tuple(answers), muk=muk))
    expect(isinstance(result, OpResult), f"expected OP_RESULT, got {result!r}")
    return result


async def authenticated_frame_limit(h: ServerHarness) -> None:
    """
    §9.3: an upload larger than the unauthenticated limit is FRAME_TOO_LARGE on a
    channel where no operation has passed, and stored on one where the insert did;
    after it a header over 1 MiB is FRAME_TOO_LARGE.
    """
    serial, _ = await h.enrolled()
    muk, secret = h.rand(32), h.rand(32)
    big = h.rand(max(h.settings.unauthenticated_body, 256 * 1024))[:524288]
    card = await h.established()
    try:
        r = await _raw_insert(h, card, serial, muk, secret)
        expect(r.status is Status.OK, f"insert: {r.status.name}")
        stranger = await h.established()
        try:
            stranger.write(stranger.seal(OpRequest(op=Op.SYNC, serial=serial, insert_secret=secret, version=1,
                                                   protected=big)))
            await stranger.expect_close(ErrorCode.FRAME_TOO_LARGE)
        finally:
            stranger.close()
        r = await card.request(OpRequest(op=Op.SYNC, serial=serial, insert_secret=secret, version=1, protected=big),
                               timeout=30)
        expect(isinstance(r, OpResult) and r.status is Status.OK and r.version == 2,
               f"a {len(big)}-byte upload after the insert: {r!r:.120}")
        card.write(_header(0x10, MAX_FRAME_BODY + 1))
        await card.expect_close(ErrorCode.FRAME_TOO_LARGE)
    finally:
        card.close()


async def _closed_after(h: ServerHarness, card: RawCard, at_least: float, at_most: float, t0: float) -> float:
    frame = await card.next_frame(timeout=at_most + 5)
    waited = h.reactor.seconds() - t0
    card.push_back(frame)
    await card.expect_close(ErrorCode.IDLE_TIMEOUT)
    expect(waited >= at_least, f"closed after {waited:.1f} s, before {at_least:g} s")
    return waited


async def unauthenticated_idle(h: ServerHarness) -> None:
    """§9.3: an unauthenticated channel gets CLOSE(IDLE_TIMEOUT) after unauthenticated_idle without a record; a record restarts the timer."""
    idle = h.settings.unauthenticated_idle
    card = await h.established()
    try:
        t0 = h.reactor.seconds()
        await h.sleep(idle * 0.6)
        got = await card.request(EchoRequest(b"keep"))
        expect(got == EchoReply(b"keep"), "echo failed")
        t1 = h.reactor.seconds()
        waited = await _closed_after(h, card, (t1 - t0) + idle * 0.8, idle * 2, t0)
        expect(waited <= (t1 - t0) + idle + 5, f"still open {waited:.1f} s after the last record (idle {idle:g} s)")
    finally:
        card.close()


async def authenticated_idle(h: ServerHarness) -> None:
    """§9.3: after an insert the channel outlives unauthenticated_idle and gets CLOSE(IDLE_TIMEOUT) after idle_timeout."""
    idle, short = h.settings.idle_timeout, h.settings.unauthenticated_idle
    serial, _ = await h.enrolled()
    card = await h.established()
    try:
        r = await _raw_insert(h, card, serial, h.rand(32), h.rand(32))
        expect(r.status is Status.OK, f"insert: {r.status.name}")
        t0 = h.reactor.seconds()
        waited = await _closed_after(h, card, max(short + 0.5, idle * 0.8) if idle > short else idle * 0.8,
                                     idle + 5, t0)
        expect(waited <= idle + 5, f"still open after {waited:.1f} s (idle_timeout {idle:g} s)")
    finally:
        card.close()


async def unauthenticated_connections_capped(h: ServerHarness) -> None:
    """§9.3: one source holds at most max_unauthenticated_per_source unauthenticated connections; one that authenticates frees its place."""
    n = h.settings.unauthenticated_per_source
    serial, _ = await h.enrolled()
    for attempt in range(3):
        # connections of earlier items the server has not yet seen close can only make it refuse EARLIER: retry
        # that case after a pause; being let in past the cap is never excused
        await h.sleep(1.0 + attempt)
        held: list[RawCard] = []
        try:
            first = await h.established()
            held.append(first)
            early = False
            for _ in range(n - 1):
                c = RawCard(h.reactor, h.endpoint, h.fp, h.cfg())
                await c.open()
                held.append(c)
                frame = await c.next_frame()
                if not (isinstance(frame, bytes) and frame[3] == 0x01):
                    early = True
                    break
            if early:
                continue
            extra = RawCard(h.reactor, h.endpoint, h.fp, h.cfg())
            await extra.open()
            held.append(extra)
            frame = await extra.next_frame()
            msg = decode_frame(frame) if isinstance(frame, bytes) else frame
            expect(msg == Alert(ErrorCode.SERVER_BUSY),
                   f"connection {n + 1} from one source: expected SERVER_BUSY, got {msg!r:.80}")
            r = await _raw_insert(h, first, serial, h.rand(32), h.rand(32))
            expect(r.status is Status.OK, f"insert: {r.status.name}")
            await h.sleep(0.2)
            again = RawCard(h.reactor, h.endpoint, h.fp, h.cfg())
            await again.open()
            held.append(again)
            frame = await again.next_frame()
            expect(isinstance(frame, bytes) and frame[3] == 0x01,
                   "after one connection authenticated, another was still refused: it kept counting")
            return
        finally:
            for c in held:
                c.close()
    raise Failed(f"fewer than {n} unauthenticated connections from one source were let in (3 tries)")


# ---------------------------------------------------------------- machine binding, versions, lockout (§10)


async def _request(h: ServerHarness, msg):
    proto = await h.connect()
    try:
        return await proto.request(msg)
    finally:
        proto.closeChannel()


async def repeat_insert_binding(h: ServerHarness) -> None:
    """§10.8, §10.13: a repeated insert is the same check-out only with the same insert secret AND the same MUK; otherwise IN_USE."""
    serial, _ = await h.enrolled()
    muk, secret = h.rand(32), h.rand(32)
    a = await h.insert(serial, muk, secret)
    st = await h.status(h.insert(serial, h.rand(32), secret))
    expect(st is Status.IN_USE, f"the same insert secret from another machine: expected IN_USE, got {st.name}")
    st = await h.status(h.insert(serial, muk, h.rand(32)))
    expect(st is Status.IN_USE, f"the same machine with another insert secret: expected IN_USE, got {st.name}")
    b = await h.insert(serial, muk, secret)
    expect((a.version, a.protected) == (b.version, b.protected), "the identical retry gave a different check-out")


async def session_binding(h: ServerHarness) -> None:
    """§10.9-§10.10, §10.13: sync, remove, attach and password change with another insert secret are REFUSED and change nothing."""
    serial, _ = await h.enrolled()
    muk, secret = h.rand(32), h.rand(32)
    await h.insert(serial, muk, secret)
    other = h.rand(32)
    kdf = ops.new_kdf(h.rand, log2_n=10)
    attempts = {
        "sync": OpRequest(op=Op.SYNC, serial=serial, insert_secret=other, version=1, protected=b"stranger"),
        "remove": OpRequest(op=Op.REMOVE, serial=serial, insert_secret=other, version=1, protected=b"stranger"),
        "attach": OpRequest(op=Op.ATTACH, serial=serial, insert_secret=other),
        "password change": ChangePassword(serial=serial, insert_secret=other, version=1, verifier=h.rand(32),
                                          kdf=kdf.encode(), protected=b"stranger"),
    }
    for what, msg in attempts.items():
        r = await _request(h, msg)
        expect(isinstance(r, OpResult) and r.status is Status.REFUSED,
               f"{what} with another insert secret: expected REFUSED, got {r!r:.100}")
    r = await _request(h, OpRequest(op=Op.SYNC, serial=serial, insert_secret=secret, version=1, protected=b"owner"))
    expect(r.status is Status.OK and r.version == 2, f"the owner's sync after them: {r!r:.100}")
    r = await _request(h, OpRequest(op=Op.SYNC, serial=serial, insert_secret=other, version=1, protected=b"owner"))
    expect(r.status is Status.REFUSED,
           f"the owner's sync 'retried' with another insert secret: expected REFUSED, got {r!r:.100}")
    r = await _request(h, OpRequest(op=Op.ATTACH, serial=serial, insert_secret=secret))
    expect(r.status is Status.OK, f"the owner's attach: {r.status.name}")


async def recover_binding(h: ServerHarness) -> None:
    """§10.11: recover with the right MUK but a wrong password is REFUSED; with the right password and another MUK MUK_MISMATCH; the card stays in use."""
    serial, _ = await h.enrolled()
    muk, secret = h.rand(32), h.rand(32)
    await h.insert(serial, muk, secret)
    proto = await h.connect()
    try:
        st = await h.status(ops.recover(proto, serial, "not the password", muk, h.master))
        expect(st is Status.REFUSED, f"recover with a wrong password: expected REFUSED, got {st.name}")
        st = await h.status(ops.recover(proto, serial, "conformance", h.rand(32), h.master))
        expect(st is Status.MUK_MISMATCH, f"recover from another machine: expected MUK_MISMATCH, got {st.name}")
    finally:
        proto.closeChannel()
    r = await _request(h, OpRequest(op=Op.SYNC, serial=serial, insert_secret=secret, version=1, protected=b"p"))
    expect(r.status is Status.OK, f"after the refused recovers the insert must still hold: sync gave {r.status.name}")


async def version_rules(h: ServerHarness) -> None:
    """
    §10.9-§10.10, §10.13: an upload based on an older or a newer version is
    VERSION_CONFLICT with the stored version; an identical retry is OK and
    changes nothing; a conflicting remove leaves the card in use; a remove
    retried after its answer was lost is OK, but not with another insert
    secret; the next insert downloads the last stored upload.
    """
    serial, _ = await h.enrolled()
    muk, secret = h.rand(32), h.rand(32)
    await h.insert(serial, muk, secret)

    def sync(v, p, op=Op.SYNC):
        return _request(h, OpRequest(op=op, serial=serial, insert_secret=secret, version=v, protected=p))

    r = await sync(1, b"two")
    expect(r.status is Status.OK and r.version == 2, f"sync on v1: {r!r:.100}")
    r = await sync(1, b"two")
    expect(r.status is Status.OK and r.version == 2, f"the identical retry: expected OK v2, got {r!r:.100}")
    for v, p, what in ((1, b"other", "a different upload on v1"), (3, b"x", "an upload on a future v3"),
                       (0, b"x", "an upload on v0")):
        r = await sync(v, p)
        expect(r.status is Status.VERSION_CONFLICT and r.version == 2,
               f"{what}: expected VERSION_CONFLICT with v2, got {r!r:.100}")
    r = await sync(1, b"x", Op.REMOVE)
    expect(r.status is Status.VERSION_CONFLICT and r.version == 2, f"remove on v1: expected VERSION_CONFLICT, got {r!r:.100}")
    kdf = ops.new_kdf(h.rand, log2_n=10)
    r = await _request(h, ChangePassword(serial=serial, insert_secret=secret, version=1, verifier=h.rand(32),
                                         kdf=kdf.encode(), protected=b"x"))
    expect(r.status is Status.VERSION_CONFLICT and r.version == 2,
           f"password change on v1: expected VERSION_CONFLICT, got {r!r:.100}")
    r = await sync(2, b"three")
    expect(r.status is Status.OK and r.version == 3, f"the card must still be in use after the conflicts: {r!r:.100}")
    r = await sync(3, b"four", Op.REMOVE)
    expect(r.status is Status.OK and r.version == 4, f"remove on v3: {r!r:.100}")
    r = await sync(3, b"four", Op.REMOVE)
    expect(r.status is Status.OK and r.version == 4, f"the remove retried: expected OK v4, got {r!r:.100}")
    r = await _request(h, OpRequest(op=Op.REMOVE, serial=serial, insert_secret=h.rand(32), version=3,
                                    protected=b"four"))
    expect(r.status is Status.REFUSED, f"the remove 'retried' with another insert secret: expected REFUSED, "
                                       f"got {r!r:.100}")
    got = await h.insert(serial, h.rand(32), h.rand(32))
    expect((got.version, got.protected) == (4, b"four"), f"the next insert downloaded v{got.version}")


async def lockout_counts(h: ServerHarness) -> None:
    """
    §10.6.1: after lockout_threshold wrong passwords from this source a correct
    answer (from another machine) is refused unevaluated — failures are counted;
    and the owner's correct answer from the card's last machine (its MUK) still
    gets in: the lockout does not count strangers' failures against the owner.
    """
    serial, _ = await h.enrolled()
    owner_muk, secret = h.rand(32), h.rand(32)
    await h.insert(serial, owner_muk, secret)
    r = await _request(h, OpRequest(op=Op.REMOVE, serial=serial, insert_secret=secret, version=1, protected=b"p"))
    expect(r.status is Status.OK, f"remove: {r.status.name}")
    for i in range(h.settings.lockout_threshold):
        st = await h.status(h.insert(serial, h.rand(32), h.rand(32), password=f"wrong {i}"))
        expect(st is Status.REFUSED, f"wrong password {i + 1}: expected REFUSED, got {st.name}")
    st = await h.status(h.insert(serial, h.rand(32), h.rand(32)))
    expect(st is Status.REFUSED,
           f"after {h.settings.lockout_threshold} failures a correct answer from another machine got {st.name}: "
           "failures are not counted")
    st = await h.status(h.insert(serial, owner_muk, h.rand(32)))
    expect(st is Status.OK, f"the owner's correct answer from its last machine got {st.name}: strangers locked it out")


async def storage_full(h: ServerHarness) -> None:
    """
    §10.3 STORAGE_FULL (needs --fill-storage/--free-storage: commands that fill
    and free the server's database storage): with the storage full an upload is
    answered STORAGE_FULL and nothing changes; once freed the same upload is
    stored at the next version.
    """
    serial, _ = await h.enrolled()
    secret = h.rand(32)
    proto = await h.connect()
    try:
        await ops.insert(proto, serial, "conformance", h.rand(32), secret, h.master)
        upload = h.rand(256 * 1024)
        h.run_hook(h.fill_storage_cmd, "fill-storage")
        try:
            r = await proto.request(OpRequest(op=Op.SYNC, serial=serial, insert_secret=secret, version=1,
                                              protected=upload))
        finally:
            h.run_hook(h.free_storage_cmd, "free-storage")
        expect(isinstance(r, OpResult) and r.status is Status.STORAGE_FULL,
               f"an upload to a full disk: expected STORAGE_FULL, got {r!r:.100}")
        r = await proto.request(OpRequest(op=Op.SYNC, serial=serial, insert_secret=secret, version=1,
                                          protected=upload))
        expect(r.status is Status.OK and r.version == 2,
               f"the same upload with room again: expected OK v2 (nothing changed before), got {r!r:.100}")
    finally:
        proto.closeChannel()


# ---------------------------------------------------------------- the handshake, byte by byte (§6)


async def client_finished_every_byte(h: ServerHarness) -> None:
    """§6.5, §7.3, S6: a CLIENT_FINISHED with any one of its 32 MAC bytes flipped -> plaintext ALERT(KEY_CONFIRMATION_FAILED)."""
    for i in range(32):
        card = await h.raw(fs=ForwardSecrecy.OFF)
        try:
            hello = await card.next_frame()
            (kt,) = card._effects(card.channel.receive_frame(hello))
            card.write(kt)
            sf = await card.next_frame()
            expect(isinstance(sf, bytes), f"server closed during the handshake: {sf!r}")
            (cf,) = card._effects(card.channel.receive_frame(sf))
            cf = bytearray(cf)
            cf[8 + i] ^= 0x01
            card.write(bytes(cf))
            try:
                await _expect_alert(card, ErrorCode.KEY_CONFIRMATION_FAILED)
            except Failed as e:
                raise Failed(f"CLIENT_FINISHED MAC byte {i} flipped: {e}") from None
        finally:
            card.close()


async def r2_mismatch(h: ServerHarness) -> None:
    """§6.5 step 3, S2: an r2 in the clear that differs from the encrypted r2 -> HANDSHAKE_FAILED."""
    card = await h.raw()
    hello = decode_frame(await card.next_frame())
    secrets = SessionSecrets(r1=hello.r1, r2=h.rand(32), s1=h.rand(32), s2=h.rand(32))
    ct = crypto.RSAPublicKey(hello.server_key).oaep_encrypt(secrets.encode(), h.rand)
    card.write(encode_frame(KeyTransport(r2=h.rand(32), suites=(Suite.AES256_GCM,), ciphertext=ct)))
    await _expect_alert(card, ErrorCode.HANDSHAKE_FAILED)


async def handshake_out_of_order(h: ServerHarness) -> None:
    """§6.2, B4: CLIENT_FINISHED before KEY_TRANSPORT, a HELLO sent to the server, a RECORD before CLIENT_FINISHED -> UNEXPECTED_MESSAGE."""
    card = await h.raw()
    await card.next_frame()
    card.write(encode_frame(ClientFinished(mac=bytes(32))))
    await _expect_alert(card, ErrorCode.UNEXPECTED_MESSAGE)
    card = await h.raw()
    hello = await card.next_frame()
    card.write(hello)
    await _expect_alert(card, ErrorCode.UNEXPECTED_MESSAGE)
    card = await h.raw(fs=ForwardSecrecy.OFF)
    hello = await card.next_frame()
    (kt,) = card._effects(card.channel.receive_frame(hello))
    card.write(kt)
    sf = await card.next_frame()
    expect(isinstance(sf, bytes), f"server closed during the handshake: {sf!r}")
    card._effects(card.channel.receive_frame(sf))  # the CLIENT_FINISHED it produces is not sent
    card.write(card.seal(EchoRequest(b"early")))
    try:
        await _expect_alert(card, ErrorCode.UNEXPECTED_MESSAGE)
    except Failed as e:
        raise Failed(f"a RECORD before CLIENT_FINISHED: {e}") from None


async def handshake_timer(h: ServerHarness) -> None:
    """§6.3, B3: no KEY_TRANSPORT within the handshake timeout -> plaintext ALERT(HANDSHAKE_TIMEOUT), not before."""
    limit = h.settings.handshake_timeout
    card = await h.raw()
    await card.next_frame()
    t0 = h.reactor.seconds()
    frame = await card.next_frame(timeout=limit + 5)
    waited = h.reactor.seconds() - t0
    card.push_back(frame)
    await _expect_alert(card, ErrorCode.HANDSHAKE_TIMEOUT)
    expect(waited >= limit * 0.8, f"the handshake timed out after {waited:.1f} s, before {limit:g} s")


async def unanswered_challenges_count(h: ServerHarness) -> None:
    """
    §10.6.1, #11: a challenge left unanswered until the deadline counts like a
    failed authentication: after lockout_threshold of them from this source, a
    correct answer from another machine is refused; the owner's last machine
    still gets in.
    """
    serial, _ = await h.enrolled()
    owner_muk, secret = h.rand(32), h.rand(32)
    await h.insert(serial, owner_muk, secret)
    r = await _request(h, OpRequest(op=Op.REMOVE, serial=serial, insert_secret=secret, version=1, protected=b"p"))
    expect(r.status is Status.OK, f"remove: {r.status.name}")
    holders = [await h.connect() for _ in range(h.settings.lockout_threshold)]
    try:
        for p in holders:
            first = await p.request(OpRequest(op=Op.INSERT, serial=serial, insert_secret=h.rand(32)))
            expect(isinstance(first, AuthChallenge), f"expected a challenge, got {type(first).__name__}")
        for p in holders:
            result = await p.nextMessage()
            expect(isinstance(result, OpResult) and result.status is Status.TIMEOUT, f"expected TIMEOUT, got {result!r}")
    finally:
        for p in holders:
            p.closeChannel()
    st = await h.status(h.insert(serial, h.rand(32), h.rand(32)))
    expect(st is Status.REFUSED, f"after {h.settings.lockout_threshold} unanswered challenges a correct answer from "
                                 f"another machine got {st.name}: they were not counted")
    st = await h.status(h.insert(serial, owner_muk, h.rand(32)))
    expect(st is Status.OK, f"the owner's last machine got {st.name} after strangers' unanswered challenges")


async def master_mac_every_end(h: ServerHarness) -> None:
    """§10.6.2, O3: a MasterResponse whose MAC has its first or its last byte flipped (all else right) -> REFUSED."""
    serial, _ = await h.enrolled()
    for i in (0, 63):  # the MAC is bytes 32..63 of the answer; byte 0 is ri2's: the MAC covers it too
        proto = await h.connect()
        try:
            first = await proto.request(OpRequest(op=Op.INSERT, serial=serial, insert_secret=h.rand(32)))
            expect(isinstance(first, AuthChallenge), f"expected a challenge, got {type(first).__name__}")
            answers, _ = ops.answer(first, serial, "conformance", h.master, h.rand)
            changed = []
            for a in answers:
                if a.method is AuthMethod.MASTER_KEY:
                    data = bytearray(a.data)
                    data[i] ^= 0x01
                    a = AuthItem(a.method, bytes(data))
                changed.append(a)
            expect(any(a.method is AuthMethod.MASTER_KEY for a in answers), "the server did not ask for the Master key")
            result = await proto.request(AuthResponse(responses=tuple(changed), muk=h.rand(32)))
            expect(isinstance(result, OpResult) and result.status is Status.REFUSED,
                   f"a Master-key answer with byte {i} flipped: expected REFUSED, got {result!r:.80}")
        finally:
            proto.closeChannel()


async def wrong_code(h: ServerHarness) -> None:
    """§10.7: an enrolment with a wrong code (one character changed) -> REFUSED, creating nothing; the right code then enrols."""
    serial, code = h.new_card()
    kdf = ops.new_kdf(h.rand, log2_n=10)
    keys = ops.derive_keys("x", kdf)
    proto = await h.connect()
    try:
        alnum = [i for i, ch in enumerate(code) if ch.isalnum()]
        i = alnum[-1]
        wrong = code[:i] + ("A" if code[i].upper() != "A" else "B") + code[i + 1:]
        st = await h.status(ops.enrol(proto, serial, wrong, keys, kdf, b"wrong"))
        expect(st is Status.REFUSED, f"a wrong code: expected REFUSED, got {st.name}")
        st = await h.status(ops.enrol(proto, serial, code, keys, kdf, b"right"))
        expect(st is Status.OK, f"the right code after a wrong one: expected OK, got {st.name}")
    finally:
        proto.closeChannel()


async def server_preference(h: ServerHarness) -> None:
    """
    §6.3, S4: the server chooses the first suite of ITS list that the card
    offered, whatever the card's order; it never picks des-cbc-md5 first
    unless its own list puts it there (and it is enabled).
    """
    mine = [s for s in h.settings.suites if s is not Suite.DES_CBC_MD5 or h.allow_insecure]
    expect(bool(mine), "the server's suite list (--server-suites) is empty")
    offers = [tuple(reversed(mine))]
    if not h.allow_insecure and len(mine) >= 1:
        offers.append((Suite.DES_CBC_MD5,) + tuple(reversed(mine)))
    for offer in offers:
        card = await h.raw(suites=offer, fs=ForwardSecrecy.OFF)
        try:
            hello = await card.next_frame()
            (kt,) = card._effects(card.channel.receive_frame(hello))
            card.write(kt)
            sf = await card.next_frame()
            msg = decode_frame(sf) if isinstance(sf, bytes) else sf
            expect(getattr(msg, "suite", None) is mine[0],
                   f"offered {','.join(s.label for s in offer)}: the server chose "
                   f"{getattr(getattr(msg, 'suite', None), 'label', msg)!r}, its own first is {mine[0].label}")
        finally:
            card.close()


# ---------------------------------------------------------------- found missing by the mutation self-test (tools/mutate.py)


async def missing_answer(h: ServerHarness) -> None:
    """An AUTH_RESPONSE without the answer to the last challenged method (§10.6.1, [0084]) is REFUSED; a whole one is OK."""
    serial, _ = await h.enrolled()
    proto = await h.connect()
    try:
        first = await proto.request(OpRequest(op=Op.INSERT, serial=serial, insert_secret=h.rand(32)))
        expect(isinstance(first, AuthChallenge) and len(first.challenges) >= 2,
               f"expected a challenge of at least two methods, got {first!r}")
        answers, _ = ops.answer(first, serial, "conformance", h.master, h.rand)
        result = await proto.request(AuthResponse(responses=tuple(answers[:-1]), muk=h.rand(32)))
        expect(isinstance(result, OpResult) and result.status is Status.REFUSED,
               f"an answer missing one method: expected REFUSED, got {result!r}")
    finally:
        proto.closeChannel()
    st = await h.status(h.insert(serial, h.rand(32), h.rand(32)))
    expect(st is Status.OK, f"then a whole answer: expected OK, got {st.name}")


async def insert_without_secret(h: ServerHarness) -> None:
    """An insert whose insert secret is not 32 bytes (empty) is BAD_REQUEST even with every answer right (§10.8)."""
    serial, _ = await h.enrolled()
    proto = await h.connect()
    try:
        st = await h.status(ops.insert(proto, serial, "conformance", h.rand(32), b"", h.master))
        expect(st is Status.BAD_REQUEST, f"an insert without an insert secret: expected BAD_REQUEST, got {st.name}")
    finally:
        proto.closeChannel()
    st = await h.status(h.insert(serial, h.rand(32), h.rand(32)))
    expect(st is Status.OK, f"the card must still be idle; an insert gave {st.name}")


async def owner_machine_throttled(h: ServerHarness) -> None:
    """
    §10.6.1: the owner's last machine has its own bucket, and it throttles
    too: after the lockout threshold of wrong passwords sent with the MUK of
    the card's last insert, that machine's next (correct) answer is refused
    unevaluated.
    """
    threshold = h.settings.lockout_threshold
    serial, _ = await h.enrolled()
    owner_muk, secret = h.rand(32), h.rand(32)
    await h.insert(serial, owner_muk, secret)
    proto = await h.connect()
    try:
        await ops.remove(proto, serial, secret, 1, b"removed")
    finally:
        proto.closeChannel()
    for i in range(threshold):
        st = await h.status(h.insert(serial, owner_muk, h.rand(32), password=f"wrong {i}"))
        expect(st is Status.REFUSED, f"wrong password {i + 1} from the last machine: expected REFUSED, got {st.name}")
    st = await h.status(h.insert(serial, owner_muk, h.rand(32)))
    expect(st is Status.REFUSED, f"after {threshold} failures from the card's last machine its correct answer got "
                                 f"{st.name}: that machine's bucket does not throttle")


async def password_change(h: ServerHarness) -> None:
    """
    §10.9, §10.13: a password change while in use is OK with v + 1 and stores
    the new verifier and KDF with the upload: after the remove the old
    password is REFUSED and the new one inserts (downloading that upload).
    Its identical retry is OK with the stored version; one "retried" with
    another verifier is VERSION_CONFLICT (it is not the change that was
    stored).
    """
    serial, _ = await h.enrolled()
    muk, secret = h.rand(32), h.rand(32)
    await h.insert(serial, muk, secret)
    kdf = ops.new_kdf(h.rand, log2_n=10)
    verifier = auth.verifier_for(ops.derive_keys("changed", kdf).auth_key, kdf.alg)

    def change(v: bytes):
        return _request(h, ChangePassword(serial=serial, insert_secret=secret, version=1, verifier=v,
                                          kdf=kdf.encode(), protected=b"re-wrapped"))

    r = await change(verifier)
    expect(isinstance(r, OpResult) and r.status is Status.OK and r.version == 2, f"password change on v1: {r!r:.100}")
    r = await change(verifier)
    expect(r.status is Status.OK and r.version == 2, f"the identical retry: expected OK v2, got {r!r:.100}")
    r = await change(h.rand(32))
    expect(r.status is Status.VERSION_CONFLICT and r.version == 2,
           f"a 'retry' with another verifier: expected VERSION_CONFLICT with v2, got {r!r:.100}")
    r = await _request(h, OpRequest(op=Op.REMOVE, serial=serial, insert_secret=secret, version=2,
                                    protected=b"re-wrapped"))
    expect(r.status is Status.OK and r.version == 3, f"remove on v2: {r!r:.100}")
    st = await h.status(h.insert(serial, h.rand(32), h.rand(32)))
    expect(st is Status.REFUSED, f"an insert with the old password after the change: expected REFUSED, got {st.name}")
    # from the card's last machine (its own lockout bucket: the refusals above count for this source)
    got = await h.insert(serial, muk, h.rand(32), password="changed")
    expect((got.version, got.protected) == (3, b"re-wrapped"), f"the insert with the new password got v{got.version}")


async def idle_remove_retry(h: ServerHarness) -> None:
    """
    §10.10: on an idle card a remove is OK only as the remove that made it
    idle, retried: the same insert secret, v = stored - 1 and the stored
    upload; the same secret with another upload, or based on the stored
    version, is REFUSED and changes nothing.
    """
    serial, _ = await h.enrolled()
    muk, secret = h.rand(32), h.rand(32)
    await h.insert(serial, muk, secret)

    def remove(v: int, p: bytes):
        return _request(h, OpRequest(op=Op.REMOVE, serial=serial, insert_secret=secret, version=v, protected=p))

    r = await remove(1, b"removed")
    expect(isinstance(r, OpResult) and r.status is Status.OK and r.version == 2, f"remove on v1: {r!r:.100}")
    for v, p, what in ((1, b"another upload", "with another upload"), (2, b"removed", "based on the stored v2")):
        r = await remove(v, p)
        expect(r.status is Status.REFUSED, f"a remove 'retried' on the idle card {what}: expected REFUSED, "
                                           f"got {r!r:.100}")
    r = await remove(1, b"removed")
    expect(r.status is Status.OK and r.version == 2, f"the remove retried: expected OK v2, got {r!r:.100}")
    got = await h.insert(serial, muk, h.rand(32))  # the last machine: the refusals above count for this source
    expect((got.version, got.protected) == (2, b"removed"), f"the next insert downloaded v{got.version}")


async def recover_forgets_session(h: ServerHarness) -> None:
    """
    §10.11, §10.13: recover forgets the insert's MUK and session, so that
    insert's secret has no authority left: a remove "retried" with it after
    the recover (v = stored - 1, the stored upload) is REFUSED; the next
    insert downloads the last sync.
    """
    serial, _ = await h.enrolled()
    muk, secret = h.rand(32), h.rand(32)
    await h.insert(serial, muk, secret)
    r = await _request(h, OpRequest(op=Op.SYNC, serial=serial, insert_secret=secret, version=1, protected=b"synced"))
    expect(r.status is Status.OK and r.version == 2, f"sync on v1: {r!r:.100}")
    proto = await h.connect()
    try:
        await ops.recover(proto, serial, "conformance", muk, h.master)
    finally:
        proto.closeChannel()
    r = await _request(h, OpRequest(op=Op.REMOVE, serial=serial, insert_secret=secret, version=1, protected=b"synced"))
    expect(r.status is Status.REFUSED, f"a remove with the recovered insert's secret: expected REFUSED, got {r!r:.100}")
    got = await h.insert(serial, muk, h.rand(32))
    expect((got.version, got.protected) == (2, b"synced"), f"the next insert downloaded v{got.version}")


async def success_resets_source_bucket(h: ServerHarness) -> None:
    """
    §10.6.1: a success resets the bucket it was counted in and the source's
    bucket for that card: after lockout_threshold - 1 wrong passwords, a
    correct insert (then a remove) and one more wrong password, a correct
    answer from another machine is still evaluated and OK.
    """
    t = h.settings.lockout_threshold
    serial, _ = await h.enrolled()
    for i in range(t - 1):
        st = await h.status(h.insert(serial, h.rand(32), h.rand(32), password=f"wrong {i}"))
        expect(st is Status.REFUSED, f"wrong password {i + 1}: expected REFUSED, got {st.name}")
    secret = h.rand(32)
    await h.insert(serial, h.rand(32), secret)
    r = await _request(h, OpRequest(op=Op.REMOVE, serial=serial, insert_secret=secret, version=1, protected=b"p"))
    expect(r.status is Status.OK, f"remove: {r.status.name}")
    if t >= 2:
        st = await h.status(h.insert(serial, h.rand(32), h.rand(32), password="wrong again"))
        expect(st is Status.REFUSED, f"a wrong password after the success: expected REFUSED, got {st.name}")
    st = await h.status(h.insert(serial, h.rand(32), h.rand(32)))
    expect(st is Status.OK, f"a correct answer after {t - 1} failures, a success and one failure got {st.name}: "
                            "the success did not reset the source's count")


async def refused_operation_keeps_limits(h: ServerHarness) -> None:
    """
    §9.3, L1: only an operation that passed its authority raises a channel's
    limits: after a sync and an attach refused (another insert secret; no such
    card), a header one byte over the unauthenticated limit is still
    FRAME_TOO_LARGE.
    """
    limit = h.settings.unauthenticated_body
    card = await h.established()
    try:
        serial = "conf-none-" + h.rand(5).hex()
        for msg in (OpRequest(op=Op.SYNC, serial=serial, insert_secret=h.rand(32), version=1, protected=b"x"),
                    OpRequest(op=Op.ATTACH, serial=serial, insert_secret=h.rand(32))):
            r = await card.request(msg)
            expect(isinstance(r, OpResult) and r.status is Status.REFUSED,
                   f"{msg.op.name} for no card: expected REFUSED, got {r!r:.100}")
        card.write(_header(0x10, limit + 1))
        await card.expect_close(ErrorCode.FRAME_TOO_LARGE)
    finally:
        card.close()


async def replayed_key_transport(h: ServerHarness) -> None:
    """
    §6.3, S1: HELLO's r1 is fresh per connection, so a recorded handshake
    cannot be replayed: a KEY_TRANSPORT the server accepted on one connection,
    sent again on a new one, -> HANDSHAKE_FAILED (wrong r1).
    """
    card = await h.raw(fs=ForwardSecrecy.OFF)
    try:
        first = await card.next_frame()
        (kt,) = card._effects(card.channel.receive_frame(first))
        card.write(kt)
        sf = await card.next_frame()
        expect(isinstance(sf, bytes) and sf[3] == 0x03, f"the server did not accept the key transport: {sf!r:.80}")
    finally:
        card.close()
    again = await h.raw(fs=ForwardSecrecy.OFF)
    try:
        hello = await again.next_frame()
        expect(decode_frame(hello).r1 != decode_frame(first).r1, "two connections got the same r1 in HELLO")
        again.write(kt)
        try:
            await _expect_alert(again, ErrorCode.HANDSHAKE_FAILED)
        except Failed as e:
            raise Failed(f"a replayed KEY_TRANSPORT: {e}") from None
    finally:
        again.close()


async def small_order_x25519(h: ServerHarness) -> None:
    """
    §6.5, B2 (S3): a KEY_TRANSPORT whose X25519 key is all zero (a small-order
    point: the shared secret is all zero) -> HANDSHAKE_FAILED, every other field
    right; a server that offered no X25519 key answers UNEXPECTED_MESSAGE.
    """
    card = await h.raw()
    try:
        hello = decode_frame(await card.next_frame())
        secrets = SessionSecrets(r1=hello.r1, r2=h.rand(32), s1=h.rand(32), s2=h.rand(32))
        ct = crypto.RSAPublicKey(hello.server_key).oaep_encrypt(secrets.encode(), h.rand)
        suites = tuple(s for s in h.settings.suites if s is not Suite.DES_CBC_MD5) or (Suite.AES256_GCM,)
        card.write(encode_frame(KeyTransport(r2=secrets.r2, suites=suites, fs_public=bytes(32), ciphertext=ct)))
        code = ErrorCode.HANDSHAKE_FAILED if hello.fs_public else ErrorCode.UNEXPECTED_MESSAGE
        await _expect_alert(card, code)
    finally:
        card.close()
