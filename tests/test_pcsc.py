"""
The card in the real PC/SC stack: pcscd with vsmartcard's vpcd reader, a
real ``twistd vsc-server``, a real ``twistd vsc-card --pcsc``, and the stock
tools — OpenSC (opensc-tool, pkcs11-tool with opensc-pkcs11.so),
yubico-piv-tool, openssl — as any smart card-aware application ([0011]).

One card for the whole module (enrolment, RSA generation and insert are the
slow part); the tests run in file order and each leaves the card as it found
it, except the last two (the PIN lock across a restart, then remove). pcscd
is started here unless one is already running (as root; stopped with
SIGTERM afterwards). When pcscd, vpcd or OpenSC are missing the tests skip
locally and fail under VSC_REQUIRE_INTEGRATION=1.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.integration import missing

pytestmark = pytest.mark.integration

VPCD_ENDPOINT = "tcp:127.0.0.1:35963"
READER = "Virtual PCD 00 00"
VPCD_DRIVER = Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so")
VPCD_CONF = Path("/etc/reader.conf.d/vpcd")
PKCS11 = next((p for p in ("/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so", "/usr/lib/opensc-pkcs11.so",
                           "/usr/lib/aarch64-linux-gnu/opensc-pkcs11.so") if os.path.exists(p)), None)
PCSCD_SOCKET = Path("/run/pcscd/pcscd.comm")
#: pcscd and the vpcd reader are machine-wide: test runs (and bench/pcsc.py) on one machine take turns
MACHINE_LOCK = Path("/tmp/vsc-pcsc.lock")
LOCK_TIMEOUT = 600.0
SERIAL = "pcsc-card-1"
PIN = "246810"
PUK = "13579135"
TOOL_TIMEOUT = 60.0
APPEAR_TIMEOUT = 20.0


def _run(argv, check: bool = True, timeout: float = TOOL_TIMEOUT, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in argv], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, argv))} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _readers() -> dict[str, bool]:
    """``opensc-tool -l``: reader name -> card present."""
    out = _run(["opensc-tool", "-l"], check=False, timeout=20).stdout
    found = {}
    for line in out.splitlines():
        m = re.match(r"^\s*(\d+)\s+(Yes|No)\s+.*?(Virtual PCD \d\d \d\d)\s*$", line)
        if m:
            found[m.group(3)] = m.group(2) == "Yes"
    return found


def _reader_index() -> str:
    out = _run(["opensc-tool", "-l"], timeout=20).stdout
    for line in out.splitlines():
        if line.rstrip().endswith(READER):
            return line.split()[0]
    raise AssertionError(f"no reader {READER!r} in:\n{out}")


def _wait_card(present: bool, timeout: float = APPEAR_TIMEOUT) -> float:
    """Poll until the card is (or is not) in the reader; the seconds it took."""
    start = time.monotonic()
    while _readers().get(READER) is not present:
        if time.monotonic() - start > timeout:
            raise AssertionError(f"the card did not {'appear in' if present else 'leave'} {READER} within {timeout:g} s")
        time.sleep(0.02)
    return time.monotonic() - start


def _wait_bindable(ports, timeout: float) -> None:
    """Wait until every port can be bound on 0.0.0.0 (vpcd binds them when pcscd loads it)."""
    deadline = time.monotonic() + timeout
    while True:
        busy = []
        for port in ports:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("0.0.0.0", port))
                except OSError:
                    busy.append(port)
        if not busy:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"ports {busy} stay in use (vpcd needs them; reserve them with "
                                 f"sysctl net.ipv4.ip_local_reserved_ports=35963-35964)")
        time.sleep(0.2)


RESERVED_PORTS = Path("/proc/sys/net/ipv4/ip_local_reserved_ports")


def _reserved(text: str, port: int) -> bool:
    for part in filter(None, text.strip().split(",")):
        lo, _, hi = part.partition("-")
        if int(lo) <= port <= int(hi or lo):
            return True
    return False


@contextlib.contextmanager
def _reserve_vpcd_ports():
    """
    While the tests run, keep vpcd's ports out of Linux's ephemeral range
    (net.ipv4.ip_local_reserved_ports, root only; the previous value is put
    back): on a busy machine another program's outgoing connection can
    otherwise take 35963 or 35964 and the reader cannot open.
    """
    old = None
    try:
        current = RESERVED_PORTS.read_text()
        if os.geteuid() == 0 and not all(_reserved(current, p) for p in (35963, 35964)):
            RESERVED_PORTS.write_text(",".join(filter(None, [current.strip(), "35963-35964"])))
            old = current.strip()
    except OSError:
        pass  # not Linux, or not allowed: the wait in Pcscd.start still applies
    try:
        yield
    finally:
        if old is not None:
            with contextlib.suppress(OSError):
                RESERVED_PORTS.write_text(old or "\n")


def _prerequisites() -> None:
    for program in ("pcscd", "opensc-tool", "pkcs11-tool", "yubico-piv-tool", "openssl"):
        if shutil.which(program) is None:
            missing(f"{program} is not installed (apt-get install pcscd vsmartcard-vpcd opensc yubico-piv-tool)")
    if not VPCD_DRIVER.exists() or not VPCD_CONF.exists():
        missing("vsmartcard-vpcd is not installed (the virtual reader pcscd loads)")
    if PKCS11 is None:
        missing("opensc-pkcs11.so is not installed (apt-get install opensc-pkcs11)")


class Pcscd:
    """The pcscd this module uses: one already running, or ``pcscd -f`` started (and stopped) here."""

    def __init__(self, log: Path):
        self.log = log
        self.proc: subprocess.Popen | None = None

    def running(self) -> bool:
        return PCSCD_SOCKET.exists() and _port_open(35963)

    def start(self) -> None:
        """
        Start ``pcscd -f``. vpcd's ports (35963, 35964) lie in Linux's
        ephemeral range, so another program's outgoing connection can hold
        one for a while: wait until both can be bound, and retry.
        """
        if self.running():
            return
        if os.geteuid() != 0:
            missing("pcscd is not running and starting it needs root")
        for attempt in range(3):
            _wait_bindable((35963, 35964), 180)
            with open(self.log, "ab") as out:
                self.proc = subprocess.Popen(["pcscd", "-f"], stdin=subprocess.DEVNULL, stdout=out,
                                             stderr=subprocess.STDOUT, start_new_session=True)
            deadline = time.monotonic() + 15
            while not self.running():
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            else:
                return
            self.stop()
        raise AssertionError(f"pcscd did not start:\n{self.log.read_text(errors='replace')[-2000:]}")

    @property
    def ours(self) -> bool:
        return self.proc is not None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


@contextlib.contextmanager
def _machine_lock():
    """Hold the machine-wide PC/SC lock (other pytest processes, bench/pcsc.py), waiting at most LOCK_TIMEOUT."""
    import fcntl

    with open(MACHINE_LOCK, "a+") as f:
        deadline = time.monotonic() + LOCK_TIMEOUT
        while True:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"{MACHINE_LOCK} held by another PC/SC test run for {LOCK_TIMEOUT:g} s")
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """pcscd + a real server + an enrolled card (PIN/PUK from files) inserted with --pcsc; all stopped at the end."""
    _prerequisites()
    from tests.cards import Cards
    from tests.servers import Servers, admin, init_data_dir

    root = tmp_path_factory.mktemp("pcsc")
    with _machine_lock(), _reserve_vpcd_ports():
        yield from _stack(root, Cards, Servers, admin, init_data_dir)


def _stack(root, Cards, Servers, admin, init_data_dir):
    pcscd = Pcscd(root / "pcscd.log")
    pcscd.start()
    servers = Servers(root / "logs")
    cards = Cards(root / "cards")
    try:
        if _readers().get(READER):
            missing(f"another card is already in {READER} (vpcd takes one card per reader); remove it first")
        data_dir = root / "server"
        fingerprint = init_data_dir(data_dir)["fingerprint"]
        server = servers.start(data_dir)
        code = admin(data_dir, "issue", SERIAL)["code"]
        home = root / "home"
        pw = cards.password_file("pw", "pcsc password 1")
        pin_file, puk_file = root / "pin", root / "puk"
        pin_file.write_text(PIN + "\n")
        puk_file.write_text(PUK + "\n")
        cards.card(home, "enroll", "--server", server.endpoint, "--server-key", fingerprint, "--serial", SERIAL,
                   "--code", code, "--password-file", str(pw), "--pin-file", str(pin_file),
                   "--puk-file", str(puk_file), "--scrypt-log2n", "10")

        def start_card():
            d = cards.start(home, pw, extra=("--pcsc", VPCD_ENDPOINT))
            _wait_card(True)
            return d

        daemon = start_card()
        yield dict(cards=cards, home=home, daemon=daemon, start_card=start_card, tmp=root, pcscd=pcscd,
                   env=cards.env())
    finally:
        cards.close()
        servers.close()
        pcscd.stop()


def _pkcs11(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _run(["pkcs11-tool", "--module", PKCS11, *args], check=check)


def _cert_public_pem(stack, obj_id: str) -> Path:
    """The public key of the certificate object ``obj_id`` read through PKCS#11, as a PEM file."""
    der = stack["tmp"] / f"cert{obj_id}.der"
    _pkcs11("--read-object", "--type", "cert", "--id", obj_id, "-o", str(der))
    pem = stack["tmp"] / f"pub{obj_id}.pem"
    pem.write_text(_run(["openssl", "x509", "-inform", "der", "-in", der, "-pubkey", "-noout"]).stdout)
    return pem


