"""
The protected channel of Figure 7 [0078] as two sans-IO state machines.

Bytes, frames and calls go in; a list of effects comes out (bytes to send,
messages received, timers to set, the channel being established or closed).
Nothing here touches a socket, a clock or a logger: time arrives as the
``timeout`` input and randomness through the injected ``rand`` callable.
The server's one private-key operation, the RSA decryption of the key
transport, is an effect (``Decrypt``) too: the glue runs it where it
chooses (a bounded worker pool in the server, vsc.server.admission) and
feeds the plaintext back with ``decrypted``; ``inline=True`` (tests, the
conformance harness) does it in the wrapper at once.

Frame limits per state: 4 KiB before the handshake completes; then the
config's ``max_body`` (the server keeps it small until an operation on the
channel has authenticated, then raises it with ``raise_limits``). An
established channel with no record for ``idle_timeout`` seconds closes with
IDLE_TIMEOUT (0: never).

The wrapper decodes first (``vsc.wire``), then fires exactly one Automat input
per outcome. Validation that needs the machine's data (r1, MACs, suites)
happens in the transition and, on failure, fires the ``fail`` input, which
Automat runs right after the current transition.

One responsibility (and so one module despite its length): the channel of Figure 7, both ends.
"""

from __future__ import annotations

from typing import Callable, Protocol

import attrs
from automat import NoTransition, TypeMachineBuilder

from vsc import crypto
from vsc.protocol.machines import indexed
from vsc.protocol.suites import (
    INSECURE_SUITES,
    ChannelConfig,
    ForwardSecrecy,
    SessionKeys,
    choose_suite,
    derive_keys,
    transcript_hash,
)
from vsc.wire import (
    CARD_TO_SERVER,
    MAGIC,
    PROTOCOL_VERSION,
    MessageType,
    MAX_FRAME_BODY,
    MAX_HANDSHAKE_BODY,
    SERVER_TO_CARD,
    Deframer,
    ErrorCode,
    Message,
    WireError,
    decode_frame,
    decode_inner,
    encode_frame,
    encode_inner,
    record_aad,
    seq_bytes,
)
from vsc.wire.messages import (
    Alert,
    ClientFinished,
    Close,
    EchoReply,
    EchoRequest,
    Hello,
    KeyTransport,
    Record,
    ServerFinished,
    SessionSecrets,
    Suite,
    record_frame,
)

MAX_SEQ = (1 << 64) - 1
_CLOSE_TYPE = bytes([MessageType.CLOSE])
_ALERT_HEADER = MAGIC + bytes([PROTOCOL_VERSION, MessageType.ALERT])


# ---------------------------------------------------------------- effects


@attrs.frozen
class Send:
    """Write these bytes to the transport."""

    data: bytes


@attrs.frozen
class ChannelInfo:
    suite: Suite
    forward_secret: bool
    server_fingerprint: str

    @property
    def insecure(self) -> bool:
        return self.suite in INSECURE_SUITES


@attrs.frozen
class Established:
    """The handshake completed; records may flow."""

    info: ChannelInfo


@attrs.frozen
class Received:
    """An authenticated inner message from the peer."""

    message: Message


@attrs.frozen
class Decrypt:
    """Run the RSA-OAEP decryption of the key transport; feed the result to ``decrypted``."""

    ciphertext: bytes


@attrs.frozen
class SetTimer:
    """Call ``timeout()`` after this many seconds (replaces any earlier timer)."""

    seconds: float


@attrs.frozen
class CancelTimer:
    """Cancel the pending timer."""


@attrs.frozen
class Closed:
    """
    The channel is over; close the transport after sending what came before.
    ``code`` is why; ``reason`` is for the local log only (never sent);
    ``by_peer`` says whether the peer reported it.
    """

    code: ErrorCode
    reason: str
    by_peer: bool = False


Effect = Send | Established | Received | Decrypt | SetTimer | CancelTimer | Closed


# ---------------------------------------------------------------- shared core


