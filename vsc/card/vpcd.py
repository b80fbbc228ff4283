"""
The card in a PC/SC reader: a TCP link to vsmartcard's vpcd (the virtual
reader driver pcscd loads), with the card as the client — the reader
driver / resource manager / service provider chain of the patent
([0023]-[0024]) then serves the card to OpenSC, NSS, ssh, yubico-piv-tool.

* The link connects once the card is inserted and is dropped when it is
  removed, so PC/SC sees the card come and go with it; if vpcd is not up
  (pcscd not started yet, or restarted) it reconnects with backoff.
* Framing: 2-byte big-endian length both ways (read by Twisted's
  Int16StringReceiver, written by vsc.wire.apdu.encode_vpcd); a 1-byte
  message from vpcd is control (00 power off, 01 power on, 02 reset: no
  reply; 04 get ATR: reply the ATR), anything else is a command APDU
  answered with the response APDU. Messages are answered strictly in order.
* TCP_QUICKACK is set after every read: Debian's vpcd (vsmartcard 0.8)
  writes the length and the payload in two sends, and with Nagle on its
  side and delayed ACKs on ours every APDU would otherwise cost ~44 ms.
* The card's applications — PIV (vsc.protocol.piv) and OpenPGP
  (vsc.protocol.openpgp), those the card was enrolled with (card.ini
  ``applications``), and a YubiKey's read-only management application
  (vsc.protocol.management) — sit behind one sans-IO router
  (vsc.protocol.router: SELECT by AID picks one); ``PivCard`` performs
  their effects on the CardSession: items are read from the locked card
  memory, every change goes through ``CardSession.put_item`` (synced to the
  server before the APDU is answered), private-key operations through
  ``CardSession.with_key``.
"""

from __future__ import annotations

import collections
import socket

from twisted.application.internet import ClientService, backoffPolicy
from twisted.internet.defer import ensureDeferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols.basic import Int16StringReceiver
from twisted.python.failure import Failure

from vsc import crypto
from vsc.card.config import applications_of
from vsc.net.transport import write_now
from vsc.protocol import management, openpgp, piv, router
from vsc.protocol.applet import Certify, Clear
from vsc.protocol.card_lifecycle import CardError
from vsc.wire import apdu
from vsc.wire.protected import ItemKind, KeyAlg

#: A YubiKey 5's historical bytes (its ATR over USB CCID, 3B FD 13 00 00 81 31 FE 15 80 73 C0 21 C0 57 59 75 62 69 4B
#: 65 79 40: pcsc-tools' smartcard_list.txt "Yubico YubiKey 5 NFC (PKI)", OpenSC 0.23 card-openpgp.c "Yubikey 5"):
#: 80 (compact TLV) 73 C0 21 C0 (card capabilities: selection by full and partial DF name; data coding 21;
#: command chaining and extended Lc/Le, ISO/IEC 7816-4 8.1.1.2.7) 57 "YubiKey" (tag 5, 7 bytes). OpenSC's PIV
#: driver takes the card for a YubiKey from that tag (card-piv.c piv_match_card_continued), asks GET VERSION and
#: treats it as one (docs/pcsc.md "The ATR"). The PIV application answers an extended-length command in one
#: response APDU and keeps chaining and 61xx + GET RESPONSE for short ones: OpenSC 0.23's PIV driver and
#: yubico-piv-tool 2.2 never send extended APDUs (they chain), so both still take the 3-APDU path.
HISTORICAL = bytes.fromhex("80") + bytes.fromhex("73C021C0") + bytes.fromhex("57") + b"YubiKey"
ATR = apdu.build_atr(HISTORICAL)
DEFAULT_ENDPOINT = "tcp:127.0.0.1:35963"

_KIND = {KeyAlg.RSA2048: crypto.KEY_RSA2048, KeyAlg.P256: crypto.KEY_P256, KeyAlg.P384: crypto.KEY_P384,
         KeyAlg.ED25519: crypto.KEY_ED25519,
         KeyAlg.X25519: crypto.KEY_X25519}


