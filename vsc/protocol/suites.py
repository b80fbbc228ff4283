"""
Suite selection and the key schedule of the protected channel
(docs/protocol.md, "Key schedule"; the patent's [0078]).
"""

from __future__ import annotations

import enum
from typing import Sequence

import attrs

from vsc import crypto
from vsc.wire import MAX_FRAME_BODY, MAX_HANDSHAKE_BODY
from vsc.wire.messages import Suite, SessionSecrets, finished_input, key_info

DEFAULT_SUITES: tuple[Suite, ...] = (
    Suite.AES256_GCM,
    Suite.CHACHA20_POLY1305,
    Suite.AES256_CBC_HMAC_SHA256,
)
INSECURE_SUITES = frozenset({Suite.DES_CBC_MD5})


class ForwardSecrecy(enum.Enum):
    OFF = "off"  # never mix in X25519 (exactly Figure 7)
    PREFER = "prefer"  # use it when the peer offers it
    REQUIRE = "require"  # refuse a handshake without it


def parse_suites(text: str) -> tuple[Suite, ...]:
    """``"aes256-gcm,chacha20-poly1305"`` → suites, in that preference order."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ValueError("no suites given")
    suites = tuple(Suite.from_label(n) for n in names)
    if len(set(suites)) != len(suites):
        raise ValueError("a suite is listed twice")
    return suites


@attrs.frozen
class ChannelConfig:
    """
    One end's channel policy. ``suites`` is in preference order (the server's
    order wins). The insecure ``des-cbc-md5`` suite may only be listed when
    ``allow_insecure`` is set, and is used only if both ends list it.
    """

    suites: tuple[Suite, ...] = DEFAULT_SUITES
    allow_insecure: bool = False
    forward_secrecy: ForwardSecrecy = ForwardSecrecy.PREFER
    handshake_timeout: float = 30.0
    #: once established, an idle channel (no record) closes after this many seconds (0: never)
    idle_timeout: float = 0.0
    #: the largest frame body once established (the server lowers it until an operation authenticates)
    max_body: int = MAX_FRAME_BODY

    def __attrs_post_init__(self) -> None:
        if not self.suites:
            raise ValueError("at least one suite must be enabled")
        if len(self.suites) > 8:
            raise ValueError("at most 8 suites may be offered")
        if INSECURE_SUITES & set(self.suites) and not self.allow_insecure:
            raise ValueError("des-cbc-md5 is insecure: enable it explicitly (allow_insecure) to list it")
        if not (0 < self.handshake_timeout <= 3600):  # also refuses nan and inf
            raise ValueError("handshake timeout must be more than 0 and at most 3600 seconds")
        if not (0 <= self.idle_timeout <= 86400):
            raise ValueError("idle timeout must be between 0 (none) and 86400 seconds")
        if not (MAX_HANDSHAKE_BODY <= self.max_body <= MAX_FRAME_BODY):
            raise ValueError(f"the frame limit must be between {MAX_HANDSHAKE_BODY} and {MAX_FRAME_BODY} bytes")


def choose_suite(server_preference: Sequence[Suite], offered: Sequence[Suite]) -> Suite | None:
    """The first suite of the server's preference that the card offered."""
    offered_set = set(offered)
    for suite in server_preference:
        if suite in offered_set:
            return suite
    return None


def transcript_hash(hello_frame: bytes, key_transport_frame: bytes) -> bytes:
    """TH = SHA-256(Hello frame || KeyTransport frame), whole frames with headers."""
    return crypto.sha256(hello_frame + key_transport_frame)


@attrs.frozen
class SessionKeys:
    suite: Suite
    x25519: bool  # an X25519 secret was mixed into the key schedule
    card_to_server: crypto.RecordCipher
    server_to_card: crypto.RecordCipher
    server_finished_key: bytes = attrs.field(repr=False)
    client_finished_key: bytes = attrs.field(repr=False)
    transcript: bytes

    @property
    def forward_secret(self) -> bool:
        """
        Whether recorded traffic stays safe if the server key leaks later. The
        legacy suite's record keys are s1 and s2 themselves (RSA-transported),
        so mixing X25519 in only protects its key confirmation: not forward secret.
        """
        return self.x25519 and self.suite not in INSECURE_SUITES

    def server_mac(self) -> bytes:
        return crypto.hmac_sha256(
            self.server_finished_key,
            finished_input("server finished", self.transcript, self.suite, self.x25519),
        )

    def client_mac(self) -> bytes:
        return crypto.hmac_sha256(
            self.client_finished_key,
            finished_input("client finished", self.transcript, self.suite, self.x25519),
        )


def derive_keys(
    suite: Suite,
    secrets: SessionSecrets,
    dh_shared: bytes,
    transcript: bytes,
    rand: crypto.RandomBytes,
) -> SessionKeys:
    """
    PRK = HKDF-Extract(salt = r1 || r2, IKM = s1 || s2 || X25519 shared (or empty));
    every key = HKDF-Expand(PRK, "vsc1 " || label || suite || TH, length).
    The legacy suite uses s1 (DES key, first 8 bytes) and s2 (MD5 key) as the
    patent says; its key confirmation still uses the HKDF keys.
    """
    prk = crypto.hkdf_extract(secrets.r1 + secrets.r2, secrets.s1 + secrets.s2 + dh_shared)

    def expand(label: str, n: int) -> bytes:
        return crypto.hkdf_expand(prk, key_info(label, suite, transcript), n)

    if suite in (Suite.AES256_GCM, Suite.CHACHA20_POLY1305):
        c2s = crypto.AEADRecordCipher(suite.label, expand("c2s key", 32), expand("c2s iv", 12))
        s2c = crypto.AEADRecordCipher(suite.label, expand("s2c key", 32), expand("s2c iv", 12))
    elif suite is Suite.AES256_CBC_HMAC_SHA256:
        c2s = crypto.CBCHMACRecordCipher(expand("c2s enc", 32), expand("c2s mac", 32), rand)
        s2c = crypto.CBCHMACRecordCipher(expand("s2c enc", 32), expand("s2c mac", 32), rand)
    elif suite is Suite.DES_CBC_MD5:
        c2s = crypto.LegacyDESMD5RecordCipher(secrets.s1, secrets.s2, rand)
        s2c = crypto.LegacyDESMD5RecordCipher(secrets.s1, secrets.s2, rand)
    else:  # pragma: no cover - StrictEnum makes this unreachable
        raise ValueError(suite)
    return SessionKeys(
        suite=suite,
        x25519=bool(dh_shared),
        card_to_server=c2s,
        server_to_card=s2c,
        server_finished_key=expand("server finished", 32),
        client_finished_key=expand("client finished", 32),
        transcript=transcript,
    )
