"""
The authentication methods of Figure 8 as one table both ends use
(docs/protocol.md §10.6): for each method, how the server makes its
challenge, how the card answers it, and how the server checks the answer.

    PASSWORD        501 [0039] [0086]   the authentication key vs the stored verifier
    TOTP            502 [0005] claim 5  RFC 6238 code, each step good once
    MASTER_KEY      503 [0042] Fig. 10  HMAC under the embedded Master key
    KEYFILE         504 [0044]-[0046]   Figure 10 with the keyfile's as1
    ONE_TIME_AGENT  504 [0049]-[0051]   run the server's fresh program f, return x

Adding a method is one class here and one ``AuthMethod`` value in
vsc.wire.ops. Everything is pure: randomness, time and the card's
credentials are passed in. A method the card cannot answer is answered
empty and the reason is added to ``Credentials.notes`` (the server refuses
as for any failed method, [0084]; the notes tell the owner why).
"""

from __future__ import annotations

from typing import Callable, Protocol

import attrs

from vsc import crypto
from vsc.protocol import auth, implauth, onetime_agent
from vsc.wire import WireError
from vsc.wire.ops import AuthMethod


@attrs.define
class Credentials:
    """
    What the card needs besides the password keys and Master to answer:
    the sealed keyfile(s) from HOME (tried in order: one left by an
    interrupted password change comes second), the pinned server key the
    keyfile must be signed by, and a source of TOTP codes (asked only when
    the server wants one). ``notes`` collects what could not be answered;
    ``keyfile_used`` says which keyfile opened.
    """

    keyfiles: tuple = ()
    server_key: str = ""
    totp: Callable[[], str] | None = None
    notes: list = attrs.Factory(list)
    keyfile_used: int | None = None
    #: the weakest password derivation this card accepts from a server ("scrypt:15", "legacy", "" = any)
    kdf_floor: str = ""
    #: the salt this card derives with (card.ini ``kdf_salt``); a challenge naming another is refused (b"" = any)
    kdf_salt: bytes = b""

    def note(self, text: str) -> None:
        self.notes.append(text)


@attrs.frozen
class CardSide:
    """The card's inputs to an answer."""

    serial: str
    auth_key: bytes = attrs.field(repr=False)
    protection_key: bytes = attrs.field(repr=False)
    master: bytes = attrs.field(repr=False)
    creds: Credentials
    rand: crypto.RandomBytes


@attrs.frozen
class ServerSide:
    """The server's inputs to a check. ``material``: the card's stored auth_info (empty for no card)."""

    serial: str
    verifier: bytes = attrs.field(repr=False)
    master: bytes = attrs.field(repr=False)
    material: dict = attrs.field(repr=False)
    now: float


@attrs.frozen
class Issued:
    """A challenge: ``data`` goes to the card; ``expected`` stays with the server (the agent's x)."""

    data: bytes
    expected: bytes = attrs.field(default=b"", repr=False)


@attrs.frozen
class Verdict:
    good: bool
    totp_step: int | None = None  # TOTP: the step the code matched, consumed with the operation


class Method(Protocol):
    method: AuthMethod
    label: str  # as in auth_info["methods"] and the history

    def challenge(self, serial: str, rand: crypto.RandomBytes) -> Issued: ...

    def answer(self, card: CardSide, data: bytes) -> bytes: ...

    def check(self, server: ServerSide, issued: Issued, answer: bytes) -> Verdict: ...


def _section(material: dict, key: str) -> dict:
    value = material.get(key)
    return value if isinstance(value, dict) else {}


def _hex(value) -> bytes | None:
    try:
        return bytes.fromhex(value) if isinstance(value, str) and value else None
    except ValueError:
        return None


class Password:
    method, label = AuthMethod.PASSWORD, auth.METHOD_LABELS[AuthMethod.PASSWORD]

    def challenge(self, serial, rand) -> Issued:
        return Issued(b"")

    def answer(self, card: CardSide, data: bytes) -> bytes:
        return card.auth_key

    def check(self, server: ServerSide, issued: Issued, answer: bytes) -> Verdict:
        return Verdict(auth.check_password(server.verifier, answer))


#: the random challenge of the Master-key and keyfile methods (Figure 10's ri1 / rm1); a card answers no other length
CHALLENGE_SIZE = 32


def _challenge_ok(card: CardSide, data: bytes, label: str) -> bool:
    """
    Whether ``data`` is a challenge of CHALLENGE_SIZE bytes; else it is noted
    and the card answers nothing: a MAC under a key shared by every card of
    the implementation is made only over the canonical layout, never over
    bytes of the server's choosing.
    """
    if len(data) == CHALLENGE_SIZE:
        return True
    card.creds.note(f"{label}: the server's challenge is {len(data)} bytes, not {CHALLENGE_SIZE}; not answered")
    return False


