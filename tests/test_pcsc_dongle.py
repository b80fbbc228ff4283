"""
A dongle card (claim 10: the protected information on a PKCS#11 token;
SoftHSM2 stands in for the dongle) is a full PIV card to smart-card
software: enrolled by ``vsc dongle enroll`` with its PIN/PUK from files and
the default PIN policy, inserted with ``--pcsc`` into the real pcscd +
vsmartcard-vpcd reader, it shows its certificates and keys to OpenSC,
signs through ``pkcs11-tool --sign --id 02`` (verified with openssl), logs
in to a local sshd with ``ssh -I opensc-pkcs11.so``, and ``vsc card cert``
prints its certificates.

Shares the machine-wide PC/SC lock and helpers of tests/test_pcsc.py, and
the SoftHSM2 lab of tests/test_dongle.py. Skips locally when pcscd, vpcd,
OpenSC, SoftHSM2 or sshd are missing; fails under VSC_REQUIRE_INTEGRATION=1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from tests import test_dongle as td
from tests import test_pcsc as tp
from tests.integration import missing, need_program

pytestmark = pytest.mark.integration

SERIAL = "dg-pcsc-1"
PIN = "314159"
PUK = "27182818"


class PcscCard(td.Card):
    """The dongle card daemon with ``--pcsc``: in the vpcd reader while inserted."""

    def spawn(self, lock_dir=None) -> "PcscCard":
        env = self.lab.env(self.hsm)
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(  # inside the PC/SC stack's private network namespace, where vpcd listens
                tp._in_netns(tp.current_netns(), [
                    str(td.TWISTD), "-n", "--pidfile=", "vsc-card", "--home", str(self.home),
                    "--password-file", str(self.password_file), "--token-pin-file", str(self.pin_file),
                    "--pcsc", tp.VPCD_ENDPOINT]),
                cwd=self.lab.root, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.lab.cards.append(self)
        return self


@pytest.fixture(scope="module")
def dongle(tmp_path_factory):
    """pcscd + a SoftHSM2 token holding an enrolled card (PIN/PUK from files), inserted with --pcsc."""
    tp._prerequisites()
    need_program("softhsm2-util")
    if not td.MODULE.exists():
        missing(f"the SoftHSM2 PKCS#11 module {td.MODULE} is not installed (apt-get install softhsm2)")
    try:
        import pkcs11  # noqa: F401
    except ImportError:
        missing("python-pkcs11 is not installed (pip install -e '.[dongle]')")
    root = tmp_path_factory.mktemp("pcsc-dongle")
    runtime = Path(tempfile.mkdtemp(prefix="vscpd-", dir="/tmp"))
    lab = td.Lab(root, runtime)
    with tp._machine_lock(), tp._reserve_vpcd_ports():
        pcscd = tp.Pcscd(root / "pcscd.log")
        pcscd.start()
        try:
            if tp._readers().get(tp.READER):
                missing(f"another card is already in {tp.READER}; remove it first")
            lab.hsm.init_token("dongle1")
            table = lab.provision("dongle1", SERIAL)
            pin_file, puk_file = root / "piv-pin", root / "piv-puk"
            pin_file.write_text(PIN + "\n")
            puk_file.write_text(PUK + "\n")
            home = root / "home"
            out = lab.vsc("dongle", "enroll", "--home", str(home), "--token", lab.hsm.uri("dongle1"),
                          "--token-pin-file", str(lab.pin_file), "--table", str(table), "--password-file",
                          str(lab.password_file), "--scrypt-log2n", "12", "--poll", "30",
                          "--pin-file", str(pin_file), "--puk-file", str(puk_file)).stdout
            card = PcscCard(lab, home, lab.hsm, lab.password_file, lab.pin_file, "card").start()
            tp._wait_card(True)
            yield dict(lab=lab, home=home, card=card, tmp=root, enrolled=out, pin_file=pin_file)
        finally:
            for c in lab.cards:
                c.stop()
            pcscd.stop()
            shutil.rmtree(runtime, ignore_errors=True)


def test_enrolment_says_what_it_made(dongle):
    """vsc dongle enroll reports the four keys with certificates and the PIN policy (no silent default PIN)."""
    out = dongle["enrolled"]
    assert "each with a self-signed certificate" in out and "PIN policy 9a=once,9c=always,9d=once,9e=never" in out
    assert "default PIN" not in out


def test_opensc_sees_certificates_and_a_card_label(dongle):
    """pkcs11-tool: the token is labelled from the card (not PIV_II); four certificates CN=<serial> <slot>; after login four private keys."""
    listing = tp._pkcs11("-L").stdout
    assert "PIV_II" not in listing, listing
    objects = tp._pkcs11("-O").stdout
    for slot in ("9a", "9c", "9d", "9e"):
        assert f"CN={SERIAL} {slot}" in objects
    logged = tp._pkcs11("-O", "--login", "--pin", PIN).stdout
    assert len(re.findall(r"Private Key Object", logged)) == 4


def test_pkcs11_tool_signs_with_9c_and_openssl_verifies(dongle):
    """pkcs11-tool --sign --id 02 (9C, policy always: OpenSC logs in for the key) gives a signature openssl verifies."""
    data = dongle["tmp"] / "data.txt"
    data.write_bytes(b"signed by a card on a token, through PC/SC\n")
    sig = dongle["tmp"] / "sig.02"
    tp._pkcs11("--login", "--pin", PIN, "--sign", "--id", "02", "-m", "ECDSA-SHA256", "--signature-format", "openssl",
               "-i", str(data), "-o", str(sig))
    pub = tp._cert_public_pem(dongle, "02")
    assert "Verified OK" in tp._run(["openssl", "dgst", "-sha256", "-verify", pub, "-signature", sig, data]).stdout


def test_vsc_card_cert_prints_the_certificate(dongle):
    """vsc card cert --slot 9a prints the slot's certificate (the dongle card has them since enrolment)."""
    lab = dongle["lab"]
    out = lab.vsc("card", "--home", str(dongle["home"]), "cert", "--slot", "9a", "--json").stdout
    cert = json.loads(out)
    assert cert["subject"] == f"CN={SERIAL} 9a" and "BEGIN CERTIFICATE" in cert["pem"]


def test_ssh_with_opensc_pkcs11_logs_in(dongle):
    """ssh -I opensc-pkcs11.so (the PIN through SSH_ASKPASS) logs in to a local sshd with the card's 9A key."""
    from tests.sshd import Sshd

    lab, tmp = dongle["lab"], dongle["tmp"]
    keys = json.loads(lab.vsc("card", "--home", str(dongle["home"]), "ssh-pubkey", "--slot", "9a", "--json").stdout)
    line = keys["keys"][0]["line"]
    sshd = Sshd(tmp / "sshd", [line])
    try:
        askpass = tmp / "askpass"
        askpass.write_text(f"#!/bin/sh\necho {PIN}\n")
        askpass.chmod(0o700)
        env = dict(os.environ, SSH_ASKPASS=str(askpass), SSH_ASKPASS_REQUIRE="force", DISPLAY=":0")
        env.pop("SSH_AUTH_SOCK", None)
        # (not IdentitiesOnly: ssh then drops PKCS#11 keys that no IdentityFile names)
        result = sshd.login(env, "-v", "-I", tp.PKCS11, batch=False)
        (tmp / "ssh-I.stderr").write_text(result.stderr)
        assert result.returncode == 0 and "vsc-login-ok" in result.stdout, (result.stderr, sshd.log.read_text())
    finally:
        sshd.stop()
