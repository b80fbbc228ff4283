"""
ECC P-384 (PIV algorithm 14) on the card in the real PC/SC stack, proved
with the stock tools: yubico-piv-tool generates P-384 keys (``-A
ECCP384``) and self-signs certificates with them (its SHA-256 and SHA-384
hashes reach the card as 32 and 48 bytes), OpenSC's pkcs11-tool signs with
``--mechanism ECDSA`` and the hashing mechanisms, openssl verifies every
signature under the generated public key, ECDH and GET METADATA go through
pcscd + vpcd as raw APDUs (pyscard), and ssh logs in with a P-384 key
through the card's ssh-agent (ecdsa-sha2-nistp384).

The stack (pcscd + vpcd in a private network namespace, a real server, a
card enrolled and inserted with --pcsc) and the sshd are tests/test_pcsc.py's
fixtures, one card for this module; the tests run in file order.
"""

from __future__ import annotations

import hashlib
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from tests.integration import missing
from tests.test_pcsc import (  # noqa: F401  (stack, sshd: the fixtures, used by name)
    PIN,
    READER,
    _agent_env,
    _pkcs11,
    _run,
    _ssh_line,
    sshd,
    stack,
)

pytestmark = pytest.mark.integration

PYSCARD_CLIENT = r"""
import sys
from smartcard.CardConnection import CardConnection
from smartcard.System import readers
reader = [r for r in readers() if str(r).startswith(sys.argv[1])][0]
conn = reader.createConnection()
conn.connect(CardConnection.T1_protocol)
for a in sys.argv[2:]:
    data, sw1, sw2 = conn.transmit(list(bytes.fromhex(a)))
    while sw1 == 0x61:
        more, sw1, sw2 = conn.transmit([0x00, 0xC0, 0x00, 0x00, sw2])
        data += more
    print(bytes(data).hex() + "%02x%02x" % (sw1, sw2))
"""


def _transmit(*apdus: bytes) -> list[tuple[bytes, int]]:
    """SELECT PIV, then each APDU, through pcscd + vpcd (pyscard in the system python3): (data, SW) of each."""
    from vsc.protocol import piv
    from vsc.wire import apdu

    if subprocess.run(["/usr/bin/python3", "-c", "import smartcard"], capture_output=True).returncode:
        missing("the system python3 has no pyscard (apt-get install python3-pyscard)")
    select = apdu.command(0, 0xA4, 0x04, 0x00, piv.PIV_AID)
    out = _run(["/usr/bin/python3", "-c", PYSCARD_CLIENT, READER, select.hex(), *(a.hex() for a in apdus)]).stdout
    answers = [bytes.fromhex(line) for line in out.split()]
    assert answers[0][-2:] == b"\x90\x00", answers[0].hex()
    return [(a[:-2], int.from_bytes(a[-2:], "big")) for a in answers[1:]]


def _verify_pin_apdu() -> bytes:
    from vsc.wire import apdu

    return apdu.command(0, 0x20, 0x00, 0x80, apdu.pad_pin(PIN.encode()))


def _point(pem: Path) -> bytes:
    key = serialization.load_pem_public_key(pem.read_bytes())
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1", key
    return key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def _openssl_verifies(hash_name: str, pub: Path, sig: Path, data: Path) -> bool:
    out = _run(["openssl", "dgst", f"-{hash_name}", "-verify", pub, "-signature", sig, data], check=False)
    return out.returncode == 0 and "Verified OK" in out.stdout


def test_yubico_piv_tool_generates_p384_and_get_metadata_reports_it(stack):
    """
    ``yubico-piv-tool -a generate -s 9c -A ECCP384`` (GENERATE 'AC' '80' 01
    14, behind the default management key): the public key it writes is a
    P-384 key; GET METADATA for 9C then answers algorithm 14, PIN policy
    always, origin generated and 86 with the same 97-byte point; ``vsc card
    status`` names the slot's type p384.
    """
    pub = stack["tmp"] / "p384-9c.pem"
    _run(["yubico-piv-tool", "-r", READER, "-a", "generate", "-s", "9c", "-A", "ECCP384", "-o", pub])
    text = _run(["openssl", "pkey", "-pubin", "-in", pub, "-noout", "-text"]).stdout
    assert "384 bit" in text and ("secp384r1" in text or "P-384" in text), text
    point = _point(pub)
    ((body, sw),) = _transmit(bytes.fromhex("00f7009c00"))
    assert sw == 0x9000
    assert body == bytes.fromhex("010114 02020301 030101 0463 8661") + point
    status = stack["cards"].card(stack["home"], "status").json()
    assert status["slots"]["9c"]["algorithm"] == "p384"
    assert "9c p384" in stack["cards"].card(stack["home"], "status", json_out=False).stdout


