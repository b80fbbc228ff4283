"""
The card daemon's side of its local control socket: AMP over a UNIX socket
(mode 0600, in the user's runtime dir). The commands are the rows of
vsc.wire.control, made into ``amp.Command`` classes here; the daemon
(``twistd vsc-card``) answers them through a CardSession. The one client is
vsc.card.client (``vsc card ...``, the licensing API, ``vsc run``).
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from twisted.internet.defer import ensureDeferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from vsc.card.pin import local_pin
from vsc.card.session import CardError, CardSession, explain
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


class ControlProtocol(amp.AMP):
    def __init__(self, session: CardSession, on_remove=None):
        super().__init__()
        self.session = session
        self.on_remove = on_remove
        self.pin = local_pin(session)
        self._fresh = False  # VerifyPin(keep=False) on this connection: one private-key operation

    async def _authorize(self, slot: str) -> None:
        """The PIN policy before a private-key operation (vsc.card.pin); a one-operation verification is used up."""
        fresh, self._fresh = self._fresh, False
        await self.pin.authorize(slot, fresh, "local API")

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

    @DataPut.responder
    def data_put(self, name, value):
        async def run():
            await self.session.data_put(name, value)
            return {}

        return _guard(run)()

    @DataGet.responder
    def data_get(self, name):
        async def run():
            return {"value": await self.session.data_get(name)}

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
