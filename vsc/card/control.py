"""
The card daemon's side of its local control socket: AMP over a UNIX socket
(mode 0600, in the user's runtime dir). The commands are the rows of
vsc.wire.control, made into ``amp.Command`` classes here; the daemon
(``twistd vsc-card``) answers them through a CardSession. The one client is
vsc.card.client (``vsc card ...``, the licensing API, ``vsc run``).

Data objects never rest in Python objects here (issue 15, docs/security.md):
the socket is read with ``recv_into`` straight into a locked buffer
(vsc.card.memory; ``listen`` makes the port whose connections do that), the
boxes are parsed in place (vsc.wire.ampbox.locate_box), a DataPut value is
copied locked buffer to locked buffer and sealed from there, and a DataGet
answer is built in a locked buffer from the item opened for it and sent
from that buffer (``LockedServer.write_locked``). Every other command is
handed to Twisted's AMP dispatch as an ordinary box. The receive buffer is
zeroed behind every box it held.

One responsibility (and so one module despite its length): the daemon's end of the control socket.
"""

from __future__ import annotations

import collections
import errno
import os
import stat
from pathlib import Path

from twisted.internet import main, unix
from twisted.internet.defer import ensureDeferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from vsc.card.memory import LockedBuffer
from vsc.card.pin import local_pin
from vsc.card.session import CardError, CardSession, _not_openpgp, explain
from vsc.wire import ampbox
from vsc.wire import control as wc

_AMP_TYPES = {wc.TEXT: amp.Unicode, wc.BYTES: amp.String, wc.INT: amp.Integer, wc.FLOAT: amp.Float,
              wc.BOOL: amp.Boolean, wc.TEXT_LIST: lambda: amp.ListOf(amp.Unicode())}


def _amp_argument(kind) -> amp.Argument:
    """The Twisted argument type of a vsc.wire.control type."""
    if isinstance(kind, wc.Records):
        return amp.AmpList([(name.encode("ascii"), _amp_argument(k)) for name, k in kind.fields])
    return _AMP_TYPES[kind]()


def _amp_command(spec: wc.Command) -> type[amp.Command]:
    """The ``amp.Command`` of one row of vsc.wire.control."""
    return type(spec.name, (amp.Command,), {
        "__doc__": spec.doc,
        "commandName": spec.name.encode("ascii"),
        "arguments": [(name.encode("ascii"), _amp_argument(kind)) for name, kind in spec.arguments],
        "response": [(name.encode("ascii"), _amp_argument(kind)) for name, kind in spec.response],
        "errors": {CardError: wc.CARD_ERROR},
    })


Status = _amp_command(wc.STATUS)
PublicKey = _amp_command(wc.PUBLIC_KEY)
SignDigest = _amp_command(wc.SIGN_DIGEST)
Decrypt = _amp_command(wc.DECRYPT)
Counter = _amp_command(wc.COUNTER)
DataPut = _amp_command(wc.DATA_PUT)
DataGet = _amp_command(wc.DATA_GET)
LicenseFund = _amp_command(wc.LICENSE_FUND)
CertPut = _amp_command(wc.CERT_PUT)
CertGet = _amp_command(wc.CERT_GET)
ChangePassword = _amp_command(wc.CHANGE_PASSWORD)
Remove = _amp_command(wc.REMOVE)
VerifyPin = _amp_command(wc.VERIFY_PIN)
ForgetPin = _amp_command(wc.FORGET_PIN)
ChangePin = _amp_command(wc.CHANGE_PIN)
UnblockPin = _amp_command(wc.UNBLOCK_PIN)


def _guard(coro_fn):
    """Run a session call; any failure reaches the client as one CardError line."""

    async def run(*a, **kw):
        try:
            return await coro_fn(*a, **kw)
        except CardError:
            raise
        except Exception as e:  # noqa: BLE001 - reported to the client, logged here
            Logger().failure("control command failed")
            raise CardError(explain(e)) from None

    return lambda *a, **kw: ensureDeferred(run(*a, **kw))


