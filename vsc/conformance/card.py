"""
Card mode: the harness plays the server for a card under test — a correct
server, then servers that misbehave one way each (which ways, and the § each
checks: vsc.conformance.items.CARD_ITEMS) — and runs the card's command
against each; the card must succeed against the correct one only.
"""

from __future__ import annotations

import os
import shlex
import tempfile
import time  # clock-ok: the harness measures how long each item took

import attrs
from twisted.internet.endpoints import serverFromString
from twisted.internet.utils import getProcessOutputAndValue

from vsc import crypto
from vsc.conformance.items import CardItem, Result
from vsc.protocol import channel as ch
from vsc.protocol.channel import server_channel
from vsc.protocol.suites import ChannelConfig, derive_keys, transcript_hash
from vsc.server.service import server_factory
from vsc.wire import ErrorCode, WireError, decode_frame, encode_frame
from vsc.wire.messages import Alert, ServerFinished, SessionSecrets, Suite


async def run_card_items(reactor, items: tuple[CardItem, ...], card_command: str, key_bits: int,
                         timeout: float, driver: str | None = None) -> list[Result]:
    """Play a (mis)behaving server for each item and run the card under test against it."""
    key = crypto.RSAPrivateKey.generate(key_bits)
    other = crypto.RSAPrivateKey.generate(key_bits)
    results = []
    for item in items:
        if item.scenario in OPS_SCENARIOS:
            t0 = time.monotonic()  # clock-ok
            if not driver:
                results.append(Result("card", item.name, True, "skipped: needs --card-driver", 0.0, item.section,
                                      item.rules, skipped=True))
                continue
            ok, detail = await run_ops_item(reactor, item.scenario, driver, key, timeout)
            results.append(Result("card", item.name, ok, detail, time.monotonic() - t0,  # clock-ok
                                  item.section, item.rules))
            continue
        use_key = other if item.scenario == "wrong-key" else key
        factory = server_factory(ChannelConfig(), use_key, reactor)
        if not item.must_succeed:
            factory.make_channel = _misbehaving(item.scenario, use_key)
        port = await serverFromString(reactor, "tcp:0:interface=127.0.0.1").listen(factory)
        endpoint = f"tcp:127.0.0.1:{port.getHost().port}"
        cmd = card_command.format(endpoint=endpoint, fingerprint=key.public_key().fingerprint())
        t0 = time.monotonic()  # clock-ok
        out, err, code = await getProcessOutputAndValue("/bin/sh", ["-c", f"timeout {timeout:g} {cmd}"], env=os.environ)
        await port.stopListening()
        # exit 124: `timeout` killed a card that hung; a card must give up by itself (its handshake timer, B3)
        ok = (code == 0) == item.must_succeed and code != 124
        detail = "" if ok else f"card exited {code} ({(err or out).decode(errors='replace').strip()[-160:]})"
        results.append(Result("card", item.name, ok, detail, time.monotonic() - t0,  # clock-ok
                              item.section, item.rules))
    return results


#: The ways the harness's server can misbehave ("wrong-key": a correct server with another key than the pinned one).
MISBEHAVIOURS = ("wrong-key", "unoffered-suite", "bad-finished-mac", "finished-mac-first-byte", "tampered-record",
                 "alert", "silent")


