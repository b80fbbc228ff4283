"""
The card's ssh-agent (vsc.card.sshagent, vsc.wire.sshagent).

Unit tests drive AgentProtocol over a StringTransport, on a CardSession whose
memory is a real CardMemory (sealed and loaded in-test), and check every
signature with ``cryptography`` directly. The integration test runs a real
``twistd vsc-server``, a real ``twistd vsc-card`` serving the agent, and
OpenSSH's own ``ssh-add`` and ``ssh-keygen -Y sign/verify`` against it.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import construct as c
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature
from twisted.internet.testing import StringTransport
from twisted.protocols.basic import Int32StringReceiver

from vsc import crypto
from vsc.card import sshagent
from vsc.card.config import CardConfig
from vsc.card.protected import PlainItem, seal_envelope
from vsc.card.session import CardSession, LifeState
from vsc.wire import sshagent as w
from vsc.wire.errors import WireError
from vsc.wire.protected import ItemKind, KeyAlg
from tests.cardfakes import MemoryStorage, in_use_session, leave_use, release

SERIAL = "card-ssh-1"
SLOT_KINDS = {"9a": crypto.KEY_RSA2048, "9c": crypto.KEY_P256, "9d": crypto.KEY_RSA2048, "9e": crypto.KEY_P256}
DATA = b"session identifier and userauth request, as ssh would send it"


def _rand(n: int) -> bytes:
    return os.urandom(n)


@pytest.fixture(scope="module")
def private_keys() -> dict:
    """One key pair per slot (PKCS#8 DER), made once for the module: RSA generation is the slow part."""
    return {slot: crypto.generate_private_der(kind) for slot, kind in SLOT_KINDS.items()}


@pytest.fixture
def public_keys(private_keys) -> dict:
    return {slot: crypto.public_der_of(der) for slot, der in private_keys.items()}


@pytest.fixture
def session(private_keys, tmp_path) -> CardSession:
    """An in-use CardSession whose memory is a real CardMemory loaded from a sealed envelope."""
    protection_key = _rand(32)
    items = [
        PlainItem(ItemKind.KEY, slot, der, KeyAlg.RSA2048 if SLOT_KINDS[slot] == crypto.KEY_RSA2048 else KeyAlg.P256,
                  crypto.public_der_of(der))
        for slot, der in private_keys.items()
    ]
    items.append(PlainItem(ItemKind.COUNTER, "runs", bytes(8)))
    items.append(PlainItem(ItemKind.DATA, "note", b"not a key"))
    envelope = seal_envelope(SERIAL, protection_key, items, _rand)
    cfg = CardConfig(home=tmp_path, server="tcp:127.0.0.1:1", server_key="SHA256:unused", serial=SERIAL)
    s = in_use_session(cfg, MemoryStorage(SERIAL, envelope, protection_key, _rand), _rand)
    yield s
    release(s)


class _Answers(Int32StringReceiver):
    """The client's end of the framing: the same Twisted 4-byte length receiver, collecting message bodies."""

    MAX_LENGTH = w.MAX_MESSAGE

    def __init__(self):
        self.bodies: list[bytes] = []
        self.makeConnection(StringTransport())

    def stringReceived(self, body: bytes) -> None:
        self.bodies.append(body)


class Client:
    """A connection to the agent over a StringTransport, speaking through vsc.wire.sshagent."""

    def __init__(self, session: CardSession, slots=None):
        self.agent = sshagent.CardAgent(session, slots)
        self.protocol = sshagent.AgentFactory(self.agent).buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)
        self._answers = _Answers()

    def send_raw(self, data: bytes) -> None:
        self.protocol.dataReceived(data)

    def responses(self) -> list:
        self._answers.dataReceived(self.transport.value())
        self.transport.clear()
        out = [w.decode_response(body) for body in self._answers.bodies]
        self._answers.bodies.clear()
        return out

    def ask(self, request) -> object:
        self.send_raw(w.encode_request(request))
        (response,) = self.responses()
        return response

    def identities(self) -> tuple:
        answer = self.ask(w.RequestIdentities())
        assert isinstance(answer, w.IdentitiesAnswer), answer
        return answer.identities

    def blob(self, slot: str) -> bytes:
        return next(i.key_blob for i in self.identities() if i.comment.endswith(f":{slot}"))


def _verify_rsa(public_der: bytes, signature: bytes, data: bytes, algorithm) -> None:
    serialization.load_der_public_key(public_der).verify(signature, data, padding.PKCS1v15(), algorithm)


