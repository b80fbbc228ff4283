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


# ================================================================ 2. error messages about a password


@pytest.mark.parametrize("via_fd", [False, True])
def test_a_password_file_that_is_not_utf8_is_refused_without_quoting_the_password(tmp_path, via_fd):
    """
    A password (or PIN, PUK, token PIN) file is read as UTF-8 text. One
    that is not (a password typed in a Latin-1 editor) raised the codec's
    UnicodeDecodeError, whose text is "'utf-8' codec can't decode byte
    0xe9 in position 9": one byte of the password and where it is. The
    daemon (``twistd vsc-card``) writes that line to stderr, which twistd
    routes into its log file, and ``vsc card`` prints it. The refusal must
    be one line that says what is wrong without any part of the secret.
    """
    from vsc.card import config as cc

    secret = b"correct-h\xe9rse-battery"
    path = tmp_path / "pw"
    path.write_bytes(secret + b"\n")
    os.chmod(path, 0o600)
    fd = os.open(path, os.O_RDONLY) if via_fd else None
    try:
        with pytest.raises(cc.CardConfigError) as e:
            cc.read_password(f"fd:{fd}" if via_fd else str(path))
    finally:
        if fd is not None:
            os.close(fd)
    text = str(e.value)
    assert "UTF-8" in text
    for leak in ("0xe9", "\\xe9", "position", "é"):
        assert leak not in text.replace(str(path), "").replace(f"fd:{fd}", ""), text
    # the CLI's one line, too
    with pytest.raises(CommandError) as e2:
        card_cli.read_password(str(path))
    assert "0xe9" not in str(e2.value) and "position" not in str(e2.value)


# ================================================================ 3. what the card sends the server


def test_a_server_chosen_salt_gives_no_answer_reusable_across_cards(monkeypatch):
    """
    docs/security.md: an offline guess costs one scrypt per candidate *per
    card* (the per-card 16-byte salt), and a malicious server cannot turn
    what the card sends into a cheaper guess (the KDF floor). The card used
    to take the salt from the server's challenge at every insert and send
    the authentication key itself (the PASSWORD method's answer is
    scrypt(password, salt)[:32]); the floor checks the cost, never the
    salt. So a malicious server sent every card the same salt S (chosen
    in advance): one dictionary pass scrypt(w, S) then tested each word
    against every card at once (a table computed before any card
    connects). Now each card pins the salt it chose at enrolment (card.ini
    ``kdf_salt``, kept across password changes): two cards, each with its
    own pinned salt, refuse the shared-salt challenge before deriving
    anything, so there is no answer to test a guess against.
    """
    from vsc.card import ops
    from vsc.wire.ops import AuthChallenge, AuthItem, AuthMethod, KdfAlg, KdfParams

    monkeypatch.setattr(ops, "derive_keys", lambda *a: pytest.fail("derived keys for another card's salt"))
    chosen = KdfParams(alg=KdfAlg.SCRYPT, salt=b"S" * 16, log2_n=15)  # meets the floor
    challenge = AuthChallenge(kdf=chosen.encode(), challenges=(AuthItem(AuthMethod.PASSWORD),))
    for serial, own in (("alice-card", b"a" * 16), ("bob-card", b"b" * 16)):
        creds = ops.Credentials(kdf_floor="scrypt:15", kdf_salt=own)
        with pytest.raises(ops.KdfSaltRefused, match="another salt"):
            ops.answer(challenge, serial, "correct horse", b"m" * 32, lambda n: b"\0" * n, creds=creds)
        assert creds.notes == []


# ================================================================ 4. card.ini: a token PIN kept in the URI


def test_a_token_pin_kept_in_card_ini_with_a_percent_sign_is_stored_and_never_echoed(tmp_path):
    """
    ``vsc dongle enroll --keep-pin-in-uri`` keeps the token PIN in
    card.ini as ``pin-value=`` percent-encoded (``quote(pin, safe='')``):
    a PIN with any character besides letters, digits and ``_.-~`` (say
    ``p@ss!``) becomes ``p%40ss%21``. card.ini was written and read by a
    ConfigParser with %-interpolation, which refused the value with
    "invalid interpolation syntax in 'pkcs11:...;pin-value=p%40ss%21' at
    position ..." (reading: "'%' must be followed by '%' or '(', found:
    '%40ss%21'"): the enrolment failed after binding the token, and the
    line ``vsc`` printed (stderr, a CI log: the option is for automation)
    held the token PIN. card.ini's values are plain text: stored and read
    back as given.
    """
    from vsc.card import config as cc
    from vsc.dongle.config import dongle_setup
    from vsc.dongle.config import TABLE_NAME
    from vsc.wire.dongle import ChallengeTable, encode_table

    pin = "p@ss!7391"
    from urllib.parse import quote

    uri = f"pkcs11:token=t;module-path=/m.so;pin-value={quote(pin, safe='')}"
    home = tmp_path / "home"
    try:
        cc.save(home, mode="dongle", serial="dg-1", token=uri, table=TABLE_NAME)
    except Exception as e:  # noqa: BLE001 - the leak is the point
        assert "7391" not in str(e), "the refusal quotes the token PIN"
        raise
    (home / TABLE_NAME).write_bytes(encode_table(ChallengeTable(serial="dg-1", entries=((b"c" * 16,) * 2,))))
    cfg = cc.load(home)
    assert cfg.settings["token"] == uri
    assert dongle_setup(cfg, None, None)[0].pin == pin


# ================================================================ 5. vsc-server.ini: a database password


def test_a_database_url_with_a_percent_encoded_password_is_stored_and_never_echoed(tmp_path):
    """
    A PostgreSQL URL percent-encodes the reserved characters of its
    password (``postgresql://vsc:p%40ss@db/vsc`` for ``p@ss``).
    ``vsc admin init --database URL`` wrote vsc-server.ini through a
    ConfigParser with %-interpolation, which refused the URL with "invalid
    interpolation syntax in 'postgresql://vsc:p%40ss...' at position ...":
    the line held the database password, and init had already written the
    server key, so running it again was refused ("already exists"). The
    same value written by hand was refused when loaded ("'%' must be
    followed by ... found: '%40ss@...'"), quoting the password again.
    vsc-server.ini's values are plain text: stored and read back as given.
    """
    from vsc.server import config

    url = "postgresql://vsc:s3cr%40t-7391@db.example/vsc"
    try:
        cfg = config.init(tmp_path / "srv", database=url, key_bits=2048)
    except Exception as e:  # noqa: BLE001 - the leak is the point
        assert "7391" not in str(e), "the refusal quotes the database password"
        raise
    assert cfg.database == url
    assert config.load(tmp_path / "srv").database == url
