"""
The rule "bad input gets one clear line, is logged, and breaks nothing else",
applied to the ``vsc`` commands and the two daemons' options and config files,
as an adversarial review found it broken; each test says how it was broken.
They hold since the fix.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from vsc.card import config as cc
from vsc.server import config as server_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


# ================================================================ 2. an endpoint description that is not one


@pytest.mark.parametrize("listen", ["notanendpoint", "tcp:abc", "bogus:1", "tcp:99999999"])
def test_vsc_server_with_a_listen_that_is_not_an_endpoint_is_one_line(tmp_path, capsys, listen):
    """
    ``listen`` (vsc-server.ini, or --listen) must be a Twisted server
    endpoint. One that is not (a typo'd kind, a port that is no number)
    went unchecked until strports.service parsed it, and ``twistd
    vsc-server`` died with a Python traceback (ValueError: Unknown endpoint
    type / invalid literal for int()). Now it is one line naming the
    setting, and exit 2, like every other bad setting.
    """
    from vsc.server import tap

    data = tmp_path / "data"
    server_config.init(data, key_bits=2048)
    options = tap.Options()
    options.parseOptions(["--data-dir", str(data), "--listen", listen])
    with pytest.raises(SystemExit) as e:
        tap.makeService(options)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("vsc-server: ") and err.count("\n") == 1 and repr(listen) in err, err


@pytest.mark.parametrize("server", ["tcp:abc", "bogus:1", "tcp:127.0.0.1", "tcp:127.0.0.1:99999999"])
def test_enroll_and_ping_with_a_server_that_is_not_an_endpoint_is_one_usage_line(tmp_path, capsys, server):
    """
    ``--server`` must be a Twisted client endpoint. One that is not was
    found only when the channel was opened, after the password and code were
    read, the keys derived and generated: "TCP4ClientEndpoint.__init__()
    missing 1 required positional argument: 'port' (set VSC_DEBUG=1 for a
    traceback)" (a Python class name, which vsc.cli promises never to show)
    or "Unknown endpoint type: 'bogus' (set VSC_DEBUG=1 ...)", exit 1.
    Now it is one line naming --server, exit 2, before anything is read.
    """
    from vsc import cli

    home = _private_dir(tmp_path / "home")
    never = tmp_path / "never-read"  # the password file: must not be needed to find the mistake
    argvs = (
        ["card", "--home", str(home), "enroll", "--server", server, "--server-key", SERVER_KEY, "--serial", "c1",
         "--code", "x", "--password-file", str(never)],
        ["ping", "--server", server, "--server-key", SERVER_KEY],
    )
    for argv in argvs:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("vsc: --server ") and err.count("\n") == 1, err
        assert "VSC_DEBUG" not in err and "Endpoint" not in err and "never-read" not in err, err
    assert not (home / cc.CARD_INI).exists()


def test_vsc_card_with_a_pcsc_that_is_not_an_endpoint_stops_before_the_password(tmp_path, capsys):
    """
    ``twistd vsc-card --pcsc ENDPOINT`` was parsed only after the card was
    inserted (the password read, the server asked): the PcscLink built
    outside the daemon's error handling raised, and the daemon logged a
    traceback and exited 1 with "internal error", removing the card it had
    just inserted. Now a --pcsc that is not an endpoint is one line naming
    it, exit 2, before the password is read; so is a card.ini server that
    is not one.
    """
    from vsc.daemon import card_tap

    home = _private_dir(tmp_path / "home")
    cc.save(home, server="tcp:127.0.0.1:7390", server_key=SERVER_KEY, serial="c1")
    never = tmp_path / "never-read"
    for pcsc in ("bogus:1", "listen:tcp:abc"):
        options = card_tap.Options()
        options.parseOptions(["--home", str(home), "--password-file", str(never), "--pcsc", pcsc, "--no-ssh-agent"])
        with pytest.raises(SystemExit) as e:
            card_tap.makeService(options)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("vsc-card: --pcsc ") and err.count("\n") == 1 and "never-read" not in err, err
    cc.save(home, server="tcp:abc", server_key=SERVER_KEY, serial="c1")
    options = card_tap.Options()
    options.parseOptions(["--home", str(home), "--password-file", str(never), "--no-ssh-agent"])
    with pytest.raises(SystemExit) as e:
        card_tap.makeService(options)
    err = capsys.readouterr().err
    assert e.value.code == 2 and "'tcp:abc'" in err and "never-read" not in err, err


# ================================================================ 3. a server key fingerprint of the wrong form


@pytest.mark.parametrize("key", ["6v8bgBMl8Ape01+fZjZQ+3P0dbjKIGgKoyhh6WtHedE",  # without SHA256:
                                 SERVER_KEY + "\n", " " + SERVER_KEY, "SHA256:" + "ab" * 16, "MD5:aa:bb", ""])
def test_a_server_key_of_the_wrong_form_is_one_usage_line(tmp_path, capsys, key):
    """
    ``--server-key`` is the pin of the server's key, in the one form
    ``vsc admin fingerprint`` prints (``SHA256:`` and 43 base64
    characters). A value of another form (pasted without ``SHA256:``, with
    a blank, a hex digest, empty) can never match, but it was only compared
    after the connect: enroll read the password and code, derived and
    generated keys, then said "channel closed: SERVER_KEY_MISMATCH: the
    server's key is not the one pinned (wrong server, or a man in the
    middle)", exit 1 — an alarm for a typo. Now it is one line naming
    --server-key and its form, exit 2, before anything is read or sent.
    """
    from vsc import cli

    home = _private_dir(tmp_path / "home")
    never = tmp_path / "never-read"
    argvs = (
        ["card", "--home", str(home), "enroll", "--server", "tcp:127.0.0.1:1", "--server-key", key, "--serial", "c1",
         "--code", "x", "--password-file", str(never)],
        ["ping", "--server", "tcp:127.0.0.1:1", "--server-key", key],
    )
    for argv in argvs:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("vsc: --server-key ") and "SHA256:" in err and err.count("\n") == 1, err
        assert "never-read" not in err and "connect" not in err, err


def test_a_well_formed_server_key_passes_the_form_check():
    """The check refuses only the form: what `vsc admin fingerprint` prints passes."""
    from vsc import crypto

    assert crypto.is_fingerprint(SERVER_KEY)
    assert crypto.is_fingerprint(crypto.fingerprint(b"any key"))
    assert not crypto.is_fingerprint(SERVER_KEY[:-1]) and not crypto.is_fingerprint(SERVER_KEY + "=")


# ================================================================ 4. a server key that is not usable


def _encrypted_key_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.BestAvailableEncryption(b"secret"))


def test_an_encrypted_server_key_is_one_line_naming_the_key_not_the_database(tmp_path, capsys):
    """
    server-key.pem protected with a passphrase (an operator's
    ``openssl pkcs8 -topk8 -v2 aes256``) cannot be used: the server reads
    it without one. cryptography says so with a TypeError, which
    ConfigServer.load_key did not turn into a ConfigError: ``twistd
    vsc-server`` fell into its catch-all and printed "cannot open the
    database sqlite:///...: Password was not given but private key is
    encrypted" (the database is fine), and ``vsc admin fingerprint`` ended
    with "(set VSC_DEBUG=1 for a traceback)". Now both name the key file.
    """
    from vsc import cli
    from vsc.server import tap

    data = tmp_path / "data"
    server_config.init(data, key_bits=2048)
    (data / server_config.KEY_NAME).write_bytes(_encrypted_key_pem())
    options = tap.Options()
    options.parseOptions(["--data-dir", str(data)])
    with pytest.raises(SystemExit) as e:
        tap.makeService(options)
    err = capsys.readouterr().err
    assert e.value.code == 2 and server_config.KEY_NAME in err and "database" not in err, err
    assert cli.main(["admin", "--data-dir", str(data), "fingerprint"]) == 1
    err = capsys.readouterr().err
    assert server_config.KEY_NAME in err and "VSC_DEBUG" not in err and err.count("\n") == 1, err


# ================================================================ 5. a HOME whose name is not UTF-8


def test_a_home_whose_name_is_not_utf8_has_a_control_socket(tmp_path, monkeypatch, capsys):
    """
    A POSIX file name is bytes; Python hands a non-UTF-8 one over with
    surrogate escapes (``--home $'/home/al\\xefce'`` from a Latin-1
    system). The control socket's name is a hash of the resolved HOME, and
    that hash encoded the name as strict UTF-8: every ``vsc card`` command
    for such a HOME said "'utf-8' codec can't encode character '\\udcef'
    ... (set VSC_DEBUG=1 for a traceback)", and so did the card daemon
    when it inserted, although ``vsc card enroll`` had already enrolled the
    card there (its one-time code spent). The name is now hashed as the
    bytes it is (os.fsencode); a UTF-8 name hashes as before.
    """
    from vsc import crypto
    from vsc.card import paths

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(_private_dir(tmp_path / "run")))
    home = _private_dir(tmp_path / "al\udcefce")
    sock = paths.control_socket_for(home)
    assert os.path.dirname(sock) == os.path.join(str(tmp_path / "run"), "vsc")
    utf8 = _private_dir(tmp_path / "café")
    tag = crypto.sha256_light(os.path.realpath(utf8).encode()).hex()[:12]
    assert paths.control_socket_for(utf8).endswith(f"card-{tag}.sock")  # unchanged for every name that worked
    # a process of its own: its stderr escapes what it cannot encode, as a terminal's does (capsys's does not)
    proc = subprocess.run([sys.executable, "-c", "import sys; from vsc.cli import main; sys.exit(main())", "card",
                           "--home", os.fsencode(home), "status"], capture_output=True, stdin=subprocess.DEVNULL,
                          env={**os.environ, "XDG_RUNTIME_DIR": str(tmp_path / "run"), "PYTHONPATH": ROOT}, timeout=60)
    err = proc.stderr.decode("utf-8", "replace")
    assert proc.returncode == 1 and "no card daemon is running" in err and "codec" not in err, err


# ================================================================ 6. a password source that cannot be read


@pytest.mark.parametrize("source", ["fd:abc", "fd:", "fd:-1", "fd:99999", "fd:" + "9" * 40, "latin1", "dir",
                                    "/dev/zero"])
def test_a_password_source_that_cannot_be_read_is_one_line_naming_it(tmp_path, capsys, source):
    """
    ``--password-file`` (and --pin-file, --token-pin-file, ...) is a file or
    ``fd:N``. ``fd:abc`` gave "invalid literal for int() with base 10:
    'abc' (set VSC_DEBUG=1 for a traceback)", a descriptor that is not open
    "Bad file descriptor" (naming neither), a huge N "Python int too large
    to convert to C int", ``/dev/zero`` was read until memory ran out (a
    line that never ends), and a file that is not UTF-8 "'utf-8' codec can't
    decode byte 0xe9 ...": no line said which option was wrong, and
    ``twistd vsc-card`` printed the same. Now each is a CardConfigError
    naming the source, so one line in vsc and in the daemon.
    """
    from vsc import cli

    if source == "latin1":
        source = str(tmp_path / "latin1")
        (tmp_path / "latin1").write_bytes("caf\xe9\n".encode("latin-1"))
    elif source == "dir":
        source = str(tmp_path)
    with pytest.raises(cc.CardConfigError) as e:
        cc.read_password(source)
    assert source in str(e.value), e.value
    home = _private_dir(tmp_path / "home")
    cc.save(home, server="tcp:127.0.0.1:1", server_key=SERVER_KEY, serial="c1")
    assert cli.main(["card", "--home", str(home), "recover", "--password-file", source]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and source in err and "VSC_DEBUG" not in err, err


@pytest.mark.parametrize("source", ["fd:abc", "fd:99999", "latin1", "dir", "/dev/zero", "blank"])
def test_an_enrolment_code_source_that_cannot_be_read_is_one_line_naming_it(tmp_path, capsys, source):
    """
    ``vsc card enroll --code-file FILE|fd:N`` read the code with its own
    reader: ``fd:abc`` gave int()'s words, ``/dev/zero`` was read until
    memory ran out, a file that is not UTF-8 quoted a byte of the one-time
    code and its position, and a blank line enrolled with an empty code (a
    refusal from the server after the password was read and the keys made).
    Now it is the password file's reader (vsc.card.config.read_secret_line):
    one line naming the source, before the password is asked for.
    """
    from vsc import cli

    if source == "latin1":
        source = str(tmp_path / "latin1")
        (tmp_path / "latin1").write_bytes("ABCD-\xe9FGH\n".encode("latin-1"))
    elif source == "blank":
        source = str(tmp_path / "blank")
        (tmp_path / "blank").write_text("   \n")
    elif source == "dir":
        source = str(tmp_path)
    # the password file does not exist: the code's line, not the password's, shows the code is read first
    code = cli.main(["card", "--home", str(tmp_path / "home"), "enroll", "--server", "tcp:127.0.0.1:1",
                     "--server-key", SERVER_KEY, "--serial", "c1", "--code-file", source,
                     "--password-file", "/nonexistent/password"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and source in err and "enrolment code" in err, err
    assert "VSC_DEBUG" not in err and "codec" not in err and "0xe9" not in err, err


# ================================================================ 7. card.ini's numbers


@pytest.mark.parametrize("name, value", [
    ("muk_poll", "nan"), ("muk_poll", "-5"), ("muk_poll", "inf"), ("muk_poll", "1e-9"),
    ("clock_poll", "nan"), ("clock_tolerance", "nan"), ("clock_tolerance", "-1"), ("clock_tolerance", "60"),
    ("reconnect_attempts", "1000000000000"), ("reconnect_attempts", "abc"),
    ("dongle_poll", "nan"), ("dongle_poll", "abc"), ("dongle_poll", "-1"),
])
def test_card_ini_numbers_out_of_range_are_one_line_naming_the_setting(tmp_path, name, value):
    """
    card.ini's polling settings are read with getfloat/getint and used as
    they came: ``muk_poll = nan`` (or -5) silently turned the MUK and
    process-id check of [0031]-[0032] off (docs/card.md: only 0 is off),
    ``clock_tolerance = nan`` the clock check of [0033], ``dongle_poll =
    nan`` the token check of Figure 14; ``muk_poll = 1e-9`` made the daemon
    spin; ``clock_tolerance`` below ``clock_poll`` removed the card at its
    first clock check; ``reconnect_attempts = 10**12`` retried a server that
    is down forever; ``dongle_poll = abc`` stopped the daemon with "could
    not convert string to float: 'abc'", naming no setting. Each is now one
    CardConfigError line naming card.ini, the setting and what it accepts.
    """
    home = _private_dir(tmp_path / "home")
    cc.save(home, server="tcp:127.0.0.1:1", server_key=SERVER_KEY, serial="c1", **{name: value})
    with pytest.raises(cc.CardConfigError) as e:
        cc.load(home)
    assert str(e.value).startswith(str(home / cc.CARD_INI)) and name in str(e.value), e.value


def test_card_ini_numbers_in_range_load():
    """What the docs and the tests use still loads: 0 (off) and ordinary values."""
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        home = _private_dir(Path(d) / "home")
        cc.save(home, server="tcp:127.0.0.1:1", server_key=SERVER_KEY, serial="c1", muk_poll="0",
                clock_poll="0", clock_tolerance="5400", reconnect_attempts="1", dongle_poll="2.5")
        cfg = cc.load(home)
        assert (cfg.muk_poll, cfg.clock_poll, cfg.reconnect_attempts) == (0, 0, 1)
        cc.save(home, server="tcp:127.0.0.1:1", server_key=SERVER_KEY, serial="c1")
        cfg = cc.load(home)
        assert (cfg.muk_poll, cfg.clock_poll, cfg.clock_tolerance, cfg.reconnect_attempts) == (60, 3600, 5400, 5)


# ================================================================ 8. vsc run's --interval and --grace


@pytest.mark.parametrize("option, value", [("--interval", "nan"), ("--interval", "inf"), ("--interval", "1e-9"),
                                           ("--grace", "nan"), ("--grace", "inf"), ("--interval", "0")])
def test_vsc_run_refuses_an_interval_or_grace_that_is_not_a_finite_time(tmp_path, capsys, option, value):
    """
    docs/licensing.md: ``vsc run`` re-proves the licence every --interval
    seconds and stops the program at most interval + grace seconds after
    the card is removed. Only ``interval <= 0 or grace < 0`` was refused,
    and that after the keyfile was read: ``--interval nan`` or ``inf``
    (NaN compares false; max(nan, 10) is nan) started the program and never
    proved the licence again, so it ran on without the card; ``--grace
    inf`` never sent SIGKILL; ``--interval 1e-9`` proved in a busy loop.
    Now each is one line naming the option, before anything is read.
    """
    from vsc import cli

    argv = ["run", "--license", str(tmp_path / "none.keyfile"), "--vendor-key", str(tmp_path / "none.pem"),
            option, value, "--", "true"]
    assert cli.main(argv) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and option in err and "none." not in err, err


# ================================================================ 9. numeric options of enroll and the dongle commands


def test_dongle_provision_refuses_more_entries_than_a_table_holds_before_the_token_is_touched(tmp_path, capsys,
                                                                                              monkeypatch):
    """
    A challenge table holds 1 to 4096 entries (vsc.wire.dongle). ``vsc
    dongle provision --entries 5000`` (or replace) checked only ``< 8``:
    it generated the DongleKey on the token and 5000 responses, then
    encode_table failed ("(set VSC_DEBUG=1 for a traceback)"), so the token
    held a DongleKey with no table written, and create_dongle_key refuses a
    second one: the token was spent for nothing. Now --entries is checked
    (8 to 4096) before the token is opened.
    """
    from vsc import cli
    from vsc.cli import dongle

    touched = []
    monkeypatch.setattr(dongle, "_ref", lambda uri, pin_file: touched.append("ref") or object())
    monkeypatch.setattr(dongle, "_new_table", lambda *a: touched.append("table"))
    for action in (["provision", "--serial", "c1"], ["replace", "--serial", "c1", "--issuer-dir", str(tmp_path)]):
        argv = ["dongle", *action[:1], "--token", "pkcs11:token=t", "--table", str(tmp_path / "table"),
                "--entries", "5000", *action[1:]]
        if action[0] == "replace":
            (tmp_path / "c1.json").write_text('{"serial": "c1", "envelope": "", "kdf": ""}')
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "--entries" in err and "4096" in err and err.count("\n") == 1, err
    assert touched == [] and not (tmp_path / "table").exists()


@pytest.mark.parametrize("extra", [["--poll", "nan"], ["--poll", "-1"], ["--poll", "1e-9"],
                                   ["--scrypt-log2n", "30"], ["--scrypt-log2n", "20"]])
def test_enroll_numbers_are_checked_before_anything_is_read_or_written(tmp_path, capsys, extra):
    """
    ``vsc dongle enroll --poll nan`` wrote ``dongle_poll = nan`` into
    card.ini after the card was stored on the token (the daemon then
    polled never, or refuses it); ``--scrypt-log2n 30`` (or 20: 128·r·N
    over the 256 MiB a card derives) failed only after the password was
    read, as "scrypt cost log2(N) must be 10..22 (set VSC_DEBUG=1 for a
    traceback)", exit 1 (20 is in 10..22, but its 1 GiB is over what the
    card derives: the same late failure, with a misleading range). Now
    each is one usage line (exit 2) naming the option and what it accepts,
    before anything is read.
    """
    from vsc import cli

    home = _private_dir(tmp_path / "home")
    never = str(tmp_path / "never-read")
    argvs = [["dongle", "enroll", "--token", "pkcs11:token=t", "--home", str(home), "--table", never,
              "--password-file", never, *extra]]
    if extra[0] == "--scrypt-log2n":
        argvs.append(["card", "--home", str(home), "enroll", "--server", "tcp:127.0.0.1:1", "--server-key",
                      SERVER_KEY, "--serial", "c1", "--code", "x", "--password-file", never, *extra])
    for argv in argvs:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err
        assert extra[0] in err and "never-read" not in err and err.count("\n") == 1, err
    assert not (home / cc.CARD_INI).exists()


# ================================================================ 10. a config file that is not a small UTF-8 text file


def _load_soon(load, path, fifo=None):
    """``load(path)``'s exception (or None), failing the test if it does not return within 10 s (a FIFO blocks)."""
    import threading

    box: list = []

    def run():
        try:
            load(path)
            box.append(None)
        except Exception as e:  # noqa: BLE001 - what load raised is the result
            box.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(10)
    if t.is_alive() and fifo is not None:  # let the blocked reader go: a writer that closes at once
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(10)
    assert box, f"loading {path} did not return (blocked)"
    return box[0]


