"""
The server-mode checks, one async function each, taking the run's
``ServerHarness``; a check returns when the server behaved as
docs/protocol.md says and raises ``Failed`` (one line) when it did not.
Which checks run, under which name and for which § of the spec:
vsc.conformance.items.
"""

from __future__ import annotations

import attrs

from vsc import crypto
from vsc.card import ops
from vsc.conformance.raw import Failed, RawCard, expect
from vsc.conformance.server import ServerHarness
from vsc.protocol.suites import ForwardSecrecy
from vsc.wire import ErrorCode, decode_frame, encode_frame
from vsc.wire.codec import MAGIC, MAX_FRAME_BODY, PROTOCOL_VERSION, FrameHeaderSchema, build_header
from vsc.wire.messages import Alert, ClientFinished, EchoReply, EchoRequest, Hello, KeyTransport, SessionSecrets, Suite
from vsc.wire.ops import AuthChallenge, AuthMethod, AuthResponse, MasterResponse, Op, OpRequest, OpResult, Status


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
    result = await proto.nextMessage()  # the server must give up by itself
    expect(isinstance(result, OpResult) and result.status is Status.TIMEOUT, f"expected TIMEOUT, got {result!r}")
    proto.closeChannel()
    st = await h.status(h.insert(serial, h.rand(32), h.rand(32)))
    expect(st is Status.OK, f"after a timeout the card must still be idle; insert gave {st.name}")




# ---------------------------------------------------------------- found missing by the mutation self-test (tools/mutate.py)


async def r2_mismatch(h: ServerHarness) -> None:
    """A key transport whose r1 is right but whose clear r2 differs from the r2 inside (§6.5): HANDSHAKE_FAILED."""
    card = await h.raw()
    hello = decode_frame(await card.next_frame())
    expect(isinstance(hello, Hello), f"expected HELLO, got {hello!r}")
    secrets = SessionSecrets(r1=hello.r1, r2=h.rand(32), s1=h.rand(32), s2=h.rand(32))
    ct = crypto.RSAPublicKey(hello.server_key).oaep_encrypt(secrets.encode(), h.rand)
    card.write(encode_frame(KeyTransport(r2=h.rand(32), suites=(Suite.AES256_GCM,), ciphertext=ct)))
    await _expect_alert(card, ErrorCode.HANDSHAKE_FAILED)


async def client_finished_tampered(h: ServerHarness) -> None:
    """CLIENT_FINISHED with its first or last MAC byte changed (§7.3): plaintext ALERT(KEY_CONFIRMATION_FAILED), no record served."""
    for index in (0, 31):
        card = await h.raw()
        try:
            hello = await card.next_frame()
            sends = card._effects(card.channel.receive_frame(hello))
            expect(len(sends) == 1, f"card rejected the Hello: {card.closed}")
            card.write(sends[0])
            sends = card._effects(card.channel.receive_frame(await card.next_frame()))
            expect(len(sends) == 1 and card.channel.established, f"handshake failed: {card.closed}")
            cf = decode_frame(sends[0])
            mac = bytearray(cf.mac)
            mac[index] ^= 0x01
            card.write(encode_frame(ClientFinished(mac=bytes(mac))))
            card.write(card.seal(EchoRequest(b"after a bad client finished")))  # a server that accepted answers it
            frame = await card.next_frame()
            msg = decode_frame(frame) if isinstance(frame, bytes) else frame
            expect(isinstance(msg, Alert) and msg.code is ErrorCode.KEY_CONFIRMATION_FAILED,
                   f"MAC byte {index} changed: expected KEY_CONFIRMATION_FAILED, got {msg!r}")
        finally:
            card.close()


async def wrong_code(h: ServerHarness) -> None:
    """Enrolment with another code than the one issued (one character changed) is REFUSED; the issued code still works."""
    serial, code = h.new_card()
    kdf = ops.new_kdf(h.rand)
    keys = ops.derive_keys("x", kdf)
    wrong = code[:-1] + ("B" if code[-1:].upper() == "A" else "A")
    proto = await h.connect()
    try:
        st = await h.status(ops.enrol(proto, serial, wrong, keys, kdf, b"first"))
        expect(st is Status.REFUSED, f"a wrong enrolment code: expected REFUSED, got {st.name}")
        st = await h.status(ops.enrol(proto, serial, code, keys, kdf, b"first"))
        expect(st is Status.OK, f"the issued code after a wrong one: expected OK, got {st.name}")
    finally:
        proto.closeChannel()


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


async def master_key_tampered(h: ServerHarness) -> None:
    """A Master-key answer computed with the right key but its last MAC byte changed (§10.6.2) is REFUSED."""
    serial, _ = await h.enrolled()
    proto = await h.connect()
    try:
        first = await proto.request(OpRequest(op=Op.INSERT, serial=serial, insert_secret=h.rand(32)))
        expect(isinstance(first, AuthChallenge), f"expected a challenge, got {first!r}")
        answers, _ = ops.answer(first, serial, "conformance", h.master, h.rand)
        expect(any(a.method is AuthMethod.MASTER_KEY for a in answers), "the server did not challenge the Master key")
        changed = []
        for a in answers:
            if a.method is AuthMethod.MASTER_KEY:
                resp = MasterResponse.decode(a.data)
                a = attrs.evolve(a, data=attrs.evolve(resp, mac=resp.mac[:-1] + bytes([resp.mac[-1] ^ 1])).encode())
            changed.append(a)
        result = await proto.request(AuthResponse(responses=tuple(changed), muk=h.rand(32)))
        expect(isinstance(result, OpResult) and result.status is Status.REFUSED,
               f"a Master-key MAC with its last byte changed: expected REFUSED, got {result!r}")
    finally:
        proto.closeChannel()


async def owner_machine_throttled(h: ServerHarness) -> None:
    """
    §10.6.1: the owner's last machine has its own bucket, and it throttles
    too: after the lockout threshold of wrong passwords sent with the MUK of
    the card's last insert, that machine's next (correct) answer is refused
    unevaluated.
    """
    settings = getattr(h, "settings", None)
    threshold = settings.lockout_threshold if settings is not None else 5  # the server's lockout_threshold
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
