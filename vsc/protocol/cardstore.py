"""
What the server's operation machine asks of the card database: one typed
effect per store operation, the record it reads, the outcome it gets back,
and the store interface (``CardStore``) with one typed method per effect.

The machine (vsc.protocol.server_ops) emits these effects; the glue
(vsc.server.service) runs ``STORE_CALLS[type(effect)](store, effect)`` on a
worker thread and feeds the return value back. vsc.server.store implements
``CardStore`` on SQLite and PostgreSQL: each call is ONE transaction that
reads the card's row under a lock, classifies the request and decides with
Figure 4's table (vsc.protocol.lifecycle), writes the decision and its
history line, and returns the ``Outcome``.
"""

from __future__ import annotations

import json
from typing import Callable, Protocol

import attrs

from vsc.protocol.lifecycle import CardFacts, Operation, State
from vsc.wire.ops import Status


@attrs.frozen
class CardRecord:
    """A card's row ([0034]): what the server knows of one serial."""

    serial: str
    state: State
    muk: bytes | None  # the current insert's MUK, while in use
    protected: bytes = attrs.field(repr=False)
    channel_info: str | None  # JSON while in use: session hash, suite, peer, since
    verifier: bytes = attrs.field(repr=False)
    kdf: bytes = b""
    auth_info: str = "{}"  # JSON: implementation-auth methods and their material
    version: int = 1
    failures: int = 0  # consecutive failed authentications from other machines (lockout.py)
    locked_until: float = 0.0  # before this, other machines' answers are not evaluated
    created: float = 0.0
    updated: float = 0.0
    last_session: bytes | None = attrs.field(default=None, repr=False)
    last_muk: bytes | None = None  # the MUK of the last successful insert, kept after remove
    machine_failures: int = 0  # ... answers carrying last_muk (the owner's own machine)
    machine_locked_until: float = 0.0

    @property
    def session_hash(self) -> bytes | None:
        if not self.channel_info:
            return None
        return bytes.fromhex(json.loads(self.channel_info)["session"])

    def facts(self) -> CardFacts:
        return CardFacts(state=self.state, version=self.version, session_hash=self.session_hash,
                         last_session=self.last_session, muk=self.muk, protected=self.protected,
                         verifier=self.verifier, kdf=self.kdf)

    def throttled(self, now: float, own_machine: bool) -> bool:
        """Whether an answer from the owner's last machine (or any other) is refused unevaluated now."""
        return (self.machine_locked_until if own_machine else self.locked_until) > now

    def summary(self, now: float) -> dict:
        return {
            "serial": self.serial,
            "state": self.state.value,
            "muk": self.muk.hex() if self.muk else None,
            "locked_out": self.throttled(now, False) or self.throttled(now, True),
            "locked_until": max(self.locked_until, self.machine_locked_until) or None,
            "failures": self.failures,
            "machine_failures": self.machine_failures,
            "version": self.version,
            "protected_bytes": len(self.protected),
            "channel": json.loads(self.channel_info) if self.channel_info else None,
            "auth": json.loads(self.auth_info or "{}").get("methods", []),
            "created": self.created,
            "updated": self.updated,
        }


@attrs.frozen
class Outcome:
    """What a store operation decided; the machine answers it as it is."""

    status: Status
    version: int = 0
    protected: bytes = attrs.field(default=b"", repr=False)
    registration: bytes = b""
    #: False: a session operation refused to a requester who did not show the card's current insert secret
    #: (or named no card); the machine counts it for its source like a failed authentication
    holder: bool = True


# ---------------------------------------------------------------- effects, one per store operation


@attrs.frozen
class LoadCard:
    """Read one card's row (or None) before challenging."""

    serial: str


@attrs.frozen
class EnrolCard:
    serial: str
    code_hash: bytes
    verifier: bytes = attrs.field(repr=False)
    kdf: bytes
    protected: bytes = attrs.field(repr=False)
    registration: bytes
    auth_extra: dict  # the server's side of material issued now (keyfile as1, TOTP seed)
    peer: str
    #: False: the source is throttled; a refused enrolment (no valid code) is only logged, not written to
    #: the history (a stranger who keeps asking cannot grow it without bound)
    record: bool = True


@attrs.frozen
class CheckOut:
    """Insert's mediation 305 and set in-use 307 (Figure 6)."""

    serial: str
    muk: bytes
    session: bytes  # SHA-256(insert secret)
    channel: dict  # suite and peer, recorded as the protected channel info [0034]
    peer: str
    verifier: bytes = attrs.field(repr=False)  # the verifier the answer was checked against
    totp_step: int | None = None
    own_machine: bool = False  # which failure bucket to reset
    #: implementation-authentication material to issue with this insert (issue 13): the methods the card must
    #: pass but has no material for (impl_auth changed after it enrolled; a duplicate's keyfile), the card's
    #: registration, and the serial its seal key was registered under
    reissue: tuple = ()
    registration: bytes = attrs.field(default=b"", repr=False)
    registered_as: str = ""
    auth_extra: dict = attrs.Factory(dict)  # the server's side of the material made (filled in by the glue)