@pytest.mark.parametrize("kind", ["fifo", "directory", "latin1", "huge"])
def test_a_config_file_that_is_not_a_small_utf8_text_file_is_one_line_naming_it(tmp_path, kind):
    """
    vsc-server.ini and card.ini were read with ConfigParser.read, which
    opens whatever the name is and skips what it cannot open: one that is a
    FIFO (or a link to one) blocked ``twistd vsc-server``, ``vsc admin`` and
    every ``vsc card`` command for ever; a directory read as no file at all
    ("has no [server] section", "invalid or missing setting: 'card'"); a
    Latin-1 vsc-server.ini gave "'utf-8' codec can't decode byte ... (set
    VSC_DEBUG=1 for a traceback)" naming no file; a huge one was read
    whole. Now each is one line naming the file and what is wrong with it.
    """
    data = tmp_path / "data"
    server_config.init(data, key_bits=2048)
    home = _private_dir(tmp_path / "home")
    targets = ((data / server_config.CONFIG_NAME, server_config.load, server_config.ConfigError, data),
               (home / cc.CARD_INI, cc.load, cc.CardConfigError, home))
    for path, load, error, arg in targets:
        if path.exists():
            path.unlink()
        if kind == "fifo":
            os.mkfifo(path)
        elif kind == "directory":
            path.mkdir()
        elif kind == "latin1":
            path.write_bytes(b"[server]\n[card]\n# caf\xe9\n")
        else:
            path.write_text("[server]\n[card]\n" + "# padding\n" * 200_000)
        e = _load_soon(load, arg, str(path) if kind == "fifo" else None)
        assert isinstance(e, error) and str(path) in str(e), (path, e)
        assert "section" not in str(e) and "codec" not in str(e), e
        if kind == "directory":
            path.rmdir()
        else:
            path.unlink()


