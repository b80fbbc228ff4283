"""
GnuPG with the card's OpenPGP application, through the real stack: pcscd with
vsmartcard's vpcd reader, a real ``twistd vsc-server``, a real ``twistd
vsc-card --pcsc`` (tests/test_pcsc.py's stack), and Debian 12's GnuPG 2.2:
gpg, gpg-agent and scdaemon set to use pcscd (``disable-ccid``,
``pcsc-driver``) in a temporary GNUPGHOME, with a scripted pinentry that
answers from a JSON file (the user PIN, the admin PIN, the reset code: on
this card the PIV PUK).

``gpg --card-edit`` is driven through ``--command-fd``/``--status-fd``: each
prompt keyword (``cardedit.prompt``, ``keygen.name``...) gets its scripted
answer. The tests run in file order on one card: status, key generation,
sign/verify, encrypt/decrypt, ssh through gpg-agent to a private sshd, the
PIN blocked and unblocked with the PUK as the reset code, then everything again after
``vsc card remove`` and a new insert; then a software key moved to the card
with ``keytocard``, keys generated as NIST P-256 and as Curve25519, and
``factory-reset``.
They skip locally when a tool is missing and fail under
VSC_REQUIRE_INTEGRATION=1.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.integration import missing
from tests import test_pcsc as pcsc
from vsc.protocol import openpgp
from vsc.devtools.gnupg import (ADMIN_PIN, EMAIL, LIBPCSC, NAME, RESET_CODE, SCDAEMON, TIMEOUT, GnuPG,
                                generate_card_keys, set_card_key_attributes)

pytestmark = pytest.mark.integration

PIN = pcsc.PIN
SSHD = Path("/usr/sbin/sshd")


def _prerequisites() -> None:
    for program in ("gpg", "gpg-agent", "gpgconf", "ssh", "ssh-add", "ssh-keygen"):
        if shutil.which(program) is None:
            missing(f"{program} is not installed (apt-get install gnupg scdaemon openssh-client)")
    if not SCDAEMON.exists():
        missing("scdaemon is not installed (apt-get install scdaemon)")
    if LIBPCSC is None:
        missing("libpcsclite.so.1 is not installed (apt-get install libpcsclite1)")


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """tests/test_pcsc.py's stack (pcscd, a real server, the card inserted with --pcsc) and a GnuPG home for it."""
    pcsc._prerequisites()
    _prerequisites()
    from tests.cards import Cards
    from tests.servers import Servers, admin, init_data_dir

    root = tmp_path_factory.mktemp("gnupg")
    with pcsc._machine_lock(), pcsc._reserve_vpcd_ports():
        gen = pcsc._stack(root, Cards, Servers, admin, init_data_dir)
        st = next(gen)
        gnupg = GnuPG(root, PIN)
        st["gnupg"] = gnupg
        try:
            yield st
        finally:
            gnupg.close()
            gen.close()


def _sign_and_verify(stack, name: str) -> None:
    g, tmp = stack["gnupg"], stack["tmp"]
    msg = tmp / f"{name}.txt"
    msg.write_text(f"signed by the card: {name}\n")
    g.gpg("--yes", "-u", EMAIL, "--output", f"{msg}.sig", "--detach-sign", str(msg))
    out = g.gpg("--verify", f"{msg}.sig", str(msg)).stderr
    assert f'Good signature from "{NAME} <{EMAIL}>"' in out


def _encrypt_and_decrypt(stack, name: str) -> None:
    g, tmp = stack["gnupg"], stack["tmp"]
    msg = tmp / f"{name}.txt"
    msg.write_text(f"for the card's eyes only: {name}\n")
    g.gpg("--yes", "--trust-model", "always", "-r", EMAIL, "--output", f"{msg}.gpg", "--encrypt", str(msg))
    out = g.gpg("--output", "-", "--decrypt", f"{msg}.gpg")
    assert out.stdout == msg.read_text()


def _three_wrong_pins(g: GnuPG) -> None:
    """card-edit 'verify' three times with a wrong PIN (a fresh scdaemon first: it skips VERIFY once it verified)."""
    g.close()
    g.set_pins(pin="999999", admin=ADMIN_PIN, reset=RESET_CODE)
    for _ in range(3):
        g.card_edit({"cardedit.prompt": ["verify", "quit"]})


