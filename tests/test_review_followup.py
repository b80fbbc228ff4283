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
