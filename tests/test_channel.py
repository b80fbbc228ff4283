"""
The sans-IO channel state machines (vsc.protocol.channel), driven directly:
no Twisted, no clock, seeded randomness. Covers the handshake for every suite
and forward-secrecy policy, every refusal and its alert, active attacks
(forged key transport, downgrade, tampered finished messages and records,
replay, reordering), timeouts, unexpected messages, close semantics, and
byte-stream chunking.
"""

from __future__ import annotations

import itertools

import pytest

from vsc import crypto
from vsc.protocol.channel import (
    MAX_SEQ,
    CancelTimer,
    ChannelInfo,
    Closed,
    Established,
    Received,
    SetTimer,
)
from vsc.protocol.suites import DEFAULT_SUITES, ChannelConfig, ForwardSecrecy
from vsc.wire import (
    CARD_TO_SERVER,
    MAX_FRAME_BODY,
    MAX_HANDSHAKE_BODY,
    ErrorCode,
    WireError,
    decode_frame,
    encode_frame,
    record_aad,
    seq_bytes,
)
from vsc.wire.codec import build_header
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
)

from tests.vectors.support import DRBG, Pair, closes, fixed_fingerprint, fixed_key, only, sends

GCM, CHACHA, CBC, DES = Suite.AES256_GCM, Suite.CHACHA20_POLY1305, Suite.AES256_CBC_HMAC_SHA256, Suite.DES_CBC_MD5
OFF, PREFER, REQUIRE = ForwardSecrecy.OFF, ForwardSecrecy.PREFER, ForwardSecrecy.REQUIRE


def cfg(*suites: Suite, fs: ForwardSecrecy = PREFER, insecure: bool | None = None, timeout: float = 30.0) -> ChannelConfig:
    suites = suites or DEFAULT_SUITES
    if insecure is None:
        insecure = DES in suites
    return ChannelConfig(suites=tuple(suites), allow_insecure=insecure, forward_secrecy=fs, handshake_timeout=timeout)


def alert(code: ErrorCode) -> bytes:
    return encode_frame(Alert(code))


def assert_failed(effects: list, code: ErrorCode, *, sent: list[bytes] | None = None, by_peer: bool = False) -> Closed:
    """
    ``effects`` end the channel: exactly one Closed (the last effect) with
    ``code``, preceded by CancelTimer, and the bytes sent are ``sent``
    (default: the plaintext Alert for ``code``; by_peer closes send nothing).
    """
    (closed,) = closes(effects)
    assert effects[-1] is closed and isinstance(effects[-2], CancelTimer), effects
    assert closed.code is code, closed
    assert closed.by_peer is by_peer, closed
    assert closed.reason
    if sent is None:
        sent = [] if by_peer else [alert(code)]
    assert sends(effects) == sent, effects
    assert not only(effects, Established) and not only(effects, Received)
    return closed


def assert_sealed_close(record_frame: bytes, receiver_pair: Pair, to: str, code: ErrorCode) -> None:
    """``record_frame`` is a sealed Close(code) that the peer authenticates and reports as closed by the peer."""
    assert isinstance(decode_frame(record_frame), Record)
    effects = receiver_pair.to_card(record_frame) if to == "card" else receiver_pair.to_server(record_frame)
    c = assert_failed(effects, code, by_peer=True)
    assert c.reason == "peer closed the channel"


def assert_dead(channel) -> None:
    """A closed channel ignores every further input."""
    assert channel.closed and not channel.established
    hello = encode_frame(Hello(r1=bytes(32), server_key=fixed_key().public_key().spki_der))
    assert channel.receive_bytes(hello) == []
    assert channel.receive_bytes(b"garbage that is not a frame") == []
    assert channel.receive_frame(alert(ErrorCode.CLOSE_NOTIFY)) == []
    assert channel.timeout() == []
    assert channel.close() == []
    assert channel.connection_lost() == []
    assert channel.frame_error(WireError(ErrorCode.MALFORMED, "x")) == []
    assert channel.start() == []
    with pytest.raises(RuntimeError, match="not established"):
        channel.send(EchoRequest(b"late"))


def echo_both_ways(p: Pair) -> None:
    """Sealed echo records work in both directions and arrive as Received effects."""
    n = len(p.card_log)
    p.card_send(EchoRequest(b"from the card"))
    assert only(p.card_log[n:], Received) == [Received(EchoReply(b"from the card"))]
    n = len(p.server_log)
    p.server_send(EchoRequest(b"from the server"))
    assert only(p.server_log[n:], Received) == [Received(EchoReply(b"from the server"))]


# ---------------------------------------------------------------- the handshake matrix


MATRIX = list(itertools.product(list(Suite), list(ForwardSecrecy), list(ForwardSecrecy)))


