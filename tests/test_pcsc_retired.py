"""
The retired key slots 82-95 (and attestation) in the real PC/SC stack of
tests/test_pcsc.py — pcscd + vpcd + a real server and card daemon in a
private network namespace — driven by yubico-piv-tool, openssl and the
card's own CLI, as a YubiKey 5 would be. Reuses test_pcsc's ``stack``
fixture (one card of its own for this module); runs with
VSC_REQUIRE_INTEGRATION=1 like test_pcsc.
"""

from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest

from tests.integration import missing
from tests.test_pcsc import EXTENDED_CLIENT, PIN, READER, SERIAL, _run, stack  # noqa: F401  (the fixture)

pytestmark = pytest.mark.integration


def _ypt(*args) -> str:
    return _run(["yubico-piv-tool", "-r", READER, *args]).stdout


def _ca(tmp: Path) -> tuple[Path, Path]:
    ca_key, ca = tmp / "retired-ca.key", tmp / "retired-ca.pem"
    if not ca.exists():
        _run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
              "-keyout", ca_key, "-out", ca, "-subj", "/CN=vsc retired CA", "-days", "2"])
    return ca_key, ca


def _certify(stack, slot: str, subject: str) -> Path:
    """A certificate for ``slot``'s key: vsc card cert --csr (the card signs), a test CA, yubico-piv-tool import."""
    cards, home, tmp = stack["cards"], stack["home"], stack["tmp"]
    req = tmp / f"req{slot}.csr"
    cards.card(home, "cert", "--slot", slot, "--csr", "--subject", subject, "--out", str(req))
    ca_key, ca = _ca(tmp)
    cert = tmp / f"cert{slot}.pem"
    _run(["openssl", "x509", "-req", "-in", req, "-CA", ca, "-CAkey", ca_key, "-set_serial", "0x" + slot, "-days", "2",
          "-out", cert])
    _ypt("-a", "import-certificate", "-s", slot, "-i", cert)
    return cert


def test_generate_certify_and_sign_in_retired_slot_82(stack):
    """
    yubico-piv-tool -a generate -s 82 (ECCP256, behind the default management key) answers the new public key;
    the card signs a CSR for it (vsc card cert --csr --slot 82: the local API takes the retired slot), a CA
    certifies it, yubico-piv-tool imports the certificate into 5FC10D; -a status lists "Slot 82" with it;
    -a test-signature -s 82 (sign with the key after VERIFY, verify with the certificate) passes; -a read-cert
    gives the certificate back; vsc card status lists the key and its slot; the card's ssh-agent offers it (after
    9a..9e).
    """
    cards, home, tmp = stack["cards"], stack["home"], stack["tmp"]
    pub = tmp / "gen82.pem"
    _ypt("-a", "generate", "-s", "82", "-A", "ECCP256", "-o", pub)
    cert = _certify(stack, "82", "/CN=retired 82/O=vsc tests")
    cert_pub = _run(["openssl", "x509", "-in", cert, "-pubkey", "-noout"]).stdout
    assert cert_pub.split() == pub.read_text().split()
    status = _ypt("-a", "status")
    assert "Slot 82:" in status and "Subject DN:\tCN=retired 82, O=vsc tests" in status, status
    out = _run(["yubico-piv-tool", "-r", READER, "-a", "verify-pin", "-P", PIN, "-a", "test-signature", "-s", "82",
                "-i", cert])  # the certificate to verify with (the tool reads it from -i, default stdin)
    assert "Successful" in out.stdout + out.stderr, out.stdout + out.stderr
    back = _ypt("-a", "read-certificate", "-s", "82")
    assert back.split() == cert.read_text().split()
    st = cards.card(home, "status").json()
    assert st["slots"]["82"]["algorithm"] == "p256"
    keys = cards.card(home, "ssh-pubkey").json()["keys"]
    assert [k["slot"] for k in keys] == ["9a", "9c", "9d", "9e", "82"]


def _pcsc(*apdus: bytes) -> list[tuple[bytes, str]]:
    """APDUs through pcscd (pyscard in the system python3, as test_pcsc does): (body, SW) of each, after SELECT."""
    from vsc.protocol import piv
    from vsc.wire import apdu

    if subprocess.run(["/usr/bin/python3", "-c", "import smartcard"], capture_output=True).returncode:
        missing("the system python3 has no pyscard (apt-get install python3-pyscard)")
    argv = ["/usr/bin/python3", "-c", EXTENDED_CLIENT, READER, apdu.command(0, 0xA4, 0x04, 0x00, piv.PIV_AID).hex(),
            *(a.hex() for a in apdus)]
    out = _run(argv).stdout.split()[1:]
    return [(bytes.fromhex(r[:-4]), r[-4:].upper()) for r in out]