def build_router(serial: str, names, rand: crypto.RandomBytes) -> router.AppletRouter:
    """The applications ``names`` in the card's order (PIV first: it is current until something is selected)."""
    applets = []
    number = openpgp.yubikey_serial(serial)
    if "piv" in names:
        piv_applet = piv.PivApplet(serial, rand)
        number = piv_applet.serial_number()  # a YubiKey has one serial number: its PIV GET SERIAL's
        applets.append((router.piv_matches, piv_applet))
    if "openpgp" in names:
        applets.append((openpgp.matches, openpgp.OpenPgpApplet(serial, rand)))
    # the YubiKey management application, read-only (ykman info, scdaemon): never the default application
    applets.append((management.matches, management.ManagementApplet(number, names, form_factor=piv.FORM_FACTOR)))
    return router.AppletRouter(applets)


_UNSET = object()

#: the applet's effects PivCard performs at once (no reactor wait): see PivCard.begin
_IMMEDIATE = (piv.Load, piv.KeyInfo, piv.Notice)


class PivCard:
    """The applications of one inserted card (PIV, OpenPGP): APDU in, APDU out, effects on the session."""

    log = Logger()

    def __init__(self, session, rand: crypto.RandomBytes = crypto.system_random, applications=None):
        self.session = session
        self.rand = rand
        names = applications if applications is not None else applications_of(session.config)
        self.router = build_router(session.config.serial, names, rand)
        self.applet = self.router.applets[0]  # PIV when carried (tests reach into its state)
        self._epoch = 0  # counts resets: a command begun before the last one is ended when its effect is done

    def reset(self) -> None:
        """
        Power off, reset, a new or lost vpcd connection: every application's
        volatile state is cleared, and a command still waiting on an effect
        (a sync to the server, a private-key operation) is ended when that
        effect is done — what it stored stays stored, but nothing it would do
        next (a PIN status set, a response buffered) lands in the state of the
        session after the reset.
        """
        self._epoch += 1
        self.router.reset()

    async def transmit(self, raw: bytes) -> bytes:
        """One command APDU in, its response APDU out."""
        response, rest = self.begin(raw)
        return response if rest is None else await rest

    def begin(self, raw: bytes):
        """
        Run the applet on ``raw`` as far as it goes without waiting:
        ``(response, None)`` when it finished (most APDUs: their effects,
        reading locked memory, are immediate), else ``(None, coroutine)``
        that finishes it once an effect that waits (a private-key operation,
        a change synced to the server) is done. Saves the coroutine and its
        Deferred on the APDUs that never wait.
        """
        return self._run(self.router.process(raw), None, None, self._epoch)

    def _run(self, gen, send, throw, epoch):
        while True:
            try:
                effect = gen.throw(throw) if throw is not None else gen.send(send)
            except StopIteration as stop:
                return stop.value, None
            send, throw = None, None
            if not isinstance(effect, _IMMEDIATE):
                if not (isinstance(effect, piv.PrivateOp) and not self.session.busy):
                    return None, self._resume(gen, effect, epoch)
                # a private-key operation while nothing holds the card: done now, under the same lock
                # (CardSession.with_key_now), without a coroutine and its Deferreds
                try:
                    send = self._private_op_now(effect)
                except piv.EffectFailed as e:
                    throw = e
                continue
            try:
                send = self._perform_now(effect)
            except piv.EffectFailed as e:
                throw = e

    async def _resume(self, gen, effect, epoch) -> bytes:
        send, throw = None, None
        try:
            send = await self._perform(effect)
        except piv.EffectFailed as e:
            throw = e
        if epoch != self._epoch:  # the card was reset while the effect ran: the command ends here
            gen.close()
            return apdu.build_response(b"", piv.SW_UNKNOWN)
        response, rest = self._run(gen, send, throw, epoch)
        return response if rest is None else await rest

    # -- effects

    def _memory(self):
        try:
            return self.session.require_usable()
        except CardError as e:
            raise piv.EffectFailed(str(e)) from None

    def _perform_now(self, effect):
        """The effects that never wait (_IMMEDIATE): reading locked memory, a log line."""
        if isinstance(effect, piv.Load):
            return self._memory().read(effect.kind, effect.name, effect.derive)
        if isinstance(effect, piv.KeyInfo):
            for kind, name, alg, public in self._memory().items():
                if kind is ItemKind.KEY and name == effect.slot:
                    return alg, public
            return None
        if isinstance(effect, piv.Notice):
            self.log.info("PIV {event} {fields}", event=effect.event, fields=effect.fields)
            return None
        raise piv.EffectFailed(f"unknown effect {effect!r}")

    async def _perform(self, effect):
        if isinstance(effect, _IMMEDIATE):
            return self._perform_now(effect)
        if isinstance(effect, piv.Store):
            try:
                await self.session.put_item(effect.kind, effect.name, effect.value, effect.alg, effect.public)
            except Exception as e:  # noqa: BLE001 - the APDU fails; the session undid the change
                raise piv.EffectFailed(f"not stored: {e}", piv.SW_MEMORY_FAILURE) from None
            return None
        if isinstance(effect, Clear):
            try:
                await self.session.clear_items(effect.prefix)
            except Exception as e:  # noqa: BLE001 - the APDU fails; the session undid the change
                raise piv.EffectFailed(f"not stored: {e}", piv.SW_MEMORY_FAILURE) from None
            return None
        if isinstance(effect, piv.PrivateOp):
            return await self._private_op(effect)
        if isinstance(effect, piv.Generate):
            return await self._generate(effect)
        if isinstance(effect, Certify):
            return await self._certify(effect)
        raise piv.EffectFailed(f"unknown effect {effect!r}")

    async def _private_op(self, effect: piv.PrivateOp) -> bytes:
        try:
            return await self.session.with_key(effect.slot, _key_op(effect))
        except Exception as e:  # noqa: BLE001 - mapped to the status word the host sees
            raise _op_failed(e) from None

    def _private_op_now(self, effect: piv.PrivateOp) -> bytes:
        """``_private_op`` at once (the caller saw that no operation holds the card)."""
        try:
            return self.session.with_key_now(effect.slot, _key_op(effect))
        except Exception as e:  # noqa: BLE001 - mapped to the status word the host sees
            raise _op_failed(e) from None

    async def _certify(self, effect: Certify) -> bytes:
        """A certificate signed by a slot's key (PIV attestation: the F9 key) inside OpenSSL; nothing is stored."""

        def issue(key: crypto.PrivateKeyHandle) -> bytes:
            if not effect.issuer:
                return crypto.attestation_ca_certificate(key, effect.subject, effect.serial)
            return crypto.attestation_certificate(key, effect.issuer, effect.public, effect.subject, effect.serial,
                                                  effect.extensions)

        try:
            return await self.session.with_key(effect.signer, issue)
        except Exception as e:  # noqa: BLE001 - mapped to the status word the host sees
            raise _op_failed(e) from None

    async def _generate(self, effect: piv.Generate) -> bytes:
        """
        A new key pair for a slot. Its PKCS#8 DER necessarily exists in this
        process: it is copied into a bytearray that is zeroed right after it
        was sealed into the card memory (the immutable bytes object the
        library returned is only dropped, not zeroed).
        """
        der = bytearray(crypto.generate_private_der(_KIND[effect.alg]))
        try:
            public = crypto.public_der_of(der)
            try:
                await self.session.put_item(ItemKind.KEY, effect.slot, der, effect.alg, public)
            except Exception as e:  # noqa: BLE001
                raise piv.EffectFailed(f"not stored: {e}", piv.SW_MEMORY_FAILURE) from None
            return public
        finally:
            der[:] = bytes(len(der))


