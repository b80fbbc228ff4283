"""
Where secrets go: rules about the card password, keys, PINs and data
objects leaving the places docs/security.md allows (files of another mode,
log lines, Python objects where locked memory is promised) that an
adversarial review found broken, each with how it was broken; they hold
since the fix.
"""

from __future__ import annotations

import argparse
import os
import stat

import pytest

from vsc.cli import CommandError
from vsc.cli import card as card_cli
from vsc.wire import control as wc

SECRET = b"the data object's plaintext \x00\x01 secret"


# ================================================================ 1. files the CLI writes a secret into


def _data_get(monkeypatch, out: str) -> None:
    def fake_call(args, command, **kwargs):
        assert command is wc.DATA_GET
        return {"value": SECRET}

    monkeypatch.setattr(card_cli, "_call", fake_call)
    card_cli.cmd_data(argparse.Namespace(data_action="get", name="db", output=out, json=False))


def test_data_get_into_an_existing_readable_file_leaves_it_private(tmp_path, monkeypatch, capsys):
    """
    ``vsc card data get NAME --output FILE`` (and ``decrypt --output``)
    writes a secret, so the CLI creates FILE with mode 0600. It opened
    FILE with O_CREAT|O_TRUNC, whose mode applies only to a new file: an
    existing FILE (the user's earlier output of mode 0644, or one another
    user's umask made, or one made world-readable to hand it on) kept its
    mode, so the data object's plaintext was readable by every local user.
    The secret must only ever be in a file of mode 0600.
    """
    out = tmp_path / "db.secret"
    out.write_bytes(b"old")
    os.chmod(out, 0o644)
    _data_get(monkeypatch, str(out))
    assert out.read_bytes() == SECRET
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


def test_decrypt_into_an_existing_readable_file_leaves_it_private(tmp_path, monkeypatch, capsys):
    """The same rule for ``vsc card decrypt --output``: the plaintext lands in a file of mode 0600 only."""
    inp = tmp_path / "ct"
    inp.write_bytes(b"c" * 256)
    out = tmp_path / "plain"
    out.write_bytes(b"")
    os.chmod(out, 0o664)
    monkeypatch.setattr(card_cli, "_key_call", lambda args, command, **kw: {"plaintext": SECRET})
    card_cli.cmd_decrypt(argparse.Namespace(slot="9d", input=str(inp), output=str(out), padding="oaep",
                                            json=False, pin_file=None))
    assert out.read_bytes() == SECRET
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