@pytest.mark.parametrize(
    ("suite", "server_fs", "card_fs"),
    MATRIX,
    ids=[f"{s.label}-server_{a.value}-card_{b.value}" for s, a, b in MATRIX],
)
def test_handshake_every_suite_and_forward_secrecy_policy(suite, server_fs, card_fs):
    """
    Every suite (des-cbc-md5 with allow_insecure on both ends) completes under
    every forward-secrecy pair except off/require, which fails with
    FORWARD_SECRECY_REQUIRED from the requiring end; X25519 is used exactly
    when neither end is off; both ends agree on the ChannelInfo; echo works
    both ways and an orderly close reaches the peer.
    """
    p = Pair(cfg(suite, fs=server_fs), cfg(suite, fs=card_fs), seed=f"{suite}{server_fs}{card_fs}".encode())
    p.run()
    if card_fs is REQUIRE and server_fs is OFF:
        assert_failed(p.card_log[1:], ErrorCode.FORWARD_SECRECY_REQUIRED)  # [0] is SetTimer from start()
        assert_failed(p.server_log[2:], ErrorCode.FORWARD_SECRECY_REQUIRED, by_peer=True)
        return
    if server_fs is REQUIRE and card_fs is OFF:
        assert_failed(p.server_log[2:], ErrorCode.FORWARD_SECRECY_REQUIRED)
        assert_failed(p.card_log[2:], ErrorCode.FORWARD_SECRECY_REQUIRED, by_peer=True)
        return
    fs = server_fs is not OFF and card_fs is not OFF
    (s_up,) = only(p.server_log, Established)
    (c_up,) = only(p.card_log, Established)
    # des-cbc-md5 mixes X25519 only into key confirmation: never reported forward secret
    assert s_up.info == c_up.info == ChannelInfo(suite, fs and suite is not Suite.DES_CBC_MD5, fixed_fingerprint())
    assert c_up.info.insecure is (suite is DES)
    assert p.server.established and p.card.established
    # the handshake timer was set at start and cancelled on establishment, on both ends
    for log in (p.server_log, p.card_log):
        assert isinstance(log[0], SetTimer) and log[0].seconds == 30.0
        assert [type(e) for e in log if isinstance(e, (SetTimer, CancelTimer))] == [SetTimer, CancelTimer]
    echo_both_ways(p)
    effects = p.card.close()
    p.card_log += effects
    (record,) = sends(effects)
    assert_failed(effects, ErrorCode.CLOSE_NOTIFY, sent=[record])
    assert_sealed_close(record, p, "server", ErrorCode.CLOSE_NOTIFY)
    assert len(closes(p.server_log)) == len(closes(p.card_log)) == 1


def test_handshake_frames_have_the_expected_shape():
    """The four frames are Hello, KeyTransport, ServerFinished, ClientFinished, carrying r1, r2, the offer and the key."""
    p = Pair(cfg(fs=PREFER), cfg(CHACHA, GCM, fs=PREFER))
    f = p.handshake()
    hello, kt, sf, cf = (decode_frame(f[k]) for k in ("hello", "key_transport", "server_finished", "client_finished"))
    assert isinstance(hello, Hello) and hello.r1 == p.server_rand.draws[0][1]
    assert hello.server_key == fixed_key().public_key().spki_der and len(hello.fs_public) == 32
    assert isinstance(kt, KeyTransport) and kt.r2 == p.card_rand.draws[0][1]
    assert kt.suites == (CHACHA, GCM) and len(kt.fs_public) == 32 and len(kt.ciphertext) == 256
    assert isinstance(sf, ServerFinished) and (sf.suite, sf.forward_secret) == (GCM, True)
    assert isinstance(cf, ClientFinished)
    # s1 and s2 never appear in the clear
    s1, s2 = p.card_rand.draws[1][1], p.card_rand.draws[2][1]
    for frame in f.values():
        assert s1 not in frame and s2 not in frame


def test_server_not_established_until_client_finished():
    """The server has keys after KeyTransport but is not established (nor accepts big frames) until ClientFinished checks out."""
    p = Pair()
    hello = p.start()
    (kt,) = sends(p.to_card(hello))
    (sf,) = sends(p.to_server(kt))
    assert not p.server.established
    assert p.server.max_frame_body() == MAX_HANDSHAKE_BODY
    with pytest.raises(RuntimeError, match="not established"):
        p.server.send(EchoRequest(b"too early"))
    (cf,) = sends(p.to_card(sf))
    assert p.card.established and p.card.max_frame_body() == MAX_FRAME_BODY
    p.to_server(cf)
    assert p.server.established and p.server.max_frame_body() == MAX_FRAME_BODY


# ---------------------------------------------------------------- suite negotiation


@pytest.mark.parametrize(
    ("server", "card", "chosen"),
    [
        ((CHACHA, GCM), (GCM, CHACHA), CHACHA),
        ((GCM, CHACHA), (CHACHA, GCM), GCM),
        ((CBC, GCM, CHACHA), (GCM, CHACHA, CBC), CBC),
        ((GCM,), (CBC, CHACHA, GCM), GCM),
        ((DES, GCM), (GCM, DES), DES),
        ((GCM, DES), (DES, GCM), GCM),
        ((DES, CBC), (CBC,), CBC),
    ],
    ids=lambda x: "+".join(s.label for s in x) if isinstance(x, tuple) else getattr(x, "label", str(x)),
)
def test_server_preference_wins(server, card, chosen):
    """The chosen suite is the first of the server's list that the card offered, whatever the card's order."""
    p = Pair(cfg(*server), cfg(*card))
    p.handshake()
    (up,) = only(p.card_log, Established)
    assert up.info.suite is chosen


def test_insecure_suite_needs_both_ends():
    """des-cbc-md5 cannot be listed without allow_insecure, and is used only when both ends list it."""
    with pytest.raises(ValueError, match="des-cbc-md5 is insecure"):
        ChannelConfig(suites=(DES,), allow_insecure=False)
    # the card allows it but the server does not: a strong suite is chosen
    p = Pair(cfg(), cfg(DES, GCM))
    p.handshake()
    assert only(p.card_log, Established)[0].info.suite is GCM
    # the server allows it but the card does not
    p = Pair(cfg(DES, CBC), cfg())
    p.handshake()
    assert only(p.card_log, Established)[0].info.suite is CBC


def test_no_common_suite():
    """A card offering nothing the server accepts gets a NO_COMMON_SUITE alert naming the offer in the server's log."""
    p = Pair(cfg(GCM), cfg(CHACHA, CBC))
    p.run()
    c = assert_failed(p.server_log[2:], ErrorCode.NO_COMMON_SUITE)
    assert "chacha20-poly1305,aes256-cbc-hmac-sha256" in c.reason
    assert_failed(p.card_log[2:], ErrorCode.NO_COMMON_SUITE, by_peer=True)
    assert_dead(p.server)
    assert_dead(p.card)


