"""
Every conformance item the harness checks, in the order it runs them: the
area and name its table shows, the § of docs/protocol.md the item checks and
the identifiers of §12's checklist it covers, and how to run it.

Adding a server-mode item: write ``async def my_check(h: ServerHarness)`` in
vsc.conformance.checks (raise ``Failed`` with one line when the server is
wrong) and add one ``Item`` line below. Adding a card-mode item: teach
vsc.conformance.card's misbehaving server the new scenario and add one
``CardItem`` line below. tests/test_conformance.py checks that every item
names a § that exists in docs/protocol.md.
"""

from __future__ import annotations

from typing import Awaitable, Callable

import attrs

from vsc.conformance import checks
from vsc.protocol.suites import ForwardSecrecy
from vsc.wire.messages import Suite


@attrs.frozen
class Item:
    """A server-mode item: ``check(harness, *args)``; ``provision``: it creates cards (needs the provisioning hook)."""

    area: str
    name: str  # may use {auth_deadline}
    section: str
    rules: tuple[str, ...]
    check: Callable[..., Awaitable[None]]
    args: tuple = ()
    provision: bool = False


@attrs.frozen
class CardItem:
    """A card-mode item: the harness plays a server that misbehaves as ``scenario`` ("correct": not at all)."""

    scenario: str
    section: str
    rules: tuple[str, ...]

    @property
    def must_succeed(self) -> bool:
        return self.scenario == "correct"

    @property
    def name(self) -> str:
        return f"{self.scenario}: card must {'succeed' if self.must_succeed else 'refuse'}"


@attrs.define
class Result:
    """One item's outcome, as the table and the JSON show it."""

    area: str
    name: str
    ok: bool
    detail: str = ""
    seconds: float = 0.0
    section: str = ""
    rules: tuple[str, ...] = ()


def _handshakes() -> tuple[Item, ...]:
    return tuple(
        Item("handshake", f"{suite.label} fs={fs.value}", "§6", ("S1", "S4", "S5", "S6", "B1", "R5", "I1"),
             checks.handshake, (suite, fs))
        for suite in Suite
        for fs in (ForwardSecrecy.OFF, ForwardSecrecy.REQUIRE)
    )


SERVER_ITEMS: tuple[Item, ...] = (
    *_handshakes(),
    Item("handshake", "wrong pinned key is detected", "§6.4", ("S1",), checks.wrong_pin),
    Item("handshake", "wrong r1 -> HANDSHAKE_FAILED", "§6.5", ("S2", "E3"), checks.wrong_r1),
    Item("handshake", "undecryptable key transport -> HANDSHAKE_FAILED", "§6.5", ("S2", "E3"), checks.garbage_kt),
    Item("handshake", "downgraded offer -> KEY_CONFIRMATION_FAILED", "§7.3", ("S5",), checks.downgrade),
    Item("record", "tampered record -> BAD_RECORD", "§8", ("R2", "R4", "E1"), checks.tampered),
    Item("record", "replayed record -> REPLAYED_RECORD", "§8", ("R4", "E1"), checks.replayed),
    Item("record", "reordered record -> OUT_OF_ORDER_RECORD", "§8", ("R4", "E1"), checks.reordered),
    Item("record", "oversized frame -> FRAME_TOO_LARGE", "§3", ("F4",), checks.oversized),
    Item("record", "truncated frame: connection closed, server keeps serving", "§3", ("F2",), checks.truncated),
    Item("record", "bad magic -> MALFORMED", "§3", ("F3",), checks.bad_magic),
    Item("record", "unknown message type -> UNKNOWN_TYPE", "§4", ("F5",), checks.unknown_type),
    Item("record", "echo of 32 KiB", "§5.8", ("R5",), checks.big_echo),
    Item("life cycle", "enrol, insert, sync, remove", "§10.13", ("O5",), checks.life_cycle, provision=True),
    Item("life cycle", "repeated insert after a drop is the same check-out", "§10.8", ("O6",), checks.repeat_insert,
         provision=True),
    Item("life cycle", "second insert while in use -> IN_USE", "§10.13", ("O5",), checks.second_insert,
         provision=True),
    Item("life cycle", "recover needs the MUK of the last insert", "§10.11", ("O7",), checks.recover, provision=True),
    Item("life cycle", "remove/recover/sync refused when idle", "§10.13", ("O5", "O9"), checks.idle_refusals,
         provision=True),
    Item("life cycle", "destroy is final -> DESTROYED", "§10.11", ("O7",), checks.destroy, provision=True),
    Item("refusal", "wrong password, unknown serial look the same", "§10.6.1", ("O2", "O3"), checks.uniform_refusal,
         provision=True),
    Item("refusal", "wrong Master key -> REFUSED", "§10.6.2", ("O3",), checks.wrong_master, provision=True),
    Item("refusal", "reused enrolment code -> REFUSED", "§10.7", ("O3",), checks.reused_code, provision=True),
    Item("refusal", "an unanswered challenge holds nothing", "§10.2", ("O1",), checks.unanswered_challenge_holds_nothing,
         provision=True),
    Item("refusal", "implementation auth later than {auth_deadline:g} s -> TIMEOUT", "§10.6.1", ("O4",),
         checks.late_answer, provision=True),
    # found missing by the mutation self-test (tools/mutate.py; docs/integrator.md "Mutation self-test")
    Item("handshake", "clear r2 differs from the r2 inside the key transport -> HANDSHAKE_FAILED", "§6.5", ("S2",),
         checks.r2_mismatch),
    Item("handshake", "client finished MAC with its first or last byte changed -> KEY_CONFIRMATION_FAILED", "§7.3",
         ("S6",), checks.client_finished_tampered),
    Item("refusal", "wrong enrolment code -> REFUSED, the issued one still works", "§10.7", ("O3",),
         checks.wrong_code, provision=True),
    Item("refusal", "an answer missing a challenged method -> REFUSED", "§10.6.1", ("O3",), checks.missing_answer,
         provision=True),
    Item("refusal", "a Master-key answer with its last MAC byte changed -> REFUSED", "§10.6.2", ("O3",),
         checks.master_key_tampered, provision=True),
    Item("life cycle", "insert without an insert secret -> BAD_REQUEST", "§10.8", ("O5",),
         checks.insert_without_secret, provision=True),
    Item("refusal", "the owner's last machine is throttled after its own failures too", "§10.6.1", ("O3",),
         checks.owner_machine_throttled, provision=True),
)

CARD_ITEMS: tuple[CardItem, ...] = (
    CardItem("correct", "§6", ("C1", "C3", "C5")),
    CardItem("wrong-key", "§6.4", ("C1",)),
    CardItem("unoffered-suite", "§6.3", ("C3",)),
    CardItem("bad-finished-mac", "§7.3", ("C5",)),
    CardItem("finished-mac-first-byte", "§7.3", ("C5",)),
    CardItem("tampered-record", "§8", ("R4",)),
    CardItem("alert", "§9.2", ("E2",)),
    CardItem("silent", "§6.3", ("B3",)),
)
