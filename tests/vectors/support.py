"""
Deterministic building blocks shared by the foundation tests and the vector
generator: a seeded ``rand(n)``, the fixed RSA-2048 test key, and small
drivers for pairs of sans-IO channels.

Nothing here is secret: the key in this directory is a published test key.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Iterable

from vsc import crypto
from vsc.protocol.channel import (
    CancelTimer,
    Channel,
    Closed,
    Established,
    Received,
    Send,
    SetTimer,
    card_channel,
    server_channel,
)
from vsc.protocol.suites import ChannelConfig

VECTORS_DIR = Path(__file__).resolve().parent
KEY_FILE = "test-server-key-rsa2048.pem"
KEY_PATH = VECTORS_DIR / KEY_FILE

EFFECT_TYPES = (Send, Established, Received, SetTimer, CancelTimer, Closed)

DRBG_DESCRIPTION = (
    "SHA-256 counter mode: the stream is SHA-256(seed || 0 as 8-byte big-endian) || "
    "SHA-256(seed || 1) || ...; rand(n) returns the next n bytes of that stream"
)


class DRBG:
    """
    A deterministic ``rand(n)`` for tests (see DRBG_DESCRIPTION). ``draws``
    records every call as (n, bytes) so a test can check the draw order.
    """

    def __init__(self, seed: bytes):
        self.seed = bytes(seed)
        self._counter = 0
        self._buffer = b""
        self.draws: list[tuple[int, bytes]] = []

    def __call__(self, n: int) -> bytes:
        while len(self._buffer) < n:
            self._buffer += hashlib.sha256(self.seed + self._counter.to_bytes(8, "big")).digest()
            self._counter += 1
        out, self._buffer = self._buffer[:n], self._buffer[n:]
        self.draws.append((n, out))
        return out


@functools.lru_cache(maxsize=None)
def fixed_key() -> crypto.RSAPrivateKey:
    """The fixed RSA-2048 server key committed next to this file."""
    return crypto.RSAPrivateKey.from_pem(KEY_PATH.read_bytes())


def fixed_fingerprint() -> str:
    return fixed_key().public_key().fingerprint()


# ---------------------------------------------------------------- effect helpers


def sends(effects: Iterable) -> list[bytes]:
    """The bytes of every Send effect, in order."""
    return [e.data for e in effects if isinstance(e, Send)]


def closes(effects: Iterable) -> list[Closed]:
    return [e for e in effects if isinstance(e, Closed)]


def only(effects: Iterable, kind: type) -> list:
    return [e for e in effects if isinstance(e, kind)]


# ---------------------------------------------------------------- channel pairs


class Pair:
    """
    A server and a card sans-IO channel with seeded randomness, plus a pump
    that carries Send effects across until both are quiet. Each side's
    effects accumulate in ``server_log`` / ``card_log``.
    """

    def __init__(
        self,
        server_config: ChannelConfig | None = None,
        card_config: ChannelConfig | None = None,
        *,
        seed: bytes = b"pair",
        pin: str | None = None,
        key: crypto.RSAPrivateKey | None = None,
    ):
        self.server_rand = DRBG(seed + b"/server")
        self.card_rand = DRBG(seed + b"/card")
        self.server: Channel = server_channel(server_config or ChannelConfig(), key or fixed_key(), self.server_rand)
        self.card: Channel = card_channel(card_config or ChannelConfig(), pin or fixed_fingerprint(), self.card_rand)
        self.server_log: list = []
        self.card_log: list = []

    def start(self) -> bytes:
        """Start both ends; return the server's Hello frame (not yet delivered)."""
        self.card_log += self.card.start()
        effects = self.server.start()
        self.server_log += effects
        (hello,) = sends(effects)
        return hello

    def to_card(self, data: bytes) -> list:
        effects = self.card.receive_bytes(data)
        self.card_log += effects
        return effects

    def to_server(self, data: bytes) -> list:
        effects = self.server.receive_bytes(data)
        self.server_log += effects
        return effects

    def pump(self, from_server: Iterable[bytes] = (), from_card: Iterable[bytes] = ()) -> None:
        """Deliver pending bytes both ways until neither end sends anything."""
        s2c, c2s = list(from_server), list(from_card)
        while s2c or c2s:
            if s2c:
                c2s += sends(self.to_card(s2c.pop(0)))
            if c2s:
                s2c += sends(self.to_server(c2s.pop(0)))

    def card_send(self, msg) -> None:
        """The card application sends ``msg``; deliver everything that follows."""
        effects = self.card.send(msg)
        self.card_log += effects
        self.pump(from_card=sends(effects))

    def server_send(self, msg) -> None:
        effects = self.server.send(msg)
        self.server_log += effects
        self.pump(from_server=sends(effects))

    def handshake(self) -> dict[str, bytes]:
        """Run the four-frame handshake step by step; return each frame."""
        hello = self.start()
        (kt,) = sends(self.to_card(hello))
        (sf,) = sends(self.to_server(kt))
        (cf,) = sends(self.to_card(sf))
        assert sends(self.to_server(cf)) == []
        assert self.server.established and self.card.established, (self.server_log, self.card_log)
        return {"hello": hello, "key_transport": kt, "server_finished": sf, "client_finished": cf}

    def run(self) -> None:
        """Start both ends and pump to completion (whatever the outcome)."""
        self.pump(from_server=[self.start()])


def established_pair(server_config=None, card_config=None, *, seed: bytes = b"pair") -> Pair:
    p = Pair(server_config, card_config, seed=seed)
    p.handshake()
    return p