# ---------------------------------------------------------------- identities


def test_request_identities_lists_every_slot_in_openssh_format(session, public_keys):
    """REQUEST_IDENTITIES answers the four slots in order, each blob the OpenSSH form of the slot's public key, comment vsc:SERIAL:SLOT."""
    identities = Client(session).identities()
    assert [i.comment for i in identities] == [f"vsc:{SERIAL}:{s}" for s in ("9a", "9c", "9d", "9e")]
    for ident, slot in zip(identities, ("9a", "9c", "9d", "9e")):
        # independent encoder: cryptography's OpenSSH public format is "type base64(blob)"
        openssh = serialization.load_der_public_key(public_keys[slot]).public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).split()
        assert ident.key_blob == base64.b64decode(openssh[1])
        assert openssh[0] == (b"ssh-rsa" if SLOT_KINDS[slot] == crypto.KEY_RSA2048 else b"ecdsa-sha2-nistp256")


def test_openssh_line_is_the_authorized_keys_form(public_keys):
    """openssh_line gives 'type base64 comment', byte-identical to cryptography's OpenSSH encoding plus the comment."""
    for slot, der in public_keys.items():
        expected = serialization.load_der_public_key(der).public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
        assert sshagent.openssh_line(der, f"vsc:{SERIAL}:{slot}") == f"{expected} vsc:{SERIAL}:{slot}"


def test_configured_slot_subset_is_all_the_agent_offers(session):
    """With slots (9a, 9c) only those two are listed, and a sign request naming 9d's key fails."""
    full = Client(session)
    blob_9d = full.blob("9d")
    client = Client(session, slots=("9c", "9a"))
    assert [i.comment for i in client.identities()] == [f"vsc:{SERIAL}:9a", f"vsc:{SERIAL}:9c"]
    assert client.ask(w.SignRequest(blob_9d, DATA, w.SignFlags.RSA_SHA2_256)) == w.Failure()


def test_parse_slots():
    """--ssh-agent-slots: comma list of known slots (case-insensitive); empty means every slot; unknown ones are refused."""
    assert sshagent.parse_slots("9a, 9C") == ("9a", "9c")
    assert sshagent.parse_slots("") is None and sshagent.parse_slots(None) is None
    with pytest.raises(ValueError, match="9f"):
        sshagent.parse_slots("9a,9f")


# ---------------------------------------------------------------- signing


def test_sign_rsa_sha2_256(session, public_keys):
    """Flag SSH_AGENT_RSA_SHA2_256: an rsa-sha2-256 blob holding PKCS#1 v1.5 over SHA-256 of the data, modulus-sized."""
    client = Client(session)
    response = client.ask(w.SignRequest(client.blob("9a"), DATA, w.SignFlags.RSA_SHA2_256))
    sig = w.decode_signature(response.signature)
    assert sig.algorithm == "rsa-sha2-256" and len(sig.blob) == 256
    _verify_rsa(public_keys["9a"], sig.blob, DATA, hashes.SHA256())


def test_sign_rsa_sha2_512(session, public_keys):
    """Flag SSH_AGENT_RSA_SHA2_512: an rsa-sha2-512 blob holding PKCS#1 v1.5 over SHA-512 (slot 9d)."""
    client = Client(session)
    response = client.ask(w.SignRequest(client.blob("9d"), DATA, w.SignFlags.RSA_SHA2_512))
    sig = w.decode_signature(response.signature)
    assert sig.algorithm == "rsa-sha2-512"
    _verify_rsa(public_keys["9d"], sig.blob, DATA, hashes.SHA512())
    with pytest.raises(InvalidSignature):
        _verify_rsa(public_keys["9d"], sig.blob, DATA, hashes.SHA256())


def test_both_rsa_flags_choose_sha256_like_openssh(session, public_keys):
    """Both RSA flags set: SHA-256 wins, as in OpenSSH's ssh-agent; unknown flag bits are ignored."""
    client = Client(session)
    response = client.ask(w.SignRequest(client.blob("9a"), DATA, 0x80 | w.SignFlags.RSA_SHA2_512 | w.SignFlags.RSA_SHA2_256))
    sig = w.decode_signature(response.signature)
    assert sig.algorithm == "rsa-sha2-256"
    _verify_rsa(public_keys["9a"], sig.blob, DATA, hashes.SHA256())


