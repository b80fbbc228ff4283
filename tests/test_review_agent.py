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