def _apdus(*hex_apdus: str) -> list[str]:
    """Send raw APDUs with ``opensc-tool -s`` (after SELECT of the PIV AID); the SW of each, as 'SW1SW2'."""
    argv = ["opensc-tool", "-r", _reader_index(), "-s", "00:A4:04:00:09:A0:00:00:03:08:00:00:10:00:00"]
    for a in hex_apdus:
        argv += ["-s", a]
    out = _run(argv).stdout
    sws = re.findall(r"Received \(SW1=0x([0-9A-Fa-f]{2}), SW2=0x([0-9A-Fa-f]{2})\)", out)
    return [(a + b).upper() for a, b in sws][1:]


def _verify_apdu(pin: str | None) -> str:
    if pin is None:
        return "00:20:00:80"
    block = pin.encode().ljust(8, b"\xff")
    return "00:20:00:80:08:" + ":".join(f"{b:02X}" for b in block)


# ---------------------------------------------------------------- discovery


def test_opensc_sees_a_piv_card(stack):
    """opensc-tool -l lists the card in 'Virtual PCD 00 00'; -a prints our ATR; -n names OpenSC's PIV driver."""
    from vsc.card.vpcd import ATR

    assert _readers().get(READER) is True
    r = _reader_index()
    atr = _run(["opensc-tool", "-r", r, "-a"]).stdout.strip().splitlines()[-1]
    assert bytes.fromhex(atr.replace(":", "")) == ATR
    assert "Personal Identity Verification Card" in _run(["opensc-tool", "-r", r, "-n"]).stdout