def test_insecure_suite_refused():
    """A card offering only des-cbc-md5 to a server that does not enable it gets INSECURE_SUITE_REFUSED."""
    p = Pair(cfg(), cfg(DES))
    p.run()
    c = assert_failed(p.server_log[2:], ErrorCode.INSECURE_SUITE_REFUSED)
    assert "only des-cbc-md5" in c.reason
    assert_failed(p.card_log[2:], ErrorCode.INSECURE_SUITE_REFUSED, by_peer=True)
    # des-cbc-md5 among others the server lacks is plain NO_COMMON_SUITE
    p = Pair(cfg(GCM), cfg(DES, CBC))
    p.run()
    assert_failed(p.server_log[2:], ErrorCode.NO_COMMON_SUITE)


# ---------------------------------------------------------------- forward secrecy


def test_card_requires_forward_secrecy():
    """A card that requires X25519 refuses a Hello without it, before drawing any secret."""
    p = Pair(cfg(fs=OFF), cfg(fs=REQUIRE))
    hello = p.start()
    assert decode_frame(hello).fs_public == b""
    c = assert_failed(p.to_card(hello), ErrorCode.FORWARD_SECRECY_REQUIRED)
    assert "requires" in c.reason
    assert p.card_rand.draws == []
    assert_failed(p.to_server(alert(ErrorCode.FORWARD_SECRECY_REQUIRED)), ErrorCode.FORWARD_SECRECY_REQUIRED, by_peer=True)


def test_server_requires_forward_secrecy():
    """A server that requires X25519 refuses a KeyTransport without it."""
    p = Pair(cfg(fs=REQUIRE), cfg(fs=OFF))
    hello = p.start()
    (kt,) = sends(p.to_card(hello))
    assert decode_frame(kt).fs_public == b""
    c = assert_failed(p.to_server(kt), ErrorCode.FORWARD_SECRECY_REQUIRED)
    assert "server requires" in c.reason


def test_card_x25519_key_without_server_offer():
    """An X25519 key in the KeyTransport when the Hello offered none is UNEXPECTED_MESSAGE."""
    p = Pair(cfg(fs=OFF), cfg())
    hello = p.start()
    (kt,) = sends(p.to_card(hello))
    k = decode_frame(kt)
    forged = encode_frame(KeyTransport(r2=k.r2, suites=k.suites, fs_public=b"\x09" * 32, ciphertext=k.ciphertext))
    c = assert_failed(p.to_server(forged), ErrorCode.UNEXPECTED_MESSAGE)
    assert "did not offer" in c.reason


def test_small_order_x25519_keys_rejected():
    """An all-zero (small-order) X25519 key fails the handshake on either end: HANDSHAKE_FAILED."""
    p = Pair()
    hello = p.start()
    (kt,) = sends(p.to_card(hello))
    k = decode_frame(kt)
    forged = encode_frame(KeyTransport(r2=k.r2, suites=k.suites, fs_public=bytes(32), ciphertext=k.ciphertext))
    c = assert_failed(p.to_server(forged), ErrorCode.HANDSHAKE_FAILED)
    assert "X25519" in c.reason
    # a Hello with a small-order key: the card notices when it computes the shared secret
    p = Pair()
    h = decode_frame(p.start())
    bad_hello = encode_frame(Hello(r1=h.r1, server_key=h.server_key, fs_public=bytes(32)))
    (kt,) = sends(p.to_card(bad_hello))
    (sf,) = sends(p.to_server(kt))
    assert_failed(p.to_card(sf), ErrorCode.HANDSHAKE_FAILED)


# ---------------------------------------------------------------- server authentication


def test_server_key_mismatch():
    """A card pinning another fingerprint refuses the Hello with SERVER_KEY_MISMATCH and sends no secret."""
    other = "SHA256:" + "A" * 43
    p = Pair(pin=other)
    c = assert_failed(p.to_card(p.start()), ErrorCode.SERVER_KEY_MISMATCH)
    assert fixed_fingerprint() in c.reason and other in c.reason
    assert p.card_rand.draws == []
    assert_failed(p.to_server(alert(ErrorCode.SERVER_KEY_MISMATCH)), ErrorCode.SERVER_KEY_MISMATCH, by_peer=True)


def test_pinned_key_that_is_not_rsa():
    """A Hello whose (pinned) key is not a usable RSA public key is MALFORMED."""
    junk = b"\x30\x03\x02\x01\x01"
    p = Pair(pin=crypto.fingerprint(junk))
    p.start()
    hello = encode_frame(Hello(r1=bytes(32), server_key=junk))
    c = assert_failed(p.to_card(hello), ErrorCode.MALFORMED)
    assert "server key" in c.reason


def _forge_key_transport(p: Pair, kt_frame: bytes, *, plaintext: bytes | None = None, ciphertext: bytes | None = None) -> bytes:
    k = decode_frame(kt_frame)
    if ciphertext is None:
        ciphertext = fixed_key().public_key().oaep_encrypt(plaintext, DRBG(b"mitm"))
    return encode_frame(KeyTransport(r2=k.r2, suites=k.suites, fs_public=k.fs_public, ciphertext=ciphertext))


def _secrets(p: Pair) -> tuple[bytes, bytes, bytes]:
    r2, s1, s2 = (p.card_rand.draws[i][1] for i in range(3))
    return r2, s1, s2


