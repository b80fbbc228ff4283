"""
A malicious or compromised VSC Server against the card side: what it sends
beyond what the card asked for must not grow the card process's memory.
Found by an adversarial review.
"""

from __future__ import annotations

from vsc.wire.ops import OpResult, Status


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