@attrs.define
class ChannelCore:
    config: ChannelConfig
    rand: crypto.RandomBytes
    outbox: list = attrs.Factory(list)
    max_body: int = MAX_FRAME_BODY  # once established (raise_limits may change it)
    idle_timeout: float = 0.0  # once established; 0: none
    keys: SessionKeys | None = None
    send_seq: int = 0
    recv_seq: int = 0
    confirmed: bool = False  # both finished MACs checked; set with the Established effect
    closed: bool = False
    hello_frame: bytes = b""
    key_transport_frame: bytes = b""
    # server side
    private_key: crypto.RSAPrivateKey | None = None
    # card side
    pinned_fingerprint: str = ""
    server_fingerprint: str = ""
    secrets: SessionSecrets | None = None
    offered: tuple = ()
    ephemeral: crypto.X25519Ephemeral | None = None
    hello: Hello | None = None
    pending_kt: KeyTransport | None = None  # server: the key transport whose decryption runs

    @property
    def established(self) -> bool:
        # Not merely "keys derived": the server derives them before the card's
        # ClientFinished confirms them.
        return self.confirmed and self.keys is not None and not self.closed

    def emit(self, effect: Effect) -> None:
        self.outbox.append(effect)

    def send_frame(self, msg: Message) -> None:
        self.emit(Send(encode_frame(msg)))

    def seal(self, msg: Message, direction: int) -> None:
        assert self.keys is not None
        if self.send_seq >= MAX_SEQ:
            raise WireError(ErrorCode.INTERNAL_ERROR, "sequence numbers exhausted; open a new channel")
        cipher = self.keys.card_to_server if direction == CARD_TO_SERVER else self.keys.server_to_card
        seq = self.send_seq
        sealed = cipher.seal(seq_bytes(seq), encode_inner(msg), record_aad(direction, seq))
        self.send_seq += 1
        self.emit(Send(record_frame(seq, sealed)))  # send_frame(Record(seq, sealed)) in one pack

    def open(self, record: Record, direction: int) -> Message:
        """Check order, authenticate and decode one record; raises WireError."""
        assert self.keys is not None
        if record.seq < self.recv_seq:
            raise WireError(ErrorCode.REPLAYED_RECORD, f"record {record.seq} replayed (expected {self.recv_seq})")
        if record.seq > self.recv_seq:
            raise WireError(
                ErrorCode.OUT_OF_ORDER_RECORD,
                f"record {record.seq} arrived, expected {self.recv_seq}: dropped or reordered",
            )
        cipher = self.keys.card_to_server if direction == CARD_TO_SERVER else self.keys.server_to_card
        try:
            plaintext = cipher.open(seq_bytes(record.seq), record.sealed, record_aad(direction, record.seq))
        except crypto.CryptoError as e:
            raise WireError(ErrorCode.BAD_RECORD, f"record {record.seq}: {e}") from None
        self.recv_seq += 1
        try:
            return decode_inner(plaintext)
        except WireError:
            if plaintext[:1] == _CLOSE_TYPE:
                # a CLOSE whose code we cannot read still ends the channel, and is never answered (§9.2)
                return Close(ErrorCode.MALFORMED)
            raise

    def finish_closed(self, code: ErrorCode, reason: str, by_peer: bool, notify: bool, sealed_dir: int | None) -> None:
        """Send the alert (sealed once established), then report Closed."""
        if self.closed:
            return
        if notify:
            try:
                if self.established and sealed_dir is not None:
                    self.seal(Close(code), sealed_dir)
                else:
                    self.send_frame(Alert(code))
            except WireError:
                pass  # cannot even say why; the transport close says enough
        self.closed = True
        self.keys = None
        self.emit(CancelTimer())
        self.emit(Closed(code, reason, by_peer))


# ---------------------------------------------------------------- inputs