def test_legacy_ssh_rsa_sha1_is_refused(session):
    """No RSA flag asks for legacy ssh-rsa (SHA-1): refused with SSH_AGENT_FAILURE."""
    client = Client(session)
    assert client.ask(w.SignRequest(client.blob("9a"), DATA, 0)) == w.Failure()
    assert client.ask(w.SignRequest(client.blob("9a"), DATA, w.SignFlags.OLD_SIGNATURE)) == w.Failure()


@pytest.mark.parametrize("slot", ["9c", "9e"])
def test_sign_ecdsa_nistp256(session, public_keys, slot):
    """P-256 slots: ecdsa-sha2-nistp256, blob = mpint r || mpint s, ECDSA over SHA-256; flags do not matter."""
    client = Client(session)
    public = serialization.load_der_public_key(public_keys[slot])
    for flags in (0, w.SignFlags.RSA_SHA2_512):
        response = client.ask(w.SignRequest(client.blob(slot), DATA, flags))
        sig = w.decode_signature(response.signature)
        assert sig.algorithm == "ecdsa-sha2-nistp256"
        rs = w.decode_ecdsa_signature(sig.blob)
        public.verify(encode_dss_signature(rs.r, rs.s), DATA, ec.ECDSA(hashes.SHA256()))


def test_sign_empty_data(session, public_keys):
    """Empty data is still signed (the agent does not judge what it signs)."""
    client = Client(session)
    sig = w.decode_signature(client.ask(w.SignRequest(client.blob("9a"), b"", w.SignFlags.RSA_SHA2_256)).signature)
    _verify_rsa(public_keys["9a"], sig.blob, b"", hashes.SHA256())


def test_unknown_key_is_refused(session):
    """A sign request naming a key the card does not hold (valid blob, or garbage blob) gets SSH_AGENT_FAILURE."""
    other = crypto.public_der_of(crypto.generate_private_der(crypto.KEY_P256))
    client = Client(session)
    assert client.ask(w.SignRequest(sshagent.key_blob(other), DATA, 0)) == w.Failure()
    assert client.ask(w.SignRequest(b"\x00\x00\x00\x07ssh-rsa", DATA, w.SignFlags.RSA_SHA2_256)) == w.Failure()


# ---------------------------------------------------------------- card not in use


@pytest.mark.parametrize("state", [LifeState.REMOVING, LifeState.IDLE, LifeState.EXITED], ids=lambda s: s.value)
def test_card_not_in_use_refuses_everything(session, state):
    """Once the card is removing/idle/exited, listing and signing both answer SSH_AGENT_FAILURE."""
    client = Client(session)
    blob = client.blob("9a")
    assert client.ask(w.RequestIdentities()) != w.Failure()
    leave_use(session, state)
    assert client.ask(w.RequestIdentities()) == w.Failure()
    assert client.ask(w.SignRequest(blob, DATA, w.SignFlags.RSA_SHA2_256)) == w.Failure()


def test_wiped_memory_refuses(session):
    """Memory wiped while the life cycle still says in use (never happens in order; the check holds anyway):
    nothing is listed or signed."""
    client = Client(session)
    blob = client.blob("9c")
    session.memory.wipe()
    assert session.life is LifeState.IN_USE and not session.usable
    assert client.ask(w.RequestIdentities()) == w.Failure()
    assert client.ask(w.SignRequest(blob, DATA, 0)) == w.Failure()


def test_removed_while_a_sign_waits_for_the_card(session):
    """A sign request queued behind another card operation fails if the card is removed before its turn."""
    client = Client(session)
    blob = client.blob("9a")
    session._oplock.acquire()  # another card operation is running
    client.send_raw(w.encode_request(w.SignRequest(blob, DATA, w.SignFlags.RSA_SHA2_256)))
    assert client.transport.value() == b""  # waiting for the card
    leave_use(session, LifeState.REMOVING)
    session._oplock.release()
    assert client.responses() == [w.Failure()]


# ---------------------------------------------------------------- protocol


def test_answers_keep_request_order(session, public_keys):
    """Pipelined requests in one write, while the card is busy, are answered in order once it is free."""
    client = Client(session)
    blob = client.blob("9a")
    session._oplock.acquire()
    client.send_raw(w.encode_request(w.SignRequest(blob, DATA, w.SignFlags.RSA_SHA2_256))
                    + w.encode_request(w.RequestIdentities())
                    + w.encode_request(w.OtherRequest(w.AgentMessageType.LOCK)))
    assert client.transport.value() == b""  # the listing waits behind the signature
    session._oplock.release()
    sign, listing, lock = client.responses()
    _verify_rsa(public_keys["9a"], w.decode_signature(sign.signature).blob, DATA, hashes.SHA256())
    assert isinstance(listing, w.IdentitiesAnswer) and len(listing.identities) == 4
    assert lock == w.Failure()


