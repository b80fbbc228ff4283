"""
The card's control socket: the schema as data (vsc.wire.control), the AMP
box codec (vsc.wire.ampbox), the daemon's commands built from the schema
(vsc.card.control) and the one synchronous client (vsc.card.client).

The codec is checked against Twisted's own AMP implementation, the client
against the daemon's real ControlProtocol (through a StringTransport) and
against a stand-in daemon on a real UNIX socket (tests/fakecard.py) for the
failures a socket can have.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.protocols import amp

from tests.fakecard import CLOSE, FakeCardSocket, fake_home  # noqa: F401  (a fixture)
from vsc.card import client
from vsc.card import control as daemon
from vsc.card.session import CardError
from vsc.wire import ampbox
from vsc.wire import control as wc

STATUS = {"state": "in-use", "serial": "s-1", "server": "tcp:127.0.0.1:7390", "version": 3, "suite": "aes256-gcm",
          "slots": {"9c": {"algorithm": "p256", "public_key_sha256": "ab" * 32},
                    "9a": {"algorithm": "rsa2048", "public_key_sha256": "cd" * 32}},
          "counters": ["lic:editor:01f03a7183add438:d4887ce23df8", "runs \u00e9"], "data": [],
          "memory_locked": True, "inserted_at": 1764680000.25, "applications": ["piv", "openpgp"]}


# ================================================================ the box codec


def random_box(rng: random.Random) -> dict[bytes, bytes]:
    return {rng.randbytes(rng.randint(1, 20)) + b"k": rng.randbytes(rng.choice((0, 1, 7, 300, 70000 % 65536)))
            for _ in range(rng.randint(0, 6))}


def test_boxes_read_and_written_as_twisted_amp_does():
    """encode_box writes the bytes Twisted's AmpBox writes (which parse back to the same pairs), and decode_box reads Twisted's boxes."""
    rng = random.Random(15)
    for _ in range(200):
        box = random_box(rng)
        ours = ampbox.encode_box(box)
        assert ours == amp.AmpBox(box).serialize() and amp.parseString(ours) == [amp.AmpBox(box)]
        theirs = amp.AmpBox(box).serialize()
        assert ampbox.decode_box(theirs) == (box, len(theirs))


def test_a_box_split_at_every_offset_is_incomplete_until_its_end():
    """Every proper prefix of a box is Incomplete; the whole box decodes, and bytes after it are left alone."""
    box = {b"_answer": b"7", b"signature": bytes(range(256)) * 3, b"e": b""}
    data = ampbox.encode_box(box)
    for cut in range(len(data)):
        with pytest.raises(ampbox.Incomplete):
            ampbox.decode_box(data[:cut])
    assert ampbox.decode_box(data + b"\x00\x05hello") == (box, len(data))


def test_bad_boxes_are_refused_with_one_line():
    """A key over 255 bytes or given twice is Malformed on decode; an empty or long key, or a long value, on encode."""
    long_key = (300).to_bytes(2, "big") + b"k" * 300 + b"\x00\x01v\x00\x00"
    twice = b"\x00\x01a\x00\x01x\x00\x01a\x00\x01y\x00\x00"
    for data, words in ((long_key, "a key of 300 bytes"), (twice, "twice")):
        with pytest.raises(ampbox.Malformed, match=words):
            ampbox.decode_box(data)
    for box, words in (({b"": b"x"}, "0 bytes"), ({b"k" * 256: b"x"}, "256 bytes"),
                       ({b"value": b"x" * 65536}, "value has 65536 bytes")):
        with pytest.raises(ampbox.Malformed, match=words) as info:
            ampbox.encode_box(box)
        assert "\n" not in str(info.value)


# ================================================================ one schema, two sides


TWISTED = {wc.TEXT: amp.Unicode(), wc.BYTES: amp.String(), wc.INT: amp.Integer(), wc.FLOAT: amp.Float(),
           wc.BOOL: amp.Boolean(), wc.TEXT_LIST: amp.ListOf(amp.Unicode())}


def shape(argument) -> tuple:
    """A Twisted argument type as comparable data: its class, and for AmpList/ListOf what it holds."""
    if isinstance(argument, amp.AmpList):
        return ("AmpList", tuple((n, shape(a)) for n, a in argument.subargs))
    if isinstance(argument, amp.ListOf):
        return ("ListOf", shape(argument.elementType))
    return (type(argument).__name__,)


def twisted_argument(kind):
    if isinstance(kind, wc.Records):
        return amp.AmpList([(n.encode(), twisted_argument(k)) for n, k in kind.fields])
    return TWISTED[kind]


def test_the_daemons_commands_are_the_schemas_rows():
    """Each row of vsc.wire.control is an amp.Command of the daemon with the same name, fields, types and error code."""
    assert len({c.name for c in wc.COMMANDS}) == len(wc.COMMANDS)
    for spec in wc.COMMANDS:
        command = getattr(daemon, spec.name)
        assert issubclass(command, amp.Command) and command.commandName == spec.name.encode()
        for ours, theirs in ((spec.arguments, command.arguments), (spec.response, command.response)):
            assert [(n.encode(), shape(twisted_argument(k))) for n, k in ours] == [(n, shape(t)) for n, t in theirs]
        assert command.errors == {CardError: wc.CARD_ERROR}


@pytest.mark.parametrize("kind, values", [
    (wc.TEXT, ["", "slot 9a", "\u00e9\u4e2d"]), (wc.BYTES, [b"", bytes(range(256))]), (wc.INT, [0, -7, 2**70]),
    (wc.FLOAT, [0.0, 1764680000.25, -1e-300]), (wc.BOOL, [True, False]),
    (wc.TEXT_LIST, [[], ["a"], ["", "lic:x", "\u00e9" * 300]]),
    (dict(wc.STATUS.response)["slots"], [[], [{"slot": "9a", "algorithm": "rsa2048", "public_key_sha256": "00"}] * 3]),
])
def test_each_type_encodes_as_twisteds_argument_does(kind, values):
    """encode_value gives Twisted's bytes for every type, and decode_value reads Twisted's bytes back to the value."""
    argument = twisted_argument(kind)
    for value in values:
        theirs = argument.toStringProto(value, None) if isinstance(argument, amp.AmpList) else argument.toString(value)
        assert wc.encode_value(kind, value) == theirs
        assert wc.decode_value(kind, "f", theirs) == value


def test_status_survives_the_wire():
    """The card's status dict, as Status fields on the wire and back, is the same dict (what --json prints)."""
    fields = wc.status_fields(STATUS)
    box = {n.encode(): wc.encode_value(k, fields[n]) for n, k in wc.STATUS.response}
    again = wc.answer(wc.STATUS, 1, {b"_answer": b"1", **box})
    assert wc.status_of(again) == STATUS
    idle = dict(STATUS, suite=None, inserted_at=None, slots={}, memory_locked=False)
    assert wc.status_of(wc.status_fields(idle)) == idle
    on_a_token = dict(STATUS, server=None, suite=None, mode="dongle", token="dongle1")
    assert wc.status_of(wc.status_fields(on_a_token)) == on_a_token


