"""
Server mode's harness: what every check against a server under test needs —
where the server is and its pinned key, raw and established card channels,
ordinary vsc connections, fresh cards through the provisioning hook, enrolled
cards, inserts, and the status an operation ended with. The checks
themselves are in vsc.conformance.checks; the list of them in
vsc.conformance.items.
"""

from __future__ import annotations

import json
import shlex
import subprocess
from typing import Awaitable

from vsc import crypto
from vsc.card import ops
from vsc.card.connect import connect
from vsc.conformance.raw import Failed, RawCard, expect
from vsc.protocol.suites import ChannelConfig, ForwardSecrecy
from vsc.wire.messages import Suite
from vsc.wire.ops import Status

PROVISION_TIMEOUT = 60.0


class ServerHarness:
    """One run against one server: its endpoint and key, the provisioning hook, the settings the checks depend on."""

    def __init__(self, reactor, endpoint: str, fingerprint: str, provision: str | None, allow_insecure: bool,
                 auth_deadline: float, master: bytes, rand: crypto.RandomBytes = crypto.system_random):
        self.reactor = reactor
        self.endpoint = endpoint
        self.fp = fingerprint
        self.provision_cmd = provision
        self.allow_insecure = allow_insecure
        self.auth_deadline = auth_deadline
        self.master = master
        self.rand = rand

    def cfg(self, suites=None, fs=ForwardSecrecy.PREFER) -> ChannelConfig:
        suites = suites or (Suite.AES256_GCM,)
        return ChannelConfig(suites=tuple(suites), allow_insecure=Suite.DES_CBC_MD5 in suites, forward_secrecy=fs)

    async def raw(self, **kw) -> RawCard:
        """A connected raw card (the server's HELLO not yet read); ``kw``: ``suites``, ``fs``."""
        card = RawCard(self.reactor, self.endpoint, self.fp, self.cfg(**kw))
        await card.open()
        return card

    async def established(self) -> RawCard:
        card = await self.raw()
        await card.handshake()
        expect(card.channel.established, f"handshake failed: {card.closed}")
        return card

    async def connect(self):
        """An ordinary vsc channel to the server (vsc.card.connect)."""
        return await connect(self.reactor, self.endpoint, self.fp, self.cfg())

    def new_card(self) -> tuple[str, str]:
        """A fresh serial issued through the provisioning hook: (serial, one-time enrolment code)."""
        serial = "conf-" + self.rand(5).hex()
        cmd = self.provision_cmd.format(serial=serial)
        r = subprocess.run(shlex.split(cmd), capture_output=True, text=True, timeout=PROVISION_TIMEOUT)
        if r.returncode != 0:
            raise Failed(f"provisioning hook failed: {r.stderr.strip()[-200:]}")
        out = r.stdout.strip()
        try:
            code = json.loads(out)["code"]
        except (ValueError, KeyError, TypeError):
            code = out.split()[-1] if out else ""
        expect(bool(code), "provisioning hook printed no enrolment code")
        return serial, code

    async def enrolled(self, password: str = "conformance") -> tuple[str, ops.PasswordKeys]:
        serial, code = self.new_card()
        kdf = ops.new_kdf(self.rand)
        keys = ops.derive_keys(password, kdf)
        proto = await self.connect()
        try:
            await ops.enrol(proto, serial, code, keys, kdf, b"opaque protected information " + self.rand(16))
        finally:
            proto.closeChannel()
        return serial, keys

    async def insert(self, serial, muk, secret, password="conformance", master=None):
        proto = await self.connect()
        try:
            result, _ = await ops.insert(proto, serial, password, muk, secret, master or self.master)
            return result
        finally:
            proto.closeChannel()

    async def status(self, coro: Awaitable) -> Status:
        """The status an operation ended with: OK, or the status it was refused with."""
        try:
            await coro
            return Status.OK
        except ops.OperationRefused as e:
            return e.status
