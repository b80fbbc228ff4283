"""
The card's ATR in the real PC/SC stack of tests/test_pcsc.py (pcscd + vpcd +
a real server and card daemon in a private network namespace): what OpenSC
0.23 does with it, read from its own debug log. Reuses test_pcsc's ``stack``
fixture; runs with VSC_REQUIRE_INTEGRATION=1 like test_pcsc.

OpenSC 0.23 src/libopensc/card-piv.c ``piv_match_card_continued``: historical
bytes in compact TLV (first byte 80) whose tag 5 (``sc_compacttlv_find_tag``
0x50) holds the 7 bytes "YubiKey" make the card SC_CARD_TYPE_PIV_II_YUBIKEY4
("reader says 4 really 5"); ``piv_init`` then sends GET VERSION (00 FD 00 00,
Yubico's extension) and sets card_issues CI_OTHER_AID_LOSE_STATE |
CI_LEAKS_FILE_NOT_FOUND (0x110), adding CI_VERIFY_LC0_FAIL only below 4.3.2.
Any other ATR is SC_CARD_TYPE_PIV_II_GENERIC with CI_VERIFY_LC0_FAIL |
CI_OTHER_AID_LOSE_STATE (0x102), and a CCC read during matching.
"""

from __future__ import annotations

import os
import re
import subprocess

import pytest

from bench.latency import opensc_apdus
from tests.integration import missing
from tests.test_pcsc import (  # noqa: F401  (stack: the fixture)
    EXTENDED_CLIENT, PIN, PKCS11, READER, _cert_public_pem, _reader_index, _run, stack)

pytestmark = pytest.mark.integration

#: a YubiKey 5 NFC over USB CCID, as pcsc-tools' smartcard_list.txt names it ("Yubico YubiKey 5 NFC (PKI)")
#: and OpenSC 0.23's card-openpgp.c lists it ("Yubikey 5 (OpenPGP v3.4)")
YUBIKEY5_ATR = bytes.fromhex("3BFD1300008131FE158073C021C057597562694B657940")

#: the most APDUs one ``pkcs11-tool --login --sign`` may send (docs/benchmarks.md: 42-46 with vsc's old ATR,
#: OpenSC taking it for a generic PIV card, 46 measured by this test before the change; 41 with the YubiKey ATR:
#: no CCC reads, one GET VERSION)
MAX_SIGN_APDUS = 41


def test_the_atr_is_a_yubikey_5s(stack):
    """opensc-tool -a prints exactly the YubiKey 5 NFC's USB ATR."""
    atr = _run(["opensc-tool", "-r", _reader_index(), "-a"]).stdout.strip().splitlines()[-1]
    assert bytes.fromhex(atr.replace(":", "")) == YUBIKEY5_ATR


def test_opensc_takes_the_card_for_a_yubikey_and_signs(stack):
    """
    One traced ``pkcs11-tool --login --sign`` (OPENSC_DEBUG=9): OpenSC's PIV driver logs the Yubico card type
    with the version GET VERSION answered (5.4.3), card_issues 0x110 (a YubiKey 5's: no CI_VERIFY_LC0_FAIL, so
    VERIFY without data tells the PIN state), sends GET VERSION, no CCC read (5FC107); the signature verifies with
    the certificate, and the process sends at most MAX_SIGN_APDUS APDUs.
    """
    data = stack["tmp"] / "atr-data.txt"
    data.write_bytes(b"signed by a card OpenSC takes for a YubiKey\n")
    sig = stack["tmp"] / "atr-sig.rsa"
    proc = _run(["pkcs11-tool", "--module", PKCS11, "--login", "--pin", PIN, "--sign",
                 "--id", "01", "-m", "SHA256-RSA-PKCS", "-i", str(data), "-o", str(sig)],
                env=dict(os.environ, OPENSC_DEBUG="9"))
    log = proc.stderr
    apdus = opensc_apdus(log)
    print(f"pkcs11-tool --sign: {len(apdus)} APDUs:", " ".join(a["cmd"][:8] for a in apdus))
    m = re.search(r"Yubico card->type=(\d+), r=0x[0-9a-f]+ version=0x([0-9a-f]{8})", log)
    assert m and m.group(2) == "00050403", log[-2000:]
    issues = re.findall(r"PIV card-type=(\d+) card_issues=0x([0-9a-f]{8})", log)
    assert issues and {i for _t, i in issues} == {"00000110"}, issues
    cmds = [bytes.fromhex(a["cmd"]) for a in apdus]
    assert bytes.fromhex("00FD0000") in [c[:4] for c in cmds]
    assert not any(c[1] == 0xCB and bytes.fromhex("5FC107") in c for c in cmds)  # no CCC read
    assert len(apdus) <= MAX_SIGN_APDUS, [a["cmd"] for a in apdus]
    pub = _cert_public_pem(stack, "01")
    assert "Verified OK" in _run(["openssl", "dgst", "-sha256", "-verify", pub, "-signature", sig, data]).stdout


def test_the_management_application_through_pcscd(stack):
    """
    Through pcscd + vpcd (pyscard in the system python3, one connection): SELECT A0 00 00 05 27 47 11 17 answers
    "5.4.3"; READ CONFIG's DeviceInfo, parsed by yubikit's own DeviceInfo.parse, names the PIV GET SERIAL number,
    firmware 5.4.3, PIV and OpenPGP only, locked; WRITE CONFIG (enable OTP) answers 6982 and DeviceInfo reads the
    same afterwards; PIV answers again once selected, and the OpenPGP application is untouched.
    """
    from tests.test_review_atr import _yubikit_management

    if subprocess.run(["/usr/bin/python3", "-c", "import smartcard"], capture_output=True).returncode:
        missing("the system python3 has no pyscard (apt-get install python3-pyscard)")
    ym = _yubikit_management()
    from yubikit.core import TRANSPORT, Version

    apdus = ["00a4040009a00000030800001000", "00f8000000", "00a4040008a000000527471117", "001d000000",
             "001c0000050403020019", "001d000000", "00a4040009a00000030800001000", "00f8000000"]
    responses = _run(["/usr/bin/python3", "-c", EXTENDED_CLIENT, READER, *apdus]).stdout.split()
    sws = [r[-4:] for r in responses]
    assert sws == ["9000", "9000", "9000", "9000", "6982", "9000", "9000", "9000"], responses
    body = [bytes.fromhex(r[:-4]) for r in responses]
    assert body[2] == b"5.4.3" and Version.from_string(body[2].decode()) == (5, 4, 3)
    info = ym.DeviceInfo.parse(body[3], Version(5, 4, 3))
    assert info.serial == int.from_bytes(body[1], "big") == int.from_bytes(body[7], "big")
    assert tuple(info.version) == (5, 4, 3) and info.is_locked
    assert info.supported_capabilities == {TRANSPORT.USB: ym.CAPABILITY.PIV | ym.CAPABILITY.OPENPGP}
    assert body[5] == body[3]
