"""
``vsc conformance``: the protocol conformance harness of docs/protocol.md,
run against any implementation over the network.

Server mode (``--server ENDPOINT --server-key FP``) plays a card — a correct
one and a hostile one — against the server under test: the handshake for
every suite, every operation, every life-cycle transition and refusal, and
every error path (tampered, replayed, reordered, truncated and oversized
records, a wrong r1, an implementation-auth answer later than the deadline,
busy and destroyed serials). New cards are created on the server under test
through a provisioning hook: ``--provision "CMD {serial}"`` is run for each
serial and must print the one-time enrolment code (``vsc admin --data-dir D
issue {serial} --json`` does).

Card mode (``--card``) plays the server for a card under test: a correct
server, then servers that misbehave one way each (wrong key, a suite the
card did not offer, a bad key-confirmation MAC, a tampered record, an alert
mid-handshake, no answer at all); ``--card-command`` runs the card against
each and must succeed only against the correct one. Then, through a card
driver (``--card-driver``: enrol, insert, step, remove), a whole server
with a store of its own that acts as hostile storage: it rolls the card's
copy back, relabels an old copy with a higher version, or asks for a KDF
below the card's floor.

Items a run lacks something for (a hook, ``--allow-insecure``, a driver)
are reported skipped, never passed. docs/integrator.md §6.1 lists every
item with its § and how to run it.

Prints a pass/fail table; exits non-zero on any failure.

The package, one job a module:

* ``vsc.conformance.items``: THE list of items, each with the § of
  docs/protocol.md it checks (add an item there);
* ``vsc.conformance.checks``: the server-mode checks, one function each;
* ``vsc.conformance.server``: what the checks share (``ServerHarness``);
* ``vsc.conformance.raw``: the raw client whose bytes a check controls;
* ``vsc.conformance.card``: card mode, the misbehaving servers (and the
  hostile storage of the operations items);
* ``vsc.conformance.vscdriver``: the card driver for vsc's own card;
* ``vsc.conformance.report``: the command, its options (``extend``), the
  runner and the table.
"""

from vsc.conformance.items import CARD_ITEMS, SERVER_ITEMS, CardItem, Item, Result
from vsc.conformance.raw import Failed, RawCard, expect
from vsc.conformance.report import cmd_conformance, extend, run_server_items, table
from vsc.conformance.server import ServerHarness

__all__ = [
    "CARD_ITEMS", "SERVER_ITEMS", "CardItem", "Failed", "Item", "RawCard", "Result", "ServerHarness",
    "cmd_conformance", "expect", "extend", "run_server_items", "table",
]