def _key_op(effect: piv.PrivateOp):
    """The function of a key that performs ``effect`` (CardSession.with_key / with_key_now run it)."""

    def run(key: crypto.PrivateKeyHandle) -> bytes:
        if effect.op == "rsa":
            return crypto.rsa_private_block(key, effect.data)
        if effect.op == "rsa-pkcs1":  # OpenPGP: the card pads (PSO:CDS, INTERNAL AUTHENTICATE)
            return crypto.pkcs1_sign_payload(key, effect.data)
        if effect.op == "rsa-decrypt":  # OpenPGP PSO:DECIPHER: PKCS#1 v1.5
            return key.decrypt(effect.data, "pkcs1")
        if effect.op == "eddsa":  # OpenPGP: Ed25519 signature and authentication keys
            return key.eddsa_sign(effect.data)
        if effect.op == "x25519":  # OpenPGP: Cv25519 decryption key
            return key.x25519(effect.data)
        if effect.op == "ecdsa":
            return crypto.ecdsa_sign_hash(key, effect.data)
        if effect.op == "ecdh":
            return key.ecdh(effect.data)
        raise crypto.CryptoError(f"unknown operation {effect.op}")

    return run


def _op_failed(e: Exception) -> piv.EffectFailed:
    """What a failed private-key operation answers: bad data 6A80 (a bad block or point), anything else 6F00."""
    if isinstance(e, piv.EffectFailed):
        return e
    if isinstance(e, (crypto.CryptoError, ValueError)):  # ValueError: e.g. a point not on the curve
        return piv.EffectFailed(str(e), piv.SW_WRONG_DATA)
    return piv.EffectFailed(str(e))  # card removed, no key