def test_byte_at_a_time(session):
    """A request delivered one byte per read is answered once, when complete."""
    client = Client(session)
    request = w.encode_request(w.RequestIdentities())
    for i in range(len(request)):
        assert client.transport.value() == b""
        client.send_raw(request[i : i + 1])
    (answer,) = client.responses()
    assert len(answer.identities) == 4


@pytest.mark.parametrize("kind", [
    w.AgentMessageType.ADD_IDENTITY, w.AgentMessageType.REMOVE_IDENTITY, w.AgentMessageType.REMOVE_ALL_IDENTITIES,
    w.AgentMessageType.ADD_ID_CONSTRAINED, w.AgentMessageType.ADD_SMARTCARD_KEY, w.AgentMessageType.LOCK,
    w.AgentMessageType.UNLOCK, w.AgentMessageType.REQUEST_RSA_IDENTITIES, 200,
])
def test_unsupported_requests_fail(session, kind):
    """Add/remove identity, smartcard, lock/unlock, SSH1 and unknown types: SSH_AGENT_FAILURE, keys unchanged."""
    client = Client(session)
    assert client.ask(w.OtherRequest(int(kind))) == w.Failure()
    assert len(client.identities()) == 4


def test_extensions_fail(session):
    """Extensions (session-bind@openssh.com, query) are answered with SSH_AGENT_FAILURE, as the draft requires for unknown ones."""
    client = Client(session)
    assert client.ask(w.Extension("session-bind@openssh.com", b"\x00" * 40)) == w.Failure()
    assert client.ask(w.Extension("query")) == w.Failure()


def test_malformed_messages_fail_and_the_connection_stays_usable(session):
    """Truncated, trailing-byte, empty and bad-UTF-8 messages each get SSH_AGENT_FAILURE; the next request still works."""
    client = Client(session)
    blob = client.blob("9a")
    sign = w.encode_request(w.SignRequest(blob, DATA, w.SignFlags.RSA_SHA2_256))
    identities = w.encode_request(w.RequestIdentities())
    bad = [
        w.frame(sign[4:-2]),  # flags cut short
        w.frame(sign[4:] + b"\x00"),  # a byte after the flags
        w.frame(identities[4:] + b"x"),  # REQUEST_IDENTITIES has no contents
        w.frame(b""),  # no type byte
        w.frame(sign[4:5] + c.Int32ub.build(1 << 30) + blob),  # a string longer than the message
        w.frame(w.encode_request(w.Extension("x", b""))[4:6]),  # extension name cut
    ]
    for message in bad:
        client.send_raw(message)
        assert client.responses() == [w.Failure()], message
        assert not client.transport.disconnecting
    assert len(client.identities()) == 4
    assert isinstance(client.ask(w.SignRequest(blob, DATA, w.SignFlags.RSA_SHA2_256)), w.SignResponse)


def test_oversized_length_closes_the_connection(session):
    """A length field above 256 KiB (OpenSSH's limit) closes the connection without an answer; nothing after it is read."""
    client = Client(session)
    client.send_raw(c.Int32ub.build(w.MAX_MESSAGE + 1) + b"\x0b")
    assert client.transport.disconnecting
    assert client.transport.value() == b""
    client.send_raw(w.encode_request(w.RequestIdentities()))
    assert client.transport.value() == b""


def test_too_many_pipelined_requests_close_the_connection(session):
    """More than MAX_PENDING unanswered requests (the card is busy) closes the connection instead of queueing without bound."""
    client = Client(session)
    blob = client.blob("9c")
    session._oplock.acquire()
    try:
        client.send_raw(w.encode_request(w.SignRequest(blob, DATA, 0)) * (sshagent.AgentProtocol.MAX_PENDING + 1))
        assert client.transport.disconnecting
    finally:
        session._oplock.release()


def test_connection_lost_while_signing_writes_nothing(session):
    """A client that hangs up while its request waits for the card gets nothing written after the loss."""
    client = Client(session)
    blob = client.blob("9a")
    session._oplock.acquire()
    client.send_raw(w.encode_request(w.SignRequest(blob, DATA, w.SignFlags.RSA_SHA2_256)))
    client.protocol.connectionLost(None)
    session._oplock.release()
    assert client.transport.value() == b""


# ---------------------------------------------------------------- wire