_DATA_PUT, _DATA_GET = wc.DATA_PUT.name.encode("ascii"), wc.DATA_GET.name.encode("ascii")
_SIGN_DIGEST = wc.SIGN_DIGEST.name.encode("ascii")
_RX_START = 8192
#: the longest box the daemon reads (the client reads no longer an answer)
_RX_MAX = wc.MAX_BOX
_log = Logger()
#: a refusal's text is cut to this many characters: it may quote what the client sent (a data object's
#: name), and a longer one could not be sent in one AMP value (the request would go unanswered)
_REFUSAL_CHARS = 1000


def _refusal(text: str) -> dict:
    """The CardError box for ``text``, cut to ``_REFUSAL_CHARS`` characters (at most 4 KB of UTF-8)."""
    if len(text) > _REFUSAL_CHARS:
        text = text[:_REFUSAL_CHARS - 1] + "…"
    return {wc.ERROR_CODE: wc.CARD_ERROR, wc.ERROR_DESCRIPTION: text.encode("utf-8", "backslashreplace")}


class ControlProtocol(amp.AMP):
    """
    AMP, except that boxes are read from a locked receive buffer (see the
    module docstring) and DataPut / DataGet are answered here, their values
    kept in locked buffers; the rest go to the responders below.
    """

    def __init__(self, session: CardSession, on_remove=None):
        super().__init__()
        self.session = session
        self.on_remove = on_remove
        self.pin = local_pin(session)
        self._fresh = False  # VerifyPin(keep=False) on this connection: one private-key operation
        self._rx: LockedBuffer | None = None
        self._fill = 0
        self._refused = False

    def _authorize_now(self, slot: str) -> None:
        """``_authorize`` at once (the PIN check only reads the card memory)."""
        _not_openpgp(slot)
        fresh, self._fresh = self._fresh, False
        self.pin.authorize_now(slot, fresh, "local API")

    async def _authorize(self, slot: str) -> None:
        """The PIN policy before a private-key operation (vsc.card.pin); a one-operation verification is used up."""
        _not_openpgp(slot)  # the OpenPGP application's keys are refused before any PIN question
        fresh, self._fresh = self._fresh, False
        await self.pin.authorize(slot, fresh, "local API")

    # -- reading into locked memory

    def receive_window(self) -> memoryview:
        """The free part of the locked receive buffer (grown as a box needs; empty when a box is too long)."""
        if self._rx is None:
            self._rx = LockedBuffer(_RX_START)
        if self._fill == self._rx.size and self._rx.size < _RX_MAX:
            bigger = LockedBuffer(min(self._rx.size * 4, _RX_MAX))
            bigger.view[:self._fill] = self._rx.view[:self._fill]
            self._rx.free()
            self._rx = bigger
        return self._rx.view[self._fill:]

    def received(self, n: int) -> None:
        """``n`` more bytes were read into the window: answer every whole box."""
        self._fill += n
        while self._fill and self._rx is not None and not self._refused:
            window = self._rx.view[:self._fill]
            try:
                fields, used = ampbox.locate_box(window)
            except ampbox.Incomplete:
                if self._fill >= _RX_MAX:
                    self._refuse_connection("a control message longer than the daemon reads")
                return
            except ampbox.Malformed as e:
                self._refuse_connection(str(e))
                return
            finally:
                window.release()
            try:
                self._box_received(fields)
            finally:
                self._consume(used)

    def dataReceived(self, data: bytes) -> None:
        """A transport that reads into bytes (a test's StringTransport): the same path, through the locked buffer."""
        data = memoryview(data)
        pos = 0
        while pos < len(data) and not self._refused:
            window = self.receive_window()
            k = min(len(window), len(data) - pos)
            window[:k] = data[pos:pos + k]
            window.release()
            if k == 0:
                self._refuse_connection("a control message longer than the daemon reads")
                return
            pos += k
            self.received(k)

    def _consume(self, used: int) -> None:
        """Drop the first ``used`` bytes of the receive buffer, zeroing what they occupied."""
        if self._rx is None or self._refused:  # refused while its box was answered: already emptied and zeroed
            return
        rest = self._fill - used
        if rest:
            self._rx.view[:rest] = self._rx.view[used:self._fill]
        self._rx.zero(rest, self._fill)
        self._fill = rest

    def _refuse_connection(self, why: str) -> None:
        _log.warn("control connection closed: {why}", why=why)
        self._refused = True
        self._fill = 0
        if self._rx is not None:
            self._rx.zero()
        self.transport.loseConnection()

    def makeConnection(self, transport):
        """AMP's, without its info line per connection (every ``vsc card`` process is one connection)."""
        self._transportPeer = transport.getPeer()
        self._transportHost = transport.getHost()
        amp.BinaryBoxProtocol.makeConnection(self, transport)

    def unhandledError(self, failure) -> None:
        """
        A command sent without ``_ask`` (nobody waits for its answer) that
        failed: refused, or unknown. AMP's own logs a traceback and drops the
        connection; here one line, and the connection is closed the same.
        """
        if self.transport is not None and not self._refused:
            self._refuse_connection(f"a command sent without _ask failed: {failure.getErrorMessage()}")

    def connectionLost(self, reason):
        if self._rx is not None:
            self._rx.free()
            self._rx = None
            self._fill = 0
        amp.BinaryBoxProtocol.connectionLost(self, reason)  # AMP's, without its info line
        self.transport = None

    def _box_received(self, fields: list[tuple[bytes, int, int]]) -> None:
        view = self._rx.view[:self._fill]
        try:
            where = {key: (start, end) for key, start, end in fields}
            if wc.COMMAND not in where:
                # an empty box, an answer or error to a request the daemon never made: AMP's dispatch would
                # raise it into the reactor (a traceback); the client is one that does not speak this protocol
                self._refuse_connection("a control message that is not a command")
                return
            command = bytes(view[slice(*where[wc.COMMAND])])
            if command in (_DATA_PUT, _DATA_GET):
                ask = bytes(view[slice(*where[wc.ASK])]) if wc.ASK in where else None
                name = bytes(view[slice(*where[b"name"])]) if b"name" in where else None
                if command == _DATA_PUT:
                    value, length = None, 0
                    if b"value" in where:  # its own locked copy: the receive buffer moves on
                        start, end = where[b"value"]
                        length = end - start
                        value = LockedBuffer(length)
                        value.view[:length] = view[start:end]
                    self._data_put(ask, name, value, length)
                else:
                    self._data_get(ask, name)
                return
            if command == _SIGN_DIGEST:  # the local API's hot path: answered here, not through AMP's dispatch
                ask, slot, digest = (bytes(view[slice(*where[k])]) if k in where else None
                                     for k in (wc.ASK, b"slot", b"digest"))
                self._sign_digest(ask, slot, digest)
                return
            box = amp.AmpBox({key: bytes(view[start:end]) for key, start, end in fields})
        finally:
            view.release()
        self.ampBoxReceived(box)

    # -- DataPut and DataGet, in locked memory

    def _answer(self, ask: bytes | None, run) -> None:
        """Run ``run()`` (async); answer ``ask`` with its box (None: already sent) or with the refusal."""

        async def go():
            try:
                box = await run()
            except CardError as e:
                box = _refusal(str(e))
                error = True
            except Exception as e:  # noqa: BLE001 - reported to the client, logged here
                _log.failure("control command failed")
                box = _refusal(explain(e))
                error = True
            else:
                error = False
            if box is not None:
                self._send_box(ask, box, error)

        ensureDeferred(go())

    def _send_box(self, ask, box: dict, error: bool) -> None:
        """Answer request ``ask`` (none: nobody waits) with ``box``, as its answer or as its error."""
        if ask is None or self.transport is None or not self.transport.connected:
            return
        box[wc.ERROR if error else wc.ANSWER] = ask
        self.transport.write(ampbox.encode_box(box))

    def _sign_digest(self, ask, slot, digest) -> None:
        """
        SignDigest without AMP's dispatch (the same answer and refusals as
        the responder below). When no other operation holds the card it is
        answered in this reactor turn, synchronously (the PIN check and the
        signature wait for nothing): no coroutine, Deferred or lock waiter.
        """
        if slot is not None and digest is not None and not self.session.busy:
            try:
                name = _text(slot)
                self._authorize_now(name)  # the PIN policy, as on every path (vsc.card.pin)
                box, error = {b"signature": self.session.sign_digest_now(name, digest)}, False
            except CardError as e:
                box, error = _refusal(str(e)), True
            except Exception as e:  # noqa: BLE001 - reported to the client, logged here
                _log.failure("control command failed")
                box, error = _refusal(explain(e)), True
            self._send_box(ask, box, error)
            return

        async def run():
            if slot is None or digest is None:
                raise CardError("SignDigest needs a slot and a digest")
            await self._authorize(_text(slot))  # the PIN policy, as on every path (vsc.card.pin)
            return {b"signature": await self.session.sign_digest(_text(slot), digest)}

        self._answer(ask, run)

    def _data_put(self, ask, name, value: LockedBuffer | None, length: int) -> None:
        async def run():
            if name is None or value is None:
                raise CardError("DataPut needs a name and a value")
            view = value.view[:length]
            try:
                await self.session.data_put(_text(name), view)
            finally:
                view.release()
            return {}

        async def run_and_free():
            try:
                return await run()
            finally:
                if value is not None:
                    value.free()

        self._answer(ask, run_and_free)

    def _data_get(self, ask, name) -> None:
        def into(plain: memoryview) -> LockedBuffer:
            box = {wc.ANSWER: ask or b"", b"value": plain}
            out = LockedBuffer(ampbox.box_size(box))
            ampbox.encode_box_into(box, out.view)
            return out

        async def run():
            if name is None:
                raise CardError("DataGet needs a name")
            out = await self.session.data_get(_text(name), into=into)
            if ask is None or self.transport is None:  # nobody waits, or the client has gone meanwhile
                out.free()
            else:
                write_locked(self.transport, out)
            return None

        self._answer(ask, run)

    @Status.responder
    def status(self):
        status = dict(self.session.status())
        try:
            status.update(self.pin.status())
        except CardError:
            pass  # not in use: no PIN state to show
        return wc.status_fields(status)

    @PublicKey.responder
    def public_key(self, slot):
        return {"pem": self.session.public_key(slot)}

    @SignDigest.responder
    def sign_digest(self, slot, digest):
        async def run():
            await self._authorize(slot)
            return {"signature": await self.session.sign_digest(slot, digest)}

        return _guard(run)()

    @Decrypt.responder
    def decrypt(self, slot, ciphertext, padding):
        async def run():
            await self._authorize(slot)
            return {"plaintext": await self.session.decrypt(slot, ciphertext, padding)}

        return _guard(run)()

    @VerifyPin.responder
    def verify_pin(self, pin, keep):
        async def run():
            self._fresh = False
            await self.pin.verify(pin, keep)
            self._fresh = not keep
            return {}

        return _guard(run)()

    @ForgetPin.responder
    def forget_pin(self):
        self.pin.forget()
        return {}

    @ChangePin.responder
    def change_pin(self, which, old, new):
        async def run():
            if which == "pin":
                await self.pin.change(old, new)
            elif which == "puk":
                await self.pin.change_puk(old, new)
            else:
                raise CardError("which is pin or puk")
            return {}

        return _guard(run)()

    @UnblockPin.responder
    def unblock_pin(self, puk, new):
        async def run():
            await self.pin.unblock(puk, new)
            return {}

        return _guard(run)()

    @Counter.responder
    def counter(self, name, delta):
        async def run():
            return {"value": await self.session.counter(name, delta)}

        return _guard(run)()

    @LicenseFund.responder
    def license_fund(self, keyfile, vendor_key):
        async def run():
            name, value = await self.session.fund_counter(keyfile, vendor_key)
            return {"name": name, "value": value}

        return _guard(run)()

    @CertPut.responder
    def cert_put(self, slot, der):
        async def run():
            from vsc.card.vpcd import put_certificate

            await put_certificate(self.session, slot, der)
            return {}

        return _guard(run)()

    @CertGet.responder
    def cert_get(self, slot):
        from vsc.card.vpcd import get_certificate

        return {"der": get_certificate(self.session, slot)}

    @ChangePassword.responder
    def change_password(self, old, new):
        async def run():
            return {"version": await self.session.change_password(old, new)}

        return _guard(run)()

    @Remove.responder
    def remove(self):
        async def run():
            await self.session.remove("vsc card remove")
            if self.on_remove is not None:
                self.session.reactor.callLater(0, self.on_remove)
            return {}

        return _guard(run)()


