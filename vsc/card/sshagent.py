"""
The card's ssh-agent: the SSH agent protocol (draft-miller-ssh-agent) on a
UNIX socket (mode 0600) in the user's runtime dir, next to the control
socket, served by the card daemon (``twistd vsc-card``) from its CardSession.

* REQUEST_IDENTITIES lists the card's keys (every slot, or the configured
  subset) as OpenSSH public key blobs, with the comment ``vsc:SERIAL:SLOT``.
* SIGN_REQUEST signs on the card (``CardSession.with_key``): the private key
  never leaves the session.
    - RSA slots: rsa-sha2-256 (flag SSH_AGENT_RSA_SHA2_256) and rsa-sha2-512
      (SSH_AGENT_RSA_SHA2_512), RFC 8332; when both flags are set, SHA-256
      (as OpenSSH's ssh-agent does). Legacy ``ssh-rsa`` (PKCS#1 v1.5 over
      SHA-1, no flag) is REFUSED: SHA-1 has practical chosen-prefix
      collisions, OpenSSH itself stopped accepting ssh-rsa signatures by
      default in 8.8, and every OpenSSH client since 7.2 asks for rsa-sha2-*.
      A card key should not produce signatures an attacker could reuse.
    - P-256 slots: ecdsa-sha2-nistp256 (ECDSA over SHA-256; signature blob
      ``mpint r, mpint s``), RFC 5656; P-384 slots: ecdsa-sha2-nistp384
      (ECDSA over SHA-384, RFC 5656 6.2.1).
* The PIN policy (vsc.card.pin, chosen at enrolment) rules every
  signature: a slot that needs the PIN signs only while the local PIN
  verification is open (the insert, or ``vsc card verify-pin``); a slot of
  policy ``always`` (the agent cannot ask for a PIN) and any PIN slot while
  the PIN is blocked are refused with SSH_AGENT_FAILURE and a log line
  saying why. REQUEST_IDENTITIES still lists them.
* Everything else (add/remove identities, lock/unlock, smartcard keys,
  extensions such as session-bind@openssh.com, SSH1) → SSH_AGENT_FAILURE.
* Once the card is not in use (removed, removing, exited) every request →
  SSH_AGENT_FAILURE.
* A malformed message → SSH_AGENT_FAILURE; the connection stays usable. A
  length field above 256 KiB (OpenSSH's limit) closes the connection.

Responses go out in request order, one request at a time per connection.
Framing: Twisted's Int32StringReceiver; messages, key and signature blobs: vsc.wire.sshagent.
(twisted.conch.ssh.agent's server keeps private keys in its own memory and
signs synchronously, so it does not fit a card.)
"""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Iterable

import attrs
from twisted.internet.defer import CancelledError, Deferred, ensureDeferred, succeed
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import Int32StringReceiver

from vsc import crypto
from vsc.wire.errors import WireError
from vsc.wire.pinpolicy import SLOT_REFS, slot_order
from vsc.wire.protected import ItemKind, KeyAlg
from vsc.wire.sshagent import (
    MAX_MESSAGE,
    AgentMessageType,
    EcdsaPublicKey,
    EcdsaSignature,
    Extension,
    Failure,
    IdentitiesAnswer,
    Identity,
    OtherRequest,
    RequestIdentities,
    Response,
    RsaPublicKey,
    SignFlags,
    SignRequest,
    SignResponse,
    SshSignature,
    decode_request,
    encode_ecdsa_signature,
    encode_public_key,
    encode_response,
    encode_signature,
)

SSH_ALGORITHMS = {KeyAlg.RSA2048: "ssh-rsa", KeyAlg.P256: "ecdsa-sha2-nistp256", KeyAlg.P384: "ecdsa-sha2-nistp384"}


def agent_socket_for(home) -> Path:
    """The default agent socket (vsc.card.paths): the control socket's name with ``.ssh-agent.sock``."""
    from vsc.card.paths import agent_socket_for

    return Path(agent_socket_for(home))


def parse_slots(text: str | None) -> tuple[str, ...] | None:
    """``"9a,9c"`` → ("9a", "9c"); None or "" → None (every slot). ValueError for an unknown slot."""
    from vsc.card.session import SLOTS

    if not text:
        return None
    slots = tuple(s.strip().lower() for s in text.split(",") if s.strip())
    unknown = [s for s in slots if s not in SLOTS]
    if unknown or not slots:
        raise ValueError(f"unknown slot(s) {', '.join(unknown) or text!r}; the card's slots are {', '.join(SLOTS)}")
    return slots


def key_comment(serial: str, slot: str) -> str:
    return f"vsc:{serial}:{slot}"