@pytest.mark.parametrize("hash_name", ["SHA256", "SHA384"])
def test_yubico_piv_tool_signs_with_the_p384_key(stack, hash_name):
    """
    ``yubico-piv-tool -a verify-pin --sign -s 9c -A ECCP384 -H HASH``: the
    tool sends the file's hash as it is — SHA-256: 32 bytes to the P-384
    key, which a YubiKey signs as the hash's integer value (lib/ykpiv.c
    only refuses input longer than 48 bytes); SHA-384: 48 bytes — and
    ``openssl dgst -HASH -verify`` accepts the signature under the key the
    tool generated (and refuses it for other data).
    """
    tmp = stack["tmp"]
    pub, data, sig = tmp / "p384-9c.pem", tmp / "p384-ypt.txt", tmp / f"p384-ypt.{hash_name}"
    data.write_bytes(b"signed by yubico-piv-tool with a P-384 key\n")
    _run(["yubico-piv-tool", "-r", READER, "-a", "verify-pin", "-P", PIN, "--sign", "-s", "9c", "-A", "ECCP384",
          "-H", hash_name, "-i", data, "-o", sig])
    assert _openssl_verifies(hash_name.lower(), pub, sig, data)
    other = tmp / "p384-ypt-other.txt"
    other.write_bytes(b"other\n")
    assert not _openssl_verifies(hash_name.lower(), pub, sig, other)


def test_certificate_for_the_p384_key(stack):
    """
    The provisioning path of tests/test_pcsc.py with the P-384 key: ``vsc
    card cert --csr`` makes a request signed by 9C's key (ecdsa-with-SHA256)
    that ``openssl req -verify`` accepts and that carries the generated key;
    a test CA signs it; ``yubico-piv-tool -a import-certificate`` puts it in
    9C (PUT DATA), where OpenSC and ``-a status`` find it. (yubico-piv-tool
    2.2's own selfsign-certificate and request-certificate fail on this
    system's OpenSSL 3 before the card signs — for P-256 keys as well.)
    """
    cards, home, tmp = stack["cards"], stack["home"], stack["tmp"]
    pub, req = tmp / "p384-9c.pem", tmp / "p384-9c.csr"
    cards.card(home, "cert", "--slot", "9c", "--csr", "--subject", "/CN=p384 signer/O=vsc tests", "--out", str(req),
               "--pin-file", str(tmp / "pin"))
    verified = _run(["openssl", "req", "-in", req, "-noout", "-verify", "-pubkey"])
    assert verified.stdout.split() == pub.read_text().split()
    ca_key, ca = tmp / "p384-ca.key", tmp / "p384-ca.pem"
    _run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-384", "-nodes", "-keyout",
          ca_key, "-out", ca, "-subj", "/CN=vsc p384 test CA", "-days", "2"])
    cert = tmp / "p384-9c.crt"
    _run(["openssl", "x509", "-req", "-in", req, "-CA", ca, "-CAkey", ca_key, "-set_serial", "9", "-days", "2",
          "-sha384", "-out", cert])
    _run(["yubico-piv-tool", "-r", READER, "-a", "import-certificate", "-s", "9c", "-i", cert])
    status = _run(["yubico-piv-tool", "-r", READER, "-a", "status"]).stdout
    assert "Subject DN:\tCN=p384 signer, O=vsc tests" in status, status


@pytest.mark.parametrize("mechanism, hash_name", [("ECDSA", "sha384"), ("ECDSA-SHA384", "sha384"),
                                                  ("ECDSA-SHA256", "sha256")])
def test_pkcs11_tool_signs_with_the_p384_key(stack, mechanism, hash_name):
    """
    OpenSC's PIV driver sees a P-384 private key in 9C (ID 02, from the
    certificate) and ``pkcs11-tool --sign --mechanism ECDSA --id 02`` over a
    SHA-384 hash (raw ECDSA: the card signs the 48 bytes), ECDSA-SHA384 and
    ECDSA-SHA256 over the data give signatures openssl verifies with the key
    yubico-piv-tool generated (``openssl dgst -sha384|-sha256 -verify``).
    """
    tmp = stack["tmp"]
    data = tmp / "p384-data.txt"
    data.write_bytes(b"P-384 through PC/SC, OpenSC and a virtual smart card\n")
    listed = _pkcs11("-O", "--login", "--pin", PIN).stdout
    assert "EC_POINT 384 bits" in listed, listed
    source = data
    if mechanism == "ECDSA":
        source = tmp / "p384-data.sha384"
        source.write_bytes(hashlib.sha384(data.read_bytes()).digest())
    sig = tmp / f"p384-{mechanism}.sig"
    _pkcs11("--login", "--pin", PIN, "--sign", "--id", "02", "--mechanism", mechanism, "--signature-format", "openssl",
            "-i", str(source), "-o", str(sig))
    pub = tmp / "p384-9c.pem"
    assert _openssl_verifies(hash_name, pub, sig, data)
    other = tmp / "p384-other.txt"
    other.write_bytes(b"something else\n")
    assert not _openssl_verifies(hash_name, pub, sig, other)