class ChannelInputs(Protocol):
    def start(self) -> None:
        "The transport is connected."

    def got_hello(self, msg: Hello, frame: bytes) -> None:
        "A Hello frame arrived."

    def got_key_transport(self, msg: KeyTransport, frame: bytes) -> None:
        "A KeyTransport frame arrived."

    def got_server_finished(self, msg: ServerFinished) -> None:
        "A ServerFinished frame arrived."

    def got_client_finished(self, msg: ClientFinished) -> None:
        "A ClientFinished frame arrived."

    def got_record(self, msg: Record) -> None:
        "A sealed record arrived."

    def decrypted(self, plaintext: bytes | None) -> None:
        "The key transport's decryption finished (None: it did not decrypt)."

    def got_alert(self, msg: Alert) -> None:
        "The peer sent a plaintext alert."

    def send(self, msg: Message) -> None:
        "The application sends an inner message."

    def close(self, code: ErrorCode) -> None:
        "The application closes the channel."

    def fail(self, code: ErrorCode, reason: str) -> None:
        "A local check failed: alert the peer and close."

    def timeout(self) -> None:
        "The timer set by SetTimer expired."

    def connection_lost(self) -> None:
        "The transport went away."


def _common(builder, established, closed, states, direction: int) -> None:
    """Transitions both machines share: failure, loss, timeout, records."""

    for state in states:

        @state.upon(ChannelInputs.fail).to(closed)
        def fail(inputs: ChannelInputs, core: ChannelCore, code: ErrorCode, reason: str) -> None:
            core.finish_closed(code, reason, by_peer=False, notify=True, sealed_dir=direction)

        @state.upon(ChannelInputs.got_alert).to(closed)
        def got_alert(inputs: ChannelInputs, core: ChannelCore, msg: Alert) -> None:
            reason = "peer sent a plaintext alert" + (" after establishment (unauthenticated)" if core.keys else "")
            core.finish_closed(msg.code, reason, by_peer=True, notify=False, sealed_dir=None)

        @state.upon(ChannelInputs.connection_lost).to(closed)
        def lost(inputs: ChannelInputs, core: ChannelCore) -> None:
            core.finish_closed(ErrorCode.CLOSE_NOTIFY, "connection lost", by_peer=True, notify=False, sealed_dir=None)

        @state.upon(ChannelInputs.close).to(closed)
        def close(inputs: ChannelInputs, core: ChannelCore, code: ErrorCode) -> None:
            core.finish_closed(code, "closed locally", by_peer=False, notify=True, sealed_dir=direction)

        if state is not established:

            @state.upon(ChannelInputs.timeout).to(closed)
            def timeout(inputs: ChannelInputs, core: ChannelCore) -> None:
                core.finish_closed(
                    ErrorCode.HANDSHAKE_TIMEOUT,
                    f"handshake not finished within {core.config.handshake_timeout:g} s",
                    by_peer=False,
                    notify=True,
                    sealed_dir=None,
                )

    @established.upon(ChannelInputs.send).loop()
    def send(inputs: ChannelInputs, core: ChannelCore, msg: Message) -> None:
        core.seal(msg, direction)

    @established.upon(ChannelInputs.got_record).loop()
    def got_record(inputs: ChannelInputs, core: ChannelCore, msg: Record) -> None:
        peer_dir = SERVER_TO_CARD if direction == CARD_TO_SERVER else CARD_TO_SERVER
        try:
            inner = core.open(msg, peer_dir)
        except WireError as e:
            inputs.fail(e.code, str(e))
            return
        if core.idle_timeout > 0:
            core.emit(SetTimer(core.idle_timeout))
        if isinstance(inner, Close):
            core.finish_closed(inner.code, "peer closed the channel", by_peer=True, notify=False, sealed_dir=None)
        elif isinstance(inner, EchoRequest):
            core.seal(EchoReply(inner.data), direction)
        else:
            core.emit(Received(inner))

    @established.upon(ChannelInputs.timeout).loop()
    def idle(inputs: ChannelInputs, core: ChannelCore) -> None:
        # once established only the idle timer runs (the handshake timer was cancelled); without an
        # idle timeout a stale fire is harmless
        if core.idle_timeout > 0:
            inputs.fail(ErrorCode.IDLE_TIMEOUT, f"no record for {core.idle_timeout:g} s")

    for inp in (
        ChannelInputs.got_hello,
        ChannelInputs.got_key_transport,
        ChannelInputs.got_server_finished,
        ChannelInputs.got_client_finished,
        ChannelInputs.got_record,
        ChannelInputs.got_alert,
        ChannelInputs.send,
        ChannelInputs.close,
        ChannelInputs.fail,
        ChannelInputs.timeout,
        ChannelInputs.connection_lost,
        ChannelInputs.start,
        ChannelInputs.decrypted,
    ):
        closed.upon(inp).loop().returns(None)