def _misbehaving(scenario: str, key):
    """A channel factory whose server end misbehaves in one way."""
    if scenario not in MISBEHAVIOURS:
        raise ValueError(f"the harness has no server that misbehaves as {scenario!r}")

    def make():
        # the silent server must stay silent: its own handshake timer would otherwise close the channel (an
        # alert the card obeys), and a card with no timer of its own would pass as refusing
        c = server_channel(ChannelConfig(handshake_timeout=3600.0) if scenario == "silent" else ChannelConfig(), key)
        orig_receive = c.receive_frame
        orig_send = c.send
        plaintexts: list[bytes | None] = []
        if scenario == "unoffered-suite":  # keep the key transport's plaintext: the session secrets
            orig_decrypted = c.decrypted

            def decrypted(plaintext):
                plaintexts.append(plaintext)
                return orig_decrypted(plaintext)

            c.decrypted = decrypted

        def receive_frame(frame):
            effects = orig_receive(frame)
            out = []
            for e in effects:
                if isinstance(e, ch.Send) and scenario in ("unoffered-suite", "bad-finished-mac",
                                                           "finished-mac-first-byte", "alert", "silent"):
                    try:
                        msg = decode_frame(e.data)
                    except WireError:
                        out.append(e)
                        continue
                    if isinstance(msg, ServerFinished):
                        if scenario == "unoffered-suite":
                            e = ch.Send(encode_frame(_choose_unoffered(c, msg, plaintexts[-1])))
                        elif scenario == "bad-finished-mac":
                            e = ch.Send(encode_frame(attrs.evolve(msg, mac=bytes(32))))
                        elif scenario == "finished-mac-first-byte":
                            e = ch.Send(encode_frame(attrs.evolve(msg, mac=bytes([msg.mac[0] ^ 1]) + msg.mac[1:])))
                        elif scenario == "alert":
                            e = ch.Send(encode_frame(Alert(ErrorCode.INTERNAL_ERROR)))
                        elif scenario == "silent":
                            continue
                out.append(e)
            return out

        def send(msg):
            effects = orig_send(msg)
            if scenario == "tampered-record":
                effects = [ch.Send(e.data[:-1] + bytes([e.data[-1] ^ 1])) if isinstance(e, ch.Send) else e for e in effects]
            return effects

        c.receive_frame = receive_frame
        if scenario == "tampered-record":
            # the channel answers echo requests itself: tamper at the byte level after establishment
            orig_receive2 = c.receive_frame

            def receive_tampering(frame):
                effects = orig_receive2(frame)
                if c.established:
                    effects = [ch.Send(e.data[:-1] + bytes([e.data[-1] ^ 1])) if isinstance(e, ch.Send) else e
                               for e in effects]
                return effects

            c.receive_frame = receive_tampering
        c.send = send
        return c

    return make


# ---------------------------------------------------------------- card mode with operations (hostile storage)
#
# The harness plays a complete server (channel, operations, a store of its own in a temporary SQLite
# database) and drives the card under test through its driver (vsc.conformance.vscdriver's actions:
# enrol, insert, step, remove, stop). Between two actions a scenario may act as a hostile server.

OPS_SCENARIOS = ("ops-correct", "rolls-back", "relabels", "weak-kdf", "other-salt", "long-challenge")


