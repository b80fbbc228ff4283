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

import attrs
from twisted.internet.task import deferLater

from vsc import crypto
from vsc.card import ops
from vsc.card.connect import connect
from vsc.conformance.raw import Failed, RawCard, expect
from vsc.net.channel import ChannelClosedError
from vsc.protocol.suites import ChannelConfig, ForwardSecrecy
from vsc.wire import ErrorCode, decode_frame
from vsc.wire.messages import Alert, Suite
from vsc.wire.ops import Status

PROVISION_TIMEOUT = 60.0
#: the harness's cards use a cheap scrypt cost (the server does not interpret it, §10.7): items stay fast
KDF_LOG2_N = 10
HOOK_TIMEOUT = 60.0
#: how often a connection refused with SERVER_BUSY (the server's per-source handshake rate, §9.3) is retried
BUSY_RETRIES = 60


@attrs.frozen
class ServerSettings:
    """
    What the checks must know of the server under test's settings (docs/admin.md;
    the command's options): the values the timing, frame-limit and lockout
    items check against.
    """

    auth_deadline: float = 30.0
    handshake_timeout: float = 30.0
    unauthenticated_idle: float = 60.0
    idle_timeout: float = 600.0
    unauthenticated_body: int = 65536
    unauthenticated_per_source: int = 64
    lockout_threshold: int = 5
    #: the server's suite list, in its order of preference
    suites: tuple = (Suite.AES256_GCM, Suite.CHACHA20_POLY1305, Suite.AES256_CBC_HMAC_SHA256)


class ServerHarness:
    """One run against one server: its endpoint and key, the provisioning hook, the settings the checks depend on."""

    def __init__(self, reactor, endpoint: str, fingerprint: str, provision: str | None, allow_insecure: bool,
                 auth_deadline: float, master: bytes, rand: crypto.RandomBytes = crypto.system_random,
                 settings: ServerSettings | None = None, fill_storage: str | None = None,
                 free_storage: str | None = None):
        self.reactor = reactor
        self.endpoint = endpoint
        self.fp = fingerprint
        self.provision_cmd = provision
        self.allow_insecure = allow_insecure
        self.settings = attrs.evolve(settings or ServerSettings(), auth_deadline=auth_deadline)
        self.auth_deadline = auth_deadline
        self.master = master
        self.rand = rand
        self.fill_storage_cmd = fill_storage
        self.free_storage_cmd = free_storage

    def hooks(self, needs: tuple[str, ...]) -> str:
        """The first hook an item needs that this run was not given ("" if none is missing)."""
        given = {"provision": self.provision_cmd, "storage": self.fill_storage_cmd and self.free_storage_cmd,
                 "insecure": self.allow_insecure}
        return next((n for n in needs if not given.get(n)), "")

    async def sleep(self, seconds: float) -> None:
        await deferLater(self.reactor, seconds, lambda: None)

    def run_hook(self, cmd: str, what: str) -> None:
        r = subprocess.run(shlex.split(cmd), capture_output=True, text=True, timeout=HOOK_TIMEOUT)
        if r.returncode != 0:
            raise Failed(f"the {what} hook failed ({r.returncode}): {r.stderr.strip()[-200:]}")

    def cfg(self, suites=None, fs=ForwardSecrecy.PREFER) -> ChannelConfig:
        suites = suites or (Suite.AES256_GCM,)
        return ChannelConfig(suites=tuple(suites), allow_insecure=Suite.DES_CBC_MD5 in suites, forward_secrecy=fs)

    async def raw(self, **kw) -> RawCard:
        """
        A connected raw card (the server's HELLO not yet read); ``kw``: ``suites``,
        ``fs``. A connection the server refuses at once with ALERT(SERVER_BUSY)
        (its per-source handshake rate, §9.3) is retried after a pause.
        """
        for attempt in range(BUSY_RETRIES):
            card = RawCard(self.reactor, self.endpoint, self.fp, self.cfg(**kw))
            await card.open()
            first = await card.next_frame()
            if isinstance(first, bytes) and first[3:4] == b"\x05":
                try:
                    busy = decode_frame(first) == Alert(ErrorCode.SERVER_BUSY)
                except Exception:  # noqa: BLE001 - not a readable alert: the check will see it
                    busy = False
                if busy:
                    card.close()
                    await self.sleep(min(0.05 * (attempt + 1), 1.0))
                    continue
            card.push_back(first)
            return card
        raise Failed(f"the server kept refusing connections with SERVER_BUSY ({BUSY_RETRIES} tries)")

    async def established(self) -> RawCard:
        card = await self.raw()
        await card.handshake()
        expect(card.channel.established, f"handshake failed: {card.closed}")
        return card

    async def connect(self):
        """An ordinary vsc channel to the server (vsc.card.connect); SERVER_BUSY is retried like ``raw``."""
        for attempt in range(BUSY_RETRIES):
            try:
                return await connect(self.reactor, self.endpoint, self.fp, self.cfg())
            except ChannelClosedError as e:
                if e.code is not ErrorCode.SERVER_BUSY:
                    raise
                await self.sleep(min(0.05 * (attempt + 1), 1.0))
        raise Failed(f"the server kept refusing connections with SERVER_BUSY ({BUSY_RETRIES} tries)")

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
        kdf = ops.new_kdf(self.rand, log2_n=KDF_LOG2_N)
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