# ---------------------------------------------------------------- server


def _forget_handshake(core: ChannelCore) -> None:
    """Once both finished MACs are checked, the handshake's frames, Hello and X25519 key are never read again:
    drop them (about a kilobyte per open channel; a server holds thousands)."""
    core.hello_frame = core.key_transport_frame = b""
    core.hello = None
    core.ephemeral = None


def _build_server():
    b = TypeMachineBuilder(ChannelInputs, ChannelCore)
    initial = b.state("initial")
    await_kt = b.state("await_key_transport")
    decrypting = b.state("decrypting")
    await_cf = b.state("await_client_finished")
    established = b.state("established")
    closed = b.state("closed")

    @initial.upon(ChannelInputs.start).to(await_kt)
    def start(inputs: ChannelInputs, core: ChannelCore) -> None:
        r1 = core.rand(32)
        fs = b""
        if core.config.forward_secrecy is not ForwardSecrecy.OFF:
            core.ephemeral = crypto.X25519Ephemeral(core.rand)
            fs = core.ephemeral.public
        assert core.private_key is not None
        hello = Hello(r1=r1, server_key=core.private_key.public_key().spki_der, fs_public=fs)
        core.hello = hello
        core.hello_frame = encode_frame(hello)
        core.emit(SetTimer(core.config.handshake_timeout))
        core.emit(Send(core.hello_frame))

    @await_kt.upon(ChannelInputs.got_key_transport).to(decrypting)
    def got_key_transport(inputs: ChannelInputs, core: ChannelCore, msg: KeyTransport, frame: bytes) -> None:
        core.pending_kt = msg
        core.key_transport_frame = frame
        core.emit(Decrypt(msg.ciphertext))

    @decrypting.upon(ChannelInputs.decrypted).to(await_cf)
    def decrypted(inputs: ChannelInputs, core: ChannelCore, plaintext: bytes | None) -> None:
        assert core.private_key is not None and core.hello is not None and core.pending_kt is not None
        msg, core.pending_kt = core.pending_kt, None
        # One alert code for "undecryptable" and "wrong r1": telling them apart
        # would hand an attacker an OAEP validity oracle (Manger's attack).
        if plaintext is None:
            inputs.fail(ErrorCode.HANDSHAKE_FAILED, "key transport did not decrypt under the server key")
            return
        try:
            secrets = SessionSecrets.decode(plaintext)
        except WireError:
            inputs.fail(ErrorCode.HANDSHAKE_FAILED, "key transport plaintext has the wrong length")
            return
        if not crypto.constant_time_equal(secrets.r1, core.hello.r1):
            inputs.fail(ErrorCode.HANDSHAKE_FAILED, "key transport echoes the wrong r1 (replay or forgery)")
            return
        if not crypto.constant_time_equal(secrets.r2, msg.r2):
            inputs.fail(ErrorCode.HANDSHAKE_FAILED, "r2 in the clear differs from r2 in the key transport")
            return
        dh = b""
        if msg.fs_public:
            if core.ephemeral is None:
                inputs.fail(ErrorCode.UNEXPECTED_MESSAGE, "card sent an X25519 key the server did not offer")
                return
            try:
                dh = core.ephemeral.exchange(msg.fs_public)
            except crypto.CryptoError as e:
                inputs.fail(ErrorCode.HANDSHAKE_FAILED, str(e))
                return
        elif core.config.forward_secrecy is ForwardSecrecy.REQUIRE:
            inputs.fail(ErrorCode.FORWARD_SECRECY_REQUIRED, "card did not send an X25519 key; server requires one")
            return
        usable = [s for s in core.config.suites if s not in INSECURE_SUITES or core.config.allow_insecure]
        suite = choose_suite(usable, msg.suites)
        if suite is None:
            if INSECURE_SUITES & set(msg.suites) and not set(msg.suites) - INSECURE_SUITES:
                inputs.fail(ErrorCode.INSECURE_SUITE_REFUSED, "card offered only des-cbc-md5, which is not enabled here")
            else:
                offered = ",".join(Suite(s).label for s in msg.suites)
                inputs.fail(ErrorCode.NO_COMMON_SUITE, f"no common suite; card offered {offered}")
            return
        th = transcript_hash(core.hello_frame, core.key_transport_frame)
        core.keys = derive_keys(suite, secrets, dh, th, core.rand)
        core.send_frame(ServerFinished(suite=suite, forward_secret=bool(dh), mac=core.keys.server_mac()))

    @await_cf.upon(ChannelInputs.got_client_finished).to(established)
    def got_client_finished(inputs: ChannelInputs, core: ChannelCore, msg: ClientFinished) -> None:
        assert core.keys is not None
        if not crypto.constant_time_equal(msg.mac, core.keys.client_mac()):
            keys, core.keys = core.keys, None  # alert in the clear: the peer's keys differ
            inputs.fail(ErrorCode.KEY_CONFIRMATION_FAILED, "client finished MAC mismatch (tampering or downgrade)")
            return
        core.emit(CancelTimer())
        assert core.private_key is not None
        core.confirmed = True
        _forget_handshake(core)
        if core.idle_timeout > 0:
            core.emit(SetTimer(core.idle_timeout))
        core.emit(
            Established(
                ChannelInfo(
                    suite=core.keys.suite,
                    forward_secret=core.keys.forward_secret,
                    server_fingerprint=core.private_key.public_key().fingerprint(),
                )
            )
        )

    _common(b, established, closed, (initial, await_kt, decrypting, await_cf, established), SERVER_TO_CARD)
    return b.build()