# ---------------------------------------------------------------- the card in GnuPG


def test_card_status_shows_the_openpgp_card(stack):
    """gpg --card-status: an OpenPGP 3.4 card in 'Virtual PCD 00 00', RSA-2048 keys, PIN retry counter 3 3 3
    (the middle one is the resetting code's: the PIV PUK's tries)."""
    g = stack["gnupg"]
    status = g.card_status()
    assert g.field(status, "Reader") == pcsc.READER
    assert g.field(status, "Application type") == "OpenPGP"
    assert g.field(status, "Version") == "3.4"
    assert g.field(status, "Key attributes") == "rsa2048 rsa2048 rsa2048"
    assert g.field(status, "Max. PIN lengths") == "8 32 32"
    assert g.field(status, "PIN retry counter") == "3 3 3"
    assert g.field(status, "Signature key") == "[none]"


def test_card_status_shows_a_yubikey(stack):
    """
    The AID is a YubiKey 5's (tests/test_review_pgpids.py): gpg shows manufacturer "Yubico" (0006,
    scd/app-openpgp.c get_manufacturer) and the serial number as 8 decimal digits (BCD), the card's PIV serial
    reduced to 8 digits; "KDF setting: off" as for a YubiKey 5 (C0 says KDF, F9 says none).
    """
    g = stack["gnupg"]
    status = g.card_status()
    aid = openpgp.yubico_aid(pcsc.SERIAL).hex().upper()
    assert g.field(status, "Application ID") == aid and aid.startswith("D2760001240103040006")
    assert g.field(status, "Manufacturer") == "Yubico"
    serial = g.field(status, "Serial number")
    assert serial == aid[20:28] and serial.isdigit() and int(serial) == openpgp.yubikey_serial(pcsc.SERIAL)
    assert g.field(status, "KDF setting") == "off"


