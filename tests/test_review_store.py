"""
Rules of the server's database layer (vsc.server.store, the store calls of
vsc.server.service, vsc.cli.admin on a database the server shares) that an
adversarial review found broken, each with how it was broken; they hold
since the fix. A store call's failure must reach the card as its documented
status (docs/protocol.md §10.13: "A database failure anywhere is INTERNAL"),
every change is one transaction that holds across processes (docs/admin.md:
several server processes, and the admin commands, share one database), and a
multi-step administrative change is all or nothing.
"""

from __future__ import annotations

import sqlite3
import threading

import pytest

from vsc.wire.ops import Status


# ---------------------------------------------------------------- 1. a database failure while enrolling


def test_a_database_failure_while_the_enrolment_material_is_made_is_internal_and_the_channel_stays(tmp_path):
    """
    Rule (docs/protocol.md §10.13, the server's operation machine): "A
    database failure anywhere is INTERNAL (STORAGE_FULL when the database
    cannot store for want of space) and changes nothing"; the channel takes
    the next request.

    Under a ``keyfile`` (or ``totp``) policy an enrolment first makes its
    material on the pool, after a plain read of the database
    (``Store.may_enrol``: is the code valid?). Before the fix, when that read
    failed (the database down, locked, a PostgreSQL restart), the glue handed
    the failure to the machine as ``store_failed`` while it was ``issuing``,
    a state with no such transition: the machine took it as a protocol
    violation of the card's, closed the channel with UNEXPECTED_MESSAGE and
    logged that the card "broke the operation protocol". The owner's
    enrolment ended with a dropped connection instead of INTERNAL. Now the
    card is answered INTERNAL, nothing is created, and the same channel
    enrols once the database is back.
    """
    from tests.test_implauth import registration
    from tests.test_review_enrol import keyfile_harness
    from tests.test_server_ops import SERIAL, result_of
    from vsc.card import ops as card_ops
    from vsc.crypto import system_random

    h, code, _ = keyfile_harness(tmp_path)
    client, server, _ = h.connect()
    kdf = card_ops.new_kdf(system_random, log2_n=10)
    keys = card_ops.derive_keys("pw", kdf)
    may_enrol = h.store.may_enrol

    def down(*args):
        raise sqlite3.OperationalError("unable to open database file")

    h.store.may_enrol = down
    d = h.run(card_ops.enrol(client, SERIAL, code, keys, kdf, b"P", registration=registration(keys, SERIAL)))
    with pytest.raises(card_ops.OperationRefused) as e:
        result_of(d)
    assert e.value.status is Status.INTERNAL
    assert not server.channel.closed and h.store.get(SERIAL) is None
    h.store.may_enrol = may_enrol
    result = result_of(h.run(card_ops.enrol(client, SERIAL, code, keys, kdf, b"P",
                                            registration=registration(keys, SERIAL))))
    assert result.status is Status.OK and result.registration