class VpcdProtocol(Int16StringReceiver):
    """
    One connection to vpcd = the card in the reader: Twisted's 2-byte length
    framing (a payload is at most 0xFFFF bytes by construction), TCP_QUICKACK
    after every read, and answers strictly in order.

    Flow control: the card reads from the link only while nothing waits —
    no APDU in flight on an effect, no message of an earlier read still
    queued, and no answer the peer has not taken (the protocol is the
    transport's streaming producer: a full write buffer pauses it). vpcd
    sends one message and waits for its answer, so this never delays it;
    a peer that floods the link, or never reads, only fills its own socket.
    """

    log = Logger()
    MAX_LENGTH = apdu.VPCD_MAX

    def __init__(self, card: PivCard, atr: bytes = ATR):
        self.card = card
        self.atr = atr
        self._queue: collections.deque[bytes] = collections.deque()  # messages read, not handled yet
        self._busy = False  # an APDU waits on an effect
        self._held = False  # the transport's write buffer is full (it called pauseProducing)
        self._draining = False
        self._stopped = False  # reading from the transport is paused
        self.apdus = 0
        self._rest = bytearray()  # the beginning of a frame not all read yet
        self._sockopt = _UNSET  # the connection's socket's setsockopt (None: not a socket), found once

    def _quickack(self) -> None:
        sockopt = self._sockopt
        if sockopt is _UNSET:
            try:
                sockopt = self._sockopt = self.transport.getHandle().setsockopt
            except AttributeError:
                sockopt = self._sockopt = None  # not a TCP socket (tests use in-memory transports)
        if sockopt is not None:
            try:
                sockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            except OSError:
                pass

    def connectionMade(self) -> None:
        self._sockopt = _UNSET  # this connection's socket
        self._quickack()
        self._direct_reads()
        self.transport.registerProducer(self, True)  # a full write buffer pauses the reading (flow control)
        self.card.reset()  # a new connection is a freshly inserted card
        self.log.info("card presented to PC/SC (vpcd {peer})", peer=str(self.transport.getPeer()))

    def _direct_reads(self) -> None:
        """
        Have the TCP transport hand what it reads straight to this protocol.
        Through PcscLink's ClientService a read passes the endpoint's
        _WrappingProtocol and ClientService's proxy (a ``__getattr__``) on its
        way here, and Debian's vpcd sends every APDU as two writes (length,
        payload): two reads per APDU. Only ``dataReceived`` is short-cut (an
        attribute of the transport's own protocol object); connectionLost
        still passes both, so reconnecting is unchanged.
        """
        outer = getattr(self.transport, "protocol", None)
        if outer is not None and outer is not self and hasattr(outer, "_wrappedProtocol"):
            outer.dataReceived = self.dataReceived

    def dataReceived(self, data: bytes) -> None:
        """
        Int16StringReceiver's framing, through vsc.wire.apdu.split_vpcd: the
        whole frames of what arrived, each to ``stringReceived`` in order
        (half of the glue's time per APDU was Twisted's generic reader).
        """
        self._quickack()  # the 44 ms pitfall: see the module docstring
        rest = self._rest
        if rest:
            rest += data  # in place: a frame that trickles in costs its length, not its length squared
            if len(rest) < 2 or len(rest) < 2 + (rest[0] << 8 | rest[1]):
                return  # the frame is not all here yet
            data = bytes(rest)
            rest.clear()
        payloads, left = apdu.split_vpcd(data)
        if left:
            rest += left
        if len(payloads) == 1 and not (self._queue or self._busy or self._held or self._draining):
            # the usual case (vpcd sends one message and waits): handled at once, no queue
            self._draining = True
            try:
                self._message(payloads[0])
            finally:
                self._draining = False
            if self._busy or self._held:
                self._flow()
        elif payloads:
            self._queue.extend(payloads)
            self._drain()

    def stringReceived(self, payload: bytes) -> None:
        self._queue.append(payload)
        self._drain()

    def _drain(self) -> None:
        """Handle the queued messages in order until one waits or the peer must take answers first."""
        if self._draining:  # an answer that came at once, from inside the loop below: the loop goes on
            return
        self._draining = True
        try:
            queue = self._queue
            while queue and not self._busy and not self._held:
                self._message(queue.popleft())
        finally:
            self._draining = False
        self._flow()

    def _flow(self) -> None:
        """Read from the link only when nothing waits (see the class docstring)."""
        stop = self._busy or self._held or bool(self._queue)
        if stop is not self._stopped and self.transport is not None:
            self._stopped = stop
            if stop:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def _message(self, payload: bytes) -> None:
        try:
            d = self._handle(payload)
        except BaseException:
            self._failed(Failure())
            return
        if d is not None:  # waits on an effect: the next message waits for its answer
            self._busy = True
            d.addBoth(self._handled).addErrback(self._failed)

    def _handled(self, result):
        self._busy = False
        self._drain()
        return result

    # -- IPushProducer: the transport pauses the card while its write buffer is full

    def pauseProducing(self) -> None:
        self._held = True
        self._flow()

    def resumeProducing(self) -> None:
        self._held = False
        self._drain()

    def stopProducing(self) -> None:
        self._held = True
        self._queue.clear()

    def _failed(self, failure) -> None:
        self.log.failure("vpcd message failed", failure)
        if self.transport is not None:
            self.transport.loseConnection()

    async def _answer(self, rest) -> None:
        """Finish an APDU whose effect had to wait (PivCard.begin), then answer it."""
        try:
            response = await rest
        except Exception:  # noqa: BLE001 - a bug: answer 6F00 rather than leave the host waiting
            self.log.failure("APDU processing failed")
            response = apdu.build_response(b"", piv.SW_UNKNOWN)
        self._respond(response)

    def _respond(self, response: bytes) -> None:
        self.apdus += 1
        write_now(self.transport, apdu.encode_vpcd(response))

    def _handle(self, payload: bytes):
        """Answer one vpcd message: None when answered in this turn, else a Deferred that fires once it is."""
        ctl = apdu.control_of(payload)
        if ctl is apdu.VpcdControl.GET_ATR:
            write_now(self.transport, apdu.encode_vpcd(self.atr))
            return None
        if ctl is not None:  # power off, power on, reset: volatile state cleared, no reply
            self.card.reset()
            return None
        try:
            response, rest = self.card.begin(payload)
        except Exception:  # noqa: BLE001 - a bug: answer 6F00 rather than leave the host waiting
            self.log.failure("APDU processing failed")
            response, rest = apdu.build_response(b"", piv.SW_UNKNOWN), None
        if rest is None:  # answered without waiting (most APDUs)
            self._respond(response)
            return None
        return ensureDeferred(self._answer(rest))

    def connectionLost(self, reason) -> None:
        self.connected = False
        self._queue.clear()
        factory = getattr(self, "factory", None)
        if factory is not None and factory.active is self:
            factory.active = None
        self.card.reset()
        self.log.info("card left PC/SC (vpcd connection closed)")