def test_pkcs11_lists_certificates_and_keys(stack):
    """pkcs11-tool -O: a certificate (CN=serial slot) and public key per slot; after login a private key per slot."""
    out = _pkcs11("-O").stdout
    for slot in ("9a", "9c", "9d", "9e"):
        assert f"CN={SERIAL} {slot}" in out
    assert out.count("Certificate Object") == 4
    assert out.count("Public Key Object") == 4
    logged = _pkcs11("-O", "--login", "--pin", PIN).stdout
    private = re.findall(r"Private Key Object; (RSA|EC).*?ID:\s+(\d\d)", logged, re.S)
    assert sorted(private) == [("EC", "02"), ("EC", "04"), ("RSA", "01"), ("RSA", "03")]


# ---------------------------------------------------------------- private-key operations through OpenSC


def test_rsa_signature_verifies_with_openssl(stack):
    """pkcs11-tool --sign -m SHA256-RSA-PKCS with the PIV authentication key; openssl verifies it with the certificate."""
    data = stack["tmp"] / "data.txt"
    data.write_bytes(b"signed through PC/SC by a virtual smart card\n")
    sig = stack["tmp"] / "sig.rsa"
    _pkcs11("--login", "--pin", PIN, "--sign", "--id", "01", "-m", "SHA256-RSA-PKCS", "-i", str(data), "-o", str(sig))
    pub = _cert_public_pem(stack, "01")
    assert "Verified OK" in _run(["openssl", "dgst", "-sha256", "-verify", pub, "-signature", sig, data]).stdout


