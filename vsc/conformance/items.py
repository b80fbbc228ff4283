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


#: what an item may need of the run (ServerHarness.hooks): "provision" (the provisioning hook: it creates
#: cards), "storage" (--fill-storage and --free-storage), "insecure" (the server enables des-cbc-md5)
NEEDS = ("provision", "storage", "insecure")


@attrs.frozen
class Item:
    """A server-mode item: ``check(harness, *args)``; it runs only when the run has everything in ``needs``."""

    area: str
    name: str  # may use the fields of ServerSettings, e.g. {auth_deadline}
    section: str
    rules: tuple[str, ...]
    check: Callable[..., Awaitable[None]]
    args: tuple = ()
    provision: bool = False
    needs: tuple[str, ...] = ()

    @property
    def requires(self) -> tuple[str, ...]:
        return (("provision",) if self.provision else ()) + tuple(n for n in self.needs if n != "provision")


@attrs.frozen
class CardItem:
    """A card-mode item: the harness plays a server that misbehaves as ``scenario`` ("correct": not at all)."""

    scenario: str
    section: str
    rules: tuple[str, ...]

    @property
    def must_succeed(self) -> bool:
        return self.scenario in ("correct", "ops-correct")

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
    skipped: bool = False  # not run: the run lacks what the item needs (detail says what)


def _handshakes() -> tuple[Item, ...]:
    return tuple(
        Item("handshake", f"{suite.label} fs={fs.value}", "§6", ("S1", "S4", "S5", "S6", "B1", "R5", "I1"),
             checks.handshake, (suite, fs))
        for suite in Suite
        for fs in (ForwardSecrecy.OFF, ForwardSecrecy.REQUIRE)
    )


def _per_suite() -> tuple[Item, ...]:
    out = []
    for suite in Suite:
        needs = ("insecure",) if suite is Suite.DES_CBC_MD5 else ()
        extra = {Suite.AES256_CBC_HMAC_SHA256: ("R3",), Suite.DES_CBC_MD5: ("R3", "I2")}.get(suite, ())
        section = {Suite.AES256_CBC_HMAC_SHA256: "§7.5", Suite.DES_CBC_MD5: "§7.6"}.get(suite, "§7.4")
        out.append(Item("record", f"{suite.label}: every byte of a record, each tag byte, flipped -> BAD_RECORD; "
                        "reflected -> BAD_RECORD", section, ("R2", "R4") + extra, checks.record_integrity, (suite,),
                        needs=needs))
        out.append(Item("record", f"{suite.label}: truncated, extended, doubled and missing tags -> BAD_RECORD",
                        section, ("R4",) + extra, checks.record_lengths, (suite,), needs=needs))
    return tuple(out)


