"""
Card mode: the harness plays the server for a card under test — a correct
server, then servers that misbehave one way each (which ways, and the § each
checks: vsc.conformance.items.CARD_ITEMS) — and runs the card's command
against each; the card must succeed against the correct one only.
"""

from __future__ import annotations

import os
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
                         timeout: float) -> list[Result]:
    """Play a (mis)behaving server for each item and run the card under test against it."""
    key = crypto.RSAPrivateKey.generate(key_bits)
    other = crypto.RSAPrivateKey.generate(key_bits)
    results = []
    for item in items:
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
        c = server_channel(ChannelConfig(), key)
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