class VpcdFactory(Factory):
    """One card, so one vpcd connection at a time (a second one, in listen mode, is closed at once)."""

    noisy = False

    def __init__(self, card: PivCard, atr: bytes = ATR):
        self.card = card
        self.atr = atr
        self.active: VpcdProtocol | None = None

    def buildProtocol(self, addr):
        if self.active is not None and self.active.connected:
            return None  # the card is already in a reader
        p = VpcdProtocol(self.card, self.atr)
        p.factory = self
        self.active = p
        return p


LISTEN_PREFIX = "listen:"


class PcscLink:
    """
    Keep the card in the vpcd reader while it is inserted.

    ``tcp:HOST:PORT`` (vpcd's default mode): connect to vpcd, reconnecting
    with backoff while vpcd is not there. ``listen:tcp:PORT:interface=127.0.0.1``
    (vpcd's reversed mode, DEVICENAME host:port in /etc/reader.conf.d/vpcd):
    listen for vpcd's connection instead; only one connection at a time.
    """

    log = Logger()

    def __init__(self, reactor, session, endpoint: str = DEFAULT_ENDPOINT,
                 rand: crypto.RandomBytes = crypto.system_random):
        from twisted.internet.endpoints import clientFromString, serverFromString

        self.reactor = reactor
        self.endpoint_text = endpoint
        self.card = PivCard(session, rand)
        self.factory = VpcdFactory(self.card)
        self.port = None
        self.service = None
        if endpoint.startswith(LISTEN_PREFIX):
            self.server_endpoint = serverFromString(reactor, endpoint[len(LISTEN_PREFIX):])
        else:
            self.server_endpoint = None
            self.service = ClientService(
                clientFromString(reactor, endpoint), self.factory,
                retryPolicy=backoffPolicy(initialDelay=0.2, maxDelay=5.0, factor=1.6), clock=reactor,
            )

    def start(self):
        """Connect (or listen); returns a Deferred that fires once listening (at once when connecting)."""
        from twisted.internet.defer import succeed

        self.log.info("presenting the card to PC/SC through vpcd at {endpoint}", endpoint=self.endpoint_text)
        if self.service is not None:
            self.service.startService()
            return succeed(None)

        def listening(port):
            self.port = port
            return port

        return self.server_endpoint.listen(self.factory).addCallback(listening)

    def stop(self):
        """Disconnect (PC/SC sees the card removed); returns a Deferred."""
        from twisted.internet.defer import succeed

        self.card.reset()
        if self.service is not None:
            return self.service.stopService() if self.service.running else succeed(None)
        d = self.port.stopListening() if self.port is not None else succeed(None)
        self.port = None
        active = self.factory.active
        if active is not None and active.transport is not None:
            active.transport.loseConnection()
        return d


# ---------------------------------------------------------------- certificates through the control socket (vsc card cert)


def _slot_public(session, slot: str) -> bytes:
    mem = session.require_usable()
    for kind, name, _alg, public in mem.items():
        if kind is ItemKind.KEY and name == slot:
            return public
    raise CardError(f"no key in slot {slot}")


async def put_certificate(session, slot: str, der: bytes) -> None:
    """Store a slot's certificate (stored and synced before this returns); its public key must be the slot's."""
    try:
        cert_public = crypto.certificate_public_der(der)
    except ValueError as e:
        raise CardError(f"not an X.509 certificate: {e}") from None
    if cert_public != _slot_public(session, slot):
        raise CardError(f"the certificate's public key is not the key in slot {slot}")
    await session.put_item(ItemKind.CERT, slot, der)


def get_certificate(session, slot: str) -> bytes:
    """A slot's certificate (DER), or b"" if it has none."""
    _slot_public(session, slot)
    mem = session.memory
    if not mem.has(ItemKind.CERT, slot):
        return b""
    with mem.open(ItemKind.CERT, slot) as view:
        return bytes(view)