@pytest.mark.parametrize("obj_id", ["02", "04"])
def test_ecdsa_signature_verifies_with_openssl(stack, obj_id):
    """pkcs11-tool -m ECDSA-SHA256 (9C digital signature, 9E card authentication) in DER; openssl verifies it."""
    data = stack["tmp"] / "data-ec.txt"
    data.write_bytes(b"P-256 through PC/SC\n")
    sig = stack["tmp"] / f"sig.ec{obj_id}"
    _pkcs11("--login", "--pin", PIN, "--sign", "--id", obj_id, "-m", "ECDSA-SHA256", "--signature-format", "openssl",
            "-i", str(data), "-o", str(sig))
    pub = _cert_public_pem(stack, obj_id)
    assert "Verified OK" in _run(["openssl", "dgst", "-sha256", "-verify", pub, "-signature", sig, data]).stdout


def test_rsa_decrypt_round_trip(stack):
    """openssl encrypts to the key-management certificate (RSA PKCS#1 v1.5); pkcs11-tool --decrypt gets it back."""
    pub = _cert_public_pem(stack, "03")
    plain = stack["tmp"] / "plain.txt"
    plain.write_bytes(b"a session key, say\n")
    enc = stack["tmp"] / "enc.bin"
    _run(["openssl", "pkeyutl", "-encrypt", "-pubin", "-inkey", pub, "-in", plain, "-out", enc])
    out = stack["tmp"] / "dec.txt"
    _pkcs11("--login", "--pin", PIN, "--decrypt", "--id", "03", "-m", "RSA-PKCS", "-i", str(enc), "-o", str(out))
    assert out.read_bytes() == plain.read_bytes()


def test_private_key_needs_the_pin(stack):
    """Without login no private key of 9A is visible; a wrong PIN is refused (and restored by the right one)."""
    assert "Private Key Object; RSA" not in _pkcs11("-O").stdout
    bad = _pkcs11("--login", "--pin", "000000", "-O", check=False)
    assert bad.returncode != 0
    assert _apdus(_verify_apdu(None)) == ["63C2"]
    assert _apdus(_verify_apdu(PIN), _verify_apdu(None)) == ["9000", "9000"]


# ---------------------------------------------------------------- yubico-piv-tool and provisioning


def test_yubico_piv_tool_status(stack):
    """yubico-piv-tool -r 'Virtual PCD 00 00' -a status: CHUID, CCC, each slot's certificate, PIN tries."""
    out = _run(["yubico-piv-tool", "-r", READER, "-a", "status"]).stdout
    assert "CHUID:" in out and "CCC:" in out
    for slot in ("9a", "9c", "9d", "9e"):
        assert f"Subject DN:\tCN={SERIAL} {slot}" in out
    assert "PIN tries left:\t3" in out


