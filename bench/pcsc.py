"""
Benchmark of the card in the PC/SC stack: APDU round trips and signatures
per second through pcscd + vsmartcard's vpcd, at the APDU level and through
OpenSC's PKCS#11 module, beside the floors measured in the same run.

    .venv/bin/python bench/pcsc.py [--quick] [--keep]

Runs as root on a machine with pcscd, vsmartcard-vpcd, opensc, softhsm2 and
python3-pyscard (Debian packages; see docs/pcsc.md); bounded well under two
minutes. This is a benchmark, not a test: it checks status words, nothing
more (tests/test_pcsc.py checks the signatures).

Set-up. pcscd is started here (``pcscd -f``) unless one is running, and
stopped at the end. A real ``twistd vsc-server`` (2048-bit key, 127.0.0.1)
and a card enrolled with it (scrypt log2 N = 10, the enrolment certificates,
PIN from a file) inserted by a real ``twistd vsc-card --pcsc
tcp:127.0.0.1:35963``: reader "Virtual PCD 00 00".

The floor: a minimal card in THIS process (a thread, plain blocking socket,
TCP_QUICKACK after every read) connected to the second vpcd reader
("Virtual PCD 00 01", port 35964) that answers 9000 to every APDU: what
pcscd + vpcd + pyscard cost on their own. The same minimal card without
TCP_QUICKACK shows Debian vpcd's 44 ms delayed-ACK pitfall. The floor card
leaves the reader before the PKCS#11 part (OpenSC would probe it).

APDU-level clients use pyscard, which is not in the venv: they run in the
system ``/usr/bin/python3`` (Debian's python3-pyscard) as a subprocess, one
PC/SC connection each, SELECT and VERIFY done once before the timing:

* round trip: GET DATA of the Discovery object (no protected-information
  access) and VERIFY status (reads the PIN record from locked memory);
* RSA-2048 signature: GENERAL AUTHENTICATE 9A alg 07 with a PKCS#1 v1.5
  block, sent as OpenSC does (command chaining: 2 blocks; the 264-byte answer
  as 256 + 61 08 + GET RESPONSE): 3 APDUs per signature;
* P-256 signature: GENERAL AUTHENTICATE 9C alg 11 on a SHA-256 hash: 1 APDU.

PKCS#11: python-pkcs11 (in the venv) in this process, one session, one
login: OpenSC's opensc-pkcs11.so on the card (CKM_SHA256_RSA_PKCS with 9A,
CKM_ECDSA on a digest with 9E) and SoftHSM2 2.6 on a fresh token in a
temporary SOFTHSM2_CONF (same mechanisms, keys generated on the token). Also
one ``pkcs11-tool --sign`` process per signature, as shell scripts use it.

In-process crypto rows: what the card daemon does per private-key APDU
(vsc.crypto.PrivateKeyHandle loads the key from its DER for ONE operation;
for RSA, OpenSSL setting up the fresh key's blinding on its first operation
dominates), measured with the same key, so a reader can see where the time
of a signature goes.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._util import fmt_rate, machine_line, markdown_table, rate  # noqa: E402

BIN = Path(sys.executable).parent
READER = "Virtual PCD 00 00"
FLOOR_READER = "Virtual PCD 00 01"
OPENSC = next((p for p in ("/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so", "/usr/lib/opensc-pkcs11.so",
                           "/usr/lib/aarch64-linux-gnu/opensc-pkcs11.so") if os.path.exists(p)), None)
SOFTHSM = "/usr/lib/softhsm/libsofthsm2.so"
SYSTEM_PYTHON = "/usr/bin/python3"
PIN = "135790"
PUK = "24680246"


# ---------------------------------------------------------------- the floor card (plain socket, this process)


class FloorCard(threading.Thread):
    """
    A card that answers 9000 to every APDU, on a plain blocking socket;
    optionally without TCP_QUICKACK. ``responder`` (APDU bytes -> response
    bytes) answers instead of 9000: bench/latency.py's replay card answers
    from a recorded conversation, at no cost of its own.
    """

    def __init__(self, port: int, quickack: bool = True, responder=None):
        super().__init__(daemon=True)
        from vsc.card.vpcd import ATR
        from vsc.wire import apdu

        self.apdu = apdu
        self.atr = ATR
        self.port, self.quickack = port, quickack
        self.responder = responder
        self.stop_flag = threading.Event()
        self.connected = threading.Event()
        self.sock: socket.socket | None = None
        self.apdus = 0

    def run(self) -> None:
        deadline = time.monotonic() + 10
        while not self.stop_flag.is_set():
            try:
                self.sock = socket.create_connection(("127.0.0.1", self.port), timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    return
                time.sleep(0.1)
        if self.sock is None:
            return
        self.sock.settimeout(0.2)
        self.connected.set()
        from twisted.protocols.basic import Int16StringReceiver

        payloads: list[bytes] = []
        reader = Int16StringReceiver()  # the card's own framing, fed by hand (no reactor here)
        reader.stringReceived = payloads.append
        while not self.stop_flag.is_set():
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except OSError:
                return
            if not data:
                return
            if self.quickack:
                self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
            reader.dataReceived(data)
            while payloads:
                payload = payloads.pop(0)
                ctl = self.apdu.control_of(payload)
                if ctl is self.apdu.VpcdControl.GET_ATR:
                    self.sock.sendall(self.apdu.encode_vpcd(self.atr))
                elif ctl is None:
                    self.apdus += 1
                    answer = b"\x90\x00" if self.responder is None else self.responder(payload)
                    self.sock.sendall(self.apdu.encode_vpcd(answer))

    def stop(self) -> None:
        self.stop_flag.set()
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.shutdown(socket.SHUT_RDWR)
            self.sock.close()
        self.join(5)


# ---------------------------------------------------------------- the APDU client (system python + pyscard)

CLIENT = r'''
import json, statistics, sys, time
from smartcard.System import readers
from smartcard.CardConnection import CardConnection

plan = json.load(sys.stdin)
reader = [r for r in readers() if str(r) == plan["reader"] or str(r).startswith(plan["reader"])][0]
conn = reader.createConnection()
conn.connect(CardConnection.T1_protocol)

def tx(apdu):
    data, sw1, sw2 = conn.transmit(list(apdu))
    n = 1
    while sw1 == 0x61:
        more, sw1, sw2 = conn.transmit([0x00, 0xC0, 0x00, 0x00, sw2])
        data += more
        n += 1
    return data, (sw1 << 8) | sw2, n

for apdu in plan["setup"]:
    _d, sw, _n = tx(bytes.fromhex(apdu))
    if sw != 0x9000:
        sys.exit(f"setup APDU {apdu} answered {sw:04X}")

results = {}
for name, seq, budget in plan["ops"]:
    seq = [bytes.fromhex(a) for a in seq]
    def op():
        total = 0
        for a in seq:
            _d, sw, n = tx(a)
            total += n
            if sw != 0x9000:
                raise SystemExit(f"{name}: {a.hex()} answered {sw:04X}")
        return total
    apdus = op()
    rates = []
    window = budget / 3
    for _ in range(3):
        count, start = 0, time.perf_counter()
        while True:
            op()
            count += 1
            t = time.perf_counter()
            if t - start >= window and count >= 2:
                break
        rates.append(count / (t - start))
    results[name] = {"rate": statistics.median(rates), "apdus": apdus}
print(json.dumps(results))
'''


def apdu_client(reader: str, setup: list[str], ops: list[tuple[str, list[str], float]]) -> dict:
    plan = json.dumps({"reader": reader, "setup": setup, "ops": ops})
    budget = sum(o[2] for o in ops)
    proc = subprocess.run([SYSTEM_PYTHON, "-c", CLIENT], input=plan, capture_output=True, text=True,
                          timeout=30 + 3 * budget)
    if proc.returncode != 0:
        raise RuntimeError(f"pyscard client failed: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout)


def _hex(b: bytes) -> str:
    return b.hex()


def piv_apdus() -> dict:
    """The APDUs of the card measurements (built with vsc.wire, as OpenSC would send them)."""
    import hashlib

    from vsc.protocol import piv
    from vsc.wire import apdu, tlv

    select = apdu.command(0, 0xA4, 0x04, 0x00, piv.PIV_AID[:9], 256)
    verify = apdu.command(0, 0x20, 0x00, 0x80, apdu.pad_pin(PIN.encode()))
    digest = hashlib.sha256(b"bench").digest()
    info = bytes.fromhex("3031300d060960864801650304020105000420") + digest
    block = b"\x00\x01" + b"\xff" * (256 - 3 - len(info)) + b"\x00" + info
    rsa = tlv.encode(0x7C, tlv.encode_many([(0x82, b""), (0x81, block)]))
    ec = tlv.encode(0x7C, tlv.encode_many([(0x82, b""), (0x81, digest)]))
    return {
        "setup": [_hex(select), _hex(verify)],
        "getdata": [_hex(apdu.command(0, 0xCB, 0x3F, 0xFF, tlv.encode(0x5C, b"\x7e"), 256))],
        "status": [_hex(apdu.command(0, 0x20, 0x00, 0x80))],
        "rsa": [_hex(apdu.command(0x10, 0x87, 0x07, 0x9A, rsa[:255])),
                _hex(apdu.command(0x00, 0x87, 0x07, 0x9A, rsa[255:], 256))],
        # the same GENERAL AUTHENTICATE as ONE extended-length APDU (the ATR advertises extended Lc/Le)
        "rsa_ext": [_hex(apdu.command(0x00, 0x87, 0x07, 0x9A, rsa, 65536, extended=True))],
        "ecdsa": [_hex(apdu.command(0, 0x87, 0x11, 0x9C, ec, 256))],
        "floor": [_hex(apdu.command(0, 0x20, 0x00, 0x80))],
    }


# ---------------------------------------------------------------- processes


def _env(tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VSC_")}
    env.update(PYTHONUNBUFFERED="1", XDG_RUNTIME_DIR=str(tmp / "rt"), VSC_LOCK_DIR=str(tmp / "lock"))
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.3)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _readers_present() -> dict:
    out = subprocess.run(["opensc-tool", "-l"], capture_output=True, text=True, timeout=20).stdout
    found = {}
    for line in out.splitlines():
        parts = line.split(None, 2)
        if len(parts) >= 3 and parts[0].isdigit() and "Virtual PCD" in line:
            found[line[line.index("Virtual PCD"):].strip()] = parts[1] == "Yes"
    return found


def _wait(pred, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.05)


class Stack:
    """pcscd (if not running), a vsc-server, an enrolled card daemon with --pcsc; ``close`` stops what it started."""

    def __init__(self, tmp: Path, progress):
        self.tmp, self.progress = tmp, progress
        self.procs: list[subprocess.Popen] = []
        self.pcscd: subprocess.Popen | None = None
        self.card: subprocess.Popen | None = None

    def _spawn(self, argv, log: str, **kw) -> subprocess.Popen:
        out = open(self.tmp / log, "ab")
        p = subprocess.Popen([str(a) for a in argv], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                             start_new_session=True, **kw)
        out.close()
        self.procs.append(p)
        return p

    def _vsc(self, *args, env) -> str:
        proc = subprocess.run([str(BIN / "vsc"), *map(str, args)], env=env, stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=120)
        if proc.returncode:
            raise RuntimeError(f"vsc {' '.join(map(str, args[:2]))} failed: {proc.stderr.strip()}")
        return proc.stdout

    def start(self) -> None:
        if not (Path("/run/pcscd/pcscd.comm").exists() and _port_open(35963)):
            self.progress("starting pcscd -f")
            _wait(lambda: all(_bindable(p) for p in (35963, 35964)), 60,
                  "vpcd's ports 35963/35964 to be free (they are in the ephemeral range)")
            self.pcscd = self._spawn(["pcscd", "-f"], "pcscd.log")
            _wait(lambda: _port_open(35963) and _port_open(35964), 15, "pcscd/vpcd to listen")
        present = _readers_present()
        if present.get(READER) or present.get(FLOOR_READER):
            raise RuntimeError("a card is already in a vpcd reader; remove it first")
        env = _env(self.tmp)
        (self.tmp / "rt").mkdir(mode=0o700)
        self.progress("server: vsc admin init, twistd vsc-server")
        data = self.tmp / "server"
        info = json.loads(self._vsc("admin", "--data-dir", data, "init", "--key-bits", "2048", "--json", env=env))
        port = _free_port()
        self._spawn([BIN / "twistd", "-n", "--pidfile=", "vsc-server", "--data-dir", data,
                     "--listen", f"tcp:{port}:interface=127.0.0.1"], "server.log", env=env, cwd=data)
        _wait(lambda: _port_open(port), 30, "the server")
        code = json.loads(self._vsc("admin", "--data-dir", data, "issue", "bench-1", "--json", env=env))["code"]
        home = self.tmp / "home"
        for name, value in (("pw", "bench password"), ("pin", PIN), ("puk", PUK)):
            (self.tmp / name).write_text(value + "\n")
        self.progress("card: vsc card enroll, twistd vsc-card --pcsc")
        self._vsc("card", "--home", home, "enroll", "--server", f"tcp:127.0.0.1:{port}", "--server-key",
                  info["fingerprint"], "--serial", "bench-1", "--code", code, "--password-file", self.tmp / "pw",
                  "--pin-file", self.tmp / "pin", "--puk-file", self.tmp / "puk", "--scrypt-log2n", "10",
                  # one VERIFY, then many 9C signatures: PIN policy once (the default, always, needs a VERIFY each)
                  "--pin-policy", "9c=once", env=env)
        self.card = self._spawn([BIN / "twistd", "-n", "--pidfile=", "vsc-card", "--home", home, "--password-file",
                                 self.tmp / "pw", "--pcsc", "tcp:127.0.0.1:35963"], "card.log", env=env)
        _wait(lambda: _readers_present().get(READER) is True, 60, "the card in PC/SC")

    def close(self) -> None:
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(20)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(10)


# ---------------------------------------------------------------- PKCS#11 (python-pkcs11)


def pkcs11_rates(module: str, pin: str, rsa_label_or_id, ec_label_or_id, budget: float) -> dict:
    import hashlib

    import pkcs11
    from pkcs11 import Mechanism, ObjectClass

    lib = pkcs11.lib(module)
    token = next(slot.get_token() for slot in lib.get_slots(token_present=True))
    out = {}
    with token.open(user_pin=pin) as session:
        def key(ref):
            if isinstance(ref, bytes):
                return session.get_key(object_class=ObjectClass.PRIVATE_KEY, id=ref)
            return session.get_key(object_class=ObjectClass.PRIVATE_KEY, label=ref)

        rsa, ec = key(rsa_label_or_id), key(ec_label_or_id)
        data = b"benchmark data " * 4
        digest = hashlib.sha256(data).digest()
        out["rsa"] = rate(lambda: rsa.sign(data, mechanism=Mechanism.SHA256_RSA_PKCS), budget)
        out["ecdsa"] = rate(lambda: ec.sign(digest, mechanism=Mechanism.ECDSA), budget)
    return out


def softhsm_setup(tmp: Path) -> dict:
    """A fresh SoftHSM2 token in tmp with an RSA-2048 and a P-256 key pair (SOFTHSM2_CONF set for this process
    and the pkcs11-tool it starts)."""
    tokens = tmp / "softhsm-tokens"
    tokens.mkdir()
    conf = tmp / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokens}\nobjectstore.backend = file\nlog.level = ERROR\n")
    os.environ["SOFTHSM2_CONF"] = str(conf)
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", "1234", "--so-pin", "5678"],
                   check=True, capture_output=True, timeout=30)
    import pkcs11
    from pkcs11 import KeyType
    from pkcs11.util.ec import encode_named_curve_parameters

    lib = pkcs11.lib(SOFTHSM)
    token = lib.get_token(token_label="bench")
    with token.open(rw=True, user_pin="1234") as session:
        session.generate_keypair(KeyType.RSA, 2048, label="rsa", store=True)
        params = session.create_domain_parameters(KeyType.EC, {pkcs11.Attribute.EC_PARAMS:
                                                               encode_named_curve_parameters("secp256r1")},
                                                  local=True)
        params.generate_keypair(label="ec", store=True)
    # the one-process-per-signature row uses a key pkcs11-tool made itself
    subprocess.run(["pkcs11-tool", "--module", SOFTHSM, "--login", "--pin", "1234", "--keypairgen", "--key-type",
                    "rsa:2048", "--label", "tool"], check=True, capture_output=True, timeout=60)



def pkcs11_tool_rate(module: str, pin: str, select: list[str], mech: str, data: Path, budget: float) -> float:
    argv = ["pkcs11-tool", "--module", module, "--login", "--pin", pin, "--sign", "-m", mech, "-i", str(data),
            "-o", os.devnull, *select]

    failures = []

    def once():
        # SoftHSM 2.6 sometimes answers CKR_GENERAL_ERROR to a second process while this one has the token
        # open: one retry, and the failures are reported
        for _ in range(2):
            proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
            if not proc.returncode:
                return
            failures.append((proc.stdout + proc.stderr).strip()[-300:])
        raise RuntimeError(f"{' '.join(argv[:3])} ... failed twice: {failures[-1]}")

    try:
        r = rate(once, budget, repeats=1)
        if failures:
            print(f"warning: {len(failures)} pkcs11-tool run(s) failed and were retried: {failures[0]}",
                  file=sys.stderr)
        return r
    except RuntimeError as e:
        print(f"warning: {e}", file=sys.stderr)
        return None


# ---------------------------------------------------------------- crypto rows (this process)


def crypto_rates(budget: float) -> dict:
    from bench.crypto import piv_blocks
    from vsc import crypto

    rsa_der = crypto.generate_private_der(crypto.KEY_RSA2048)
    ec_der = crypto.generate_private_der(crypto.KEY_P256)
    blocks = piv_blocks(rsa_der)

    def rsa_per_op(block: bytes):
        def once() -> None:
            with crypto.PrivateKeyHandle(rsa_der) as k:
                crypto.rsa_private_block(k, block)
        return once

    held = crypto.PrivateKeyHandle(rsa_der)
    held.openssl_key  # noqa: B018 - loaded once

    def ec_per_op():
        with crypto.PrivateKeyHandle(ec_der) as k:
            crypto.ecdsa_sign_hash(k, bytes(32))

    return {
        "rsa_load_and_op": rate(rsa_per_op(blocks["pkcs1"]), budget),
        "rsa_raw_load_and_op": rate(rsa_per_op(blocks["pss"]), budget),
        "rsa_load": rate(lambda: crypto.PrivateKeyHandle(rsa_der).openssl_key, budget),
        "rsa_op": rate(lambda: crypto.rsa_private_block(held, blocks["pkcs1"]), budget),
        "ec_load_and_op": rate(ec_per_op, budget),
    }


# ---------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/pcsc.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="shorter windows (about a third of the time)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    args = p.parse_args(argv)
    budget = 1.0 if args.quick else 3.0
    started = time.monotonic()

    def progress(msg: str) -> None:
        print(f"[{time.monotonic() - started:5.1f} s] {msg}", file=sys.stderr, flush=True)

    missing = [t for t in ("pcscd", "opensc-tool", "pkcs11-tool", "softhsm2-util") if shutil.which(t) is None]
    if missing or OPENSC is None or not Path("/usr/lib/pcsc/drivers/serial/libifdvpcd.so").exists():
        print(f"missing: {', '.join(missing + (['opensc-pkcs11.so'] if OPENSC is None else []))} or vsmartcard-vpcd",
              file=sys.stderr)
        return 2
    if subprocess.run([SYSTEM_PYTHON, "-c", "import smartcard"], capture_output=True).returncode:
        print(f"{SYSTEM_PYTHON} has no pyscard (apt-get install python3-pyscard)", file=sys.stderr)
        return 2

    import fcntl

    lock = open("/tmp/vsc-pcsc.lock", "a+")  # shared with tests/test_pcsc.py: pcscd and vpcd are machine-wide
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        progress("waiting for /tmp/vsc-pcsc.lock (a PC/SC test run is using pcscd)")
        fcntl.flock(lock, fcntl.LOCK_EX)
    tmp = Path(tempfile.mkdtemp(prefix="vsc-bench-pcsc-"))
    stack = Stack(tmp, progress)
    rows = []
    try:
        stack.start()
        apdus = piv_apdus()

        progress("floor: minimal card on Virtual PCD 00 01")
        floor = FloorCard(35964)
        floor.start()
        floor.connected.wait(10)
        _wait(lambda: _readers_present().get(FLOOR_READER) is True, 20, "the floor card")
        f = apdu_client(FLOOR_READER, [], [("floor", apdus["floor"], budget)])["floor"]
        floor.stop()
        _wait(lambda: not _readers_present().get(FLOOR_READER), 20, "the floor card to leave")
        progress("floor without TCP_QUICKACK")
        slow = FloorCard(35964, quickack=False)
        slow.start()
        slow.connected.wait(10)
        _wait(lambda: _readers_present().get(FLOOR_READER) is True, 20, "the slow floor card")
        s = apdu_client(FLOOR_READER, [], [("floor", apdus["floor"], min(budget, 1.5))])["floor"]
        slow.stop()
        _wait(lambda: not _readers_present().get(FLOOR_READER), 20, "the slow floor card to leave")

        progress("card: APDU level")
        c = apdu_client(READER, apdus["setup"], [
            ("getdata", apdus["getdata"], budget), ("status", apdus["status"], budget),
            ("rsa", apdus["rsa"], budget), ("ecdsa", apdus["ecdsa"], budget)])
        progress("card: OpenSC PKCS#11")
        o = pkcs11_rates(OPENSC, PIN, b"\x01", b"\x04", budget)
        data = tmp / "data.txt"
        data.write_bytes(b"benchmark data\n")
        o_tool = pkcs11_tool_rate(OPENSC, PIN, ["--id", "01"], "SHA256-RSA-PKCS", data, budget)
        progress("SoftHSM2")
        softhsm_setup(tmp)
        sh = pkcs11_rates(SOFTHSM, "1234", "rsa", "ec", budget)
        sh_tool = pkcs11_tool_rate(SOFTHSM, "1234", ["--label", "tool"], "SHA256-RSA-PKCS", data, budget)
        progress("crypto in this process")
        cr = crypto_rates(budget)
    finally:
        stack.close()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            progress(f"kept {tmp}")

    def row(name, r, apdus_per_op, note=""):
        per = f"{1000 / r:,.2f}" if r else "—"
        per_apdu = f"{1000 / (r * apdus_per_op):,.3f}" if r and apdus_per_op else "—"
        return [name, fmt_rate(r), per, str(apdus_per_op) if apdus_per_op else "—", per_apdu, note]

    fr = f["rate"]
    rows = [
        row("floor: minimal card, 9000 to everything (TCP_QUICKACK)", fr, 1, "pcscd + vpcd + pyscard"),
        row("floor: the same card WITHOUT TCP_QUICKACK", s["rate"], 1, "Debian vpcd's 44 ms pitfall"),
        row("card: GET DATA Discovery (round trip)", c["getdata"]["rate"], c["getdata"]["apdus"],
            f"{fr / c['getdata']['rate']:.2f}× the floor's time"),
        row("card: VERIFY status (reads the PIN record)", c["status"]["rate"], c["status"]["apdus"],
            f"{fr / c['status']['rate']:.2f}× the floor's time"),
        row("card: RSA-2048 sign, 9A (GENERAL AUTHENTICATE)", c["rsa"]["rate"], c["rsa"]["apdus"],
            "chained 2 blocks + GET RESPONSE"),
        row("card: P-256 sign, 9C (GENERAL AUTHENTICATE)", c["ecdsa"]["rate"], c["ecdsa"]["apdus"], ""),
        row("OpenSC PKCS#11: CKM_SHA256_RSA_PKCS, 9A", o["rsa"], 0, "python-pkcs11, one session"),
        row("OpenSC PKCS#11: CKM_ECDSA (digest), 9E", o["ecdsa"], 0, "python-pkcs11, one session"),
        row("OpenSC: one pkcs11-tool --sign process (RSA)", o_tool, 0, "process start, C_Initialize, login, sign"),
        row("SoftHSM2 2.6 PKCS#11: CKM_SHA256_RSA_PKCS", sh["rsa"], 0, "python-pkcs11, one session"),
        row("SoftHSM2 2.6 PKCS#11: CKM_ECDSA (digest)", sh["ecdsa"], 0, "python-pkcs11, one session"),
        row("SoftHSM2: one pkcs11-tool --sign process (RSA)", sh_tool, 0, "process start, C_Initialize, login, sign"),
        row("crypto: load RSA key + PIV op, PKCS#1 v1.5 block", cr["rsa_load_and_op"], 0,
            "per RSA sign APDU in the card (cryptography)"),
        row("crypto: load RSA key + PIV op, PSS/decipher block", cr["rsa_raw_load_and_op"], 0,
            "libcrypto, RSA without padding"),
        row("crypto: load RSA key (PrivateKeyHandle) alone", cr["rsa_load"], 0, "parse only; no key check"),
        row("crypto: PIV op, PKCS#1 v1.5 block, key held", cr["rsa_op"], 0, "vsc.crypto.rsa_private_block"),
        row("crypto: load P-256 key + ECDSA", cr["ec_load_and_op"], 0, "per EC APDU in the card"),
    ]
    print()
    print(markdown_table(["operation", "per second", "ms per op", "APDUs/op", "ms per APDU", "note"], rows))
    print()
    print(f"{machine_line()}; windows {budget:g} s (median of 3); total {time.monotonic() - started:.0f} s")
    return 0


# ---------------------------------------------------------------- OpenPGP through scdaemon beside PIV through OpenSC


def openpgp_latency(n: int = 8, progress=lambda m: None) -> dict:
    """
    One signature per process, on ONE card, through each application: ``gpg --detach-sign`` with the card's
    OpenPGP signature key (gpg -> gpg-agent -> scdaemon -> pcscd -> vpcd -> the card; the signature PIN is
    forced, so every signature is a VERIFY (scripted pinentry) and a PSO:COMPUTE DIGITAL SIGNATURE) and
    ``pkcs11-tool --sign`` with PIV 9A (OpenSC: C_Initialize, login, sign). Both RSA-2048 and timed as whole
    processes. The keys are generated on the card first (``gpg --card-edit`` generate); gpg-agent and
    scdaemon stay up between signatures, as for a user, and are stopped before the PIV runs (scdaemon holds
    the reader exclusively). The last OpenPGP signature is checked with ``gpg --verify``.

    Returns ``{"n", "gpg_sign_ms", "pkcs11_tool_sign_ms"}`` (lists of milliseconds) or ``{"skipped": why}``.
    Takes /tmp/vsc-pcsc.lock (shared with the PC/SC tests) and uses a running pcscd if there is one.
    """
    import fcntl

    from vsc.devtools import gnupg

    missing = [t for t in ("pcscd", "gpg", "gpg-agent", "gpgconf", "pkcs11-tool") if shutil.which(t) is None]
    if missing or not gnupg.SCDAEMON.exists() or gnupg.LIBPCSC is None or OPENSC is None:
        return {"skipped": "missing: " + ", ".join(missing or ["scdaemon, libpcsclite or opensc-pkcs11.so"])}
    lock = open("/tmp/vsc-pcsc.lock", "a+")
    fcntl.flock(lock, fcntl.LOCK_EX)
    tmp = Path(tempfile.mkdtemp(prefix="vsc-bench-pgp-", dir="/tmp"))
    stack = Stack(tmp, progress)
    g = None
    try:
        stack.start()
        g = gnupg.GnuPG(tmp, PIN)
        progress("OpenPGP: gpg --card-edit generate (three RSA-2048 keys on the card)")
        gnupg.generate_card_keys(g)
        data = tmp / "data.txt"
        data.write_bytes(b"benchmark data\n")
        g.gpg("--yes", "-u", gnupg.EMAIL, "--output", str(tmp / "warm.sig"), "--detach-sign", str(data))
        progress(f"OpenPGP: {n} x gpg --detach-sign")
        gpg_ms = []
        for i in range(n):
            t0 = time.perf_counter()
            g.gpg("--yes", "-u", gnupg.EMAIL, "--output", str(tmp / "data.sig"), "--detach-sign", str(data))
            gpg_ms.append((time.perf_counter() - t0) * 1000)
        if "Good signature" not in g.gpg("--verify", str(tmp / "data.sig"), str(data)).stderr:
            raise RuntimeError("gpg --verify did not accept the card's signature")
        g.close()
        progress(f"PIV: {n} x pkcs11-tool --sign (OpenSC)")
        piv_ms = []
        argv = ["pkcs11-tool", "--module", OPENSC, "--login", "--pin", PIN, "--sign", "--id", "01", "--mechanism",
                "SHA256-RSA-PKCS", "--input-file", str(data), "--output-file", str(tmp / "data.p11")]
        subprocess.run(argv, capture_output=True, timeout=120, check=True)  # warm-up
        for i in range(n):
            t0 = time.perf_counter()
            subprocess.run(argv, capture_output=True, timeout=120, check=True)
            piv_ms.append((time.perf_counter() - t0) * 1000)
        return {"n": n, "gpg_sign_ms": gpg_ms, "pkcs11_tool_sign_ms": piv_ms}
    finally:
        if g is not None:
            g.close()
        stack.close()
        shutil.rmtree(tmp, ignore_errors=True)
        lock.close()


if __name__ == "__main__":
    raise SystemExit(main())