def test_imported_p384_key_agrees_ecdh_over_pcsc(stack):
    """
    ``yubico-piv-tool -a import-key -s 9d`` of a P-384 key openssl made
    (IMPORT ASYMMETRIC KEY, 00 FE 14 9D, the 48-byte scalar): GET METADATA
    then reports algorithm 14, origin imported (02) and that key's point;
    GENERAL AUTHENTICATE 14 with 7C { 82 00, 85 61 <peer point> } answers
    7C { 82 30 <x> }, the shared x cryptography computes from the imported
    private key (Debian 12's pkcs11-tool --derive refuses before sending
    anything, docs/pcsc.md). A 65-byte (P-256) point is 6A80.
    """
    from vsc.wire import apdu, tlv

    tmp = stack["tmp"]
    pem = tmp / "p384-import.pem"
    _run(["openssl", "ecparam", "-name", "secp384r1", "-genkey", "-noout", "-out", pem])
    mine = serialization.load_pem_private_key(pem.read_bytes(), None)
    _run(["yubico-piv-tool", "-r", READER, "-a", "import-key", "-s", "9d", "-i", pem])
    point = mine.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    peer = ec.generate_private_key(ec.SECP384R1())
    peer_point = peer.public_key().public_bytes(serialization.Encoding.X962,
                                                serialization.PublicFormat.UncompressedPoint)
    ga = apdu.command(0, 0x87, 0x14, 0x9D, tlv.encode(0x7C, tlv.encode_many([(0x82, b""), (0x85, peer_point)])), 256)
    p256 = ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)
    bad = apdu.command(0, 0x87, 0x14, 0x9D, tlv.encode(0x7C, tlv.encode_many([(0x82, b""), (0x85, p256)])), 256)
    (meta, meta_sw), (_, verified), (body, sw), (_, bad_sw) = _transmit(bytes.fromhex("00f7009d00"),
                                                                       _verify_pin_apdu(), ga, bad)
    assert (meta_sw, verified, sw, bad_sw) == (0x9000, 0x9000, 0x9000, 0x6A80)
    assert meta == bytes.fromhex("010114 02020201 030102 0463 8661") + point
    secret = tlv.to_dict(tlv.decode_one(body, 0x7C))[0x82]
    assert len(secret) == 48 and secret == mine.exchange(ec.ECDH(), peer.public_key())
    assert stack["cards"].card(stack["home"], "status").json()["slots"]["9d"]["algorithm"] == "p384"


def test_vsc_card_sign_with_a_p384_key(stack):
    """
    ``vsc card sign`` with 9C's P-384 key (policy always: --pin-file): by
    default what ``openssl dgst -sha256 -sign`` gives, with ``--sha384``
    what ``openssl dgst -sha384 -sign`` gives; each verifies with the public
    key yubico-piv-tool wrote, and not under the other hash.
    """
    cards, home, tmp = stack["cards"], stack["home"], stack["tmp"]
    msg = tmp / "p384-cli.txt"
    msg.write_bytes(b"signed by vsc card with a P-384 key\n")
    pub = tmp / "p384-9c.pem"
    for extra, hash_name, other in (((), "sha256", "sha384"), (("--sha384",), "sha384", "sha256")):
        sig = tmp / f"p384-cli.{hash_name}"
        cards.card(home, "sign", "--slot", "9c", "--in", str(msg), "--out", str(sig), "--pin-file", str(tmp / "pin"),
                   *extra)
        assert _openssl_verifies(hash_name, pub, sig, msg)
        assert not _openssl_verifies(other, pub, sig, msg)


def test_ssh_login_with_a_p384_key_through_the_card_agent(stack, sshd):
    """
    A P-384 key generated into 9A (PIN policy once: the insert counts on
    the local paths) is offered by the card's ssh-agent as
    ecdsa-sha2-nistp384 (``vsc card ssh-pubkey``, ``ssh-add -L``: the same
    line, the point yubico-piv-tool wrote); ssh logs in with it to an sshd
    that trusts only that key (the agent signs with SHA-384, RFC 5656).
    """
    import base64

    from vsc.wire import sshagent as w

    pub = stack["tmp"] / "p384-9a.pem"
    _run(["yubico-piv-tool", "-r", READER, "-a", "generate", "-s", "9a", "-A", "ECCP384", "-o", pub])
    line = _ssh_line(stack, "9a")
    assert line.startswith("ecdsa-sha2-nistp384 ")
    assert w.decode_public_key(base64.b64decode(line.split()[1])) == w.EcdsaPublicKey("nistp384", _point(pub))
    env = _agent_env(stack)
    assert line.split()[:2] in [listed.split()[:2] for listed in _run(["ssh-add", "-L"], env=env).stdout.splitlines()]
    sshd.set_authorized([line])
    result = sshd.login(env)
    assert result.returncode == 0 and "vsc-login-ok" in result.stdout, result.stderr
    assert "ecdsa-sha2-nistp384" in stack["daemon"].log_text()