def test_provisioning_generate_csr_import(stack):
    """
    yubico-piv-tool generates a new 9D key behind the default management
    key; 'vsc card cert --csr' gets a request signed by that key through the
    daemon; a test CA signs it; yubico-piv-tool imports the certificate (PUT
    DATA); OpenSC then decrypts with the new key what openssl encrypted to
    the new certificate. A certificate for another key is refused by
    'vsc card cert --import'.
    """
    cards, home, tmp = stack["cards"], stack["home"], stack["tmp"]
    pub = tmp / "gen9d.pem"
    _run(["yubico-piv-tool", "-r", READER, "-a", "generate", "-s", "9d", "-A", "RSA2048", "-o", pub])
    req = tmp / "req9d.csr"
    cards.card(home, "cert", "--slot", "9d", "--csr", "--subject", "/CN=provisioned/O=vsc tests", "--out", str(req))
    verified = _run(["openssl", "req", "-in", req, "-noout", "-verify", "-pubkey"])
    assert verified.stdout.split() == Path(pub).read_text().split()  # the CSR carries the generated key
    ca_key, ca = tmp / "ca.key", tmp / "ca.pem"
    _run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", ca_key, "-out", ca,
          "-subj", "/CN=vsc test CA", "-days", "2"])
    cert = tmp / "cert9d.pem"
    _run(["openssl", "x509", "-req", "-in", req, "-CA", ca, "-CAkey", ca_key, "-set_serial", "7", "-days", "2",
          "-out", cert])
    _run(["yubico-piv-tool", "-r", READER, "-a", "import-certificate", "-s", "9d", "-i", cert])
    status = _run(["yubico-piv-tool", "-r", READER, "-a", "status"]).stdout
    assert "Subject DN:\tCN=provisioned, O=vsc tests" in status and "Issuer DN:\tCN=vsc test CA" in status
    plain, enc, dec = tmp / "plain9d.txt", tmp / "enc9d.bin", tmp / "dec9d.txt"
    plain.write_bytes(b"after provisioning\n")
    _run(["openssl", "pkeyutl", "-encrypt", "-pubin", "-inkey", _cert_public_pem(stack, "03"), "-in", plain,
          "-out", enc])
    _pkcs11("--login", "--pin", PIN, "--decrypt", "--id", "03", "-m", "RSA-PKCS", "-i", str(enc), "-o", str(dec))
    assert dec.read_bytes() == plain.read_bytes()
    refused = cards.card(home, "cert", "--slot", "9a", "--import", str(cert), json_out=False, check=False)
    assert refused.returncode != 0 and "not the key in slot 9a" in refused.stderr
    back = cards.card(home, "cert", "--slot", "9d").json()
    assert back["subject"] == "O=vsc tests,CN=provisioned"


def test_wrong_management_key_cannot_provision(stack):
    """yubico-piv-tool with a wrong management key cannot generate: the card refuses the authentication."""
    out = _run(["yubico-piv-tool", "-r", READER, "-k", "0102030405060708010203040506070801020304050607FF",
                "-a", "generate", "-s", "9c", "-A", "ECCP256"], check=False)
    assert out.returncode != 0
    assert f"CN={SERIAL} 9c" in _pkcs11("-O").stdout


# ---------------------------------------------------------------- random numbers and the PIN policy (issue 12)


def test_pkcs11_tool_generates_random_numbers(stack):
    """pkcs11-tool --generate-random 32 (OpenSC asks GENERAL AUTHENTICATE for challenges): 32 bytes, different each time."""
    outs = []
    for n in (1, 2):
        out = stack["tmp"] / f"random{n}.bin"
        _pkcs11("--generate-random", "32", "-o", str(out))
        outs.append(out.read_bytes())
    assert [len(o) for o in outs] == [32, 32] and outs[0] != outs[1]
    assert _apdus("00:87:00:9B:04:7C:02:81:00") == ["9000"]


def _ga_9c() -> str:
    """GENERAL AUTHENTICATE with the 9C key (ECDSA P-256 over a 32-byte hash)."""
    return "00:87:11:9C:26:7C:24:82:00:81:20:" + ":".join(["5A"] * 32)


def _ga_9e() -> str:
    return "00:87:11:9E:26:7C:24:82:00:81:20:" + ":".join(["A5"] * 32)


def _agent_env(stack) -> dict:
    sock = stack["cards"].card(stack["home"], "ssh-agent-env").json()["SSH_AUTH_SOCK"]
    return dict(os.environ, SSH_AUTH_SOCK=sock)


def _ssh_line(stack, slot: str) -> str:
    return stack["cards"].card(stack["home"], "ssh-pubkey", "--slot", slot).json()["keys"][0]["line"]


@pytest.fixture(scope="module")
def sshd(stack):
    from tests.sshd import Sshd

    server = Sshd(stack["tmp"] / "sshd", [])
    yield server
    server.stop()