# ---------------------------------------------------------------- card


def _build_card():
    b = TypeMachineBuilder(ChannelInputs, ChannelCore)
    initial = b.state("initial")
    await_hello = b.state("await_hello")
    await_sf = b.state("await_server_finished")
    established = b.state("established")
    closed = b.state("closed")

    @initial.upon(ChannelInputs.start).to(await_hello)
    def start(inputs: ChannelInputs, core: ChannelCore) -> None:
        core.emit(SetTimer(core.config.handshake_timeout))

    @await_hello.upon(ChannelInputs.got_hello).to(await_sf)
    def got_hello(inputs: ChannelInputs, core: ChannelCore, msg: Hello, frame: bytes) -> None:
        fp = crypto.fingerprint(msg.server_key)
        if not crypto.constant_time_equal(fp.encode(), core.pinned_fingerprint.encode()):
            inputs.fail(
                ErrorCode.SERVER_KEY_MISMATCH,
                f"server key {fp} is not the pinned {core.pinned_fingerprint}",
            )
            return
        try:
            server_key = crypto.RSAPublicKey(msg.server_key)
        except crypto.CryptoError as e:
            inputs.fail(ErrorCode.MALFORMED, f"server key: {e}")
            return
        if not msg.fs_public and core.config.forward_secrecy is ForwardSecrecy.REQUIRE:
            inputs.fail(ErrorCode.FORWARD_SECRECY_REQUIRED, "server offered no X25519 key; this card requires one")
            return
        core.server_fingerprint = fp
        core.hello = msg
        core.hello_frame = frame
        secrets = SessionSecrets(r1=msg.r1, r2=core.rand(32), s1=core.rand(32), s2=core.rand(32))
        fs = b""
        if msg.fs_public and core.config.forward_secrecy is not ForwardSecrecy.OFF:
            core.ephemeral = crypto.X25519Ephemeral(core.rand)
            fs = core.ephemeral.public
        core.secrets = secrets
        core.offered = tuple(core.config.suites)
        kt = KeyTransport(
            r2=secrets.r2,
            suites=core.offered,
            fs_public=fs,
            ciphertext=server_key.oaep_encrypt(secrets.encode(), core.rand),
        )
        core.key_transport_frame = encode_frame(kt)
        core.emit(Send(core.key_transport_frame))

    @await_sf.upon(ChannelInputs.got_server_finished).to(established)
    def got_server_finished(inputs: ChannelInputs, core: ChannelCore, msg: ServerFinished) -> None:
        assert core.secrets is not None and core.hello is not None
        if msg.suite not in core.offered:
            inputs.fail(ErrorCode.SUITE_NOT_OFFERED, f"server chose {msg.suite.label}, which this card did not offer")
            return
        dh = b""
        if core.ephemeral is not None:
            try:
                dh = core.ephemeral.exchange(core.hello.fs_public)
            except crypto.CryptoError as e:
                inputs.fail(ErrorCode.HANDSHAKE_FAILED, str(e))
                return
        if msg.forward_secret != bool(dh):
            inputs.fail(ErrorCode.KEY_CONFIRMATION_FAILED, "server and card disagree on forward secrecy")
            return
        th = transcript_hash(core.hello_frame, core.key_transport_frame)
        keys = derive_keys(msg.suite, core.secrets, dh, th, core.rand)
        core.secrets = None
        if not crypto.constant_time_equal(msg.mac, keys.server_mac()):
            inputs.fail(ErrorCode.KEY_CONFIRMATION_FAILED, "server finished MAC mismatch (tampering, downgrade or wrong key)")
            return
        core.keys = keys
        core.confirmed = True
        core.send_frame(ClientFinished(mac=keys.client_mac()))
        _forget_handshake(core)
        core.emit(CancelTimer())
        if core.idle_timeout > 0:
            core.emit(SetTimer(core.idle_timeout))
        core.emit(Established(ChannelInfo(keys.suite, keys.forward_secret, core.server_fingerprint)))

    _common(b, established, closed, (initial, await_hello, await_sf, established), CARD_TO_SERVER)
    return b.build()