@attrs.frozen
class SyncCard:
    serial: str
    session: bytes
    version: int
    protected: bytes = attrs.field(repr=False)
    peer: str
    #: False: the source is throttled; a refusal to a requester without the insert secret is only logged,
    #: not written to the history (a stranger who keeps asking cannot grow it without bound)
    record: bool = True


@attrs.frozen
class ChangeCardPassword:
    serial: str
    session: bytes
    version: int
    verifier: bytes = attrs.field(repr=False)
    kdf: bytes
    protected: bytes = attrs.field(repr=False)
    peer: str
    #: False: the source is throttled; a refusal to a requester without the insert secret is only logged,
    #: not written to the history (a stranger who keeps asking cannot grow it without bound)
    record: bool = True


@attrs.frozen
class CheckIn:
    """Remove (Figure 11): the upload and set idle, together."""

    serial: str
    session: bytes
    version: int
    protected: bytes = attrs.field(repr=False)
    peer: str
    #: False: the source is throttled; a refusal to a requester without the insert secret is only logged,
    #: not written to the history (a stranger who keeps asking cannot grow it without bound)
    record: bool = True


@attrs.frozen
class AttachCard:
    """A new channel of an in-use card presents the insert secret (nothing changes; refusals are logged)."""

    serial: str
    session: bytes
    peer: str
    #: False: the source is throttled; a refusal to a requester without the insert secret is only logged,
    #: not written to the history (a stranger who keeps asking cannot grow it without bound)
    record: bool = True


@attrs.frozen
class RecoverCard:
    """Recover (Figure 12): idle again, from the last insert's machine only."""

    serial: str
    muk: bytes
    peer: str
    verifier: bytes = attrs.field(repr=False)
    totp_step: int | None = None
    own_machine: bool = False


@attrs.frozen
class DestroyCard:
    serial: str
    muk: bytes
    peer: str
    verifier: bytes = attrs.field(repr=False)
    totp_step: int | None = None
    own_machine: bool = False


@attrs.frozen
class CountFailure:
    """A failed (or unanswered) authentication: counted in one bucket, with its history line."""

    serial: str
    op: Operation
    peer: str
    detail: str
    muk: bytes | None
    own_machine: bool
    result: str = "refused"  # or "timeout"


@attrs.frozen
class LogRefusal:
    """A refusal that changes nothing but the history."""

    serial: str
    op: Operation
    result: str
    peer: str
    detail: str = ""
    muk: bytes | None = None


class CardStore(Protocol):
    """The card database as the server's machine uses it (vsc.server.store.Store)."""

    def load_card(self, e: LoadCard) -> CardRecord | None: ...
    def enrol(self, e: EnrolCard) -> Outcome: ...
    def check_out(self, e: CheckOut) -> Outcome: ...
    def sync(self, e: SyncCard) -> Outcome: ...
    def change_password(self, e: ChangeCardPassword) -> Outcome: ...
    def check_in(self, e: CheckIn) -> Outcome: ...
    def attach(self, e: AttachCard) -> Outcome: ...
    def recover(self, e: RecoverCard) -> Outcome: ...
    def destroy(self, e: DestroyCard) -> Outcome: ...
    def count_failure(self, e: CountFailure) -> None: ...
    def log_refusal(self, e: LogRefusal) -> None: ...


#: The glue's dispatch by type: effect class -> a call of the store method that carries it out.
STORE_CALLS: dict[type, Callable[[CardStore, object], object]] = {
    LoadCard: lambda store, e: store.load_card(e),
    EnrolCard: lambda store, e: store.enrol(e),
    CheckOut: lambda store, e: store.check_out(e),
    SyncCard: lambda store, e: store.sync(e),
    ChangeCardPassword: lambda store, e: store.change_password(e),
    CheckIn: lambda store, e: store.check_in(e),
    AttachCard: lambda store, e: store.attach(e),
    RecoverCard: lambda store, e: store.recover(e),
    DestroyCard: lambda store, e: store.destroy(e),
    CountFailure: lambda store, e: store.count_failure(e),
    LogRefusal: lambda store, e: store.log_refusal(e),
}

StoreEffect = (LoadCard | EnrolCard | CheckOut | SyncCard | ChangeCardPassword | CheckIn | AttachCard | RecoverCard
               | DestroyCard | CountFailure | LogRefusal)