# ================================================================ 11. a server socket that is not there


def test_a_unix_server_socket_that_is_not_there_is_worded_not_a_number():
    """
    ``--server unix:/run/vsc.sock`` (a UNIX socket endpoint) when the
    socket is missing: Twisted reports the errno as a number (osError=2)
    with its words beside it, and vsc said "cannot connect to the server:
    2". Now the words are shown.
    """
    from twisted.internet import error

    from vsc.net.errors import describe

    assert describe(error.getConnectError((2, "No such file or directory"))) == \
        "cannot connect to the server: No such file or directory"
    assert describe(error.getConnectError((13, ""))) == "cannot connect to the server: Permission denied"


# ================================================================ 12. the card daemon with no terminal to ask on


@pytest.mark.parametrize("stdin", ["devnull", "closed"])
def test_the_card_daemon_without_a_terminal_or_password_file_is_one_line(tmp_path, stdin):
    """
    ``twistd vsc-card`` without --password-file asks on the terminal. With
    none (a service, a cron job: no controlling terminal), getpass fell
    back to reading stdin with warnings ("GetPassWarning: Can not control
    echo on the terminal", "Warning: Password input may be echoed", the
    prompt) — what ``vsc card`` deliberately avoids — and with stdin closed
    it died with a traceback ("AttributeError: 'NoneType' object has no
    attribute 'readline'"). Now it is one line saying to use
    --password-file, exit 2, as ``vsc card`` says.
    """
    home = _private_dir(tmp_path / "home")
    cc.save(home, server="tcp:127.0.0.1:1", server_key=SERVER_KEY, serial="c1")
    code = ("import sys\n"
            f"if {stdin == 'closed'}:\n    sys.stdin = None\n"
            "from vsc.daemon import card_tap\n"
            "o = card_tap.Options()\n"
            f"o.parseOptions(['--home', {str(home)!r}, '--no-ssh-agent'])\n"
            "card_tap.makeService(o)\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                          start_new_session=True,  # no controlling terminal: /dev/tty cannot be opened
                          env={**os.environ, "PYTHONPATH": ROOT}, timeout=60)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr
    assert lines[0].startswith("vsc-card: no password given") and "--password-file" in lines[0], proc.stderr