def test_mpint_encoding_is_strict():
    """mpint: zero is empty, a set high bit gets a leading zero; negative or non-minimal encodings are refused."""
    assert w.encode_ecdsa_signature(w.EcdsaSignature(r=0, s=0x80)) == c.Int32ub.build(0) + c.Int32ub.build(2) + b"\x00\x80"
    assert w.decode_ecdsa_signature(c.Int32ub.build(1) + b"\x7f" + c.Int32ub.build(0)) == w.EcdsaSignature(0x7F, 0)
    for bad in (b"\x80", b"\x00\x01", b"\x00"):
        with pytest.raises(WireError):
            w.decode_ecdsa_signature(c.Int32ub.build(len(bad)) + bad + c.Int32ub.build(0))
    with pytest.raises(WireError):
        w.encode_ecdsa_signature(w.EcdsaSignature(r=-1, s=1))


def test_public_key_blob_round_trip(public_keys):
    """Key blobs decode back to the numbers they were built from; an unknown key type is refused."""
    for slot, der in public_keys.items():
        key = sshagent.ssh_public_key(der)
        assert w.decode_public_key(w.encode_public_key(key)) == key
    with pytest.raises(WireError):
        w.decode_public_key(w.encode_signature(w.SshSignature("ssh-ed25519", b"k" * 32)))


def test_requests_split_at_every_offset_are_answered_in_order(session):
    """AgentProtocol (Int32StringReceiver) reassembles three pipelined requests cut at every offset, answers each once, in order."""
    stream = (w.encode_request(w.RequestIdentities()) + w.frame(b"") + w.encode_request(w.Extension("query")))
    expected = None
    for i in range(len(stream) + 1):
        client = Client(session)
        client.send_raw(stream[:i])
        client.send_raw(stream[i:])
        answers = client.responses()
        expected = expected or answers
        assert answers == expected, f"split at {i}"
        assert not client.transport.disconnecting and client.protocol._pending == 0
    assert [type(a) for a in expected] == [w.IdentitiesAnswer, w.Failure, w.Failure]
    assert len(expected[0].identities) == 4


#: reproducible fuzzing: the same inputs every run (derandomized, no example database)
AGENT_FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None)


@AGENT_FUZZ
@given(st.binary(max_size=200), st.sampled_from([0, 11, 13, 27]))
def test_decoders_raise_only_wire_errors(data, kind):
    """Any bytes: the request, response, key and signature decoders return a value or raise WireError, nothing else."""
    for decode, arg in ((w.decode_request, bytes([kind]) + data if kind else data), (w.decode_response, data),
                        (w.decode_public_key, data), (w.decode_signature, data), (w.decode_ecdsa_signature, data)):
        try:
            decode(arg)
        except WireError:
            pass


_RSA_BLOB = w.encode_public_key(w.RsaPublicKey(e=65537, n=(1 << 2047) + 0x1234567))
_EC_BLOB = w.encode_public_key(w.EcdsaPublicKey("nistp256", b"\x04" + bytes(range(64))))
#: valid agent messages (bodies, without the length) and values, each with the decoder that must take it
VALID_AGENT = (
    (w.decode_request, w.encode_request(w.RequestIdentities())[4:]),
    (w.decode_request, w.encode_request(w.SignRequest(_RSA_BLOB, DATA, w.SignFlags.RSA_SHA2_256))[4:]),
    (w.decode_request, w.encode_request(w.Extension("query", b"contents"))[4:]),
    (w.decode_response, w.encode_response(w.IdentitiesAnswer((w.Identity(_RSA_BLOB, "9a"),
                                                              w.Identity(_EC_BLOB, "9c"))))[4:]),
    (w.decode_response, w.encode_response(w.SignResponse(w.encode_signature(w.SshSignature("rsa-sha2-256",
                                                                                           b"s" * 256))))[4:]),
    (w.decode_public_key, _RSA_BLOB),
    (w.decode_public_key, _EC_BLOB),
    (w.decode_signature, w.encode_signature(w.SshSignature("ecdsa-sha2-nistp256", b"sig"))),
    (w.decode_ecdsa_signature, w.encode_ecdsa_signature(w.EcdsaSignature(r=(1 << 255) + 7, s=12345))),
)
#: edits of a valid message: flip a byte, insert bytes, delete bytes (positions wrap around the message)
EDITS = st.lists(st.one_of(st.tuples(st.just("flip"), st.integers(0, 4096), st.integers(1, 255)),
                           st.tuples(st.just("insert"), st.integers(0, 4096), st.binary(min_size=1, max_size=8)),
                           st.tuples(st.just("delete"), st.integers(0, 4096), st.integers(1, 8))),
                 min_size=1, max_size=4)