class FakePin:
    """What ControlProtocol asks of the session's LocalPin (vsc.card.pin): it records, and allows every slot."""

    def __init__(self, calls: list):
        self.calls = calls

    def status(self):
        return {}

    async def authorize(self, slot, fresh, path):
        self.calls.append(("authorize", slot, fresh))

    def authorize_now(self, slot, fresh, path):
        self.calls.append(("authorize", slot, fresh))

    async def verify(self, pin, keep):
        self.calls.append(("verify", pin, keep))

    def forget(self):
        self.calls.append(("forget",))

    async def change(self, old, new):
        self.calls.append(("change", old, new))

    async def change_puk(self, old, new):
        self.calls.append(("change_puk", old, new))

    async def unblock(self, puk, new):
        self.calls.append(("unblock", puk, new))


class FakeSession:
    """What ControlProtocol asks of a CardSession, answering from fixed values (and refusing slot 9x)."""

    def __init__(self):
        self.reactor = Clock()
        self.calls: list[tuple] = []
        self._local_pin = FakePin(self.calls)

    def _slot(self, slot):
        if slot == "9x":
            raise CardError("no key in slot 9x")

    def status(self):
        return STATUS

    def public_key(self, slot):
        self._slot(slot)
        return b"-----BEGIN PUBLIC KEY-----\n"

    busy = False  # no other operation holds the card: SignDigest takes the synchronous path

    async def sign_digest(self, slot, digest):
        self._slot(slot)
        return b"sig:" + digest

    def sign_digest_now(self, slot, digest):
        self._slot(slot)
        return b"sig:" + digest

    async def decrypt(self, slot, ciphertext, padding):
        return padding.encode() + b":" + ciphertext

    async def counter(self, name, delta):
        return 10 + delta

    async def data_put(self, name, value):
        self.calls.append(("data_put", name, bytes(value)))  # the daemon lends a locked buffer for the call

    async def data_get(self, name, into=None):
        value = name.encode() * 2
        return value if into is None else into(memoryview(value))

    async def fund_counter(self, keyfile, vendor_key):
        return f"lic:{keyfile}", len(vendor_key)

    async def change_password(self, old, new):
        return 4

    async def remove(self, why):
        self.calls.append(("remove", why))