def ssh_public_key(public_der: bytes) -> RsaPublicKey | EcdsaPublicKey:
    """A slot's public key (SubjectPublicKeyInfo DER) as an OpenSSH public key value."""
    parts = crypto.ssh_public_parts(public_der)
    if parts[0] == "rsa":
        return RsaPublicKey(e=parts[1], n=parts[2])
    return EcdsaPublicKey(curve=parts[0], point=parts[1])


def key_blob(public_der: bytes) -> bytes:
    return encode_public_key(ssh_public_key(public_der))


def openssh_line(public_der: bytes, comment: str) -> str:
    """The authorized_keys line: ``ssh-rsa AAAA... comment`` / ``ecdsa-sha2-nistp256|384 AAAA... comment``."""
    key = ssh_public_key(public_der)
    blob = base64.b64encode(encode_public_key(key)).decode("ascii")
    return f"{key.algorithm} {blob} {comment}".rstrip()


class AgentRefused(Exception):
    """A request the agent answers with SSH_AGENT_FAILURE; the message says why (logged)."""


@attrs.frozen
class AgentKey:
    slot: str
    alg: KeyAlg
    key_blob: bytes
    comment: str


class CardAgent:
    """The agent's logic over one CardSession (no I/O: AgentProtocol frames it)."""

    log = Logger()

    def __init__(self, session, slots: Iterable[str] | None = None):
        self.session = session
        self.slots = tuple(slots) if slots else None
        self._blobs: dict[bytes, bytes] = {}  # public DER → key blob

    def _blob(self, public: bytes) -> bytes:
        blob = self._blobs.get(public)
        if blob is None:
            blob = self._blobs[public] = key_blob(public)
        return blob

    def keys(self) -> list[AgentKey]:
        """The card's keys the agent offers, in slot order; the card's CardError when it is not usable."""
        memory = self.session.require_usable()
        out = []
        serial = self.session.config.serial
        for kind, name, alg, public in memory.items():
            if kind is not ItemKind.KEY or alg not in SSH_ALGORITHMS or not public or name not in SLOT_REFS:
                continue  # PIV key slots only: the OpenPGP application's keys (pgp-*) serve through it (gpg-agent
                # has their ssh side), and the attestation key (f9) signs attestations only
            if self.slots is not None and name not in self.slots:
                continue
            out.append(AgentKey(name, alg, self._blob(public), key_comment(serial, name)))
        return sorted(out, key=lambda k: slot_order(k.slot))  # 9a, 9c, 9d, 9e, then the retired 82..95

    async def answer(self, body: bytes) -> Response:
        """One request body → its response; every refusal is a Failure (and a log line)."""
        try:
            req = decode_request(body)
        except WireError as e:
            self.log.warn("ssh-agent: malformed request refused: {error}", error=str(e))
            return Failure()
        try:
            if isinstance(req, RequestIdentities):
                return IdentitiesAnswer(tuple(Identity(k.key_blob, k.comment) for k in self.keys()))
            if isinstance(req, SignRequest):
                return SignResponse(await self.sign(req))
            if isinstance(req, Extension):
                raise AgentRefused(f"extension {req.name!r} is not supported")
            assert isinstance(req, OtherRequest)
            try:
                name = AgentMessageType(req.type).name
            except ValueError:
                name = f"message type {req.type}"
            raise AgentRefused(f"{name} is not supported (the card's keys are fixed)")
        except AgentRefused as e:
            self.log.info("ssh-agent: refused: {why}", why=str(e))
            return Failure()
        except CancelledError:
            raise  # the client went away (AgentProtocol.connectionLost): nothing to answer
        except Exception as e:  # noqa: BLE001 - a card error (removed meanwhile...) is a refusal too
            from vsc.card.session import CardError, explain

            if isinstance(e, (CardError, crypto.CryptoError)):
                self.log.info("ssh-agent: refused: {why}", why=str(e))
            else:
                self.log.failure("ssh-agent: request failed: {why}", why=explain(e))
            return Failure()

    async def sign(self, req: SignRequest) -> bytes:
        """The SSH signature blob for ``req`` (AgentRefused for an unknown key or algorithm)."""
        key = next((k for k in self.keys() if k.key_blob == req.key_blob), None)
        if key is None:
            raise AgentRefused("sign request for a key that is not on the card")
        data = req.data
        if key.alg is KeyAlg.RSA2048:
            if req.flags & SignFlags.RSA_SHA2_256:
                algorithm = "rsa-sha2-256"

                def op(handle):
                    return handle.sign_digest(crypto.sha256(data))

            elif req.flags & SignFlags.RSA_SHA2_512:
                algorithm = "rsa-sha2-512"

                def op(handle):
                    return handle.sign_pkcs1(data, "sha512")

            else:
                raise AgentRefused(f"slot {key.slot}: legacy ssh-rsa (SHA-1) signatures are refused; use rsa-sha2-256/512")
        else:
            # RFC 5656 6.2.1: the hash follows the curve (nistp256 SHA-256, nistp384 SHA-384)
            algorithm = SSH_ALGORITHMS[key.alg]
            digest_of = crypto.sha384 if key.alg is KeyAlg.P384 else crypto.sha256

            def op(handle):
                r, s = crypto.ecdsa_der_to_rs(handle.sign_digest(digest_of(data)))
                return encode_ecdsa_signature(EcdsaSignature(r=r, s=s))

        # the PIN policy (vsc.card.pin): a slot that needs the PIN signs only while the local verification is
        # open; a slot of policy "always" and a blocked PIN are refused — an ordinary agent failure, and a log
        # line that tells the owner why
        from vsc.card.pin import local_pin

        await local_pin(self.session).authorize(key.slot, False, "ssh-agent")
        signature = await self.session.with_key(key.slot, op)
        self.log.info("ssh-agent: slot {slot} signed {size} bytes ({algorithm})", slot=key.slot, size=len(data),
                      algorithm=algorithm)
        return encode_signature(SshSignature(algorithm=algorithm, blob=signature))