def _edit(data: bytes, edits) -> bytes:
    b = bytearray(data)
    for kind, pos, arg in edits:
        at = pos % (len(b) + 1)
        if kind == "flip" and b:
            b[at % len(b)] ^= arg
        elif kind == "insert":
            b[at:at] = arg
        elif kind == "delete":
            del b[at:at + arg]
    return bytes(b)


def test_the_valid_agent_corpus_decodes():
    """The fuzzer's starting points are valid: each message decodes with its decoder (so mutations start from real messages)."""
    for decode, data in VALID_AGENT:
        decode(data)


@AGENT_FUZZ
@given(st.sampled_from(VALID_AGENT), EDITS)
def test_decoders_on_mutated_valid_messages(valid, edits):
    """Valid agent messages with bytes flipped, inserted or deleted: each decoder returns a value or raises WireError, nothing else."""
    decode, data = valid
    try:
        decode(_edit(data, edits))
    except WireError:
        pass


def test_sign_pkcs1_refuses_sha1_and_ec(private_keys):
    """PrivateKeyHandle.sign_pkcs1 signs SHA-256/384/512 with RSA only; SHA-1 and EC keys are refused."""
    with crypto.PrivateKeyHandle(private_keys["9a"]) as key:
        sig = key.sign_pkcs1(DATA, "sha384")
        _verify_rsa(crypto.public_der_of(private_keys["9a"]), sig, DATA, hashes.SHA384())
        with pytest.raises(crypto.CryptoError):
            key.sign_pkcs1(DATA, "sha1")
    with crypto.PrivateKeyHandle(private_keys["9c"]) as key, pytest.raises(crypto.CryptoError):
        key.sign_pkcs1(DATA, "sha256")


def test_tap_options():
    """twistd vsc-card: --ssh-agent PATH, --ssh-agent-slots and --no-ssh-agent parse."""
    from vsc.daemon.card_tap import Options

    o = Options()
    o.parseOptions(["--home", "/h", "--ssh-agent", "/run/x.sock", "--ssh-agent-slots", "9a,9c"])
    assert o["ssh-agent"] == "/run/x.sock" and o["ssh-agent-slots"] == "9a,9c" and not o["no-ssh-agent"]
    o = Options()
    o.parseOptions(["--home", "/h", "--no-ssh-agent"])
    assert o["no-ssh-agent"]


def test_agent_socket_is_next_to_the_control_socket(tmp_path):
    """The default agent socket is the control socket's name with .ssh-agent.sock, in the same runtime dir."""
    from vsc.card.config import control_socket_for

    control = control_socket_for(tmp_path)
    agent = sshagent.agent_socket_for(tmp_path)
    assert agent.parent == control.parent and agent.name == control.stem + ".ssh-agent.sock"


# ---------------------------------------------------------------- integration: OpenSSH against the real daemon

from tests.integration import missing, need_program  # noqa: E402
from tests.servers import TWISTD, VSC, _env, admin, init_data_dir, servers  # noqa: E402,F401
from vsc.devtools.process import Child, ProcessFailed  # noqa: E402

WAIT = 30.0
TOOL_TIMEOUT = 30.0


def _run(cmd: list, env: dict, check: bool = True, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(x) for x in cmd], env=env, stdin=kw.pop("stdin", subprocess.DEVNULL),
                          capture_output=True, text=True, timeout=TOOL_TIMEOUT, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, cmd))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


class CardDaemon(Child):
    """A ``twistd -n vsc-card`` process (vsc.devtools); its output in a log file; stopped at teardown if still running."""

    def __init__(self, home: Path, env: dict, log: Path, *extra: str):
        super().__init__([TWISTD, "-n", "--pidfile=", "vsc-card", "--home", home, "--password-file", home / "password",
                          *extra], log, name="vsc-card", env=env, append=True)
        self.spawn()

    def text(self) -> str:
        return self.log_text()

    def wait_for(self, needle: str, timeout: float = WAIT) -> None:
        try:
            self.wait_until(lambda: needle in self.text(), timeout, f"the log line {needle!r}")
        except ProcessFailed as e:
            raise AssertionError(str(e)) from None

    def wait_exit(self, timeout: float = WAIT) -> int:
        return self.proc.wait(timeout)