def _verify() -> bytes:
    from vsc.wire import apdu

    return apdu.command(0, 0x20, 0x00, 0x80, apdu.pad_pin(PIN.encode()))


def _general_authenticate(alg: int, slot: int, challenge: bytes) -> bytes:
    from vsc.wire import apdu, tlv

    return apdu.command(0, 0x87, alg, slot, tlv.encode(0x7C, tlv.encode_many([(0x82, b""), (0x81, challenge)])),
                        65536, extended=True)


def _signature(body: bytes) -> bytes:
    from vsc.wire import tlv

    return tlv.to_dict(tlv.decode_one(body, 0x7C))[0x82]


def test_signature_with_slot_82_verifies_with_openssl(stack):
    """
    Over PC/SC (pcscd + vpcd, as any application), VERIFY then GENERAL AUTHENTICATE ``00 87 11 82`` with a SHA-256
    hash (what yubico-piv-tool's sign and yubikit's PivSession.sign send; Debian's yubico-piv-tool 2.2 has no
    sign action, and OpenSC lists no retired key without a key history object, as with a YubiKey): the ECDSA
    signature verifies with openssl under the certificate imported into 5FC10D.
    """
    tmp = stack["tmp"]
    data, sig = tmp / "retired-data.txt", tmp / "retired-82.sig"
    data.write_bytes(b"signed by a retired key\n")
    (_v, sw1), (body, sw2) = _pcsc(_verify(), _general_authenticate(0x11, 0x82, hashlib.sha256(data.read_bytes())
                                                                     .digest()))
    assert (sw1, sw2) == ("9000", "9000")
    sig.write_bytes(_signature(body))
    pem = tmp / "pub82-cert.pem"
    pem.write_text(_run(["openssl", "x509", "-in", tmp / "cert82.pem", "-pubkey", "-noout"]).stdout)
    assert "Verified OK" in _run(["openssl", "dgst", "-sha256", "-verify", pem, "-signature", sig, data]).stdout


def test_retired_slot_95_rsa_with_a_pin_policy(stack):
    """
    yubico-piv-tool -a generate -s 95 -A RSA2048 --pin-policy=always: the policy holds on every path — vsc card
    status shows 95=always, vsc card sign --slot 95 is refused without --pin-file and signs with it, and over
    PC/SC GENERAL AUTHENTICATE with 95 is 6982 before a VERIFY and after the one operation it allows (the same
    signature as the CLI's); a certificate (the CSR signed with the PIN)
    goes into 5FC120, -a status lists "Slot 95", and -a test-signature -s 95 (VERIFY right before) passes.
    """
    cards, home, tmp = stack["cards"], stack["home"], stack["tmp"]
    _ypt("-a", "generate", "-s", "95", "-A", "RSA2048", "--pin-policy=always", "-o", tmp / "gen95.pem")
    assert cards.card(home, "status").json()["pin_policy"] == "9a=once,9c=always,9d=once,9e=never,95=always"
    msg = tmp / "retired-95.txt"
    msg.write_bytes(b"slot 95\n")
    refused = cards.card(home, "sign", "--slot", "95", "--in", str(msg), "--out", str(tmp / "cli.95"),
                         json_out=False, check=False)
    assert refused.returncode != 0 and "slot 95 needs the PIN with every use" in refused.stderr
    cards.card(home, "sign", "--slot", "95", "--in", str(msg), "--out", str(tmp / "cli.95"), "--pin-file",
               str(tmp / "pin"))
    info = bytes.fromhex("3031300d060960864801650304020105000420") + hashlib.sha256(msg.read_bytes()).digest()
    block = b"\x00\x01" + b"\xff" * (256 - 3 - len(info)) + b"\x00" + info
    ga = _general_authenticate(0x07, 0x95, block)
    answers = _pcsc(ga, _verify(), ga, ga)
    assert [sw for _b, sw in answers] == ["6982", "9000", "9000", "6982"]  # always: one VERIFY, one operation
    assert _signature(answers[2][0]) == (tmp / "cli.95").read_bytes()  # PKCS#1 v1.5 is deterministic
    req = tmp / "req95.csr"
    cards.card(home, "cert", "--slot", "95", "--csr", "--subject", "/CN=retired 95", "--out", str(req),
               "--pin-file", str(tmp / "pin"))
    ca_key, ca = _ca(tmp)
    cert = tmp / "cert95.pem"
    _run(["openssl", "x509", "-req", "-in", req, "-CA", ca, "-CAkey", ca_key, "-set_serial", "149", "-days", "2",
          "-out", cert])
    _ypt("-a", "import-certificate", "-s", "95", "-i", cert)
    assert "Slot 95:" in _ypt("-a", "status")
    out = _run(["yubico-piv-tool", "-r", READER, "-a", "verify-pin", "-P", PIN, "-a", "test-signature", "-s", "95",
                "-i", cert])
    assert "Successful" in out.stdout + out.stderr, out.stdout + out.stderr
    pem = tmp / "pub95-cert.pem"
    pem.write_text(_run(["openssl", "x509", "-in", cert, "-pubkey", "-noout"]).stdout)
    assert "Verified OK" in _run(["openssl", "dgst", "-sha256", "-verify", pem, "-signature", tmp / "cli.95",
                                  msg]).stdout