def test_wrong_r1_and_undecryptable_key_transport_look_the_same():
    """
    A key transport echoing the wrong r1 (encrypted with the real server key),
    one that does not decrypt, one with the wrong plaintext length, and one
    whose inner r2 differs from the clear r2 all fail with HANDSHAKE_FAILED,
    and the alert bytes on the wire are identical (no OAEP oracle); only the
    local log reason tells them apart.
    """
    alerts, reasons = [], []
    for variant in ("wrong r1", "undecryptable", "wrong length", "wrong r2"):
        p = Pair(seed=b"forge")
        hello = p.start()
        (kt,) = sends(p.to_card(hello))
        r2, s1, s2 = _secrets(p)
        r1 = decode_frame(hello).r1
        if variant == "wrong r1":
            forged = _forge_key_transport(p, kt, plaintext=SessionSecrets(bytes(32), r2, s1, s2).encode())
        elif variant == "undecryptable":
            forged = _forge_key_transport(p, kt, ciphertext=b"\x00" + DRBG(b"noise")(255))
        elif variant == "wrong length":
            forged = _forge_key_transport(p, kt, plaintext=(r1 + r2 + s1 + s2)[:-1])
        else:
            forged = _forge_key_transport(p, kt, plaintext=SessionSecrets(r1, bytes(32), s1, s2).encode())
        effects = p.to_server(forged)
        c = assert_failed(effects, ErrorCode.HANDSHAKE_FAILED)
        alerts.append(sends(effects))
        reasons.append(c.reason)
        assert_dead(p.server)
    assert alerts == [[alert(ErrorCode.HANDSHAKE_FAILED)]] * 4
    assert len(set(reasons)) == 4


def test_key_transport_ciphertext_of_wrong_size():
    """A key transport ciphertext shorter or longer than the modulus is HANDSHAKE_FAILED too."""
    for size in (1, 255, 257, 512):
        p = Pair()
        (kt,) = sends(p.to_card(p.start()))
        assert_failed(p.to_server(_forge_key_transport(p, kt, ciphertext=b"\x01" * size)), ErrorCode.HANDSHAKE_FAILED)


def test_replayed_key_transport_from_another_session():
    """A KeyTransport recorded from one session is refused by a server that sent a different r1."""
    old = Pair(seed=b"session one")
    (kt,) = sends(old.to_card(old.start()))
    p = Pair(seed=b"session two")
    p.start()
    assert_failed(p.to_server(kt), ErrorCode.HANDSHAKE_FAILED)


# ---------------------------------------------------------------- downgrade and tampering


@pytest.mark.parametrize("offer", [(CBC,), (CHACHA,), (CBC, CHACHA, GCM)], ids=lambda o: "+".join(s.label for s in o))
def test_downgrade_by_rewriting_the_offer(offer):
    """
    A man in the middle who rewrites the card's offer (dropping or reordering
    suites) makes the server choose a suite the card did offer, but the
    transcript hash differs, so the card refuses the ServerFinished with
    KEY_CONFIRMATION_FAILED (a plaintext alert: it has no keys).
    """
    p = Pair(cfg(GCM, CHACHA, CBC), cfg(GCM, CHACHA, CBC))
    hello = p.start()
    (kt,) = sends(p.to_card(hello))
    k = decode_frame(kt)
    forged = encode_frame(KeyTransport(r2=k.r2, suites=offer, fs_public=k.fs_public, ciphertext=k.ciphertext))
    (sf,) = sends(p.to_server(forged))
    assert decode_frame(sf).suite is next(s for s in (GCM, CHACHA, CBC) if s in offer)
    c = assert_failed(p.to_card(sf), ErrorCode.KEY_CONFIRMATION_FAILED)
    assert "server finished MAC mismatch" in c.reason
    assert_failed(p.to_server(alert(ErrorCode.KEY_CONFIRMATION_FAILED)), ErrorCode.KEY_CONFIRMATION_FAILED, by_peer=True)


def _to_server_finished(p: Pair) -> bytes:
    (kt,) = sends(p.to_card(p.start()))
    (sf,) = sends(p.to_server(kt))
    return sf


@pytest.mark.parametrize(
    ("change", "code"),
    [
        ({"suite": CHACHA}, ErrorCode.KEY_CONFIRMATION_FAILED),  # offered, but not what the MAC covers
        ({"suite": CBC}, ErrorCode.SUITE_NOT_OFFERED),
        ({"suite": DES}, ErrorCode.SUITE_NOT_OFFERED),
        ({"forward_secret": False}, ErrorCode.KEY_CONFIRMATION_FAILED),
        ({"mac": b"\x00" * 32}, ErrorCode.KEY_CONFIRMATION_FAILED),
    ],
    ids=["suite-offered", "suite-not-offered", "suite-insecure", "fs-flag", "mac"],
)
def test_tampered_server_finished(change, code):
    """A ServerFinished altered in transit is refused: SUITE_NOT_OFFERED or KEY_CONFIRMATION_FAILED, in a plaintext alert."""
    p = Pair(cfg(GCM, CHACHA, CBC), cfg(GCM, CHACHA))
    sf = decode_frame(_to_server_finished(p))
    fields = {"suite": sf.suite, "forward_secret": sf.forward_secret, "mac": sf.mac, **change}
    assert_failed(p.to_card(encode_frame(ServerFinished(**fields))), code)
    assert_dead(p.card)


def test_server_finished_mac_bit_flips():
    """Flipping any single byte of the ServerFinished MAC is KEY_CONFIRMATION_FAILED."""
    for i in range(32):
        p = Pair()
        sf = bytearray(_to_server_finished(p))
        sf[-32 + i] ^= 0x01
        assert_failed(p.to_card(bytes(sf)), ErrorCode.KEY_CONFIRMATION_FAILED)


def test_tampered_client_finished():
    """A ClientFinished with a wrong MAC is KEY_CONFIRMATION_FAILED, alerted in the clear, and the server never establishes."""
    for i in (0, 17, 31):
        p = Pair()
        sf = _to_server_finished(p)
        cf = bytearray(sends(p.to_card(sf))[0])
        cf[-32 + i] ^= 0x80
        c = assert_failed(p.to_server(bytes(cf)), ErrorCode.KEY_CONFIRMATION_FAILED)
        assert "client finished" in c.reason
        assert not only(p.server_log, Established)
        # the (established) card authenticates nothing from this alert but closes on it
        assert_failed(p.to_card(alert(ErrorCode.KEY_CONFIRMATION_FAILED)), ErrorCode.KEY_CONFIRMATION_FAILED, by_peer=True)