@pytest.fixture
def card_env(servers, tmp_path):
    """A real server and a card enrolled with it; a short private runtime dir and machine-lock dir for this test."""
    ssh_add, ssh_keygen = need_program("ssh-add"), need_program("ssh-keygen")
    short = Path(tempfile.mkdtemp(prefix="vsc-ssh-"))  # AF_UNIX paths must stay under 108 bytes
    env = _env()
    env.update(XDG_RUNTIME_DIR=str(short), VSC_LOCK_DIR=str(short / "lock"))
    os.chmod(short, 0o700)
    data_dir = tmp_path / "server"
    fingerprint = init_data_dir(data_dir)["fingerprint"]
    server = servers.start(data_dir)
    code = admin(data_dir, "issue", SERIAL)["code"]
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "password").write_text("correct horse battery staple\n")
    _run([VSC, "card", "--home", home, "enroll", "--server", server.endpoint, "--server-key", fingerprint,
          "--serial", SERIAL, "--code", code, "--password-file", home / "password", "--scrypt-log2n", "10",
          "--pin-policy", "9c=once"], env)  # the agent signs with 9C (policy always would refuse: tests/test_pin_*.py)
    daemons: list[CardDaemon] = []

    def start(*extra: str) -> CardDaemon:
        d = CardDaemon(home, env, tmp_path / f"card{len(daemons) + 1}.log", *extra)
        daemons.append(d)
        return d

    try:
        yield dict(env=env, home=home, start=start, ssh_add=ssh_add, ssh_keygen=ssh_keygen, tmp=tmp_path)
    finally:
        for d in daemons:
            d.stop()
        shutil.rmtree(short, ignore_errors=True)


@pytest.mark.integration
def test_openssh_tools_use_the_card_agent(card_env):
    """
    Real server + real card daemon: ssh-add -L lists exactly what 'vsc card
    ssh-pubkey' prints; ssh-keygen -Y sign through SSH_AUTH_SOCK makes
    signatures ssh-keygen -Y verify accepts for an RSA (9a, rsa-sha2-512) and
    an EC (9c) slot; after 'vsc card remove' ssh-add -L and signing fail.
    """
    env, home, tmp = card_env["env"], card_env["home"], card_env["tmp"]
    daemon = card_env["start"]()
    daemon.wait_for("ssh-agent on")
    sock = _run([VSC, "card", "--home", home, "ssh-agent-env", "--json"], env).stdout
    import json

    agent_path = json.loads(sock)["SSH_AUTH_SOCK"]
    assert f"export SSH_AUTH_SOCK={agent_path}" in daemon.text()
    assert (os.stat(agent_path).st_mode & 0o777) == 0o600
    ssh_env = dict(env, SSH_AUTH_SOCK=agent_path)

    pubkeys = _run([VSC, "card", "--home", home, "ssh-pubkey"], env).stdout.splitlines()
    assert len(pubkeys) == 4
    assert [line.split()[0] for line in pubkeys] == ["ssh-rsa", "ecdsa-sha2-nistp256", "ssh-rsa", "ecdsa-sha2-nistp256"]
    assert [line.split()[2] for line in pubkeys] == [f"vsc:{SERIAL}:{s}" for s in ("9a", "9c", "9d", "9e")]
    listed = _run([card_env["ssh_add"], "-L"], ssh_env).stdout.splitlines()
    assert listed == pubkeys
    one = _run([VSC, "card", "--home", home, "ssh-pubkey", "--slot", "9c"], env).stdout.splitlines()
    assert one == [pubkeys[1]]

    message = tmp / "message.txt"
    message.write_bytes(b"signed by a virtual smart card\n")
    for slot, line in (("9a", pubkeys[0]), ("9c", pubkeys[1])):
        pub = tmp / f"{slot}.pub"
        pub.write_text(line + "\n")
        sig = Path(str(message) + ".sig")
        sig.unlink(missing_ok=True)
        _run([card_env["ssh_keygen"], "-Y", "sign", "-f", pub, "-n", "file", message], ssh_env)
        allowed = tmp / "allowed_signers"
        allowed.write_text(f"signer@example {' '.join(line.split()[:2])}\n")
        with open(message, "rb") as f:
            ok = subprocess.run([card_env["ssh_keygen"], "-Y", "verify", "-f", str(allowed), "-I", "signer@example",
                                 "-n", "file", "-s", str(sig)], env=env, stdin=f, capture_output=True, text=True,
                                timeout=TOOL_TIMEOUT)
        assert ok.returncode == 0 and "Good" in ok.stdout, ok
        with open(message, "rb") as f:
            tampered = subprocess.run([card_env["ssh_keygen"], "-Y", "verify", "-f", str(allowed), "-I", "signer@example",
                                       "-n", "git", "-s", str(sig)], env=env, stdin=f, capture_output=True, text=True,
                                      timeout=TOOL_TIMEOUT)
        assert tampered.returncode != 0
    assert "slot 9a signed" in daemon.text() and "rsa-sha2-512" in daemon.text()
    assert "slot 9c signed" in daemon.text() and "ecdsa-sha2-nistp256" in daemon.text()

    _run([VSC, "card", "--home", home, "remove"], env)
    assert daemon.wait_exit() == 0
    assert _run([card_env["ssh_add"], "-L"], ssh_env, check=False).returncode != 0
    sig.unlink(missing_ok=True)
    signed = _run([card_env["ssh_keygen"], "-Y", "sign", "-f", tmp / "9a.pub", "-n", "file", message], ssh_env, check=False)
    assert signed.returncode != 0 and not sig.exists()
    assert not os.path.exists(agent_path)


