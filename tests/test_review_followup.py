"""
Follow-up review: suspicions earlier reviewers left unproven, each proved with a test that failed on the code
before its fix (or argued in the review's report not to be a defect).
"""

from __future__ import annotations

import pytest


# ---------------------------------------------------------------- §10.2: each answer belongs to one request


def test_card_closes_the_channel_on_an_operation_answer_it_did_not_ask_for(tmp_path):
    """
    Rule (docs/protocol.md §10.2): one operation at a time per channel; a request gets its answers (an
    AUTH_CHALLENGE then an OP_RESULT, or one OP_RESULT) and nothing else; a message not valid in the
    receiver's state is a protocol violation (UNEXPECTED_MESSAGE). How it was broken: CardProtocol queued
    every inner message it had not asked for (up to MAX_UNCLAIMED) and handed the oldest to the next request.
    A lying or buggy server that sent one OP_RESULT(OK) while the card sat idle on its channel had it taken as
    the answer to the card's next sync — acknowledged before the server had answered it (here: a sync with a
    wrong insert secret, which the server refuses, came back OK), and every later request on that channel then
    got the answer of the one before. Now an operation message with no request owed an answer closes the
    channel (UNEXPECTED_MESSAGE) and the next request fails with ChannelClosedError (the storage reconnects).
    """
    from tests.test_server_ops import SERIAL, Harness, result_of
    from vsc.net.channel import ChannelClosedError
    from vsc.wire import ErrorCode
    from vsc.wire.ops import Op, OpRequest, OpResult, Status

    h = Harness(tmp_path)
    client, server, _pump = h.connect()
    server.sendMessage(OpResult(status=Status.OK, version=7))
    h.settle()
    d = h.run(client.request(OpRequest(op=Op.SYNC, serial=SERIAL, insert_secret=b"W" * 32, version=1,
                                       protected=b"P")))
    with pytest.raises(ChannelClosedError):
        answer = result_of(d)
        raise AssertionError(f"the sync took an answer the server sent before it was asked: {answer!r}")
    assert client.channel.closed and client.closeCode is ErrorCode.UNEXPECTED_MESSAGE


def test_card_keeps_an_early_timeout_as_its_operation_answer(tmp_path):
    """
    The one answer that may come before the card asks for it (§10.13: challenged --deadline--> TIMEOUT): the
    OP_RESULT(TIMEOUT) the server sends when the AUTH_RESPONSE is late still answers that operation (the card
    computing its answers sees it when it sends them), and a stray OP_RESULT after it closes the channel.
    """
    from tests.test_server_ops import Harness, result_of
    from vsc.wire import ErrorCode
    from vsc.wire.ops import AuthItem, AuthMethod, AuthResponse, OpResult, Status

    h = Harness(tmp_path)
    client, server, _pump = h.connect()
    h.enrol(client)
    h.challenge(client)
    h.clock.advance(31)
    h.settle()
    late = h.run(client.request(AuthResponse(responses=(AuthItem(AuthMethod.PASSWORD, b"x"),), muk=b"M" * 32)))
    assert result_of(late) == OpResult(status=Status.TIMEOUT)
    h.settle()
    assert client.channel.closed  # the server closes on the late answer; nothing was shifted onto a request
    assert client.closeCode is ErrorCode.UNEXPECTED_MESSAGE


# ---------------------------------------------------------------- §10.4: the enrolment code's normal form


def test_enrolment_code_hash_is_the_documented_normal_form():
    """
    Rule (docs/protocol.md §10.4, ENROL_REQUEST.code): the server compares SHA-256 of the code's upper-cased
    letters and digits, other characters dropped. How it was broken: code_hash encoded the kept characters with
    encode("ascii", "replace"), so every non-ASCII letter or digit became "?": two different codes ("ÄÄ" and
    "ÖÖ", "ÉCOLE" and "ÈCOLE") had one hash, and a second server built from the document (which hashes what it
    keeps, in UTF-8) disagreed with vsc about them. No code vsc issues is affected (new_enrolment_code is base32:
    A-Z and 2-7), so no stored hash changes; what holds now is the documented form, with no collisions.
    """
    import hashlib

    from vsc.protocol.auth import code_hash

    def documented(code: str) -> bytes:
        return hashlib.sha256("".join(c for c in code.upper() if c.isalnum()).encode("utf-8")).digest()

    for code in ("abcde-fghij-23456", "ÄÄ", "ÖÖ", "école-42", "ÈCOLE 42", "٣٣"):
        assert code_hash(code) == documented(code), code
    assert code_hash("ÄÄ") != code_hash("ÖÖ")
    assert code_hash("ab cd-ef") == code_hash("ABCDEF")  # separators and case still do not matter


# ---------------------------------------------------------------- §5.2: the server key's size