def _scd(g: GnuPG, *commands: str) -> tuple[list[str], bytes]:
    """gpg-connect-agent --hex: scdaemon's status lines and its data (Assuan %-escapes undone)."""
    out = subprocess.run(["gpg-connect-agent", "--hex", "SCD SERIALNO openpgp", *(f"SCD {c}" for c in commands),
                          "/bye"], env=g.env, capture_output=True, text=True, timeout=60).stdout
    assert out.rstrip().endswith("OK") and "ERR" not in out, out
    raw = bytes.fromhex("".join(re.findall(r"[0-9A-F]{2}", "".join(line[9:58] for line in out.splitlines()
                                                                   if line.startswith("D[")))))
    return ([line for line in out.splitlines() if line.startswith("S ")],
            re.sub(rb"%([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]), raw))


def _card_apdu(g: GnuPG, apdu_hex: str) -> tuple[bytes, int]:
    """An APDU sent through scdaemon (its APDU command): the response data and status word."""
    _, raw = _scd(g, f"APDU {apdu_hex}")
    return raw[:-2], int.from_bytes(raw[-2:], "big")


def test_scdaemon_reads_a_yubikey_5s_capabilities(stack):
    """
    scdaemon's EXTCAP (what it parsed from C0 and 7F74 at SELECT, scd/app-openpgp.c app_select_openpgp and
    do_getattr "EXTCAP") says key import, attributes changeable, a button (bt=1: 7F74 present) and KDF (kdf=1), as
    for a YubiKey 5; the raw answers through scdaemon are a YubiKey 5 NFC's (tests/test_review_pgpids.py).
    """
    g = stack["gnupg"]
    status, _ = _scd(g, "GETATTR EXTCAP")
    line = next(line for line in status if line.startswith("S EXTCAP "))
    extcap = dict(kv.split("=") for kv in line.split(" ", 2)[2].replace("+", " ").split())
    assert {k: extcap[k] for k in ("ki", "aac", "bt", "kdf", "mcl3")} == {"ki": "1", "aac": "1", "bt": "1",
                                                                         "kdf": "1", "mcl3": "2048"}
    assert _card_apdu(g, "00CA5F5200") == (bytes.fromhex("00730000e0059000"), 0x9000)
    assert _card_apdu(g, "00CA00C000") == (bytes.fromhex("7d000bfe080000ff0000"), 0x9000)
    assert _card_apdu(g, "00CA7F7400") == (bytes.fromhex("810120"), 0x9000)
    assert _card_apdu(g, "00CA00F900") == (bytes.fromhex("810100"), 0x9000)
    assert _card_apdu(g, "00CA00C100") == (bytes.fromhex("010800001100"), 0x9000)


def test_random_bytes_from_the_card(stack):
    """scdaemon's RANDOM (GET CHALLENGE on the card) returns the bytes asked for, different each time."""
    g = stack["gnupg"]

    def random16() -> bytes:
        out = subprocess.run(["gpg-connect-agent", "--hex", "SCD SERIALNO openpgp", "SCD RANDOM 16", "/bye"],
                             env=g.env, capture_output=True, text=True, timeout=60).stdout
        assert out.rstrip().endswith("OK"), out
        # --hex: "D[offset]  " then up to 16 bytes as hex (the Assuan data line, still %-escaped), then ASCII
        raw = bytes.fromhex("".join(re.findall(r"[0-9A-F]{2}", "".join(line[9:58] for line in out.splitlines()
                                                                       if line.startswith("D[")))))
        return re.sub(rb"%([0-9A-F]{2})", lambda m: bytes([int(m.group(1), 16)]), raw)

    first, second = random16(), random16()
    assert len(first) == len(second) == 16 and first != second


def test_card_edit_generates_keys_on_the_card(stack):
    """gpg --card-edit admin/generate (admin PIN, then the PIN): three keys on the card, fingerprints shown;
    'vsc card status' lists the keys and both applications."""
    g = stack["gnupg"]
    fingerprint = generate_card_keys(g)
    status = g.card_status()
    assert g.field(status, "Signature key").replace(" ", "") == fingerprint
    for name in ("Encryption key", "Authentication key"):
        assert re.fullmatch(r"[0-9A-F ]{50}", g.field(status, name))
    assert "admin" in g.pinentry_log.read_text().split()
    secret = g.gpg("--list-secret-keys", EMAIL).stdout
    assert "sec>" in secret and secret.count("ssb>") == 2  # stubs: the private keys are on the card
    card_status = stack["cards"].card(stack["home"], "status").json()
    assert {"pgp-sig", "pgp-dec", "pgp-aut"} <= set(card_status["slots"])
    assert card_status["applications"] == ["piv", "openpgp"]  # enrolled without --applications: both


def test_openpgp_keys_serve_through_gnupg_only(stack):
    """The local API's SignDigest with slot pgp-sig is refused with one line (no PW1, no counter there; the CLI
    offers PIV slots only); the card daemon's own ssh-agent offers the PIV keys but none of the OpenPGP keys."""
    cards, home = stack["cards"], stack["home"]
    code = ("import sys\nfrom vsc.card import client\nfrom vsc.wire import control\n"
            "try:\n    client.call(sys.argv[1], control.SIGN_DIGEST, slot='pgp-sig', digest=bytes(32))\n"
            "except client.Refused as e:\n    print(e)\nelse:\n    print('SIGNED')\n")
    refused = subprocess.run([sys.executable, "-c", code, str(home)], env=cards.env(), capture_output=True, text=True,
                             timeout=60)
    assert "OpenPGP application" in refused.stdout and "SIGNED" not in refused.stdout, refused.stdout + refused.stderr
    sock = cards.card(home, "ssh-agent-env").json()["SSH_AUTH_SOCK"]
    listed = subprocess.run(["ssh-add", "-L"], env=dict(os.environ, SSH_AUTH_SOCK=sock), capture_output=True,
                            text=True, timeout=60)
    comments = [line.split()[-1] for line in listed.stdout.splitlines()]
    assert comments and not any("pgp-" in c for c in comments), listed.stdout


def test_sign_and_verify(stack):
    """gpg --sign (a signed file) and gpg --detach-sign with the card's signature key (one PIN per signature),
    gpg --verify: Good signature, the signed file's content intact; the signature counter goes up by two."""
    g, tmp = stack["gnupg"], stack["tmp"]
    before = int(g.field(g.card_status(), "Signature counter"))
    asked = g.pinentry_log.read_text().split().count("pin")
    msg = tmp / "inline.txt"
    msg.write_text("signed inline by the card\n")
    g.gpg("--yes", "-u", EMAIL, "--output", f"{msg}.gpg", "--sign", str(msg))
    verified = g.gpg("--output", "-", "--decrypt", f"{msg}.gpg")
    assert verified.stdout == msg.read_text() and f'Good signature from "{NAME} <{EMAIL}>"' in verified.stderr
    assert f'Good signature from "{NAME} <{EMAIL}>"' in g.gpg("--verify", f"{msg}.gpg").stderr
    _sign_and_verify(stack, "first")
    assert int(g.field(g.card_status(), "Signature counter")) == before + 2
    assert g.pinentry_log.read_text().split().count("pin") == asked + 2  # "Signature PIN: forced"


def test_encrypt_and_decrypt_through_the_card(stack):
    """gpg --encrypt to the card's key, gpg --decrypt through the card (PSO:DECIPHER, RSA-2048)."""
    _encrypt_and_decrypt(stack, "first")


def _sshd(tmp: Path, authorized: str):
    """A private sshd on a free loopback port accepting ``authorized`` for this user; (process, port)."""
    host_key = tmp / "ssh_host_ed25519_key"
    if not host_key.exists():
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(host_key)], check=True, timeout=30)
    keys = tmp / "authorized_keys"
    keys.write_text(authorized)
    keys.chmod(0o600)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp / "sshd_config"
    config.write_text(f"Port {port}\nListenAddress 127.0.0.1\nHostKey {host_key}\nAuthorizedKeysFile {keys}\n"
                      "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                      f"PidFile {tmp / 'sshd.pid'}\nPermitRootLogin prohibit-password\n")
    Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
    proc = subprocess.Popen([str(SSHD), "-D", "-e", "-f", str(config)], stdin=subprocess.DEVNULL,
                            stdout=open(tmp / "sshd.log", "ab"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 20
    while not pcsc._port_open(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise AssertionError(f"sshd did not start:\n{(tmp / 'sshd.log').read_text()}")
        time.sleep(0.05)
    return proc, port


def test_an_aid_changed_under_its_keys_orphans_gnupgs_stubs(stack):
    """
    Why a card holding keys keeps its AID: GnuPG's stub of each card key (private-keys-v1.d) names the card by its
    full AID, and gpg-agent signs only on a card answering that AID (agent/divert-scd.c ask_for_card: strcmp, else
    "Please remove the current card and insert the one with serial number ..."); gpg --card-status does not
    rewrite an existing stub (agent/learncard.c: skipped unless --force). Here the stubs are made to name the
    same card as it was with manufacturer FF56 - what the holder of a card from before would have had, had its
    AID become the Yubico one: signing fails with "Card not present" although the card is in the reader and the
    PIN is given. ``learn --force`` (the repair) writes the stubs for the AID the card answers, and signing works
    again.
    """
    g, tmp = stack["gnupg"], stack["tmp"]
    aid = g.field(g.card_status(), "Application ID").encode()
    before = aid[:16] + b"FF56" + aid[20:]
    stubs = {p: p.read_bytes() for p in (g.home / "private-keys-v1.d").glob("*.key") if aid in p.read_bytes()}
    assert len(stubs) == 3  # signature, decryption, authentication
    msg = tmp / "orphaned.txt"
    msg.write_text("which card?\n")
    sign = ("--pinentry-mode", "loopback", "--passphrase", PIN, "--yes", "-u", EMAIL, "--output", f"{msg}.sig",
            "--detach-sign", str(msg))
    try:
        g.gpg(*sign)  # the PIN through loopback works with the right stubs (loopback asks no card confirmation)
        for path, raw in stubs.items():
            path.write_bytes(raw.replace(aid, before))
        g.close()
        failed = g.gpg(*sign, check=False)
        # the card is in the reader, but not the card the stubs name (gpg-agent asks scdaemon for that serial)
        assert failed.returncode != 0 and "signing failed: Card not present" in failed.stderr, failed.stderr
        out = subprocess.run(["gpg-connect-agent", "SCD SERIALNO openpgp", "LEARN --force", "/bye"], env=g.env,
                             capture_output=True, text=True, timeout=60).stdout
        assert out.rstrip().endswith("OK"), out
        g.gpg(*sign)
        assert f'<{EMAIL}>' in g.gpg("--verify", f"{msg}.sig", str(msg)).stderr
    finally:
        for path, raw in stubs.items():
            path.write_bytes(raw)
        g.close()


def _ssh_login(stack, key_type: str) -> None:
    """ssh-add -L through gpg-agent lists one card key of ``key_type``; ssh logs in with it to a private sshd."""
    if not SSHD.exists():
        missing("sshd is not installed (apt-get install openssh-server)")
    if os.geteuid() != 0 and not os.access("/run/sshd", os.W_OK):
        missing("a private sshd needs /run/sshd")
    g, tmp = stack["gnupg"], stack["tmp"]
    env = dict(g.env, SSH_AUTH_SOCK=g.ssh_socket())
    subprocess.run(["gpg-connect-agent", "/bye"], env=g.env, capture_output=True, timeout=30)
    listed = subprocess.run(["ssh-add", "-L"], env=env, capture_output=True, text=True, timeout=60)
    card_keys = [line for line in listed.stdout.splitlines() if "cardno:" in line]
    assert len(card_keys) == 1 and card_keys[0].startswith(key_type + " "), listed.stdout + listed.stderr
    proc, port = _sshd(tmp, card_keys[0] + "\n")
    try:
        user = subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()
        login = subprocess.run(["ssh", "-p", str(port), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                                "-o", f"UserKnownHostsFile={tmp / 'known_hosts'}", "-o", "IdentityFile=none",
                                "-o", "PreferredAuthentications=publickey", f"{user}@127.0.0.1",
                                "echo logged-in-with-the-card"],
                               env=env, capture_output=True, text=True, timeout=TIMEOUT, stdin=subprocess.DEVNULL)
        assert login.stdout.strip() == "logged-in-with-the-card", login.stderr
    finally:
        proc.terminate()
        proc.wait(10)


def test_ssh_through_gpg_agent(stack):
    """ssh-add -L (gpg-agent's ssh support) lists the card's authentication key; ssh logs in with it to an sshd."""
    _ssh_login(stack, "ssh-rsa")


def test_wrong_pin_blocks_and_the_puk_unblocks(stack):
    """
    Three wrong PINs (card-edit verify) block PW1 — and the PIV PIN, which is the same PIN (VERIFY through
    OpenSC answers 6983); signing fails; 'unblock' with the resetting code, which on this card is the PIV PUK,
    sets the PIN again and signing works. The admin can neither set a reset code of its own nor unblock with
    the admin PIN (6985): only the PUK resets the PIV PIN.
    """
    g = stack["gnupg"]
    assert g.field(g.card_status(), "PIN retry counter") == "3 3 3"
    out = g.card_edit({"cardedit.prompt": ["admin", "passwd", "quit"], "cardutil.change_pin.menu": ["4", "q"]})
    assert "[GNUPG:] SC_OP_FAILURE" in out, out  # PUT DATA D3 answered 6985: no reset code of its own
    g.close()
    _three_wrong_pins(g)
    assert g.field(g.card_status(), "PIN retry counter") == "0 3 3"
    g.close()  # gpg-agent and its scdaemon hold the reader exclusively; the next gpg starts them again
    assert pcsc._apdus(pcsc._verify_apdu(None)) == ["6983"]  # the PIV application: the same, blocked PIN
    msg = stack["tmp"] / "blocked.txt"
    msg.write_text("no\n")
    g.set_pins(pin=PIN, admin=ADMIN_PIN, reset=pcsc.PUK)
    assert g.gpg("--yes", "-u", EMAIL, "--detach-sign", str(msg), check=False).returncode != 0
    g.card_edit({"cardedit.prompt": ["unblock", "quit"]})
    assert g.field(g.card_status(), "PIN retry counter") == "3 3 3"
    _sign_and_verify(stack, "unblocked")


def test_everything_holds_after_remove_and_insert(stack):
    """
    After 'vsc card remove' and a new insert (everything from the server): the same fingerprints, signature
    counter and retry counters; three wrong PINs leave PW1 blocked across another remove and insert; the reset
    code (the PUK) unblocks it; signing, decryption and the ssh key all still work.
    """
    g, cards, home = stack["gnupg"], stack["cards"], stack["home"]

    def reinsert():
        cards.card(home, "remove")
        assert stack["daemon"].wait_exit() == 0
        pcsc._wait_card(False)
        stack["daemon"] = stack["start_card"]()
        g.wait_for_card()  # scdaemon sees the new card on its own ticker, after pcscd

    before = g.card_status()
    reinsert()
    after = g.card_status()
    for name in ("Signature key", "Encryption key", "Authentication key", "Signature counter", "PIN retry counter",
                 "Application ID"):
        assert g.field(after, name) == g.field(before, name)
    _sign_and_verify(stack, "after-insert")
    _encrypt_and_decrypt(stack, "after-insert")
    _three_wrong_pins(g)
    reinsert()
    assert g.field(g.card_status(), "PIN retry counter") == "0 3 3"
    g.set_pins(pin=PIN, admin=ADMIN_PIN, reset=pcsc.PUK)
    g.card_edit({"cardedit.prompt": ["unblock", "quit"]})
    _sign_and_verify(stack, "after-unblock")
    listed = subprocess.run(["ssh-add", "-L"], env=dict(g.env, SSH_AUTH_SOCK=g.ssh_socket()), capture_output=True,
                            text=True, timeout=60)
    assert "cardno:" in listed.stdout


def test_keytocard_imports_an_rsa_key(stack):
    """A software RSA-2048 key made by gpg goes to the card with 'keytocard' (PUT DATA with the extended header
    list, admin PIN); gpg then signs with the card (the local key is a stub) and the signature verifies."""
    g, tmp = stack["gnupg"], stack["tmp"]
    g.gpg("--passphrase", "", "--pinentry-mode", "loopback", "--quick-gen-key", "Soft Key <soft@example.org>",
          "rsa2048", "sign", "0")
    colons = g.gpg("--with-colons", "--list-keys", "soft@example.org").stdout
    fingerprint = next(line.split(":")[9] for line in colons.splitlines() if line.startswith("fpr:"))
    g.command({"keyedit.prompt": ["keytocard", "save"], "keyedit.keytocard.use_primary": ["y"],
               "cardedit.genkeys.storekeytype": ["1"], "cardedit.genkeys.replace_key": ["y"]},
              "--edit-key", fingerprint)
    assert g.field(g.card_status(), "Signature key").replace(" ", "") == fingerprint
    assert "sec>" in g.gpg("--list-secret-keys", "soft@example.org").stdout  # the private key is on the card now
    msg = tmp / "imported.txt"
    msg.write_text("signed with an imported key\n")
    g.gpg("--yes", "-u", "soft@example.org", "--output", f"{msg}.sig", "--detach-sign", str(msg))
    assert 'Good signature from "Soft Key <soft@example.org>"' in g.gpg("--verify", f"{msg}.sig", str(msg)).stderr


def test_nist_p256_keys(stack):
    """key-attr ECC NIST P-256 for all three keys (--expert), generated on the card: ECDSA signature verifies,
    ECDH decryption through the card, ssh logs in with the ecdsa-sha2-nistp256 key gpg-agent offers."""
    g = stack["gnupg"]
    set_card_key_attributes(g, "nistp256")
    assert g.field(g.card_status(), "Key attributes") == "nistp256 nistp256 nistp256"
    fingerprint = generate_card_keys(g, "EC Holder", "ec@example.org")
    assert g.field(g.card_status(), "Signature key").replace(" ", "") == fingerprint
    g_tmp = stack["tmp"]
    msg = g_tmp / "ec.txt"
    msg.write_text("P-256 on the card\n")
    g.gpg("--yes", "-u", "ec@example.org", "--output", f"{msg}.sig", "--detach-sign", str(msg))
    assert 'Good signature from "EC Holder <ec@example.org>"' in g.gpg("--verify", f"{msg}.sig", str(msg)).stderr
    g.gpg("--yes", "--trust-model", "always", "-r", "ec@example.org", "--output", f"{msg}.gpg", "--encrypt", str(msg))
    out = g.gpg("--output", "-", "--decrypt", f"{msg}.gpg")
    assert out.stdout == msg.read_text() and "256-bit ECDH key" in out.stderr
    _ssh_login(stack, "ecdsa-sha2-nistp256")


def test_curve25519_keys(stack):
    """key-attr ECC Curve 25519 (ed25519 / cv25519 / ed25519), generated on the card: the EdDSA signature
    verifies, Cv25519 decryption goes through the card, ssh logs in with the ssh-ed25519 key gpg-agent offers."""
    g, tmp = stack["gnupg"], stack["tmp"]
    set_card_key_attributes(g, "cv25519")
    assert g.field(g.card_status(), "Key attributes") == "ed25519 cv25519 ed25519"
    fingerprint = generate_card_keys(g, "Ed Holder", "ed@example.org")
    assert g.field(g.card_status(), "Signature key").replace(" ", "") == fingerprint
    msg = tmp / "ed.txt"
    msg.write_text("Curve25519 on the card\n")
    g.gpg("--yes", "-u", "ed@example.org", "--output", f"{msg}.sig", "--detach-sign", str(msg))
    assert 'Good signature from "Ed Holder <ed@example.org>"' in g.gpg("--verify", f"{msg}.sig", str(msg)).stderr
    g.gpg("--yes", "--trust-model", "always", "-r", "ed@example.org", "--output", f"{msg}.gpg", "--encrypt", str(msg))
    out = g.gpg("--output", "-", "--decrypt", f"{msg}.gpg")
    assert out.stdout == msg.read_text() and "ECDH key" in out.stderr
    _ssh_login(stack, "ssh-ed25519")


def test_key_attr_back_to_rsa(stack):
    """
    gpg --card-edit key-attr from ECC back to RSA 2048: scdaemon's change_rsa_keyattr writes C1-C3 as
    01 08 00 00 20 00 (e length 32, scd/app-openpgp.c); the card takes it (as it must, or GnuPG could not
    return to RSA) and answers the YubiKey's 01 08 00 00 11 00 afterwards.
    """
    g = stack["gnupg"]
    g.card_edit({"cardedit.prompt": ["admin", "key-attr", "quit"], "cardedit.genkeys.algo": ["1"] * 3,
                 "cardedit.genkeys.size": ["2048"] * 3}, "--expert")
    assert g.field(g.card_status(), "Key attributes") == "rsa2048 rsa2048 rsa2048"
    for tag in ("C1", "C2", "C3"):
        assert _card_apdu(g, f"00CA00{tag}00") == (bytes.fromhex("010800001100"), 0x9000)


def test_factory_reset(stack):
    """gpg --card-edit admin/factory-reset (PW3 blocked by gpg, TERMINATE DF, ACTIVATE FILE): no keys and the
    default admin PIN afterwards, while the user PIN — the PIV PIN too — and the PUK are untouched; new keys can
    be generated and sign."""
    g = stack["gnupg"]
    g.close()
    g.card_edit({"cardedit.prompt": ["admin", "factory-reset", "quit"], "cardedit.factory-reset.proceed": ["y"],
                 "cardedit.factory-reset.really": ["yes"]})
    g.close()
    status = g.card_status()
    for name in ("Signature key", "Encryption key", "Authentication key"):
        assert g.field(status, name) == "[none]"
    assert g.field(status, "PIN retry counter") == "3 3 3"
    assert g.field(status, "Key attributes") == "rsa2048 rsa2048 rsa2048"
    g.close()
    assert pcsc._apdus(pcsc._verify_apdu(PIN)) == ["9000"]  # the PIV PIN is still the enrolled one
    fingerprint = generate_card_keys(g, "Reset Holder", "reset@example.org")
    msg = stack["tmp"] / "after-reset.txt"
    msg.write_text("after the factory reset\n")
    g.gpg("--yes", "-u", fingerprint, "--output", f"{msg}.sig", "--detach-sign", str(msg))
    assert 'Good signature from "Reset Holder <reset@example.org>"' in g.gpg("--verify", f"{msg}.sig", str(msg)).stderr