_ServerMachine = indexed(_build_server())
_CardMachine = indexed(_build_card())


# ---------------------------------------------------------------- wrapper


class Channel:
    """
    One end of a protected channel. Every method returns the effects it
    produced, in order; the caller carries them out (see vsc.net.channel).
    With ``inline`` the wrapper performs the ``Decrypt`` effect itself (no
    caller ever sees it); otherwise the caller runs it and calls ``decrypted``.
    """

    def __init__(self, machine_factory, core: ChannelCore, inline: bool = True):
        self._core = core
        self._machine: ChannelInputs = machine_factory(core)
        self._deframer = Deframer(MAX_HANDSHAKE_BODY)
        self.inline = inline

    # -- state, for callers and tests
    @property
    def established(self) -> bool:
        return self._core.established

    @property
    def closed(self) -> bool:
        return self._core.closed

    def _drain(self) -> list[Effect]:
        out, self._core.outbox = self._core.outbox, []
        if self.inline:
            for i, effect in enumerate(out):
                if isinstance(effect, Decrypt):
                    return out[:i] + self.decrypted(private_decrypt(self._core.private_key, effect.ciphertext)) + out[i + 1:]
        return out

    def _fire(self, fn: Callable[..., None], *args) -> list[Effect]:
        """One input (``fn(*args)``, a bound input of the machine), then the effects it left."""
        try:
            fn(*args)
        except NoTransition:
            self._machine.fail(ErrorCode.UNEXPECTED_MESSAGE, "message not valid in this state")
        except WireError as e:
            self._machine.fail(e.code, str(e))
        return self._drain()

    # -- inputs
    def start(self) -> list[Effect]:
        return self._fire(self._machine.start)

    def receive_bytes(self, data: bytes) -> list[Effect]:
        """Feed any chunk of the byte stream (the pure-Python framing path)."""
        effects: list[Effect] = []
        try:
            self._deframer.max_body = self.max_frame_body()
            for frame in self._deframer.feed(data):
                effects += self.receive_frame(frame)
                if self._core.closed:
                    break
                self._deframer.max_body = self.max_frame_body()
        except WireError as e:
            effects += self._fire(self._machine.fail, e.code, str(e))
        return effects

    def receive_frame(self, frame: bytes) -> list[Effect]:
        """Feed exactly one whole frame (header + body)."""
        if self._core.closed:
            return []
        limit = self.max_frame_body()
        try:
            msg = decode_frame(frame, max_body=limit)
        except WireError as e:
            if e.code is ErrorCode.MALFORMED and frame[:4] == _ALERT_HEADER:
                # an ALERT whose code we cannot read still ends the channel, and is never answered (§9.2)
                return self._fire(self._machine.got_alert, Alert(ErrorCode.MALFORMED))
            return self._fire(self._machine.fail, e.code, str(e))
        m = self._machine
        if isinstance(msg, Record):
            return self._fire(m.got_record, msg)
        if isinstance(msg, Hello):
            return self._fire(m.got_hello, msg, frame)
        if isinstance(msg, KeyTransport):
            return self._fire(m.got_key_transport, msg, frame)
        if isinstance(msg, ServerFinished):
            return self._fire(m.got_server_finished, msg)
        if isinstance(msg, ClientFinished):
            return self._fire(m.got_client_finished, msg)
        if isinstance(msg, Alert):
            return self._fire(m.got_alert, msg)
        return self._fire(m.fail, ErrorCode.UNEXPECTED_MESSAGE, f"{type(msg).__name__} not expected")

    def decrypted(self, plaintext: bytes | None) -> list[Effect]:
        """The result of a ``Decrypt`` effect (None: it did not decrypt)."""
        return self._fire(self._machine.decrypted, plaintext)

    def frame_error(self, error: WireError) -> list[Effect]:
        """The framing layer rejected the byte stream (bad header, too long)."""
        if self._core.closed:
            return []
        return self._fire(self._machine.fail, error.code, str(error))

    def send(self, msg: Message) -> list[Effect]:
        """Seal and send an inner message; only once established."""
        if not self.established:
            raise RuntimeError("channel is not established")
        return self._fire(self._machine.send, msg)

    def close(self, code: ErrorCode = ErrorCode.CLOSE_NOTIFY) -> list[Effect]:
        return self._fire(self._machine.close, code)

    def timeout(self) -> list[Effect]:
        return self._fire(self._machine.timeout)

    def connection_lost(self) -> list[Effect]:
        return self._fire(self._machine.connection_lost)

    def max_frame_body(self) -> int:
        return self._core.max_body if self._core.established else MAX_HANDSHAKE_BODY

    def raise_limits(self, max_body: int, idle_timeout: float) -> list[Effect]:
        """
        An operation on this channel authenticated: allow larger frames and a
        longer idle time. The idle timer restarts now with the new time (the
        one running was set by the last record with the short one).
        """
        self._core.max_body = max_body
        self._core.idle_timeout = idle_timeout
        if not self._core.established:
            return []
        return [SetTimer(idle_timeout)] if idle_timeout > 0 else [CancelTimer()]