EXCHANGES = [  # (command, arguments, answer the FakeSession gives)
    (wc.STATUS, {}, wc.status_fields(STATUS)),
    (wc.PUBLIC_KEY, {"slot": "9a"}, {"pem": b"-----BEGIN PUBLIC KEY-----\n"}),
    (wc.SIGN_DIGEST, {"slot": "9c", "digest": bytes(32)}, {"signature": b"sig:" + bytes(32)}),
    (wc.DECRYPT, {"slot": "9a", "ciphertext": b"\x00\xff", "padding": "oaep"}, {"plaintext": b"oaep:\x00\xff"}),
    (wc.COUNTER, {"name": "runs \u00e9", "delta": -3}, {"value": 7}),
    (wc.DATA_PUT, {"name": "d", "value": b"v" * 60000}, {}),
    (wc.DATA_GET, {"name": "d"}, {"value": b"dd"}),
    (wc.LICENSE_FUND, {"keyfile": "K", "vendor_key": b"pem"}, {"name": "lic:K", "value": 3}),
    (wc.CERT_PUT, {"slot": "9a", "der": b"\x30\x00"}, {}),
    (wc.CERT_GET, {"slot": "9a"}, {"der": b"\x30\x01"}),
    (wc.CHANGE_PASSWORD, {"old": "a", "new": "b"}, {"version": 4}),
    (wc.VERIFY_PIN, {"pin": b"123456", "keep": False}, {}),
    (wc.SIGN_DIGEST, {"slot": "9a", "digest": bytes(32)}, {"signature": b"sig:" + bytes(32)}),
    (wc.VERIFY_PIN, {"pin": b"654321", "keep": True}, {}),
    (wc.FORGET_PIN, {}, {}),
    (wc.CHANGE_PIN, {"which": "pin", "old": b"123456", "new": b"654321"}, {}),
    (wc.CHANGE_PIN, {"which": "puk", "old": b"12345678", "new": b"87654321"}, {}),
    (wc.UNBLOCK_PIN, {"puk": b"87654321", "new": b"111111"}, {}),
    (wc.REMOVE, {}, {}),
]


def exchange(proto, transport, command, args, ask):
    """Client bytes in, the daemon's answer decoded by the client's codec."""
    transport.clear()
    proto.dataReceived(ampbox.encode_box(wc.request(command, ask, args)))
    box, used = ampbox.decode_box(transport.value())
    assert used == len(transport.value())
    return wc.answer(command, ask, box)


def test_every_command_round_trips_between_the_client_codec_and_the_daemon(monkeypatch):
    """
    Each command, encoded by the client's schema and codec, is answered by
    the daemon's real ControlProtocol, and the answer decodes to exactly the
    session's values; Remove also stops the daemon (on_remove fires).
    """
    from vsc.card import vpcd

    async def put_certificate(session, slot, der):
        session.calls.append(("cert_put", slot, der))

    monkeypatch.setattr(vpcd, "put_certificate", put_certificate)
    monkeypatch.setattr(vpcd, "get_certificate", lambda session, slot: b"\x30\x01")
    session, removed = FakeSession(), []
    proto = daemon.ControlProtocol(session, on_remove=lambda: removed.append(True))
    transport = StringTransport()
    proto.makeConnection(transport)
    for ask, (command, args, expected) in enumerate(EXCHANGES, 1):
        assert exchange(proto, transport, command, args, ask) == expected, command
    assert ("data_put", "d", b"v" * 60000) in session.calls and ("cert_put", "9a", b"\x30\x00") in session.calls
    assert ("remove", "vsc card remove") in session.calls
    # the PIN policy is asked before every private-key operation; a VerifyPin(keep=False) counts for the next one only
    assert [c for c in session.calls if c[0] == "authorize"] == [("authorize", "9c", False), ("authorize", "9a", False),
                                                                ("authorize", "9a", True)]
    assert ("verify", b"654321", True) in session.calls and ("unblock", b"87654321", b"111111") in session.calls
    assert ("change_puk", b"12345678", b"87654321") in session.calls
    session.reactor.advance(0)
    assert removed == [True]


def test_a_refusal_reaches_the_client_as_its_one_line():
    """A CardError in the daemon arrives as Refused(CARD_ERROR) with exactly its text, sync and async responders alike."""
    proto = daemon.ControlProtocol(FakeSession())
    transport = StringTransport()
    proto.makeConnection(transport)
    for ask, (command, args) in enumerate(((wc.PUBLIC_KEY, {"slot": "9x"}),
                                           (wc.SIGN_DIGEST, {"slot": "9x", "digest": b"d"})), 1):
        with pytest.raises(wc.Refused, match="^no key in slot 9x$") as info:
            exchange(proto, transport, command, args, ask)
        assert info.value.code == wc.CARD_ERROR


