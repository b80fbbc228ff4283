"""
The card's local control socket: AMP over a UNIX socket (mode 0600, in the
user's runtime dir). ``vsc card ...`` commands are its clients; the daemon
(``twistd vsc-card``) answers through a CardSession.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

from twisted.internet.defer import ensureDeferred
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp

from vsc.card.session import CardError, CardSession, explain


class Status(amp.Command):
    arguments = []
    response = [(b"json", amp.Unicode())]
    errors = {CardError: b"CARD_ERROR"}


class PublicKey(amp.Command):
    arguments = [(b"slot", amp.Unicode())]
    response = [(b"pem", amp.String())]
    errors = {CardError: b"CARD_ERROR"}


class SignDigest(amp.Command):
    arguments = [(b"slot", amp.Unicode()), (b"digest", amp.String())]
    response = [(b"signature", amp.String())]
    errors = {CardError: b"CARD_ERROR"}


class Decrypt(amp.Command):
    arguments = [(b"slot", amp.Unicode()), (b"ciphertext", amp.String()), (b"padding", amp.Unicode())]
    response = [(b"plaintext", amp.String())]
    errors = {CardError: b"CARD_ERROR"}


class Counter(amp.Command):
    arguments = [(b"name", amp.Unicode()), (b"delta", amp.Integer())]
    response = [(b"value", amp.Integer())]
    errors = {CardError: b"CARD_ERROR"}


class DataPut(amp.Command):
    arguments = [(b"name", amp.Unicode()), (b"value", amp.String())]
    response = []
    errors = {CardError: b"CARD_ERROR"}


class DataGet(amp.Command):
    arguments = [(b"name", amp.Unicode())]
    response = [(b"value", amp.String())]
    errors = {CardError: b"CARD_ERROR"}


class LicenseFund(amp.Command):
    """
    Fund a rental grant's counter once: the card verifies the keyfile's vendor
    signature and that it names this card's own key, and takes the counter's
    name and units from the signed keyfile — never from the caller.
    """

    arguments = [(b"keyfile", amp.Unicode()), (b"vendor_key", amp.String())]
    response = [(b"name", amp.Unicode()), (b"value", amp.Integer())]
    errors = {CardError: b"CARD_ERROR"}


class CertPut(amp.Command):
    """A slot's X.509 certificate (DER), stored and synced (vsc card cert --import; vsc.card.vpcd)."""

    arguments = [(b"slot", amp.Unicode()), (b"der", amp.String())]
    response = []
    errors = {CardError: b"CARD_ERROR"}


class CertGet(amp.Command):
    arguments = [(b"slot", amp.Unicode())]
    response = [(b"der", amp.String())]
    errors = {CardError: b"CARD_ERROR"}


class ChangePassword(amp.Command):
    """Change the owner's password while the card is in use (the daemon never stores either)."""

    arguments = [(b"old", amp.Unicode()), (b"new", amp.Unicode())]
    response = [(b"version", amp.Integer())]
    errors = {CardError: b"CARD_ERROR"}


class Remove(amp.Command):
    arguments = []
    response = []
    errors = {CardError: b"CARD_ERROR"}


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

    @Status.responder
    def status(self):
        return {"json": json.dumps(self.session.status())}

    @PublicKey.responder
    def public_key(self, slot):
        return {"pem": self.session.public_key(slot)}

    @SignDigest.responder
    def sign_digest(self, slot, digest):
        async def run():
            return {"signature": await self.session.sign_digest(slot, digest)}

        return _guard(run)()

    @Decrypt.responder
    def decrypt(self, slot, ciphertext, padding):
        async def run():
            return {"plaintext": await self.session.decrypt(slot, ciphertext, padding)}

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
    """The runtime dir is 0700 and a stale socket (no daemon behind it) is removed."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
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