RECORD_SUITES = [GCM, CHACHA, CBC, DES]


def _record_pair(suite: Suite) -> tuple[Pair, bytes]:
    p = Pair(cfg(suite), cfg(suite), seed=b"records " + suite.label.encode())
    p.handshake()
    effects = p.card.send(EchoRequest(b"tamper me"))
    (frame,) = sends(effects)
    return p, frame


@pytest.mark.parametrize("suite", RECORD_SUITES, ids=lambda s: s.label)
def test_tampered_record_every_byte(suite):
    """
    Flipping any byte of a sealed record is detected: in the sealed part
    (ciphertext, IV, tag) BAD_RECORD; in the sequence number
    OUT_OF_ORDER_RECORD; in the header a framing error. Each failure closes
    the server once and, being established, it sends a sealed Close the card
    can authenticate.
    """
    _, frame = _record_pair(suite)
    seen = set()
    for pos in range(len(frame)):
        p, again = _record_pair(suite)
        assert again == frame  # seeded: every pair produces the same record
        bad = bytearray(frame)
        bad[pos] ^= 0x01
        effects = p.server.receive_frame(bytes(bad))
        (closed,) = closes(effects)
        if pos >= 16:
            expected = ErrorCode.BAD_RECORD
        elif pos >= 8:
            expected = ErrorCode.OUT_OF_ORDER_RECORD
        else:
            # magic, version, type, then the length: top byte over 1 MiB, the others a size mismatch
            expected = {0: ErrorCode.MALFORMED, 1: ErrorCode.MALFORMED, 2: ErrorCode.PROTOCOL_VERSION,
                        3: ErrorCode.UNKNOWN_TYPE, 4: ErrorCode.FRAME_TOO_LARGE}.get(pos, ErrorCode.MALFORMED)
        seen.add(expected)
        (record,) = sends(effects)
        assert_failed(effects, expected, sent=[record])
        assert_sealed_close(record, p, "card", expected)
        assert not only(effects, Received)
    assert seen == {ErrorCode.BAD_RECORD, ErrorCode.OUT_OF_ORDER_RECORD, ErrorCode.MALFORMED,
                    ErrorCode.PROTOCOL_VERSION, ErrorCode.UNKNOWN_TYPE, ErrorCode.FRAME_TOO_LARGE}


@pytest.mark.parametrize("suite", RECORD_SUITES, ids=lambda s: s.label)
def test_replayed_record(suite):
    """A record delivered twice is REPLAYED_RECORD (after the first was accepted and answered)."""
    p, frame = _record_pair(suite)
    (reply,) = sends(p.to_server(frame))
    assert p.to_card(reply) == [Received(EchoReply(b"tamper me"))]
    effects = p.to_server(frame)
    (close_record,) = sends(effects)
    c = assert_failed(effects, ErrorCode.REPLAYED_RECORD, sent=[close_record])
    assert "record 0 replayed (expected 1)" in c.reason
    assert_sealed_close(close_record, p, "card", ErrorCode.REPLAYED_RECORD)


@pytest.mark.parametrize("suite", RECORD_SUITES, ids=lambda s: s.label)
def test_reordered_and_dropped_records(suite):
    """A record arriving ahead of its turn (reordered, or after a dropped one) is OUT_OF_ORDER_RECORD."""
    p, r0 = _record_pair(suite)
    (r1,) = sends(p.card.send(EchoRequest(b"second")))
    (r2,) = sends(p.card.send(EchoRequest(b"third")))
    effects = p.to_server(r1)
    c = assert_failed(effects, ErrorCode.OUT_OF_ORDER_RECORD, sent=sends(effects))
    assert len(sends(effects)) == 1  # the sealed Close
    assert "record 1 arrived, expected 0" in c.reason
    p, r0 = _record_pair(suite)
    sends(p.card.send(EchoRequest(b"second")))  # sealed, then lost in transit
    (r2,) = sends(p.card.send(EchoRequest(b"third")))
    assert len(sends(p.to_server(r0))) == 1
    effects = p.to_server(r2)
    c = assert_failed(effects, ErrorCode.OUT_OF_ORDER_RECORD, sent=sends(effects))
    assert "record 2 arrived, expected 1" in c.reason


@pytest.mark.parametrize("suite", RECORD_SUITES, ids=lambda s: s.label)
def test_reflected_and_foreign_records(suite):
    """A card's own record reflected back to it, or a record from another session, fails authentication: BAD_RECORD."""
    p, frame = _record_pair(suite)
    effects = p.to_card(frame)  # card->server direction byte in the AAD: the card must not accept it
    assert_failed(effects, ErrorCode.BAD_RECORD, sent=sends(effects))
    other = Pair(cfg(suite), cfg(suite), seed=b"another session")
    other.handshake()
    effects = other.to_server(frame)
    assert_failed(effects, ErrorCode.BAD_RECORD, sent=sends(effects))


def test_record_with_a_non_inner_message_inside():
    """A correctly sealed record whose plaintext is a frame message (or garbage) is refused after authentication."""
    for plaintext, code in ((b"\x05\x00\x00", ErrorCode.UNEXPECTED_MESSAGE), (b"\x99", ErrorCode.UNKNOWN_TYPE), (b"", ErrorCode.MALFORMED)):
        q = Pair()
        q.handshake()
        cipher = q.card._core.keys.card_to_server
        sealed = cipher.seal(seq_bytes(0), plaintext, record_aad(CARD_TO_SERVER, 0))
        effects = q.to_server(encode_frame(Record(seq=0, sealed=sealed)))
        assert_failed(effects, code, sent=sends(effects))


# ---------------------------------------------------------------- timeouts