def _text(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise CardError("a name is not UTF-8 text") from None


def write_locked(transport, out: LockedBuffer) -> None:
    """Send ``out`` (a whole answer box) and free it: from the locked buffer itself on a LockedServer."""
    if isinstance(transport, LockedServer):
        transport.write_locked(out)
        return
    try:  # a test's transport: it keeps bytes anyway
        transport.write(bytes(out.view))
    finally:
        out.free()


class LockedServer(unix.Server):
    """
    A control connection that reads with ``recv_into`` into its protocol's
    locked receive buffer (never a ``bytes`` of what arrived), and writes
    every answer, in order, from one queue whose entries may be locked
    buffers (freed, so zeroed, once sent).
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._queue: collections.deque = collections.deque()  # [view, LockedBuffer | None]

    def doRead(self):
        window = self.protocol.receive_window()
        try:
            if not len(window):
                return main.CONNECTION_LOST
            n = self.socket.recv_into(window)
        except InterruptedError:
            return None
        except OSError as e:
            return None if e.errno == errno.EWOULDBLOCK else main.CONNECTION_LOST
        finally:
            window.release()
        if not n:
            return main.CONNECTION_DONE
        self.protocol.received(n)
        return None

    def write(self, data) -> None:
        if not data or not self.connected or self._writeDisconnected:
            return
        self._send_or_queue(memoryview(bytes(data)), None)

    def writeSequence(self, iovec) -> None:
        for data in iovec:
            self.write(data)

    def write_locked(self, out: LockedBuffer) -> None:
        if not self.connected or self._writeDisconnected:
            out.free()
            return
        self._send_or_queue(out.view[:out.size], out)

    def _send_or_queue(self, view: memoryview, owner: LockedBuffer | None) -> None:
        """Send at once when nothing waits before it (an answer goes out in this reactor turn), else queue it."""
        if not self._queue and not self.disconnecting:
            try:
                sent = self.socket.send(view)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                sent = 0  # doWrite meets the error again and loses the connection
            if sent == len(view):
                view.release()
                if owner is not None:
                    owner.free()
                return
            rest = view[sent:]
            view.release()
            view = rest
        self._queue.append([view, owner])
        self.startWriting()

    def doWrite(self):
        while self._queue:
            entry = self._queue[0]
            try:
                sent = self.socket.send(entry[0])
            except InterruptedError:
                return None
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.ENOBUFS):
                    return None
                return main.CONNECTION_LOST
            if sent < len(entry[0]):
                rest = entry[0][sent:]
                entry[0].release()
                entry[0] = rest
                return None
            self._queue.popleft()
            entry[0].release()
            if entry[1] is not None:
                entry[1].free()
        return super().doWrite()  # nothing of Twisted's own buffer: stops writing, completes a loseConnection

    def connectionLost(self, reason):
        while self._queue:
            view, owner = self._queue.popleft()
            view.release()
            if owner is not None:
                owner.free()
        super().connectionLost(reason)


class LockedPort(unix.Port):
    """The control socket's listening port: its connections are LockedServers."""

    transport = LockedServer


def listen(reactor, path: str, factory, mode: int = 0o600) -> LockedPort:
    """Listen on the control socket ``path`` (mode 0600) with LockedServer connections."""
    port = LockedPort(path, factory, mode=mode, reactor=reactor)
    port.startListening()
    return port


class ControlFactory(Factory):
    noisy = False

    def __init__(self, session: CardSession, on_remove=None):
        self.session = session
        self.on_remove = on_remove

    def buildProtocol(self, addr):
        return ControlProtocol(self.session, self.on_remove)


def prepare_socket_path(path: Path) -> None:
    """The runtime dir is checked (yours, 0700: vsc.card.paths) and a stale socket (no daemon behind it) is removed."""
    from vsc.card import paths

    try:
        if os.fspath(path.parent) == paths.runtime_dir():
            paths.check_runtime_dir(create=True)
        else:
            paths.check_private_dir(os.fspath(path.parent), create=True, what="the socket's directory", shared_ok=True)
    except paths.UnsafeDirectory as e:
        raise CardError(str(e)) from None
    if path.exists():
        if not stat.S_ISSOCK(path.stat().st_mode):
            raise CardError(f"{path} exists and is not a socket")
        import socket

        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            s.connect(str(path))
        except OSError:
            path.unlink()
        else:
            raise CardError(f"a card daemon already serves {path}")
        finally:
            s.close()