class _OpsServer:
    """A real vsc server in this process, on 127.0.0.1, whose store and channel a scenario may tamper with."""

    def __init__(self, reactor, key, directory: str, tamper: str = ""):
        from twisted.python.threadpool import ThreadPool

        from vsc.protocol.auth import load_master_key
        from vsc.server.policy import Policy
        from vsc.server.service import Backend
        from vsc.server.store import Store

        self.reactor, self.key, self.directory = reactor, key, directory
        self.db = os.path.join(directory, "server.sqlite3")
        self.store = Store(f"sqlite:///{self.db}", reactor.seconds)
        self.store.migrate()
        self.pool = ThreadPool(1, 4, name="conformance-store")
        self.pool.start()
        self.policy = Policy.from_settings({})
        self.factory = server_factory(ChannelConfig(), key, reactor, backend=Backend(reactor, self.store, self.pool),
                                      ops_policy=self.policy.ops(), master=load_master_key(None))
        self.answers_seen = 0  # AUTH_RESPONSEs received after a tampered challenge
        self.macs_seen = 0  # non-empty MASTER_KEY answers to a challenge that is not 32 bytes
        if tamper in ("weak-kdf", "other-salt"):
            self.factory.make_channel = self._weak_kdf_channel(self.factory.make_channel, tamper)
        elif tamper == "long-challenge":
            self.factory.make_channel = self._long_challenge_channel(self.factory.make_channel)
        self.port = None

    def _weak_kdf_channel(self, make, tamper: str):
        """
        The KDF attacks (§10.5): every AUTH_CHALLENGE asks for a cheaper derivation with the card's own salt
        (``weak-kdf``, K1: r = 1, eight times cheaper; with its own salt, so that only the floor refuses it), or
        names another salt of the same cost (``other-salt``, K10: the salt a server would send every card).
        """
        from vsc.wire.ops import AuthChallenge, AuthResponse, KdfAlg, KdfParams

        def tampered(kdf: bytes) -> bytes:
            real = KdfParams.decode(kdf)
            if tamper == "weak-kdf":
                return attrs.evolve(real, alg=KdfAlg.SCRYPT, r=1).encode()
            return attrs.evolve(real, salt=bytes(b ^ 0x5A for b in real.salt)).encode()

        def wrapped():
            c = make()
            orig_send, orig_receive = c.send, c.receive_frame

            def send(msg):
                if isinstance(msg, AuthChallenge):
                    msg = attrs.evolve(msg, kdf=tampered(msg.kdf))
                return orig_send(msg)

            def receive_frame(frame):
                effects = orig_receive(frame)
                self.answers_seen += sum(isinstance(e, ch.Received) and isinstance(e.message, AuthResponse)
                                         for e in effects)
                return effects

            c.send, c.receive_frame = send, receive_frame
            return c

        return wrapped

    def _long_challenge_channel(self, make):
        """
        §10.6.2 K9: every AUTH_CHALLENGE's MASTER_KEY challenge is 33 bytes (ri1 and one more): a card that
        MACs it makes a non-canonical MasterInput under the Master key every card shares.
        """
        from vsc.wire.ops import AuthChallenge, AuthMethod, AuthResponse

        def wrapped():
            c = make()
            orig_send, orig_receive = c.send, c.receive_frame

            def send(msg):
                if isinstance(msg, AuthChallenge):
                    msg = attrs.evolve(msg, challenges=tuple(
                        attrs.evolve(item, data=bytes(item.data) + b"\x01") if item.method == AuthMethod.MASTER_KEY
                        else item for item in msg.challenges))
                return orig_send(msg)

            def receive_frame(frame):
                effects = orig_receive(frame)
                for e in effects:
                    if isinstance(e, ch.Received) and isinstance(e.message, AuthResponse):
                        self.macs_seen += sum(item.method == AuthMethod.MASTER_KEY and len(item.data) > 0
                                              for item in e.message.responses)
                return effects

            c.send, c.receive_frame = send, receive_frame
            return c

        return wrapped

    async def listen(self) -> str:
        self.port = await serverFromString(self.reactor, "tcp:0:interface=127.0.0.1").listen(self.factory)
        return f"tcp:127.0.0.1:{self.port.getHost().port}"

    def issue(self, serial: str) -> str:
        from vsc.server.policy import code_hash, new_enrolment_code

        code = new_enrolment_code()
        self.store.issue(serial, code_hash(code), self.policy.initial_auth_info(), 3600)
        return code

    def row(self, serial: str) -> tuple[int, bytes]:
        card = self.store.get(serial)
        if card is None:
            raise _Wrong("the driver reported success but the server has no such card (nothing was enrolled)")
        return card.version, bytes(card.protected)

    def write_row(self, serial: str, version: int, protected: bytes) -> None:
        """What a hostile operator does to the database: another blob, another version number."""
        import sqlite3

        conn = sqlite3.connect(self.db)
        try:
            with conn:
                conn.execute("UPDATE cards SET protected = ?, version = ? WHERE serial = ?", (protected, version, serial))
        finally:
            conn.close()

    async def close(self) -> None:
        if self.port is not None:
            await self.port.stopListening()
        self.pool.stop()


async def _driver(driver: str, action: str, timeout: float, **fields) -> tuple[int, str]:
    cmd = driver.format(action=action, **{k: shlex.quote(str(v)) for k, v in fields.items()})
    out, err, code = await getProcessOutputAndValue("/bin/sh", ["-c", f"timeout {timeout:g} {cmd}"], env=os.environ)
    return code, (err or out).decode(errors="replace").strip()[-200:]