@pytest.mark.parametrize("kind", ["latin1", "zero"])
def test_a_totp_file_that_is_not_a_short_utf8_line_is_one_line_naming_it(tmp_path, kind):
    """
    ``--totp-file F`` is read when the server asks for the code. A Latin-1
    file raised UnicodeDecodeError into the insert ("insert refused:
    'utf-8' codec can't decode byte 0xe9 ...", naming no file), and
    ``/dev/zero`` was read until memory ran out. Now both are a
    CardConfigError naming the file, like --password-file's.
    """
    path = "/dev/zero"
    if kind == "latin1":
        path = str(tmp_path / "totp")
        (tmp_path / "totp").write_bytes(b"12345\xe9\n")
    read = cc.totp_source(None, path, True)
    with pytest.raises(cc.CardConfigError) as e:
        read()
    assert path in str(e.value), e.value


@pytest.mark.parametrize("option,value", [("--count", "0"), ("--count", "-3"), ("--count", "100001"),
                                          ("--size", "-1"), ("--size", "40000")])
def test_ping_counts_and_sizes_out_of_range_are_one_usage_line(capsys, option, value):
    """
    ``vsc ping --count`` and ``--size`` were used as given, after the
    channel was opened: a negative or zero count, a negative size or one
    larger than the conformance echo, a count that runs for hours (left open
    by the review of bad input). Now each is one usage line, exit 2, before
    anything is connected.
    """
    from vsc import cli

    assert cli.main(["ping", "--server", "tcp:127.0.0.1:9", "--server-key", SERVER_KEY, option, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"vsc: {option} {value} must be from ") and err.count("\n") == 1, err


def test_a_master_key_file_that_is_not_hex_is_named(tmp_path):
    """
    A VSC_MASTER_KEY_FILE that is not hex gave fromhex's "non-hexadecimal
    number found in fromhex() arg at position N", naming no file (left open
    by the review of bad input). The refusal now names the file; a good one
    still loads.
    """
    from vsc.protocol.auth import load_master_key

    bad = tmp_path / "master.key"
    bad.write_text("not hex at all\n")
    with pytest.raises(ValueError, match=f"^{bad}: a Master key is 32 bytes"):
        load_master_key(str(bad))
    good = tmp_path / "good.key"
    good.write_text("ab" * 32 + "\n")
    assert load_master_key(str(good)) == bytes([0xAB]) * 32