def test_pin_policy_on_pcsc(stack):
    """
    The enrolment default policy over PC/SC: 9C (always) needs a VERIFY
    right before each operation — the second GENERAL AUTHENTICATE after one
    VERIFY is 6982; 9E (never) signs without one; pkcs11-tool signs with 9C
    (OpenSC logs in again for the key, CKA_ALWAYS_AUTHENTICATE) and 9E.
    (pkcs11-tool --sign logs in before any signature, 9E's included, so it
    is given the PIN for both; the card itself asks none for 9E.)
    """
    assert _apdus(_verify_apdu(PIN), _ga_9c(), _ga_9c(), _verify_apdu(PIN), _ga_9c()) == \
        ["9000", "9000", "6982", "9000", "9000"]
    assert _apdus(_ga_9e()) == ["9000"]
    data = stack["tmp"] / "policy.txt"
    data.write_bytes(b"policy\n")
    for obj_id in ("02", "04"):
        sig = stack["tmp"] / f"policy.{obj_id}"
        _pkcs11("--login", "--pin", PIN, "--sign", "--id", obj_id, "-m", "ECDSA-SHA256", "--signature-format", "openssl",
                "-i", str(data), "-o", str(sig))
        pub = _cert_public_pem(stack, obj_id)
        assert "Verified OK" in _run(["openssl", "dgst", "-sha256", "-verify", pub, "-signature", sig, data]).stdout


def test_pin_policy_on_the_cli_and_status(stack):
    """
    vsc card: 9A (once) signs after the insert (local=insert), 9C (always)
    is refused without --pin-file and signs with it; status shows the
    policy and the tries.
    """
    cards, home, tmp = stack["cards"], stack["home"], stack["tmp"]
    msg = tmp / "cli-policy.txt"
    msg.write_bytes(b"local policy\n")
    pin_file = tmp / "pin"
    cards.card(home, "sign", "--slot", "9a", "--in", str(msg), "--out", str(tmp / "cli.9a"))
    refused = cards.card(home, "sign", "--slot", "9c", "--in", str(msg), "--out", str(tmp / "cli.9c"),
                         json_out=False, check=False)
    assert refused.returncode != 0 and "slot 9c needs the PIN with every use" in refused.stderr
    cards.card(home, "sign", "--slot", "9c", "--in", str(msg), "--out", str(tmp / "cli.9c"), "--pin-file",
               str(pin_file))
    pub = _cert_public_pem(stack, "02")
    assert "Verified OK" in _run(["openssl", "dgst", "-sha256", "-verify", pub, "-signature", tmp / "cli.9c",
                                  msg]).stdout
    status = cards.card(home, "status").json()
    assert status["pin_policy"] == "9a=once,9c=always,9d=once,9e=never"
    assert (status["pin_local"], status["pin_tries"]) == ("insert", 3)
    text = cards.card(home, "status", json_out=False).stdout
    assert "PIN: 3 tries left; policy 9a=once,9c=always,9d=once,9e=never" in text


def test_pin_policy_on_the_ssh_agent(stack, sshd):
    """A real ssh through the card's agent: the 9A key (once; the insert counts) logs in, the 9C key (always) cannot."""
    env = _agent_env(stack)
    sshd.set_authorized([_ssh_line(stack, "9a")])
    assert sshd.logged_in(env), sshd.login(env).stderr
    sshd.set_authorized([_ssh_line(stack, "9c")])
    assert not sshd.logged_in(env)
    assert "slot 9c needs the PIN with every use" in stack["daemon"].log_text()
    refusal = stack["cards"].card(stack["home"], "status").json()["pin_refusal"]  # the owner learns why
    assert refusal.startswith("ssh-agent: slot 9c needs the PIN with every use"), refusal


