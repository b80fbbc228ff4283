"""
A malicious or compromised VSC Server against the card side (found by an
adversarial review): another card's blob must not disarm this card's
rollback record, and what the server sends beyond what the card asked for
must not grow the card process's memory.
"""

from __future__ import annotations

import pytest

from vsc.card.config import CardConfig
from vsc.card.machine import MachineLock
from vsc.card.protected import PlainItem, seal_envelope
from vsc.card.session import CardError, CardSession, LifeState
from vsc.wire.ops import OpResult, Status
from vsc.wire.protected import ItemKind, encode_counter

from tests.cardfakes import MemoryStorage, done, release

PASSWORD_KEY = b"k" * 32  # the protection key the owner's password gives (the server chooses the salt: it can
#                           hand the card another card's KDF parameters, so this is what an owner with one
#                           password for two cards derives for either of them)


def _rand():
    state = [0]

    def rand(n: int) -> bytes:
        state[0] += 1
        return (state[0].to_bytes(4, "big") * (n // 4 + 1))[:n]

    return rand


def _env(serial: str, runs: int) -> bytes:
    return seal_envelope(serial, PASSWORD_KEY, [PlainItem(ItemKind.COUNTER, "lic:editor:x", encode_counter(runs))],
                         _rand())


class SwitchableServer(MemoryStorage):
    """A storage whose next ``open`` hands out whatever envelope the (malicious) server chooses."""

    def hand_out(self, envelope: bytes) -> None:
        self.envelope = envelope

    async def hand_back(self) -> None:
        pass


def _session(tmp_path, storage) -> CardSession:
    cfg = CardConfig(home=tmp_path, server="tcp:127.0.0.1:9", server_key="SHA256:x", serial="card-A",
                     muk_poll=0, clock_poll=0, reconnect_attempts=1)
    from twisted.internet.task import Clock

    return CardSession(cfg, Clock(), storage, rand=_rand(), muk=lambda: b"m" * 32, pid=lambda: 1,
                       lock=MachineLock(str(tmp_path / "lock")))


def test_another_cards_blob_does_not_disarm_the_rollback_record(tmp_path):
    """
    docs/security.md "Rollback": on a machine that has inserted the card before, the record covers "a
    malicious server that hands back any older copy". Here the server first hands card A's insert the blob
    of card B (another card of the same owner, same password; the server picks the KDF salt, so the card
    derives B's key): the card opens it (copies under another serial must open), serves B's secrets, and
    its remove records B's generation. Before the fix that record replaced card A's, and the server could
    then hand back A's OLD copy (one licence run refunded) unnoticed. Now HOME/freshness keeps one record
    per card ID, and A's old copy is still refused.
    """
    storage = SwitchableServer("card-A", _env("card-A", runs=10), PASSWORD_KEY, _rand())
    session = _session(tmp_path, storage)
    try:
        done(session.insert("pw"))
        backup = storage.envelope  # the server keeps this copy (generation 0, 10 runs)
        assert done(session.counter("lic:editor:x", -1)) == 9  # a run is spent and stored (generation 1)
        done(session.remove())  # generation 2 acknowledged; HOME/freshness records card-A at 2

        storage.hand_out(backup)  # control: handed back directly, the old copy IS refused today
        with pytest.raises(CardError, match="older copy"):
            done(session.insert("pw"))

        # the malicious server: card B's blob (same password) for card A's insert, then the owner removes
        storage.hand_out(_env("card-B", runs=50))
        done(session.insert("pw"))
        assert session.memory.serial == "card-B"  # card B's secrets now serve as card A, unremarked
        done(session.remove())

        # ... and then card A's old copy (a licence run refunded): it must still be refused
        storage.hand_out(backup)
        with pytest.raises(CardError, match="older copy"):
            done(session.insert("pw"))
        assert session.life is LifeState.IDLE
    finally:
        release(session)


def test_unsolicited_server_messages_do_not_pile_up_in_card_memory(tmp_path):
    """
    A server that sends inner messages nobody asked for (here: 200 of 64 KiB while the card is idle on its
    channel): the card keeps at most a few (MAX_UNCLAIMED) and then closes the channel as a protocol
    violation. Before the fix CardProtocol.messageReceived kept every one (13 MB here, ~512 KiB each at
    most), so a malicious server could grow the card process's memory without limit.
    """
    from tests.test_server_ops import Harness

    h = Harness(tmp_path)
    client, server, _pump = h.connect()
    blob = b"\x00" * (64 * 1024)
    for _ in range(200):
        server.sendMessage(OpResult(status=Status.OK, version=1, protected=blob))
    h.settle()
    held = sum(len(m.protected) for m in client._unclaimed)
    assert client.channel.closed and held <= 4 * 64 * 1024, f"the card holds {held} bytes the server pushed"