def test_handshake_timeout_server_awaiting_key_transport():
    """The server's handshake timer firing before the KeyTransport sends a HANDSHAKE_TIMEOUT alert and closes."""
    p = Pair(cfg(timeout=5))
    p.start()
    assert p.server_log[0] == SetTimer(5)
    c = assert_failed(p.server.timeout(), ErrorCode.HANDSHAKE_TIMEOUT)
    assert "within 5 s" in c.reason
    assert_dead(p.server)


def test_handshake_timeout_server_awaiting_client_finished():
    """A server that sent ServerFinished and never gets ClientFinished times out with a plaintext alert."""
    p = Pair()
    _to_server_finished(p)
    assert_failed(p.server.timeout(), ErrorCode.HANDSHAKE_TIMEOUT)


def test_handshake_timeout_card_stages():
    """The card times out waiting for Hello and waiting for ServerFinished, alerting the server each time."""
    p = Pair(card_config=cfg(timeout=2.5))
    assert p.card.start() == [SetTimer(2.5)]
    assert_failed(p.card.timeout(), ErrorCode.HANDSHAKE_TIMEOUT)
    p = Pair()
    (kt,) = sends(p.to_card(p.start()))
    effects = p.card.timeout()
    assert_failed(effects, ErrorCode.HANDSHAKE_TIMEOUT)
    assert_failed(p.to_server(sends(effects)[0]), ErrorCode.HANDSHAKE_TIMEOUT, by_peer=True)


def test_stale_timeout_after_establishment_is_harmless():
    """A timer that fires after establishment (already cancelled) changes nothing."""
    p = Pair()
    p.handshake()
    assert p.server.timeout() == [] and p.card.timeout() == []
    assert p.server.established and p.card.established
    echo_both_ways(p)


# ---------------------------------------------------------------- unexpected messages


@pytest.mark.parametrize("kind", ["hello", "server_finished", "client_finished"])
def test_unexpected_message_server_awaiting_key_transport(kind):
    """The server waiting for KeyTransport refuses any other handshake message with UNEXPECTED_MESSAGE."""
    donor = Pair(seed=b"donor").handshake()
    p = Pair()
    p.start()
    c = assert_failed(p.to_server(donor[kind]), ErrorCode.UNEXPECTED_MESSAGE)
    assert "not valid in this state" in c.reason


@pytest.mark.parametrize("kind", ["key_transport", "server_finished", "client_finished"])
def test_unexpected_message_card_awaiting_hello(kind):
    """The card waiting for Hello refuses any other handshake message with UNEXPECTED_MESSAGE."""
    donor = Pair(seed=b"donor").handshake()
    p = Pair()
    p.card.start()
    assert_failed(p.to_card(donor[kind]), ErrorCode.UNEXPECTED_MESSAGE)


def test_unexpected_message_mid_handshake():
    """A second Hello to a card awaiting ServerFinished, or a second KeyTransport to a server awaiting ClientFinished, is UNEXPECTED_MESSAGE."""
    p = Pair()
    hello = p.start()
    (kt,) = sends(p.to_card(hello))
    assert_failed(p.to_card(hello), ErrorCode.UNEXPECTED_MESSAGE)
    p = Pair()
    hello = p.start()
    (kt,) = sends(p.to_card(hello))
    sends(p.to_server(kt))
    assert_failed(p.to_server(kt), ErrorCode.UNEXPECTED_MESSAGE)


def test_handshake_message_after_establishment():
    """A handshake message on an established channel is UNEXPECTED_MESSAGE, reported in a sealed Close."""
    p = Pair()
    frames = p.handshake()
    effects = p.to_server(frames["key_transport"])
    (record,) = sends(effects)
    assert_failed(effects, ErrorCode.UNEXPECTED_MESSAGE, sent=[record])
    assert_sealed_close(record, p, "card", ErrorCode.UNEXPECTED_MESSAGE)


def test_inner_message_in_the_clear():
    """An inner message (Close, EchoRequest) sent as a plaintext frame is UNEXPECTED_MESSAGE, never honoured."""
    for msg in (Close(), EchoRequest(b"x")):
        p = Pair()
        p.handshake()
        body = msg.SCHEMA.build({"code": msg.code} if isinstance(msg, Close) else {"data": msg.data})
        frame = build_header(msg.TYPE, len(body)) + body
        effects = p.to_server(frame)
        c = assert_failed(effects, ErrorCode.UNEXPECTED_MESSAGE, sent=sends(effects))
        assert "only valid inside a sealed record" in c.reason


def test_record_before_establishment():
    """A Record before the handshake completes is UNEXPECTED_MESSAGE, with a plaintext alert, on either end and in every stage."""
    donor = Pair(seed=b"donor")
    donor.handshake()
    (record,) = sends(donor.card.send(EchoRequest(b"early")))
    # server awaiting KeyTransport
    p = Pair()
    p.start()
    assert_failed(p.to_server(record), ErrorCode.UNEXPECTED_MESSAGE)
    # server awaiting ClientFinished (keys derived but not confirmed)
    p = Pair()
    _to_server_finished(p)
    assert_failed(p.to_server(record), ErrorCode.UNEXPECTED_MESSAGE)
    # card awaiting Hello, and awaiting ServerFinished
    p = Pair()
    p.card.start()
    assert_failed(p.to_card(record), ErrorCode.UNEXPECTED_MESSAGE)
    p = Pair()
    sends(p.to_card(p.start()))
    assert_failed(p.to_card(record), ErrorCode.UNEXPECTED_MESSAGE)


def test_oversized_frame_before_establishment():
    """Before establishment a header announcing more than MAX_HANDSHAKE_BODY is FRAME_TOO_LARGE, without waiting for the body."""
    p = Pair()
    p.start()
    effects = p.to_server(build_header(0x02, MAX_HANDSHAKE_BODY + 1))
    c = assert_failed(effects, ErrorCode.FRAME_TOO_LARGE)
    assert f"limit of {MAX_HANDSHAKE_BODY}" in c.reason
    p = Pair()
    p.card.start()
    frame = build_header(0x01, MAX_HANDSHAKE_BODY + 1) + bytes(MAX_HANDSHAKE_BODY + 1)
    assert_failed(p.card.receive_frame(frame), ErrorCode.FRAME_TOO_LARGE)