def test_blocked_pin_refuses_on_every_path_across_a_restart(stack, sshd):
    """
    Three wrong PINs on the local path (vsc card verify-pin) block the one
    PIN: PC/SC's VERIFY answers 6983, pkcs11-tool cannot sign with 9A, ssh
    through the agent cannot log in, vsc card sign --slot 9a is refused — and
    all of it still after the card daemon is restarted (the counter was
    synced to the server). 9E (never) still signs. The PUK unblocks it
    (vsc card unblock-pin) and ssh logs in again.
    """
    cards, home, tmp = stack["cards"], stack["home"], stack["tmp"]
    bad = tmp / "bad-pin"
    bad.write_text("000000\n")
    for left in (2, 1, 0):
        r = cards.card(home, "verify-pin", "--pin-file", str(bad), json_out=False, check=False)
        assert r.returncode != 0 and f"wrong PIN ({left} tries left)" in r.stderr, r.stderr
    sshd.set_authorized([_ssh_line(stack, "9a")])
    msg = tmp / "blocked.txt"
    msg.write_bytes(b"blocked\n")

    def refused_everywhere():
        assert _apdus(_verify_apdu(None)) == ["6983"]
        assert _pkcs11("--login", "--pin", PIN, "--sign", "--id", "01", "-m", "SHA256-RSA-PKCS", "-i", str(msg),
                       "-o", str(tmp / "blocked.sig"), check=False).returncode != 0
        assert not sshd.logged_in(_agent_env(stack))
        r = cards.card(home, "sign", "--slot", "9a", "--in", str(msg), "--out", str(tmp / "b.9a"), json_out=False,
                       check=False)
        assert r.returncode != 0 and "the PIN is blocked" in r.stderr
        cards.card(home, "sign", "--slot", "9e", "--in", str(msg), "--out", str(tmp / "b.9e"))
        assert cards.card(home, "status").json()["pin_tries"] == 0

    refused_everywhere()
    stack["daemon"].kill(signal.SIGTERM)  # remove (uploads), exit
    _wait_card(False)
    stack["daemon"] = stack["start_card"]()
    refused_everywhere()
    puk, new = tmp / "puk", tmp / "pin"
    cards.card(home, "unblock-pin", "--puk-file", str(puk), "--new-file", str(new))
    assert sshd.logged_in(_agent_env(stack))
    assert _apdus(_verify_apdu(None), _verify_apdu(PIN)) == ["63C3", "9000"]


# ---------------------------------------------------------------- PIN lock across a restart, then remove


def test_pin_lock_survives_restarting_the_card(stack):
    """
    Wrong PINs answer 63C2, 63C1, 63C0, then 6983; the counter lives in the
    protected information (synced before each answer), so after restarting
    the card daemon the PIN is still blocked; the PUK unblocks it.
    """
    assert _apdus(_verify_apdu("000000"), _verify_apdu("000000"), _verify_apdu("000000"),
                  _verify_apdu(PIN), _verify_apdu(None)) == ["63C2", "63C1", "63C0", "6983", "6983"]
    daemon = stack["daemon"]
    daemon.kill(signal.SIGTERM)  # remove (uploads), exit
    _wait_card(False)
    stack["daemon"] = stack["start_card"]()
    assert _apdus(_verify_apdu(PIN), _verify_apdu(None)) == ["6983", "6983"]
    assert "PIN tries left:\t0" in _run(["yubico-piv-tool", "-r", READER, "-a", "status"]).stdout
    _run(["yubico-piv-tool", "-r", READER, "-a", "unblock-pin", "-P", PUK, "-N", PIN])
    assert _apdus(_verify_apdu(None), _verify_apdu(PIN)) == ["63C3", "9000"]


def test_card_reconnects_when_pcscd_restarts(stack):
    """When vpcd goes away (pcscd restarted) the card reconnects with backoff and is back in the reader."""
    if os.geteuid() != 0:
        missing("restarting pcscd needs root")
    pcscd = stack["pcscd"]
    if not pcscd.ours:
        missing("pcscd was already running before these tests; not restarting someone else's pcscd")
    pcscd.stop()
    time.sleep(0.5)
    pcscd.start()
    _wait_card(True, timeout=30)
    assert _apdus(_verify_apdu(None)) == ["63C3"]


def test_yubico_piv_tool_sets_a_pin_policy_with_a_new_key(stack):
    """yubico-piv-tool -a generate --pin-policy=always: the slot's policy (vsc card status) is always from then on."""
    cards, home = stack["cards"], stack["home"]
    assert cards.card(home, "status").json()["pin_policy"] == "9a=once,9c=always,9d=once,9e=never"
    _run(["yubico-piv-tool", "-r", READER, "-a", "generate", "-s", "9d", "-A", "RSA2048", "--pin-policy=always",
          "-o", stack["tmp"] / "gen9d-always.pem"])
    assert cards.card(home, "status").json()["pin_policy"] == "9a=once,9c=always,9d=always,9e=never"


def test_card_leaves_pcsc_within_a_second_of_remove(stack):
    """'vsc card remove' disconnects from vpcd: the reader is empty within a second, and the daemon exits 0."""
    cards, home = stack["cards"], stack["home"]
    cards.card(home, "remove")
    took = _wait_card(False, timeout=5)
    assert took < 1.0, f"the card left PC/SC {took:.2f} s after remove returned"
    assert stack["daemon"].wait_exit() == 0