@pytest.mark.parametrize("bits", [1024, 4160])
def test_server_refuses_a_key_outside_2048_to_4096_bits(tmp_path, bits):
    """
    Rule (docs/protocol.md §5.2): "The RSA key MUST have a modulus of 2048 to 4096 bits (4096 is the largest whose
    KEY_TRANSPORT ciphertext fits, §5.3); a card MUST refuse a shorter key." How it was broken: ``vsc admin init``
    only makes 2048/3072/4096-bit keys, but the server loaded whatever server-key.pem held: an administrator who
    put a 1024-bit (or a 4160-bit) key there got a server that started, listened, and failed every handshake
    (cards refuse the short key; a longer one's ciphertext does not fit KEY_TRANSPORT). Now loading it is
    refused with one line naming the file and the range.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from vsc.server.config import ConfigError, ServerConfig

    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    cfg = ServerConfig(data_dir=tmp_path)
    cfg.key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    with pytest.raises(ConfigError) as e:
        cfg.load_key()
    assert str(e.value) == f"{cfg.key_path} is a {bits}-bit RSA key; the server key must have 2048 to 4096 bits"


# ---------------------------------------------------------------- OpenPGP PSO:CDS: the input is checked first


def _sig_count(card) -> int:
    from vsc.wire import tlv

    body, sw = card.get_data(0x7A)
    assert sw == 0x9000
    return int.from_bytes(tlv.to_dict(tlv.decode_one(body, 0x7A))[0x93], "big")


@pytest.mark.parametrize("attributes, bad, good", [
    ("13" + "2a8648ce3d030107", bytes(65), bytes(32)),  # ECDSA P-256: the input is a hash of at most 64 bytes
    ("16" + "2b06010401da470f01", b"", b"message"),  # Ed25519: something to sign
    ("010800001100", bytes(246), bytes(51)),  # RSA-2048: a PKCS#1 v1.5 payload of at most 245 bytes
])
def test_a_refused_signature_input_counts_no_signature_and_keeps_pw1(attributes, bad, good):
    """
    Rule (OpenPGP card spec 3.4, 4.4.1 DS-Counter: the digital signature counter counts signatures; the C4
    PW1 status byte 00 makes PW1 valid for one PSO:CDS, i.e. one signature). Gnuk (openpgp.c cmd_pso) checks
    the input's length first — GPG_CONDITION_NOT_SATISFIED and return, nothing changed — and increments the
    counter only when a signature was made. How it was broken: vsc's _compute_signature consumed PW1 and stored
    the incremented counter before _sign looked at the input, so an ECDSA input over 64 bytes, an empty EdDSA
    input or an over-long RSA payload answered 6A80 with no signature, yet the counter GnuPG shows had gone up
    and (single-use PW1, the default) the owner had to enter the PIN again. Now the input is checked first: a
    refused one changes nothing, and the next good one signs with the PIN verified and counts 1.
    """
    from tests.test_openpgp import FakeCard

    card = FakeCard()
    assert card.select() == 0x9000
    assert card.verify(0x83, b"12345678") == 0x9000
    assert card.send(0xDA, 0x00, 0xC1, bytes.fromhex(attributes))[1] == 0x9000
    assert card.generate(0xB6)[1] == 0x9000
    assert card.verify(0x81, b"123456") == 0x9000
    assert card.send(0x2A, 0x9E, 0x9A, bad, le=256, extended=True)[1] == 0x6A80
    assert _sig_count(card) == 0
    sig, sw = card.get_all(0x2A, 0x9E, 0x9A, good, le=256)
    assert sw == 0x9000 and sig, "the PIN verified before the refused input no longer signs"
    assert _sig_count(card) == 1


# ---------------------------------------------------------------- the vpcd link: a trickled frame costs its length


from tests.test_piv import session  # noqa: E402,F401 - a fixture


def test_a_frame_trickling_in_on_the_vpcd_link_is_not_copied_on_every_read(session, monkeypatch):  # noqa: F811
    """
    Rule (VpcdProtocol: Int16StringReceiver's framing; a payload is at most 0xFFFF bytes): reading a frame costs
    work in proportion to its length. How it was broken: dataReceived did ``self._rest + data`` and re-split the
    whole buffer on every read, so a peer that sent a 64 KiB frame a few bytes at a time had the card copy the
    beginning of the frame again on every read — O(n²): about 300 MB copied for one frame sent 7 bytes a read
    (2 GB one byte a read), the card process busy on the reactor meanwhile. Now an incomplete frame grows a
    buffer in place and is split once it is all there: the bytes the splitter sees are the frame's, once.
    The answer is unchanged (one response to the one frame).
    """
    from tests.test_piv import VpcdTransport, vpcd_payloads
    from vsc.card import vpcd
    from vsc.wire import apdu

    from tests.test_piv import Drbg

    seen = []
    split = apdu.split_vpcd

    def counting(data):
        seen.append(len(data))
        return split(data)

    monkeypatch.setattr(apdu, "split_vpcd", counting)
    proto = vpcd.VpcdFactory(vpcd.PivCard(session, Drbg(b"trickle"))).buildProtocol(None)
    transport = VpcdTransport()
    proto.makeConnection(transport)
    frame = apdu.encode_vpcd(b"\x00\xca\x00\x00\x00\xff\xf8" + bytes(0xFFFF - 7))
    reads = [frame[:1], frame[1:2], frame[2:3]] + [frame[i:i + 7] for i in range(3, len(frame), 7)]
    for chunk in reads:
        proto.dataReceived(chunk)
    answers = vpcd_payloads(transport.value())
    assert len(answers) == 1 and len(apdu.parse_response(answers[0])[0]) == 0
    assert sum(seen) <= 2 * len(frame), f"{sum(seen)} bytes re-examined for one {len(frame)}-byte frame"