async def run_ops_item(reactor, scenario: str, driver: str, key, timeout: float) -> tuple[bool, str]:
    """
    One card-mode operations scenario against the card under test; (ok, detail).

    * ``ops-correct``: enrol, insert, step, remove, insert, remove: every action must succeed;
    * ``rolls-back``: enrol, insert, step, remove; the server puts back the copy the step stored, one
      upload older than the last (a restored backup: that version and blob); the insert must be refused;
    * ``relabels``: the same, but the server serves the enrolment blob under a version number higher
      than any it stored; the insert must be refused;
    * ``weak-kdf``: enrol (scrypt), then the server asks at insert for a cheaper derivation (r = 1) with the
      card's own salt; the insert must fail and the card must send no AUTH_RESPONSE (§10.5: before
      deriving or sending).
    * ``other-salt``: the same, but the server names another salt of the same cost (every byte of the
      card's own flipped): the card must refuse it the same way (§10.5, K10: the salt is pinned).
    * ``long-challenge``: enrol, then the server's MASTER_KEY challenge at insert is 33 bytes; the insert
      must fail and no MASTER_KEY answer may carry anything (§10.6.2: the card MACs only 32-byte challenges).
    """
    if scenario not in OPS_SCENARIOS:
        raise ValueError(f"the harness has no operations scenario {scenario!r}")
    with tempfile.TemporaryDirectory(prefix="vsc-conf-") as tmp:
        server = _OpsServer(reactor, key, tmp, tamper=scenario)
        endpoint = await server.listen()
        serial = "conf-" + crypto.system_random(4).hex()
        fields = dict(dir=os.path.join(tmp, "card"), endpoint=endpoint, fingerprint=key.public_key().fingerprint(),
                      serial=serial, code=server.issue(serial))

        async def act(action: str, must: bool) -> None:
            before = server.store.get(serial)
            code, out = await _driver(driver, action, timeout, **fields)
            if (code == 0) != must:
                raise _Wrong(f"{action}: the card {'failed' if must else 'succeeded'} (exit {code}) {out}".strip())
            if not must:
                return
            # what the server saw must agree with what the driver reports
            after = server.store.get(serial)
            want = {"enrol": "idle", "insert": "in-use", "step": "in-use", "remove": "idle"}[action]
            state = after.state.value if after is not None else "none"
            if state != want:
                raise _Wrong(f"{action}: the driver reported success, but the server has the card {state}")
            if action in ("step", "remove") and (before is None or after.version <= before.version):
                raise _Wrong(f"{action}: the driver reported success, but nothing was uploaded")

        try:
            await act("enrol", True)
            enrolled = server.row(serial)
            if scenario in ("weak-kdf", "other-salt"):
                await act("insert", False)
                if server.answers_seen:
                    return False, ("the card answered a challenge with cheaper KDF parameters (below its floor)"
                                   if scenario == "weak-kdf" else
                                   "the card answered a challenge naming another salt than the one it enrolled with")
                return True, ""
            if scenario == "long-challenge":
                await act("insert", False)
                if server.macs_seen:
                    return False, "the card MACed a 33-byte Master-key challenge (a non-canonical MasterInput)"
                return True, ""
            await act("insert", True)
            await act("step", True)
            stepped = server.row(serial)  # the copy one upload before the last
            await act("remove", True)
            if scenario == "ops-correct":
                await act("insert", True)
                await act("step", True)
                await act("remove", True)
                return True, ""
            version, _ = server.row(serial)
            if scenario == "rolls-back":
                server.write_row(serial, *stepped)  # one upload back: an off-by-one freshness check must fail
            else:
                server.write_row(serial, version + 10, enrolled[1])
            await act("insert", False)
            return True, ""
        except _Wrong as e:
            return False, str(e)
        finally:
            await _driver(driver, "stop", timeout, **fields)
            await server.close()


class _Wrong(Exception):
    pass
def _choose_unoffered(c, finished: ServerFinished, plaintext: bytes) -> ServerFinished:
    """
    A server that really chooses des-cbc-md5, which the card did not offer:
    its keys, its SERVER_FINISHED MAC and its records are all consistent
    for that suite, so only the card's own check of the offer (C3) stops it.
    """
    core = c._core
    kt = decode_frame(core.key_transport_frame)
    dh = core.ephemeral.exchange(kt.fs_public) if kt.fs_public and core.ephemeral is not None else b""
    th = transcript_hash(core.hello_frame, core.key_transport_frame)
    core.keys = derive_keys(Suite.DES_CBC_MD5, SessionSecrets.decode(plaintext), dh, th, core.rand)
    return attrs.evolve(finished, suite=Suite.DES_CBC_MD5, mac=core.keys.server_mac())