class MasterKey:
    method, label = AuthMethod.MASTER_KEY, auth.METHOD_LABELS[AuthMethod.MASTER_KEY]

    def challenge(self, serial, rand) -> Issued:
        return Issued(rand(CHALLENGE_SIZE))  # rm1 (Figure 10)

    def answer(self, card: CardSide, data: bytes) -> bytes:
        if not _challenge_ok(card, data, "master key"):
            return b""
        return auth.master_answer(card.master, data, card.serial, card.rand)

    def check(self, server: ServerSide, issued: Issued, answer: bytes) -> Verdict:
        try:
            return Verdict(auth.check_master(server.master, issued.data, server.serial, answer))
        except WireError:
            return Verdict(False)


class Keyfile:
    method, label = AuthMethod.KEYFILE, auth.METHOD_LABELS[AuthMethod.KEYFILE]

    def challenge(self, serial, rand) -> Issued:
        return Issued(rand(CHALLENGE_SIZE))  # ri1 ([0046])

    def answer(self, card: CardSide, data: bytes) -> bytes:
        """Open the keyfile (decrypt, check the pinned server's signature), then Figure 10 with as1."""
        creds = card.creds
        if not _challenge_ok(card, data, "keyfile"):
            return b""
        if not creds.keyfiles:
            creds.note("the server requires keyfile authentication, but this card has no keyfile in its HOME")
            return b""
        problems = []
        for index, sealed in enumerate(creds.keyfiles):
            try:
                body = implauth.open_keyfile(sealed, card.serial, card.protection_key, creds.server_key)
            except implauth.KeyfileError as e:
                problems.append(str(e))
                continue
            creds.keyfile_used = index
            return implauth.keyfile_answer(body.as1, data, card.serial, card.rand)
        creds.note("keyfile: " + problems[0])
        return b""

    def check(self, server: ServerSide, issued: Issued, answer: bytes) -> Verdict:
        as1 = _hex(_section(server.material, "keyfile").get("as1"))
        return Verdict(as1 is not None and implauth.check_keyfile(as1, issued.data, server.serial, answer))


class OneTimeAgent:
    method, label = AuthMethod.ONE_TIME_AGENT, auth.METHOD_LABELS[AuthMethod.ONE_TIME_AGENT]

    def challenge(self, serial, rand) -> Issued:
        issued = implauth.agent_challenge(serial, rand)  # a new f for every challenge [0051]
        return Issued(issued.data, issued.x)

    def answer(self, card: CardSide, data: bytes) -> bytes:
        """[0050]: run the server's one-time function f on y, derive the key, decrypt w: x."""
        try:
            return implauth.agent_answer(data, card.serial)
        except onetime_agent.AgentError as e:
            card.creds.note(f"the server's one-time agent was refused: {e}")
        except crypto.CryptoError as e:
            card.creds.note(f"the one-time agent's w does not decrypt with f(y): {e}")
        return b""

    def check(self, server: ServerSide, issued: Issued, answer: bytes) -> Verdict:
        return Verdict(bool(issued.expected) and implauth.check_agent(issued.expected, answer))


class Totp:
    method, label = AuthMethod.TOTP, auth.METHOD_LABELS[AuthMethod.TOTP]

    def challenge(self, serial, rand) -> Issued:
        return Issued(b"")

    def answer(self, card: CardSide, data: bytes) -> bytes:
        """[0005]-[0006]: the code the owner reads off the reader-less device."""
        creds = card.creds
        code = ""
        if creds.totp is not None:
            try:
                code = (creds.totp() or "").strip()
            except Exception as e:  # noqa: BLE001 - the source is the owner's terminal or file: a note
                creds.note(f"no TOTP code: {e}")
                return b""
        if not code:
            creds.note("the server requires a TOTP code (pass --totp CODE or --totp-file F)")
            return b""
        try:
            return implauth.totp_answer(code)
        except WireError:
            creds.note("the TOTP code is not a code (at most 10 characters)")
            return b""

    def check(self, server: ServerSide, issued: Issued, answer: bytes) -> Verdict:
        totp = _section(server.material, "totp")
        secret = _hex(totp.get("secret"))
        if secret is None:
            return Verdict(False)
        try:
            last, period, digits = (int(totp.get("last_step", -1)), int(totp.get("period", implauth.TOTP_PERIOD)),
                                    int(totp.get("digits", implauth.TOTP_DIGITS)))
        except (TypeError, ValueError):
            return Verdict(False)
        step = implauth.check_totp(secret, answer, server.now, last, period, digits)
        return Verdict(step is not None, step)


#: Every method, by its wire value.
METHODS: dict[AuthMethod, Method] = {m.method: m for m in (Password(), MasterKey(), Keyfile(), OneTimeAgent(),
                                                           Totp())}
