"""
Rules of the card's ssh-agent (vsc.card.sshagent, vsc.wire.sshagent, and
``vsc card ssh-agent-env``) that an adversarial review found broken, each
with how it was broken; they hold since the fix.
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from pathlib import Path

import pytest

from vsc.card import paths
from vsc.cli import CommandError

NOBODY = 65534


# ================================================================ 1. ssh-agent-env: the socket it names


def test_ssh_agent_env_never_names_a_socket_in_another_users_runtime_dir(tmp_path, monkeypatch, capsys):
    """
    ``eval "$(vsc card ssh-agent-env)"`` points ssh (and ssh-add, and ssh -A)
    at the socket it prints. It printed the default socket path whenever
    something existed there, without checking the runtime directory: another
    local user who made ``/tmp/vsc-UID`` first (open to all, or theirs) and
    put a listening socket at the card's agent name got the owner's ssh to
    talk to THEIR agent — it sees every host the owner signs in to, can offer
    its own keys, and receives any key the owner ``ssh-add``s. The rule
    (docs/security.md): a runtime directory that is not the user's own 0700
    one is refused with one line and nothing in it is used, by the CLI too.
    """
    shared = Path(tempfile.mkdtemp(prefix="vsc-rv-", dir="/tmp"))  # a /tmp-like TMPDIR: 1777, sticky
    os.chmod(shared, 0o1777)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("TMPDIR", str(shared))
    home = tmp_path / "home"
    home.mkdir()
    runtime = Path(paths.runtime_dir())
    os.mkdir(runtime, 0o777)  # the other user's move: made first, open to all
    os.chmod(runtime, 0o777)
    agent_path = paths.agent_socket_for(str(home))
    squatter = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        squatter.bind(agent_path)
        squatter.listen(1)
        os.chmod(agent_path, 0o777)
        if os.getuid() == 0:
            os.chown(agent_path, NOBODY, NOBODY)
            os.chown(runtime, NOBODY, NOBODY)
        from vsc.cli.card import cmd_ssh_agent_env

        with pytest.raises(CommandError) as err:
            cmd_ssh_agent_env(argparse.Namespace(home=str(home), json=False))
        assert str(runtime) in str(err.value) and "will not use it" in str(err.value)
        assert agent_path not in capsys.readouterr().out
    finally:
        squatter.close()
        for p in (agent_path,):
            if os.path.lexists(p):
                os.unlink(p)
        os.rmdir(runtime)
        os.rmdir(shared)


def test_ssh_agent_env_still_names_the_daemons_socket_in_a_private_runtime_dir(tmp_path, monkeypatch, capsys):
    """The positive control: the user's own 0700 runtime dir with the daemon's socket in it is printed."""
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path / "xdg"))
    (tmp_path / "xdg").mkdir(mode=0o700)
    home = tmp_path / "home"
    home.mkdir()
    paths.check_runtime_dir(create=True)
    agent_path = paths.agent_socket_for(str(home))
    served = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        served.bind(agent_path)
        served.listen(1)
        from vsc.cli.card import cmd_ssh_agent_env

        assert cmd_ssh_agent_env(argparse.Namespace(home=str(home), json=False)) == 0
        assert agent_path in capsys.readouterr().out
    finally:
        served.close()


# ================================================================ 2. the agent's bound on queued card work


from tests.test_sshagent import DATA, Client, private_keys, public_keys, session  # noqa: E402,F401  (fixtures)
from vsc.card import sshagent  # noqa: E402
from vsc.wire import sshagent as w  # noqa: E402


def test_a_closed_connection_leaves_no_card_work_behind(session, monkeypatch):
    """
    AgentProtocol bounds a connection's unanswered requests (MAX_PENDING,
    then the connection is closed "instead of queueing without bound"). But
    closing did not drop them: every request a connection had queued still
    waited for the card and was signed, with nobody to read the answer. So a
    client that queues MAX_PENDING signatures, hangs up and does it again
    queues card work without bound (here 8 connections: 8 waiters on the
    card's lock, 256 signatures to come), and the owner's own PIV, local API
    and ssh operations wait behind all of it. The rule: what a connection
    leaves behind when it closes is dropped, including a request waiting for
    the card; nothing is signed for a client that is gone.
    """
    blob = Client(session).blob("9a")
    signed = []
    real = session.with_key

    async def counting(slot, fn):
        result = await real(slot, fn)
        signed.append(slot)
        return result

    monkeypatch.setattr(session, "with_key", counting)
    session._oplock.acquire()  # another card operation is running (a PIV signature, a store...)
    clients = []
    for _ in range(8):
        client = Client(session)
        client.send_raw(w.encode_request(w.SignRequest(blob, DATA, w.SignFlags.RSA_SHA2_256))
                        * sshagent.AgentProtocol.MAX_PENDING)
        assert not client.transport.disconnecting  # within the bound
        client.protocol.connectionLost(None)
        clients.append(client)
    assert len(session._oplock.waiting) == 0  # nothing of theirs waits for the card
    session._oplock.release()
    assert signed == []
    assert all(c.transport.value() == b"" for c in clients)
    # the agent still serves a connection that stays
    live = Client(session)
    assert isinstance(live.ask(w.SignRequest(blob, DATA, w.SignFlags.RSA_SHA2_256)), w.SignResponse)
    assert signed == ["9a"]