class AgentProtocol(Int32StringReceiver):
    """
    One client connection: Twisted's 4-byte length framing with OpenSSH's
    256 KiB limit (a longer length closes the connection, as ssh-agent
    does), and answers in request order. When the connection closes, what
    it left behind is dropped: the queued requests, and the one waiting for
    the card is cancelled, so a client that is gone gets nothing signed and
    cannot queue card work beyond MAX_PENDING by hanging up and coming back.
    """

    log = Logger()
    MAX_LENGTH = MAX_MESSAGE
    MAX_PENDING = 32

    def __init__(self, agent: CardAgent):
        self.agent = agent
        self._tail: Deferred = succeed(None)
        self._pending = 0
        self._closed = False
        self._current: Deferred | None = None  # the request being answered (cancelled if the client goes)

    def dataReceived(self, data: bytes) -> None:
        if not self._closed:
            super().dataReceived(data)

    def stringReceived(self, body: bytes) -> None:
        if self._closed:
            return
        if self._pending >= self.MAX_PENDING:
            self._close(f"more than {self.MAX_PENDING} requests waiting for an answer")
            return
        self._pending += 1
        self._tail.addCallback(self._next, body)

    def _next(self, _, body: bytes) -> Deferred | None:
        if self._closed:  # the client went away: nothing is done for it
            self._pending -= 1
            return None
        d = self._current = ensureDeferred(self._answer(body))
        d.addErrback(lambda f: f.trap(CancelledError) and None)
        return d

    def lengthLimitExceeded(self, length: int) -> None:
        self._close(f"a message of {length} bytes exceeds the limit of {self.MAX_LENGTH}")

    async def _answer(self, body: bytes) -> None:
        try:
            response = await self.agent.answer(body)
        except CancelledError:
            self._pending -= 1
            raise
        except Exception:  # noqa: BLE001 - answer() already maps refusals; this is a bug
            self.log.failure("ssh-agent: internal error")
            response = Failure()
        self._pending -= 1
        if not self._closed:
            self.transport.write(encode_response(response))

    def _close(self, why: str) -> None:
        self.log.warn("ssh-agent: closing a client connection: {why}", why=why)
        self._closed = True
        self.transport.loseConnection()

    def connectionLost(self, reason=None) -> None:
        self._closed = True
        current, self._current = self._current, None
        if current is not None:
            current.cancel()  # a request waiting for the card gives up its place (a running operation finishes)


class AgentFactory(Factory):
    noisy = False

    def __init__(self, agent: CardAgent):
        self.agent = agent

    def buildProtocol(self, addr):
        p = AgentProtocol(self.agent)
        p.factory = self
        return p


async def listen(reactor, session, path: Path, slots: Iterable[str] | None = None):
    """Serve the agent on ``path`` (mode 0600; a stale socket is replaced); returns the listening port."""
    from twisted.internet.endpoints import UNIXServerEndpoint

    from vsc.card.control import prepare_socket_path

    path = Path(path)
    prepare_socket_path(path)
    port = await UNIXServerEndpoint(reactor, str(path), mode=0o600).listen(AgentFactory(CardAgent(session, slots)))
    return port