SERVER_ITEMS: tuple[Item, ...] = (
    *_handshakes(),
    Item("handshake", "the server's preference wins; des-cbc-md5 never chosen unless enabled", "§6.3", ("S4", "E4"),
         checks.server_preference),
    Item("handshake", "wrong pinned key is detected", "§6.4", ("S1",), checks.wrong_pin),
    Item("handshake", "wrong r1 -> HANDSHAKE_FAILED", "§6.5", ("S2", "E3"), checks.wrong_r1),
    Item("handshake", "undecryptable key transport -> HANDSHAKE_FAILED", "§6.5", ("S2", "E3"), checks.garbage_kt),
    Item("handshake", "downgraded offer -> KEY_CONFIRMATION_FAILED", "§7.3", ("S5",), checks.downgrade),
    Item("handshake", "key transport one byte off the modulus length -> HANDSHAKE_FAILED", "§5.3", ("S2", "E3"),
         checks.kt_length),
    Item("handshake", "clear r2 differs from the encrypted r2 -> HANDSHAKE_FAILED", "§6.5", ("S2", "E3"),
         checks.r2_mismatch),
    Item("handshake", "any one CLIENT_FINISHED MAC byte flipped -> KEY_CONFIRMATION_FAILED", "§7.3", ("S6", "B5"),
         checks.client_finished_every_byte),
    Item("handshake", "handshake messages out of order, a record before CLIENT_FINISHED -> UNEXPECTED_MESSAGE",
         "§6.2", ("B4", "S6"), checks.handshake_out_of_order),
    Item("handshake", "no key transport within {handshake_timeout:g} s -> HANDSHAKE_TIMEOUT", "§6.3", ("B3",),
         checks.handshake_timer),
    Item("handshake", "a KEY_TRANSPORT replayed on a new connection -> HANDSHAKE_FAILED (r1 is fresh)", "§6.5",
         ("S1", "S2"), checks.replayed_key_transport),
    Item("handshake", "an all-zero (small-order) X25519 key -> HANDSHAKE_FAILED", "§6.5", ("B2", "S3"),
         checks.small_order_x25519),
    Item("record", "tampered record -> BAD_RECORD", "§8", ("R2", "R4", "E1"), checks.tampered),
    *_per_suite(),
    Item("record", "replay of the last record and of one 3 back -> REPLAYED_RECORD (no window)", "§8", ("R4",),
         checks.replay_window),
    Item("record", "a record 1 or 2^63 ahead, or with a seq byte flipped -> OUT_OF_ORDER_RECORD", "§8", ("R4",),
         checks.reorder_window),
    Item("record", "replayed record -> REPLAYED_RECORD", "§8", ("R4", "E1"), checks.replayed),
    Item("record", "reordered record -> OUT_OF_ORDER_RECORD", "§8", ("R4", "E1"), checks.reordered),
    Item("record", "oversized frame -> FRAME_TOO_LARGE", "§3", ("F4",), checks.oversized),
    Item("record", "truncated frame: connection closed, server keeps serving", "§3", ("F2",), checks.truncated),
    Item("record", "bad magic -> MALFORMED", "§3", ("F3",), checks.bad_magic),
    Item("record", "unknown message type -> UNKNOWN_TYPE", "§4", ("F5",), checks.unknown_type),
    Item("record", "echo of 32 KiB", "§5.8", ("R5",), checks.big_echo),
    Item("record", "an unsolicited ECHO_REPLY is ignored", "§5.8", ("R5", "B4"), checks.unsolicited_echo_reply),
    Item("record", "an inner-only type as a frame, a frame type in a record -> UNEXPECTED_MESSAGE, any body", "§3",
         ("F7",), checks.out_of_place_types),
    Item("record", "an ALERT (known, unknown code, short) is never answered", "§9.2", ("E2",),
         checks.alert_not_answered),
    Item("record", "a sealed CLOSE (unknown code too) is never answered", "§9.2", ("E2",), checks.close_not_answered),
    Item("record", "operation messages out of place -> UNEXPECTED_MESSAGE", "§10.2", ("O8",),
         checks.unexpected_operation_message),
    Item("limits", "before establishment: 4097-byte header -> FRAME_TOO_LARGE, 4096 read", "§9.3", ("F4", "L1"),
         checks.handshake_frame_limit),
    Item("limits", "unauthenticated: a {unauthenticated_body}-byte record served, one byte more -> FRAME_TOO_LARGE",
         "§9.3", ("F4", "L1"), checks.unauthenticated_frame_limit),
    Item("limits", "a large upload: FRAME_TOO_LARGE before an operation passed, stored after", "§9.3", ("F4", "L1"),
         checks.authenticated_frame_limit, provision=True),
    Item("limits", "unauthenticated idle: IDLE_TIMEOUT after {unauthenticated_idle:g} s, a record restarts it",
         "§9.3", ("L2",), checks.unauthenticated_idle),
    Item("limits", "authenticated idle: IDLE_TIMEOUT after {idle_timeout:g} s", "§9.3", ("L2",),
         checks.authenticated_idle, provision=True),
    Item("limits", "at most {unauthenticated_per_source} unauthenticated connections per source; authenticating "
         "frees a place", "§9.3", ("L3", "O1"), checks.unauthenticated_connections_capped, provision=True),
    Item("life cycle", "enrol, insert, sync, remove", "§10.13", ("O5",), checks.life_cycle, provision=True),
    Item("life cycle", "repeated insert after a drop is the same check-out", "§10.8", ("O6",), checks.repeat_insert,
         provision=True),
    Item("life cycle", "second insert while in use -> IN_USE", "§10.13", ("O5",), checks.second_insert,
         provision=True),
    Item("life cycle", "recover needs the MUK of the last insert", "§10.11", ("O7",), checks.recover, provision=True),
    Item("binding", "repeated insert: the same check-out only with the same secret and MUK, else IN_USE", "§10.8",
         ("O6", "O10"), checks.repeat_insert_binding, provision=True),
    Item("binding", "sync, remove, attach, password change with another insert secret -> REFUSED, nothing changed",
         "§10.13", ("O9", "O10"), checks.session_binding, provision=True),
    Item("binding", "recover: a wrong password -> REFUSED, another machine -> MUK_MISMATCH", "§10.11", ("O7", "O10"),
         checks.recover_binding, provision=True),
    Item("versions", "uploads on another version -> VERSION_CONFLICT, identical retry OK, insert gets the last",
         "§10.9", ("O6",), checks.version_rules, provision=True),
    Item("life cycle", "remove/recover/sync refused when idle", "§10.13", ("O5", "O9"), checks.idle_refusals,
         provision=True),
    Item("life cycle", "destroy is final -> DESTROYED", "§10.11", ("O7",), checks.destroy, provision=True),
    Item("refusal", "wrong password, unknown serial look the same", "§10.6.1", ("O2", "O3"), checks.uniform_refusal,
         provision=True),
    Item("refusal", "wrong Master key -> REFUSED", "§10.6.2", ("O3",), checks.wrong_master, provision=True),
    Item("refusal", "a Master-key answer with its first or last byte flipped -> REFUSED", "§10.6.2", ("O3",),
         checks.master_mac_every_end, provision=True),
    Item("refusal", "reused enrolment code -> REFUSED", "§10.7", ("O3",), checks.reused_code, provision=True),
    Item("refusal", "a wrong enrolment code -> REFUSED, the right one then enrols", "§10.7", ("O3", "O5"),
         checks.wrong_code, provision=True),
    Item("refusal", "an unanswered challenge holds nothing", "§10.2", ("O1",), checks.unanswered_challenge_holds_nothing,
         provision=True),
    Item("refusal", "implementation auth later than {auth_deadline:g} s -> TIMEOUT", "§10.6.1", ("O4",),
         checks.late_answer, provision=True),
    Item("refusal", "lockout: {lockout_threshold} failures throttle this source, never the owner's last machine",
         "§10.6.1", ("O3", "O11"), checks.lockout_counts, provision=True),
    Item("refusal", "{lockout_threshold} unanswered challenges count like failures, never against the owner's "
         "last machine", "§10.6.1", ("O1", "O11"), checks.unanswered_challenges_count, provision=True),
    Item("refusal", "a full disk -> STORAGE_FULL, nothing changed", "§10.3", ("O12",), checks.storage_full,
         provision=True, needs=("storage",)),
    # found missing by the mutation self-test (tools/mutate.py; docs/integrator.md "Mutation self-test")
    Item("refusal", "an answer missing a challenged method -> REFUSED", "§10.6.1", ("O3",), checks.missing_answer,
         provision=True),
    Item("refusal", "the owner's last machine is throttled after its own {lockout_threshold} failures too",
         "§10.6.1", ("O3", "O11"), checks.owner_machine_throttled, provision=True),
    Item("life cycle", "insert without an insert secret -> BAD_REQUEST", "§10.8", ("O5",),
         checks.insert_without_secret, provision=True),
    Item("versions", "password change: OK v+1, then the new password opens the card and the old is REFUSED; "
         "a retry with another verifier -> VERSION_CONFLICT", "§10.9", ("O5", "O6"), checks.password_change,
         provision=True),
    Item("versions", "a remove retried on an idle card: OK only with the stored upload on stored-1, else REFUSED",
         "§10.10", ("O5", "O6"), checks.idle_remove_retry, provision=True),
    Item("life cycle", "recover forgets the insert: a remove retried with its secret -> REFUSED", "§10.11",
         ("O7", "O10"), checks.recover_forgets_session, provision=True),
    Item("refusal", "a success resets this source's failures on the card: failures before it do not throttle",
         "§10.6.1", ("O3", "O11"), checks.success_resets_source_bucket,
         provision=True),
    Item("limits", "a refused sync and attach leave the channel unauthenticated: one byte over "
         "{unauthenticated_body} -> FRAME_TOO_LARGE", "§9.3", ("F4", "L1"), checks.refused_operation_keeps_limits),
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
    # with operations, through the card driver (--card-driver): the harness is a whole server with its own store
    CardItem("ops-correct", "§10.8", ("K4", "K5")),
    CardItem("rolls-back", "§10.12", ("K8",)),
    CardItem("relabels", "§10.12", ("K8",)),
    CardItem("weak-kdf", "§10.5", ("K1",)),
    CardItem("other-salt", "§10.5", ("K10",)),
    CardItem("long-challenge", "§10.6.2", ("K9",)),
)