def test_answers_that_do_not_fit_the_schema_are_malformed():
    """An answer to another request, without a field, or with a value not of its type is Malformed, not a crash."""
    for box, words in (({b"_answer": b"2", b"value": b"1"}, "not an answer"), ({b"_answer": b"1"}, "without value"),
                       ({b"_answer": b"1", b"value": b"1.5"}, "value is not an integer")):
        with pytest.raises(ampbox.Malformed, match=words):
            wc.answer(wc.COUNTER, 1, box)
    records = dict(wc.STATUS.response)["slots"]
    for kind, raw, words in ((wc.BOOL, b"yes", "True or False"), (wc.FLOAT, b"x", "a number"),
                             (wc.TEXT, b"\xff", "UTF-8"), (wc.TEXT_LIST, b"\x00\x05ab", "list of UTF-8"),
                             (records, b"\x00\x04slot\x00\x0299\x00\x00", "without algorithm"),
                             (records, b"\x00\x04slot", "list of records")):
        with pytest.raises(ampbox.Malformed, match=words):
            wc.decode_value(kind, "f", raw)
    with pytest.raises(TypeError):
        wc.request(wc.COUNTER, 1, {"name": "x"})  # a caller's missing argument is a bug, not a wire error


# ================================================================ the client on a real socket


def test_no_daemon_and_a_dead_daemon_are_told_apart(fake_home):
    """No socket: NotRunning (not stale); a socket nobody accepts on: NotRunning (stale); both one line."""
    with pytest.raises(client.NotRunning) as info:
        client.call(fake_home, wc.STATUS)
    assert not info.value.stale and str(info.value) == f"no card daemon is running for {fake_home}"
    import socket

    path = Path(client.ControlClient(fake_home).path)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.close()  # the file stays; nobody listens
    with pytest.raises(client.NotRunning) as info:
        client.call(fake_home, wc.STATUS)
    assert info.value.stale


def test_several_requests_on_one_connection(fake_home):
    """One ControlClient sends several requests on one connection, each answered under its own ask tag."""
    card = FakeCardSocket(fake_home, lambda command, args: {b"value": args[b"delta"]})
    try:
        with client.ControlClient(fake_home) as c:
            assert [c.call(wc.COUNTER, name="n", delta=d)["value"] for d in (0, -1, 5)] == [0, -1, 5]
        assert [args[b"delta"] for _, args in card.requests] == [b"0", b"-1", b"5"]
    finally:
        card.close()


@pytest.mark.parametrize("behaviour, error, words", [
    ("refuse", client.Refused, "^counter 'n' is 0; it cannot go below zero$"),
    ("silent", client.NoAnswer, "^the card did not answer in time$"),
    ("close", client.Dropped, r"^the card daemon closed the connection \(the card was removed\)$"),
    ("garbage", client.ControlError, "^the card daemon's answer is malformed: control message: a key of 300"),
    ("unknown", client.ControlError, "^the card daemon could not answer Counter: "),
])
def test_each_failure_is_its_own_one_line_error(fake_home, behaviour, error, words):
    """Each way a daemon can fail a request is a ControlError subclass with one plain line (and no class name)."""
    answers = {
        "refuse": {b"_error_code": b"CARD_ERROR", b"_error_description": b"counter 'n' is 0; it cannot go below zero"},
        "silent": None,
        "close": CLOSE,
        "garbage": (300).to_bytes(2, "big") + b"k" * 300,
        "unknown": {b"_error_code": b"UNHANDLED", b"_error_description": b"Unhandled Command: 'Counter'"},
    }
    card = FakeCardSocket(fake_home, lambda command, args: answers[behaviour])
    try:
        with pytest.raises(error, match=words) as info:
            client.call(fake_home, wc.COUNTER, 0.5, name="n", delta=-1)
        assert "\n" not in str(info.value) and "Error" not in str(info.value)
        assert card.requests == [(b"Counter", {b"name": b"n", b"delta": b"-1"})]
    finally:
        card.close()


def test_the_client_imports_nothing_heavy():
    """Importing the client and making a request's bytes loads neither Twisted, construct, a crypto library nor argparse."""
    code = ("import sys, vsc.card.client as c, vsc.wire.control as w, vsc.wire.ampbox as a;"
            "a.encode_box(w.request(w.STATUS, 1, {}));"
            "print(' '.join(sorted(m for m in sys.modules)))")
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parent.parent)))
                 .stdout.split())
    assert "vsc.card.client" in loaded
    heavy = {m for m in loaded if m.split(".")[0] in ("twisted", "construct", "cryptography", "Crypto", "argparse",
                                                        "socket", "json", "attrs", "enum")}
    assert heavy == set(), heavy