def test_garbage_stream():
    """Bytes that are not a frame header close the channel with the header's error code."""
    for data, code in ((b"GET / HTTP/1.1\r\n", ErrorCode.MALFORMED), (b"VS\x02\x01\x00\x00\x00\x00", ErrorCode.PROTOCOL_VERSION)):
        p = Pair()
        p.start()
        assert_failed(p.to_server(data), code)


# ---------------------------------------------------------------- close semantics


def test_orderly_close_from_the_server():
    """The server's close() sends a sealed Close(CLOSE_NOTIFY); the card reports a peer close and sends nothing back."""
    p = Pair()
    p.handshake()
    effects = p.server.close()
    (record,) = sends(effects)
    assert_failed(effects, ErrorCode.CLOSE_NOTIFY, sent=[record])
    effects = p.to_card(record)
    assert_failed(effects, ErrorCode.CLOSE_NOTIFY, by_peer=True)
    assert_dead(p.card)
    assert_dead(p.server)


def test_close_with_an_error_code():
    """close(code) carries the code to the peer, authenticated."""
    p = Pair()
    p.handshake()
    (record,) = sends(p.card.close(ErrorCode.IDLE_TIMEOUT))
    assert_sealed_close(record, p, "server", ErrorCode.IDLE_TIMEOUT)


def test_close_before_establishment_is_a_plaintext_alert():
    """Closing during the handshake sends the code as a plaintext Alert."""
    p = Pair()
    p.start()
    assert_failed(p.server.close(ErrorCode.INTERNAL_ERROR), ErrorCode.INTERNAL_ERROR)


def test_connection_lost():
    """Losing the transport closes the channel quietly (CLOSE_NOTIFY, by the peer), in any state."""
    for advance in (0, 1, 4):
        p = Pair()
        if advance >= 1:
            sends(p.to_card(p.start()))
        if advance == 4:
            p = Pair()
            p.handshake()
        for ch in (p.server, p.card):
            c = assert_failed(ch.connection_lost(), ErrorCode.CLOSE_NOTIFY, by_peer=True)
            assert c.reason == "connection lost"
            assert_dead(ch)


def test_plaintext_alert_after_establishment():
    """An unauthenticated plaintext alert still closes an established channel, and the log says it was unauthenticated."""
    p = Pair()
    p.handshake()
    c = assert_failed(p.to_card(alert(ErrorCode.INTERNAL_ERROR)), ErrorCode.INTERNAL_ERROR, by_peer=True)
    assert "unauthenticated" in c.reason


def test_everything_after_close_is_ignored():
    """After a failure, further bytes (even valid frames), timers and calls produce no effects."""
    p = Pair()
    frames = p.handshake()
    effects = p.to_server(b"\x00" * 8)
    (record,) = sends(effects)
    assert_failed(effects, ErrorCode.MALFORMED, sent=[record])
    for frame in frames.values():
        assert p.server.receive_bytes(frame) == []
    assert_dead(p.server)
    assert len(closes(p.server_log)) == 1


def test_frames_after_a_failing_frame_in_the_same_chunk_are_ignored():
    """When one chunk holds a bad frame followed by more frames, processing stops at the failure."""
    p = Pair()
    hello = p.start()
    (kt,) = sends(p.to_card(hello))
    effects = p.to_server(alert(ErrorCode.CLOSE_NOTIFY) + kt + b"junk")
    assert_failed(effects, ErrorCode.CLOSE_NOTIFY, by_peer=True)


def test_sequence_numbers_exhausted():
    """A channel whose send counter reached 2^64-1 refuses to seal: INTERNAL_ERROR, closed, nothing sent."""
    p = Pair()
    p.handshake()
    p.card._core.send_seq = MAX_SEQ
    effects = p.card.send(EchoRequest(b"one too many"))
    c = assert_failed(effects, ErrorCode.INTERNAL_ERROR, sent=[])
    assert "sequence numbers exhausted" in c.reason


def test_received_effect_for_application_messages():
    """Authenticated inner messages other than Close and EchoRequest reach the application as Received."""
    p = Pair()
    p.handshake()
    n = len(p.card_log)
    p.server_send(EchoReply(b"unsolicited"))
    assert p.card_log[n:] == [Received(EchoReply(b"unsolicited"))]


