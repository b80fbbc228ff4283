"""
``vsc conformance``: the protocol conformance harness of docs/protocol.md,
run against any implementation over the network.

Server mode (``--server ENDPOINT --server-key FP``) plays a card — a correct
one and a hostile one — against the server under test: the handshake for
every suite, every operation, every life-cycle transition and refusal, and
every error path (tampered, replayed, reordered, truncated and oversized
records, a wrong r1, an implementation-auth answer later than the deadline,
busy and destroyed serials). New cards are created on the server under test
through a provisioning hook: ``--provision "CMD {serial}"`` is run for each
serial and must print the one-time enrolment code (``vsc admin --data-dir D
issue {serial} --json`` does).

Card mode (``--card``) plays the server for a card under test: a correct
server, then servers that misbehave one way each (wrong key, a suite the
card did not offer, a bad key-confirmation MAC, a tampered record, an alert
mid-handshake, no answer at all); ``--card-command`` runs the card against
each and must succeed only against the correct one.

Prints a pass/fail table; exits non-zero on any failure.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time  # clock-ok: a command-line tool (or the harness) reads the wall clock
from typing import Awaitable, Callable

import attrs
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.endpoints import clientFromString
from twisted.internet.protocol import Factory, Protocol

from vsc import crypto
from vsc.card import ops
from vsc.card.connect import connect
from vsc.protocol.channel import Closed, Send, card_channel
from vsc.protocol.suites import ChannelConfig, ForwardSecrecy
from vsc.wire import Deframer, ErrorCode, WireError, decode_frame, encode_frame
from vsc.wire.codec import MAGIC, MAX_FRAME_BODY, PROTOCOL_VERSION, FrameHeaderSchema, build_header
from vsc.wire.messages import Alert, EchoReply, EchoRequest, Hello, KeyTransport, SessionSecrets, Suite
from vsc.wire.ops import AuthResponse, AuthChallenge, Op, OpRequest, OpResult, Status


@attrs.define
class Result:
    area: str
    name: str
    ok: bool
    detail: str = ""
    seconds: float = 0.0


class Failed(Exception):
    pass


def expect(cond: bool, detail: str) -> None:
    if not cond:
        raise Failed(detail)


# ---------------------------------------------------------------- a raw connection with a sans-IO card channel


class _Raw(Protocol):
    def __init__(self):
        self.deframer = Deframer(MAX_FRAME_BODY)
        self.frames: DeferredQueue = DeferredQueue()
        self.lost: Deferred = Deferred()

    def dataReceived(self, data: bytes) -> None:
        try:
            for frame in self.deframer.feed(data):
                self.frames.put(frame)
        except WireError as e:
            self.frames.put(e)

    def connectionLost(self, reason=None) -> None:
        self.frames.put(None)
        if not self.lost.called:
            self.lost.callback(None)


class RawCard:
    """A card-side channel whose bytes the harness controls."""

    def __init__(self, reactor, endpoint: str, fingerprint: str, config: ChannelConfig):
        self.reactor = reactor
        self.endpoint = endpoint
        self.channel = card_channel(config, fingerprint)
        self.proto: _Raw | None = None
        self.closed: Closed | None = None

    async def open(self) -> None:
        self.proto = await clientFromString(self.reactor, self.endpoint).connect(Factory.forProtocol(_Raw))
        self._effects(self.channel.start())

    def _effects(self, effects) -> list[bytes]:
        out = []
        for e in effects:
            if isinstance(e, Send):
                out.append(e.data)
            elif isinstance(e, Closed):
                self.closed = e
        return out

    def write(self, data: bytes) -> None:
        self.proto.transport.write(data)

    async def next_frame(self, timeout: float = 10.0):
        d = self.proto.frames.get()
        timer = self.reactor.callLater(timeout, lambda: d.called or d.errback(Failed(f"no answer within {timeout:g} s")))
        try:
            return await d
        finally:
            if timer.active():
                timer.cancel()

    async def handshake(self, tamper_kt: Callable[[bytes], bytes] | None = None) -> None:
        hello = await self.next_frame()
        expect(isinstance(hello, bytes), f"expected Hello, got {hello!r}")
        sends = self._effects(self.channel.receive_frame(hello))
        expect(len(sends) == 1 and self.closed is None, f"card rejected the Hello: {self.closed}")
        kt = sends[0]
        self.write(tamper_kt(kt) if tamper_kt else kt)
        sf = await self.next_frame()
        if sf is None or isinstance(sf, WireError):
            raise Failed(f"server closed during the handshake: {sf}")
        for data in self._effects(self.channel.receive_frame(sf)):
            self.write(data)

    def seal(self, msg) -> bytes:
        (data,) = self._effects(self.channel.send(msg))
        return data

    async def expect_close(self, code: ErrorCode, timeout: float = 10.0) -> None:
        """The server must close, telling us ``code`` (alert or sealed close), and must not crash."""
        while True:
            frame = await self.next_frame(timeout)
            if frame is None:
                break
            if isinstance(frame, WireError):
                raise Failed(f"server sent an unparseable frame: {frame}")
            self._effects(self.channel.receive_frame(frame))
            if self.closed is not None:
                break
        expect(self.closed is not None, "server closed the connection without an alert")
        expect(self.closed.code is code, f"expected {code.name}, server said {self.closed.code.name}")

    def close(self) -> None:
        if self.proto is not None and self.proto.transport is not None:
            self.proto.transport.loseConnection()


# ---------------------------------------------------------------- server-mode suite


class ServerSuite:
    def __init__(self, reactor, endpoint: str, fingerprint: str, provision: str | None, allow_insecure: bool,
                 auth_deadline: float, master: bytes):
        self.reactor = reactor
        self.endpoint = endpoint
        self.fp = fingerprint
        self.provision_cmd = provision
        self.allow_insecure = allow_insecure
        self.auth_deadline = auth_deadline
        self.master = master
        self.results: list[Result] = []

    async def run(self, only: set[str] | None = None) -> list[Result]:
        checks: list[tuple[str, str, Callable[[], Awaitable[None]]]] = []
        for suite in Suite:
            for fs in (ForwardSecrecy.OFF, ForwardSecrecy.REQUIRE):
                checks.append(("handshake", f"{suite.label} fs={fs.value}", lambda s=suite, f=fs: self.handshake(s, f)))
        checks += [
            ("handshake", "wrong pinned key is detected", self.wrong_pin),
            ("handshake", "wrong r1 -> HANDSHAKE_FAILED", self.wrong_r1),
            ("handshake", "undecryptable key transport -> HANDSHAKE_FAILED", self.garbage_kt),
            ("handshake", "downgraded offer -> KEY_CONFIRMATION_FAILED", self.downgrade),
            ("record", "tampered record -> BAD_RECORD", self.tampered),
            ("record", "replayed record -> REPLAYED_RECORD", self.replayed),
            ("record", "reordered record -> OUT_OF_ORDER_RECORD", self.reordered),
            ("record", "oversized frame -> FRAME_TOO_LARGE", self.oversized),
            ("record", "truncated frame: connection closed, server keeps serving", self.truncated),
            ("record", "bad magic -> MALFORMED", self.bad_magic),
            ("record", "unknown message type -> UNKNOWN_TYPE", self.unknown_type),
            ("record", "echo of 64 KiB", self.big_echo),
        ]
        if self.provision_cmd:
            checks += [
                ("life cycle", "enrol, insert, sync, remove", self.life_cycle),
                ("life cycle", "repeated insert after a drop is the same check-out", self.repeat_insert),
                ("life cycle", "second insert while in use -> IN_USE", self.second_insert),
                ("life cycle", "recover needs the MUK of the last insert", self.recover),
                ("life cycle", "remove/recover/sync refused when idle", self.idle_refusals),
                ("life cycle", "destroy is final -> DESTROYED", self.destroy),
                ("refusal", "wrong password, unknown serial look the same", self.uniform_refusal),
                ("refusal", "wrong Master key -> REFUSED", self.wrong_master),
                ("refusal", "reused enrolment code -> REFUSED", self.reused_code),
                ("refusal", "busy serial -> BUSY", self.busy),
                ("refusal", f"implementation auth later than {self.auth_deadline:g} s -> TIMEOUT", self.late_answer),
            ]
        for area, name, fn in checks:
            if only and area not in only:
                continue
            t0 = time.monotonic()  # clock-ok: the harness measures how long each check took
            try:
                await fn()
                self.results.append(Result(area, name, True, "", time.monotonic() - t0))  # clock-ok
            except Failed as e:
                self.results.append(Result(area, name, False, str(e), time.monotonic() - t0))  # clock-ok
            except Exception as e:  # noqa: BLE001 - a check that crashed is a failure, reported
                self.results.append(Result(area, name, False, f"{e.__class__.__name__}: {e}", time.monotonic() - t0))  # clock-ok
        return self.results

    # -- helpers
    def cfg(self, suites=None, fs=ForwardSecrecy.PREFER) -> ChannelConfig:
        suites = suites or (Suite.AES256_GCM,)
        return ChannelConfig(suites=tuple(suites), allow_insecure=Suite.DES_CBC_MD5 in suites, forward_secrecy=fs)

    async def raw(self, **kw) -> RawCard:
        card = RawCard(self.reactor, self.endpoint, self.fp, self.cfg(**kw))
        await card.open()
        return card

    async def established(self) -> RawCard:
        card = await self.raw()
        await card.handshake()
        expect(card.channel.established, f"handshake failed: {card.closed}")
        return card

    async def connect(self):
        return await connect(self.reactor, self.endpoint, self.fp, self.cfg())

    def new_card(self) -> tuple[str, str]:
        serial = "conf-" + os.urandom(5).hex()
        cmd = self.provision_cmd.format(serial=serial)
        r = subprocess.run(shlex.split(cmd), capture_output=True, text=True, timeout=60)
        if r.returncode != 0:
            raise Failed(f"provisioning hook failed: {r.stderr.strip()[-200:]}")
        out = r.stdout.strip()
        try:
            code = json.loads(out)["code"]
        except (ValueError, KeyError, TypeError):
            code = out.split()[-1] if out else ""
        expect(bool(code), "provisioning hook printed no enrolment code")
        return serial, code

    async def enrolled(self, password: str = "conformance") -> tuple[str, ops.PasswordKeys]:
        serial, code = self.new_card()
        kdf = ops.new_kdf(os.urandom)
        keys = ops.derive_keys(password, kdf)
        proto = await self.connect()
        try:
            await ops.enrol(proto, serial, code, keys, kdf, b"opaque protected information " + os.urandom(16))
        finally:
            proto.closeChannel()
        return serial, keys

    async def insert(self, serial, muk, secret, password="conformance", master=None):
        proto = await self.connect()
        try:
            result, _ = await ops.insert(proto, serial, password, muk, secret, master or self.master)
            return result
        finally:
            proto.closeChannel()

    # -- handshake checks
    async def handshake(self, suite: Suite, fs: ForwardSecrecy) -> None:
        card = await self.raw(suites=(suite,), fs=fs)
        try:
            try:
                await card.handshake()
            except Failed:
                pass
            if card.channel.established:
                data = os.urandom(48)
                card.write(card.seal(EchoRequest(data)))
                frame = await card.next_frame()
                effects = card.channel.receive_frame(frame)
                got = [e.message for e in effects if hasattr(e, "message")]
                expect(got == [EchoReply(data)], f"echo came back as {got}")
                return
            code = card.closed.code if card.closed else None
            if suite is Suite.DES_CBC_MD5 and not self.allow_insecure:
                expect(code is ErrorCode.INSECURE_SUITE_REFUSED, f"des-cbc-md5 must be refused unless enabled, got {code}")
            elif fs is ForwardSecrecy.REQUIRE:
                expect(code is ErrorCode.FORWARD_SECRECY_REQUIRED, f"handshake failed: {code}")
            else:
                raise Failed(f"handshake failed: {code}")
        finally:
            card.close()

    async def wrong_pin(self) -> None:
        card = RawCard(self.reactor, self.endpoint, "SHA256:" + "A" * 43, self.cfg())
        await card.open()
        hello = await card.next_frame()
        card._effects(card.channel.receive_frame(hello))
        expect(card.closed is not None and card.closed.code is ErrorCode.SERVER_KEY_MISMATCH, "a wrong pin went unnoticed")
        card.close()

    async def _kt_with(self, secrets_fn) -> None:
        card = await self.raw()
        hello_frame = await card.next_frame()
        hello = decode_frame(hello_frame)
        assert isinstance(hello, Hello)
        secrets = secrets_fn(hello)
        ct = crypto.RSAPublicKey(hello.server_key).oaep_encrypt(secrets.encode(), os.urandom) if secrets else os.urandom(
            crypto.RSAPublicKey(hello.server_key).bits // 8)
        kt = KeyTransport(r2=secrets.r2 if secrets else os.urandom(32), suites=(Suite.AES256_GCM,), ciphertext=ct)
        card.write(encode_frame(kt))
        frame = await card.next_frame()
        msg = decode_frame(frame) if isinstance(frame, bytes) else frame
        expect(isinstance(msg, Alert) and msg.code is ErrorCode.HANDSHAKE_FAILED, f"expected HANDSHAKE_FAILED, got {msg!r}")
        card.close()

    async def wrong_r1(self) -> None:
        await self._kt_with(lambda h: SessionSecrets(r1=os.urandom(32), r2=os.urandom(32), s1=os.urandom(32), s2=os.urandom(32)))

    async def garbage_kt(self) -> None:
        await self._kt_with(lambda h: None)

    async def downgrade(self) -> None:
        card = await self.raw(suites=(Suite.AES256_GCM, Suite.CHACHA20_POLY1305))

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

    # -- record checks
    async def tampered(self) -> None:
        card = await self.established()
        rec = bytearray(card.seal(EchoRequest(b"x" * 32)))
        rec[-1] ^= 1
        card.write(bytes(rec))
        await card.expect_close(ErrorCode.BAD_RECORD)

    async def replayed(self) -> None:
        card = await self.established()
        rec = card.seal(EchoRequest(b"once"))
        card.write(rec)
        card._effects(card.channel.receive_frame(await card.next_frame()))
        card.write(rec)
        await card.expect_close(ErrorCode.REPLAYED_RECORD)

    async def reordered(self) -> None:
        card = await self.established()
        first, second = card.seal(EchoRequest(b"1")), card.seal(EchoRequest(b"2"))
        card.write(second + first)
        await card.expect_close(ErrorCode.OUT_OF_ORDER_RECORD)

    async def oversized(self) -> None:
        card = await self.established()
        card.write(FrameHeaderSchema.build(dict(magic=MAGIC, version=PROTOCOL_VERSION, type=0x10, length=MAX_FRAME_BODY + 1)))
        await card.expect_close(ErrorCode.FRAME_TOO_LARGE)

    async def truncated(self) -> None:
        card = await self.raw()
        await card.next_frame()
        card.write(build_header(0x02, 400) + b"\x00" * 100)
        card.proto.transport.loseWriteConnection() if hasattr(card.proto.transport, "loseWriteConnection") else card.close()
        await card.proto.lost
        other = await self.established()  # the server still serves everyone else
        other.close()

    async def bad_magic(self) -> None:
        card = await self.raw()
        await card.next_frame()
        card.write(b"XX\x01\x02\x00\x00\x00\x00")
        frame = await card.next_frame()
        msg = decode_frame(frame) if isinstance(frame, bytes) else frame
        expect(isinstance(msg, Alert) and msg.code is ErrorCode.MALFORMED, f"expected MALFORMED, got {msg!r}")
        card.close()

    async def unknown_type(self) -> None:
        card = await self.raw()
        await card.next_frame()
        card.write(build_header(0x7E, 0))
        frame = await card.next_frame()
        msg = decode_frame(frame) if isinstance(frame, bytes) else frame
        expect(isinstance(msg, Alert) and msg.code is ErrorCode.UNKNOWN_TYPE, f"expected UNKNOWN_TYPE, got {msg!r}")
        card.close()

    async def big_echo(self) -> None:
        proto = await self.connect()
        data = os.urandom(65536)
        reply = await proto.request(EchoRequest(data))
        expect(reply == EchoReply(data), "64 KiB echo came back different")
        proto.closeChannel()

    # -- life cycle
    async def life_cycle(self) -> None:
        serial, _ = await self.enrolled()
        muk, secret = os.urandom(32), os.urandom(32)
        r = await self.insert(serial, muk, secret)
        expect(r.version == 1 and r.protected.startswith(b"opaque"), "download differs from what was enrolled")
        proto = await self.connect()
        r = await ops.sync(proto, serial, secret, 1, b"v2")
        expect(r.version == 2, f"sync gave version {r.version}")
        r = await ops.remove(proto, serial, secret, 2, b"v3")
        expect(r.version == 3, f"remove gave version {r.version}")
        proto.closeChannel()
        r = await self.insert(serial, os.urandom(32), os.urandom(32))
        expect(r.protected == b"v3", "the removed upload was not what the next insert downloaded")

    async def repeat_insert(self) -> None:
        serial, _ = await self.enrolled()
        muk, secret = os.urandom(32), os.urandom(32)
        a = await self.insert(serial, muk, secret)
        b = await self.insert(serial, muk, secret)
        expect((a.version, a.protected) == (b.version, b.protected), "a repeated insert gave a different check-out")

    async def _status(self, coro) -> Status:
        try:
            await coro
            return Status.OK
        except ops.OperationRefused as e:
            return e.status

    async def second_insert(self) -> None:
        serial, _ = await self.enrolled()
        await self.insert(serial, os.urandom(32), os.urandom(32))
        st = await self._status(self.insert(serial, os.urandom(32), os.urandom(32)))
        expect(st is Status.IN_USE, f"expected IN_USE, got {st.name}")

    async def recover(self) -> None:
        serial, _ = await self.enrolled()
        muk = os.urandom(32)
        await self.insert(serial, muk, os.urandom(32))
        proto = await self.connect()
        st = await self._status(ops.recover(proto, serial, "conformance", os.urandom(32), self.master))
        expect(st is Status.MUK_MISMATCH, f"recover from another machine: expected MUK_MISMATCH, got {st.name}")
        st = await self._status(ops.recover(proto, serial, "conformance", muk, self.master))
        expect(st is Status.OK, f"recover from the same machine: expected OK, got {st.name}")
        st = await self._status(ops.recover(proto, serial, "conformance", muk, self.master))
        expect(st is Status.NOT_IN_USE, f"recover when idle: expected NOT_IN_USE, got {st.name}")
        proto.closeChannel()

    async def idle_refusals(self) -> None:
        serial, _ = await self.enrolled()
        proto = await self.connect()
        st = await self._status(ops.remove(proto, serial, os.urandom(32), 1, b"x"))
        expect(st is Status.REFUSED, f"remove when idle: expected REFUSED, got {st.name}")
        st = await self._status(ops.sync(proto, serial, os.urandom(32), 1, b"x"))
        expect(st is Status.REFUSED, f"sync when idle: expected REFUSED, got {st.name}")
        proto.closeChannel()

    async def destroy(self) -> None:
        serial, _ = await self.enrolled()
        await self.insert(serial, os.urandom(32), os.urandom(32))
        proto = await self.connect()
        st = await self._status(ops.destroy(proto, serial, "conformance", self.master))
        expect(st is Status.OK, f"destroy from in-use: {st.name}")
        for name, coro in (("insert", ops.insert(proto, serial, "conformance", os.urandom(32), os.urandom(32), self.master)),
                           ("recover", ops.recover(proto, serial, "conformance", os.urandom(32), self.master)),
                           ("destroy", ops.destroy(proto, serial, "conformance", self.master))):
            st = await self._status(coro)
            expect(st is Status.DESTROYED, f"{name} after destroy: expected DESTROYED, got {st.name}")
        proto.closeChannel()

    async def uniform_refusal(self) -> None:
        serial, _ = await self.enrolled()
        answers = []
        for s, pw in ((serial, "wrong password"), ("conf-nobody-" + os.urandom(4).hex(), "conformance")):
            proto = await self.connect()
            first = await proto.request(OpRequest(op=Op.INSERT, serial=s, insert_secret=os.urandom(32)))
            expect(isinstance(first, AuthChallenge), f"expected a challenge, got {type(first).__name__}")
            answers_, _ = ops.answer(first, s, pw, self.master, os.urandom)
            result = await proto.request(AuthResponse(responses=tuple(answers_), muk=os.urandom(32)))
            answers.append(result)
            proto.closeChannel()
        expect(all(isinstance(a, OpResult) and a.status is Status.REFUSED for a in answers), f"got {answers}")
        expect(answers[0] == answers[1], "a wrong password and an unknown serial were refused differently")

    async def wrong_master(self) -> None:
        serial, _ = await self.enrolled()
        st = await self._status(self.insert(serial, os.urandom(32), os.urandom(32), master=os.urandom(32)))
        expect(st is Status.REFUSED, f"expected REFUSED, got {st.name}")

    async def reused_code(self) -> None:
        serial, code = self.new_card()
        kdf = ops.new_kdf(os.urandom)
        keys = ops.derive_keys("x", kdf)
        proto = await self.connect()
        await ops.enrol(proto, serial, code, keys, kdf, b"first")
        st = await self._status(ops.enrol(proto, serial, code, keys, kdf, b"second"))
        expect(st is Status.REFUSED, f"expected REFUSED, got {st.name}")
        proto.closeChannel()

    async def busy(self) -> None:
        serial, _ = await self.enrolled()
        holder = await self.connect()
        first = await holder.request(OpRequest(op=Op.INSERT, serial=serial, insert_secret=os.urandom(32)))
        expect(isinstance(first, AuthChallenge), "expected a challenge")
        st = await self._status(self.insert(serial, os.urandom(32), os.urandom(32)))
        holder.closeChannel()
        expect(st is Status.BUSY, f"expected BUSY while another operation runs, got {st.name}")

    async def late_answer(self) -> None:
        serial, _ = await self.enrolled()
        proto = await self.connect()
        first = await proto.request(OpRequest(op=Op.INSERT, serial=serial, insert_secret=os.urandom(32)))
        expect(isinstance(first, AuthChallenge), "expected a challenge")
        result = await proto.nextMessage()  # the server must give up by itself
        expect(isinstance(result, OpResult) and result.status is Status.TIMEOUT, f"expected TIMEOUT, got {result!r}")
        proto.closeChannel()
        st = await self._status(self.insert(serial, os.urandom(32), os.urandom(32)))
        expect(st is Status.OK, f"after a timeout the card must still be idle; insert gave {st.name}")


# ---------------------------------------------------------------- card-mode suite


CARD_SCENARIOS = ("correct", "wrong-key", "unoffered-suite", "bad-finished-mac", "tampered-record", "alert", "silent")


async def run_card_mode(reactor, card_command: str, key_bits: int, timeout: float) -> list[Result]:
    """Play a (mis)behaving server for each scenario and run the card under test against it."""
    from twisted.internet.endpoints import serverFromString

    from vsc.protocol.channel import server_channel
    from vsc.server.service import server_factory

    key = crypto.RSAPrivateKey.generate(key_bits)
    other = crypto.RSAPrivateKey.generate(key_bits)
    results = []
    for scenario in CARD_SCENARIOS:
        use_key = other if scenario == "wrong-key" else key
        factory = server_factory(ChannelConfig(), use_key, reactor)
        if scenario != "correct":
            factory.make_channel = _misbehaving(scenario, use_key, server_channel)
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
        endpoint = f"tcp:127.0.0.1:{port.getHost().port}"
        cmd = card_command.format(endpoint=endpoint, fingerprint=key.public_key().fingerprint())
        t0 = time.monotonic()  # clock-ok
        from twisted.internet.utils import getProcessOutputAndValue

        out, err, code = await getProcessOutputAndValue("/bin/sh", ["-c", f"timeout {timeout:g} {cmd}"], env=os.environ)
        await port.stopListening()
        should_pass = scenario == "correct"
        ok = (code == 0) == should_pass
        detail = "" if ok else f"card exited {code} ({(err or out).decode(errors='replace').strip()[-160:]})"
        results.append(Result("card", f"{scenario}: card must {'succeed' if should_pass else 'refuse'}", ok, detail,
                              time.monotonic() - t0))  # clock-ok
    return results


def _misbehaving(scenario: str, key, server_channel):
    """A channel factory whose server end misbehaves in one way."""
    from vsc.protocol import channel as ch

    def make():
        c = server_channel(ChannelConfig(), key)
        orig_receive = c.receive_frame
        orig_send = c.send

        def receive_frame(frame):
            effects = orig_receive(frame)
            out = []
            for e in effects:
                if isinstance(e, ch.Send) and scenario in ("unoffered-suite", "bad-finished-mac", "alert", "silent"):
                    try:
                        msg = decode_frame(e.data)
                    except WireError:
                        out.append(e)
                        continue
                    from vsc.wire.messages import ServerFinished

                    if isinstance(msg, ServerFinished):
                        if scenario == "unoffered-suite":
                            e = ch.Send(encode_frame(attrs.evolve(msg, suite=Suite.DES_CBC_MD5)))
                        elif scenario == "bad-finished-mac":
                            e = ch.Send(encode_frame(attrs.evolve(msg, mac=bytes(32))))
                        elif scenario == "alert":
                            e = ch.Send(encode_frame(Alert(ErrorCode.INTERNAL_ERROR)))
                        elif scenario == "silent":
                            continue
                out.append(e)
            return out

        def send(msg):
            effects = orig_send(msg)
            if scenario == "tampered-record":
                effects = [ch.Send(e.data[:-1] + bytes([e.data[-1] ^ 1])) if isinstance(e, ch.Send) else e for e in effects]
            return effects

        c.receive_frame = receive_frame
        if scenario == "tampered-record":
            # the channel answers echo requests itself: tamper at the byte level after establishment
            orig_receive2 = c.receive_frame

            def receive_tampering(frame):
                effects = orig_receive2(frame)
                if c.established:
                    effects = [ch.Send(e.data[:-1] + bytes([e.data[-1] ^ 1])) if isinstance(e, ch.Send) else e
                               for e in effects]
                return effects

            c.receive_frame = receive_tampering
        c.send = send
        return c

    return make


# ---------------------------------------------------------------- output and CLI


def table(results: list[Result]) -> str:
    lines = ["| area | check | result | time | detail |", "|---|---|---|---:|---|"]
    for r in results:
        lines.append(f"| {r.area} | {r.name} | {'PASS' if r.ok else 'FAIL'} | {r.seconds:.2f} s | {r.detail} |")
    passed = sum(r.ok for r in results)
    lines.append("")
    lines.append(f"{passed} passed, {len(results) - passed} failed")
    return "\n".join(lines)


def cmd_conformance(args) -> int:
    from twisted.internet.task import react

    from vsc import cli as vcli
    from vsc.protocol.auth import load_master_key

    results: list[Result] = []

    async def run(reactor):
        if args.card:
            results.extend(await run_card_mode(reactor, args.card_command, args.key_bits, args.timeout))
            return
        if not args.server or not args.server_key:
            raise vcli.CommandError("server mode needs --server and --server-key (or use --card)")
        provision = args.provision
        if not provision and args.admin_data_dir:
            vsc_exe = os.path.join(os.path.dirname(sys.executable), "vsc")
            provision = f"{shlex.quote(vsc_exe)} admin --data-dir {shlex.quote(args.admin_data_dir)} issue {{serial}} --json"
        suite = ServerSuite(reactor, args.server, args.server_key, provision, args.allow_insecure,
                            args.auth_deadline, load_master_key(os.environ.get("VSC_MASTER_KEY_FILE")))
        only = set(args.only.split(",")) if args.only else None
        results.extend(await suite.run(only))

    vcli._react(react, run)
    if args.json:
        print(json.dumps([attrs.asdict(r) for r in results], indent=2))
    else:
        print(table(results))
    return 0 if results and all(r.ok for r in results) else 1


def extend(sub) -> None:
    p = sub.add_parser("conformance", help="run the protocol conformance suite against a server (or, with --card, a card)")
    p.add_argument("--server", help="the server under test, e.g. tcp:127.0.0.1:7390")
    p.add_argument("--server-key", help="its key fingerprint (SHA256:...)")
    p.add_argument("--provision", help="command that creates a test card and prints its enrolment code; {serial} is replaced")
    p.add_argument("--admin-data-dir", help="shortcut: provision with 'vsc admin --data-dir DIR issue {serial} --json'")
    p.add_argument("--allow-insecure", action="store_true", help="the server under test enables des-cbc-md5")
    p.add_argument("--auth-deadline", type=float, default=30.0, help="the server's implementation-auth deadline (s)")
    p.add_argument("--only", help="comma-separated areas: handshake,record,life cycle,refusal")
    p.add_argument("--card", action="store_true", help="play the server for a card under test")
    p.add_argument("--card-command", default=None,
                   help="card to test; {endpoint} and {fingerprint} are replaced "
                        "(default: vsc ping --server {endpoint} --server-key {fingerprint} --count 2 --handshake-timeout 5)")
    p.add_argument("--key-bits", type=int, default=2048, help="card mode: the harness server's key size")
    p.add_argument("--timeout", type=float, default=30.0, help="card mode: seconds per scenario")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_defaults(cmd_conformance))


def _defaults(fn):
    def wrapped(args):
        if args.card_command is None:
            vsc_exe = os.path.join(os.path.dirname(sys.executable), "vsc")
            args.card_command = (f"{shlex.quote(vsc_exe)} ping --server {{endpoint}} --server-key {{fingerprint}} "
                                 "--count 2 --handshake-timeout 5")
        return fn(args)

    return wrapped