@pytest.mark.integration
def test_custom_agent_socket_and_slot_subset(card_env):
    """--ssh-agent PATH --ssh-agent-slots 9e: ssh-add -L on PATH lists only 9e; SIGTERM removes the card and the socket."""
    env, home, tmp = card_env["env"], card_env["home"], card_env["tmp"]
    path = Path(env["XDG_RUNTIME_DIR"]) / "agent.sock"
    daemon = card_env["start"]("--ssh-agent", str(path), "--ssh-agent-slots", "9e")
    daemon.wait_for("ssh-agent on")
    listed = _run([card_env["ssh_add"], "-L"], dict(env, SSH_AUTH_SOCK=str(path))).stdout.splitlines()
    assert listed == _run([VSC, "card", "--home", home, "ssh-pubkey", "--slot", "9e"], env).stdout.splitlines()
    assert _run([VSC, "card", "--home", home, "ssh-agent-env"], env, check=False).returncode != 0  # not the default path
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.wait_exit() in (0, -signal.SIGTERM)  # twistd re-raises the signal once shut down
    assert "removed" in daemon.text() and not path.exists()


def test_p384_slot_is_ecdsa_sha2_nistp384_over_sha384(tmp_path):
    """
    A P-384 slot (PIV algorithm 14) is listed as ecdsa-sha2-nistp384 with
    the curve name nistp384 and its 97-byte point (RFC 5656 3.1), and signs
    with ECDSA over SHA-384 (RFC 5656 6.2.1: the hash follows the curve):
    the signature blob (mpint r, mpint s) verifies with ECDSA(SHA-384) and
    not with ECDSA(SHA-256). The authorized_keys line names the same type.
    """
    der = crypto.generate_private_der(crypto.KEY_P384)
    public_der = crypto.public_der_of(der)
    protection_key = _rand(32)
    envelope = seal_envelope(SERIAL, protection_key, [PlainItem(ItemKind.KEY, "9a", der, KeyAlg.P384, public_der)],
                             _rand)
    cfg = CardConfig(home=tmp_path, server="tcp:127.0.0.1:1", server_key="SHA256:unused", serial=SERIAL)
    s = in_use_session(cfg, MemoryStorage(SERIAL, envelope, protection_key, _rand), _rand)
    try:
        client = Client(s)
        (identity,) = client.identities()
        key = w.decode_public_key(identity.key_blob)
        public = serialization.load_der_public_key(public_der)
        assert key == w.EcdsaPublicKey("nistp384", public.public_bytes(serialization.Encoding.X962,
                                                                         serialization.PublicFormat.UncompressedPoint))
        assert key.algorithm == "ecdsa-sha2-nistp384" and len(key.point) == 97
        assert sshagent.openssh_line(public_der, "c").startswith("ecdsa-sha2-nistp384 ")
        sig = w.decode_signature(client.ask(w.SignRequest(identity.key_blob, DATA, 0)).signature)
        assert sig.algorithm == "ecdsa-sha2-nistp384"
        rs = w.decode_ecdsa_signature(sig.blob)
        public.verify(encode_dss_signature(rs.r, rs.s), DATA, ec.ECDSA(hashes.SHA384()))
        with pytest.raises(InvalidSignature):
            public.verify(encode_dss_signature(rs.r, rs.s), DATA, ec.ECDSA(hashes.SHA256()))
    finally:
        release(s)