# ---------------------------------------------------------------- attestation (YubiKey INS F9)


def test_yubico_piv_tool_attests_a_generated_key(stack):
    """
    yubico-piv-tool -a attest -s 9a (ATTEST, YubiKey INS F9) prints a certificate that openssl verifies under the
    F9 certificate read back with -a read-certificate -s f9 (object 5FFF01: the card's own attestation key, made
    on this first attestation and synced); its public key is slot 9a's, its subject "YubiKey PIV Attestation 9a",
    and it carries Yubico's extensions (firmware 5.4.3, the serial yubico-piv-tool reports, PIN policy once and
    touch never, form factor). The retired key generated in 82 is attested as well, under the same F9 key, which
    vsc card status lists.
    """
    cards, home, tmp = stack["cards"], stack["home"], stack["tmp"]
    att, f9 = tmp / "attest9a.pem", tmp / "f9.pem"
    att.write_text(_ypt("-a", "attest", "-s", "9a"))
    f9.write_text(_ypt("-a", "read-certificate", "-s", "f9"))
    verified = _run(["openssl", "verify", "-CAfile", f9, att])
    assert verified.stdout.strip() == f"{att}: OK", verified.stdout + verified.stderr
    att_pub = _run(["openssl", "x509", "-in", att, "-pubkey", "-noout"]).stdout
    slot_pub = cards.card(home, "public-key", "--slot", "9a", json_out=False).stdout
    assert att_pub.split() == slot_pub.split()
    from cryptography import x509

    cert = x509.load_pem_x509_certificate(att.read_bytes())
    assert cert.subject.rfc4514_string() == "CN=YubiKey PIV Attestation 9a"
    assert cert.issuer.rfc4514_string() == f"CN=vsc PIV Attestation {SERIAL}"
    exts = {e.oid.dotted_string: e.value.value for e in cert.extensions}
    status = _ypt("-a", "status")
    serial = int(re.search(r"Serial Number:\s*(\d+)", status).group(1))
    n = serial.to_bytes(serial.bit_length() // 8 + 1, "big")
    assert exts == {"1.3.6.1.4.1.41482.3.3": b"\x05\x04\x03", "1.3.6.1.4.1.41482.3.7": b"\x02" + bytes([len(n)]) + n,
                    "1.3.6.1.4.1.41482.3.8": b"\x02\x01", "1.3.6.1.4.1.41482.3.9": b"\x00"}
    assert cards.card(home, "status").json()["slots"]["f9"]["algorithm"] == "rsa2048"
    att82 = tmp / "attest82.pem"
    att82.write_text(_ypt("-a", "attest", "-s", "82"))
    assert _run(["openssl", "verify", "-CAfile", f9, att82]).stdout.strip() == f"{att82}: OK"


def test_attestation_refused_for_an_imported_key_and_an_empty_slot(stack):
    """
    yubico-piv-tool -a import-key -s 83 (a key made by openssl) succeeds; -a attest -s 83 then fails (the card
    answers 6A80: only keys generated on the card are attested, as on a YubiKey), and so does -a attest -s 84
    (no key).
    """
    tmp = stack["tmp"]
    key = tmp / "imported83.pem"
    _run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key])
    _ypt("-a", "import-key", "-s", "83", "-i", key)
    for slot in ("83", "84"):
        out = _run(["yubico-piv-tool", "-r", READER, "-a", "attest", "-s", slot], check=False)
        assert out.returncode != 0 and "BEGIN CERTIFICATE" not in out.stdout, (slot, out.stdout, out.stderr)
