"""
The rule "bad input gets one clear line, is logged, and breaks nothing else",
applied to the ``vsc`` commands and the two daemons' options and config files,
as an adversarial review found it broken; each test says how it was broken.
They hold since the fix.
"""

from __future__ import annotations

import os

import pytest

from vsc.card import config as cc
from vsc.server import config as server_config

SERVER_KEY = "SHA256:6v8bgBMl8Ape01+fZjZQ+3P0dbjKIGgKoyhh6WtHedE"


def _private_dir(path):
    path.mkdir(mode=0o700, exist_ok=True)
    os.chmod(path, 0o700)
    return path


# ================================================================ 1. a '%' in a config value


def test_server_init_keeps_a_percent_encoded_database_password(tmp_path):
    """
    A PostgreSQL URL carries its password percent-encoded
    (``postgresql://vsc:p%40ss@db/vsc`` for ``p@ss``). vsc-server.ini was
    written and read with configparser's default interpolation, for which
    '%' is a syntax character: ``vsc admin init --database URL`` failed with
    "invalid interpolation syntax ... (set VSC_DEBUG=1 for a traceback)"
    after it had written server-key.pem, so the data directory was left
    half-made and the next init refused ("server-key.pem already exists").
    A value is now text as written, and init stores and reads it back.
    """
    url = "postgresql://vsc:p%40ss@127.0.0.1:1/vsc"
    cfg = server_config.init(tmp_path / "data", database=url, key_bits=2048)
    assert cfg.database == url
    assert server_config.load(tmp_path / "data").database == url


def test_vsc_server_ini_with_a_percent_is_read_as_written_and_never_a_traceback(tmp_path, capsys):
    """
    A '%' in vsc-server.ini (``listen = unix:/run/vsc%1.sock``, or
    ``%(x)s``) made configparser raise InterpolationError while the [server]
    section was turned into a dict, outside the error handling: ``twistd
    vsc-server`` died with ``UnboundLocalError: cannot access local variable
    'cfg'`` (its catch-all names the database of a config it never loaded).
    The value is now read as written.
    """
    data = tmp_path / "data"
    server_config.init(data, key_bits=2048)
    (data / server_config.CONFIG_NAME).write_text("[server]\nlisten = unix:%(x)s.sock\n")
    assert server_config.load(data).listen == "unix:%(x)s.sock"


def test_card_ini_keeps_a_percent_encoded_token_uri(tmp_path):
    """
    A PKCS#11 URI is percent-encoded (RFC 7512: ``token=My%20Token``), and
    ``vsc dongle enroll --keep-pin-in-uri`` writes the PIN into card.ini
    with ``quote(pin)`` (``p@ss`` -> ``p%40ss``). card.ini was written with
    configparser's interpolation, which refuses a '%': cc.save raised
    ValueError after the card had been written to the token, so the card
    existed on the token with no card.ini to insert it (and a hand-written
    '%' made every command fail "invalid or missing setting"). The value is
    now saved and read back as it is.
    """
    home = _private_dir(tmp_path / "home")
    uri = "pkcs11:token=My%20Token;module-path=/usr/lib/softhsm/libsofthsm2.so;pin-value=p%40ss"
    cc.save(home, mode="dongle", serial="card1", token=uri, table="table.bin")
    assert cc.load(home).settings["token"] == uri