def test_largest_echo_through_the_byte_stream():
    """After establishment the byte-stream path accepts frames above the handshake limit (a MAX_ECHO echo both ways)."""
    from vsc.wire.messages import MAX_ECHO

    p = Pair(cfg(CBC), cfg(CBC))
    p.handshake()
    data = bytes(range(256)) * (MAX_ECHO // 256)
    (record,) = sends(p.card.send(EchoRequest(data)))
    assert len(record) > MAX_HANDSHAKE_BODY
    replies = []
    for i in range(0, len(record), 1000):
        replies += sends(p.to_server(record[i : i + 1000]))
    (reply,) = replies
    assert p.to_card(reply) == [Received(EchoReply(data))]


def test_client_finished_and_a_large_record_in_one_chunk():
    """ClientFinished followed by a large record in the same chunk: the limit rises between the two frames."""
    p = Pair()
    (kt,) = sends(p.to_card(p.start()))
    (sf,) = sends(p.to_server(kt))
    (cf,) = sends(p.to_card(sf))
    (record,) = sends(p.card.send(EchoRequest(b"x" * 10000)))
    effects = p.to_server(cf + record)
    assert only(effects, Established)
    (reply,) = sends(effects)
    assert p.to_card(reply) == [Received(EchoReply(b"x" * 10000))]


# ---------------------------------------------------------------- chunking


def _stage(kind: str) -> tuple[Pair, bytes, str]:
    """A fresh seeded pair advanced until ``kind`` is the next frame to deliver."""
    p = Pair(seed=b"chunking")
    hello = p.start()
    if kind == "hello":
        return p, hello, "card"
    (kt,) = sends(p.card.receive_frame(hello))
    if kind == "key_transport":
        return p, kt, "server"
    (sf,) = sends(p.server.receive_frame(kt))
    if kind == "server_finished":
        return p, sf, "card"
    (cf,) = sends(p.card.receive_frame(sf))
    return p, cf, "server"


@pytest.mark.parametrize("kind", ["hello", "key_transport", "server_finished", "client_finished"])
def test_handshake_frame_split_at_every_offset(kind):
    """Each handshake frame, fed through receive_bytes in two chunks split at every offset, yields exactly the effects of the whole frame."""
    p, frame, side = _stage(kind)
    baseline = (p.card if side == "card" else p.server).receive_frame(frame)
    assert sends(baseline) or only(baseline, Established)
    for i in range(len(frame) + 1):
        q, again, _ = _stage(kind)
        assert again == frame
        ch = q.card if side == "card" else q.server
        first = ch.receive_bytes(frame[:i])
        assert first == [] or i == len(frame)
        assert first + ch.receive_bytes(frame[i:]) == baseline, f"split at {i}"


def test_whole_handshake_byte_at_a_time():
    """Delivering every handshake frame one byte at a time gives the same four frames and the same channel."""
    reference = Pair(seed=b"bytewise").handshake()
    p = Pair(seed=b"bytewise")
    out = {"hello": p.start()}

    def trickle(ch, data):
        effects = []
        for b in data:
            effects += ch.receive_bytes(bytes([b]))
        return effects

    (out["key_transport"],) = sends(trickle(p.card, out["hello"]))
    (out["server_finished"],) = sends(trickle(p.server, out["key_transport"]))
    (out["client_finished"],) = sends(trickle(p.card, out["server_finished"]))
    assert only(trickle(p.server, out["client_finished"]), Established)
    assert out == reference


# ---------------------------------------------------------------- processing order and unreadable alerts (§3, §8, §9.2)


def test_an_out_of_place_type_is_unexpected_whatever_its_body():
    """
    §3 step 6 / §8 step 5: an inner-only type as a frame, and a frame type
    inside a record, are UNEXPECTED_MESSAGE before their body is parsed: an
    empty, a truncated and a well-formed body all get the same code.
    """
    for body in (b"", b"\x00", b"\x00\x00\x00\x01x", b"\x01" * 40):
        p = Pair()
        p.handshake()
        effects = p.to_server(build_header(0x31, len(body)) + body)  # OP_REQUEST as a frame
        c = assert_failed(effects, ErrorCode.UNEXPECTED_MESSAGE, sent=sends(effects))
        assert "only valid inside a sealed record" in c.reason
    for inner in (b"\x01", b"\x02\x00", b"\x05", b"\x05\x00\x06", b"\x10" + b"\x00" * 30):
        q = Pair()
        q.handshake()
        sealed = q.card._core.keys.card_to_server.seal(seq_bytes(0), inner, record_aad(CARD_TO_SERVER, 0))
        effects = q.to_server(encode_frame(Record(seq=0, sealed=sealed)))
        c = assert_failed(effects, ErrorCode.UNEXPECTED_MESSAGE, sent=sends(effects))
        assert "not valid inside a record" in c.reason


def test_an_alert_with_an_unknown_code_is_never_answered():
    """
    §9.2: an ALERT whose code is not in the table (or whose body does not
    parse) ends the channel like any alert, on either end, before and after
    establishment, and nothing is sent back (not even ALERT(MALFORMED)).
    """
    for body in (b"\x00\x63", b"\xff\xff", b"\x00", b"\x00\x06\x00"):
        frame = build_header(0x05, len(body)) + body
        p = Pair()
        p.start()
        assert_failed(p.to_server(frame), ErrorCode.MALFORMED, sent=[], by_peer=True)
        p = Pair()
        p.handshake()
        assert_failed(p.to_server(frame), ErrorCode.MALFORMED, sent=[], by_peer=True)
        assert_failed(p.to_card(frame), ErrorCode.MALFORMED, sent=[], by_peer=True)


def test_a_sealed_close_with_an_unknown_code_is_never_answered():
    """§9.2: an authenticated CLOSE whose code is unknown (or body unparsable) ends the channel; nothing is sent back."""
    for inner in (b"\x20\x00\x63", b"\x20", b"\x20\x00\x00\x00"):
        p = Pair()
        p.handshake()
        sealed = p.card._core.keys.card_to_server.seal(seq_bytes(0), inner, record_aad(CARD_TO_SERVER, 0))
        effects = p.to_server(encode_frame(Record(seq=0, sealed=sealed)))
        assert_failed(effects, ErrorCode.MALFORMED, sent=[], by_peer=True)
        assert_dead(p.server)


def test_raising_the_limits_restarts_the_idle_timer_with_the_new_time():
    """
    §9.3: when an operation authenticates, the idle timer restarts with the
    longer idle time (the running one was set by the last record with the
    unauthenticated one), and a raised limit of 0 cancels it; before
    establishment nothing is scheduled.
    """
    import attrs as _attrs

    p = Pair(_attrs.evolve(ChannelConfig(), max_body=65536, idle_timeout=3.0))
    assert p.server.raise_limits(MAX_FRAME_BODY, 5.0) == []  # not established: only the limits change
    p = Pair(_attrs.evolve(ChannelConfig(), max_body=65536, idle_timeout=3.0))
    p.handshake()
    assert SetTimer(3.0) in p.server_log
    assert p.server.raise_limits(MAX_FRAME_BODY, 5.0) == [SetTimer(5.0)]
    assert p.server.max_frame_body() == MAX_FRAME_BODY
    assert p.server.raise_limits(MAX_FRAME_BODY, 0.0) == [CancelTimer()]