def private_decrypt(key: crypto.RSAPrivateKey | None, ciphertext: bytes) -> bytes | None:
    """The ``Decrypt`` effect itself: RSA-OAEP-SHA256 under the server key (None: it did not decrypt)."""
    assert key is not None
    try:
        return key.oaep_decrypt(ciphertext)
    except crypto.CryptoError:
        return None


def server_channel(
    config: ChannelConfig,
    private_key: crypto.RSAPrivateKey,
    rand: crypto.RandomBytes = crypto.system_random,
    inline: bool = True,
) -> Channel:
    """
    The server end: call ``start()`` once connected; it sends Hello (r1).
    ``inline=False``: the caller runs the ``Decrypt`` effect (off the reactor).
    """
    core = ChannelCore(config=config, rand=rand, private_key=private_key, max_body=config.max_body,
                       idle_timeout=config.idle_timeout)
    return Channel(_ServerMachine, core, inline)


def card_channel(
    config: ChannelConfig,
    server_fingerprint: str,
    rand: crypto.RandomBytes = crypto.system_random,
) -> Channel:
    """The card end: call ``start()`` once connected; it waits for Hello."""
    core = ChannelCore(config=config, rand=rand, pinned_fingerprint=server_fingerprint, max_body=config.max_body,
                       idle_timeout=config.idle_timeout)
    return Channel(_CardMachine, core)
