"""
The measurement of [0027]-[0030]: is any of the card's secrets readable in
the memory of a running card daemon?

A real ``twistd -n vsc-server`` and a real ``twistd -n vsc-card``; the card
is enrolled by a TEST-ONLY wrapper around the real ``vsc card enroll`` code
path (vsc.cli.main in a subprocess, with crypto.generate_private_der wrapped
to record each new private key for this test: the product never writes them
anywhere). Between operations (never during one) the test reads
/proc/PID/maps and every readable region of /proc/PID/mem of the daemon (as
root) and searches it for:

* each slot's private key, its full PKCS#8 DER;
* each RSA key's secret numbers p, q, d (and dP, dQ, qInv), big-endian as
  in the DER and little-endian as in an OpenSSL BIGNUM;
* each EC key's private scalar, both byte orders;
* the plaintext of a data object stored through the control socket (a
  distinctive 48-byte random value);
* after PIV private-key operations too: the test stands in for vpcd (the
  daemon's ``--pcsc listen:`` mode) and sends GENERAL AUTHENTICATE with a
  PKCS#1 v1.5 signature block (signed through ``cryptography``), a PSS block
  and a PKCS#1 v1.5 ciphertext to decipher (both through libcrypto without
  padding, vsc.crypto._libcrypto);
* (reported, not asserted) the password and the keys derived from it.

A positive control proves the scanner finds what it looks for: a throwaway
Python process holding a known DER in a bytes object, and the same key
loaded into OpenSSL (its p found little-endian).

A second test audits every ``free()`` (and ``realloc``) of a process doing
the PIV RSA operations with an LD_PRELOAD shim compiled here: no heap block
holding a piece of d, p, q, dP, dQ or qInv (either byte order) is handed
back to the allocator without being cleansed. This is stronger than a scan,
which only sees freed memory that nothing reused yet. It is also how the
binding's choice of decoders was made (vsc/crypto/_libcrypto.py): the same
audit of ``d2i_AutoPrivateKey`` (reported, not asserted) finds OpenSSL 3's
decoder freeing copies of the DER uncleansed.

What is asserted is what the design guarantees: no private key, prime or
scalar is ever found. The data object's value necessarily crosses the
control socket in Python objects (the AMP box on the way in, the answer on
the way out); CPython frees them without zeroing, so it may be found after
the operation: the test records where, and whether it is still found after a
garbage collection in the daemon (a test-only SIGUSR1 handler installed by a
sitecustomize on the daemon's PYTHONPATH). The figures are written to
``memory-scan.json`` in the test's directory and printed (pytest -s).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import attrs
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.serialization import load_der_private_key

from tests import rsa_blocks
from tests.cards import Cards
from tests.integration import missing, wait_for
from tests.servers import Servers, init_data_dir
from vsc import crypto
from vsc.card.protected import wrapping_key
from vsc.card.vpcd import ATR
from vsc.protocol import piv
from vsc.wire import apdu, tlv

pytestmark = pytest.mark.integration

PASSWORD = "memory-scan password 7f3a"
PIV_PIN = b"314159"
SLOTS = ("9a", "9c", "9d", "9e")  # the order vsc.cli.card.SLOT_KEYS generates them in
CHUNK = 32 << 20
SKIP = {"[vvar]", "[vvar_vclock]", "[vsyscall]"}

# --------------------------------------------------------------------------- the scanner


@attrs.define
class Hit:
    needle: str
    address: int
    region: str


@attrs.define
class Scan:
    label: str
    bytes_scanned: int = 0
    regions: int = 0
    unreadable: int = 0  # bytes in readable-looking regions the kernel would not give us
    hits: list = attrs.Factory(list)
    seconds: float = 0.0

    def found(self, prefix: str = "") -> set[str]:
        return {h.needle for h in self.hits if h.needle.startswith(prefix)}


def scan(pid: int, needles: dict[str, bytes], label: str = "") -> Scan:
    """Search every readable mapping of ``pid`` for every needle (chunks overlap by the longest needle)."""
    result = Scan(label)
    started = time.monotonic()
    overlap = max(len(n) for n in needles.values()) - 1
    with open(f"/proc/{pid}/maps") as f:
        maps = f.read().splitlines()
    with open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            parts = line.split(None, 5)
            start, end = (int(x, 16) for x in parts[0].split("-"))
            perms, path = parts[1], (parts[5] if len(parts) > 5 else "[anon]")
            if not perms.startswith("r") or path in SKIP:
                continue
            result.regions += 1
            pos = start
            while pos < end:
                size = min(CHUNK, end - pos)
                try:
                    mem.seek(pos)
                    data = mem.read(size + min(overlap, end - pos - size))
                except OSError:
                    result.unreadable += end - pos
                    break
                result.bytes_scanned += size
                for name, needle in needles.items():
                    i = data.find(needle)
                    while i != -1 and i < size:
                        result.hits.append(Hit(name, pos + i, f"{path} {perms} {parts[0]}"))
                        i = data.find(needle, i + 1)
                pos += size
    result.seconds = time.monotonic() - started
    return result


def secret_numbers(der: bytes) -> dict[str, bytes]:
    """Every secret number of a private key, big-endian: RSA p, q, d, dP, dQ, qInv; an EC scalar."""
    key = load_der_private_key(der, None)
    if isinstance(key, rsa.RSAPrivateKey):
        n = key.private_numbers()
        numbers = {"p": n.p, "q": n.q, "d": n.d, "dp": n.dmp1, "dq": n.dmq1, "qinv": n.iqmp}
    else:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        numbers = {"scalar": key.private_numbers().private_value}
    return {name: value.to_bytes((value.bit_length() + 7) // 8, "big") for name, value in numbers.items()}


def key_needles(slot: str, der: bytes) -> dict[str, bytes]:
    """The full DER and every secret number of the key, big- and little-endian."""
    out = {f"key:{slot}:pkcs8-der": der}
    for name, be in secret_numbers(der).items():
        out[f"key:{slot}:{name}:big-endian"] = be
        out[f"key:{slot}:{name}:little-endian"] = be[::-1]
    return out


# --------------------------------------------------------------------------- the enrolment that records the keys

ENROL_AND_RECORD = textwrap.dedent("""
    # TEST ONLY: the real 'vsc card enroll' (vsc.cli.main), with each generated private key
    # also handed to the memory-scan test through a 0600 file. The product never does this.
    import json, os, sys
    from vsc import crypto
    recorded = []
    generate = crypto.generate_private_der
    def generate_and_record(kind):
        der = generate(kind)
        recorded.append({"kind": kind, "der": der.hex()})
        return der
    crypto.generate_private_der = generate_and_record
    from vsc.cli import main
    rc = main(sys.argv[2:])
    fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(recorded, f)
    sys.exit(rc)
""")

GC_HOOK = textwrap.dedent("""
    # TEST ONLY (tests/test_memory_scan.py): SIGUSR1 runs gc.collect() in this process and
    # appends the number of unreachable objects found to $VSC_TEST_GC_LOG.
    import gc, os, signal
    def _collect(signum, frame):
        n = gc.collect()
        with open(os.environ["VSC_TEST_GC_LOG"], "a") as f:
            f.write(f"{n}\\n")
    signal.signal(signal.SIGUSR1, _collect)
""")


def _positive_control(der: bytes, needles: dict[str, bytes]) -> Scan:
    """A throwaway process holding ``der`` in a bytes object and the key loaded in OpenSSL: the scanner must find both."""
    code = textwrap.dedent("""
        import sys, time
        from cryptography.hazmat.primitives.serialization import load_der_private_key
        held = bytes.fromhex(sys.stdin.readline())
        key = load_der_private_key(held, None)
        print("ready", flush=True)
        time.sleep(60)
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        proc.stdin.write(der.hex() + "\n")
        proc.stdin.flush()
        assert proc.stdout.readline().strip() == "ready"
        return scan(proc.pid, needles, "positive control")
    finally:
        proc.kill()
        proc.wait(10)


# --------------------------------------------------------------------------- PIV through the daemon's PC/SC link


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class VpcdStandIn:
    """The test in vpcd's place (vpcd's reversed mode): it connects to the card daemon's ``--pcsc listen:`` port."""

    def __init__(self, port: int):
        def connect():
            try:
                return socket.create_connection(("127.0.0.1", port), timeout=10)
            except OSError:
                return None
        self.sock = wait_for(connect, 30, f"the card daemon's PC/SC listener on port {port}")

    def close(self) -> None:
        self.sock.close()

    def _exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            assert chunk, "the card closed the PC/SC link"
            data += chunk
        return data

    def message(self, payload: bytes, reply: bool = True) -> bytes:
        self.sock.sendall(apdu.encode_vpcd(payload))
        return self._exact(int.from_bytes(self._exact(2), "big")) if reply else b""

    def transmit(self, ins: int, p1: int, p2: int, data: bytes = b"") -> tuple[bytes, int]:
        """One command as OpenSC sends it: command chaining for long data, GET RESPONSE while 61xx."""
        chunks = [data[i:i + 255] for i in range(0, len(data), 255)] or [b""]
        for i, chunk in enumerate(chunks):
            last = i == len(chunks) - 1
            body, sw = apdu.parse_response(self.message(apdu.command(0x00 if last else 0x10, ins, p1, p2, chunk,
                                                                     256 if last else None)))
            if not last and sw != 0x9000:
                return body, sw
        while sw >> 8 == 0x61:
            more, sw = apdu.parse_response(self.message(apdu.command(0x00, 0xC0, 0, 0, b"", (sw & 0xFF) or 256)))
            body += more
        return body, sw

    def general_authenticate(self, slot: int, block: bytes) -> bytes:
        data = tlv.encode(0x7C, tlv.encode_many([(0x82, b""), (0x81, block)]))
        body, sw = self.transmit(0x87, 0x07, slot, data)
        assert sw == 0x9000, f"GENERAL AUTHENTICATE {slot:02X}: SW {sw:04X}"
        return tlv.to_dict(tlv.decode_one(body, 0x7C))[0x82]


def piv_rsa_operations(port: int, ders: dict[str, bytes]) -> dict:
    """
    Through the daemon's PIV application: a PKCS#1 v1.5 SHA-256 signature
    and a PSS signature with 9A, a PKCS#1 v1.5 decipher with 9D; each result
    checked here with cryptography (so the operations certainly happened).
    """
    host = VpcdStandIn(port)
    try:
        assert host.message(bytes([apdu.VpcdControl.GET_ATR])) == ATR
        host.message(bytes([apdu.VpcdControl.POWER_ON]), reply=False)
        assert host.transmit(0xA4, 0x04, 0x00, piv.PIV_AID[:9])[1] == 0x9000
        assert host.transmit(0x20, 0x00, piv.PIN_REF, apdu.pad_pin(PIV_PIN))[1] == 0x9000
        key9a, key9d = (load_der_private_key(ders[s], None) for s in ("9a", "9d"))
        message = b"PIV raw RSA inside OpenSSL"
        sig = host.general_authenticate(0x9A, rsa_blocks.pkcs1_v15_block(256, "sha256", message))
        key9a.public_key().verify(sig, message, padding.PKCS1v15(), hashes.SHA256())
        pss_block, _ = rsa_blocks.pss_block(key9a, message)
        rsa_blocks.pss_verify(key9a.public_key(), message, host.general_authenticate(0x9A, pss_block))
        secret = os.urandom(32)
        em = host.general_authenticate(0x9D, key9d.public_key().encrypt(secret, padding.PKCS1v15()))
        assert rsa_blocks.eme_pkcs1_v15_decode(em) == secret
        return {"pkcs1_signature": True, "pss_signature": True, "decipher": True}
    finally:
        host.close()


# --------------------------------------------------------------------------- the test


def test_no_private_key_material_in_the_card_daemons_memory(tmp_path):
    """
    Keys (PKCS#8 DER, RSA p/q/d/dP/dQ/qInv, EC scalar, both byte orders) are
    never found in the card daemon's memory after insert and between
    operations (sign with every slot, counter steps, data put/get, PIV
    GENERAL AUTHENTICATE: PKCS#1 and PSS signatures and a decipher); the
    scanner finds a known DER and an OpenSSL-held prime in a control process.
    Where the data object's plaintext (and the password-derived keys) are
    found is measured and reported.
    """
    if os.geteuid() != 0:
        missing("reading another process's memory (/proc/PID/mem) needs root")
    servers = Servers(tmp_path / "logs")
    cards = Cards(tmp_path / "cards")
    report: dict = {"scans": []}
    try:
        data_dir = tmp_path / "server"
        fingerprint = init_data_dir(data_dir)["fingerprint"]
        server = servers.start(data_dir)

        # enrol through the real code path, recording the keys for this test only
        code = cards.vsc("admin", "--data-dir", str(data_dir), "issue", "scan-1", "--json").json()["code"]
        home, pw = tmp_path / "home", cards.password_file("pw", PASSWORD)
        pin_file, puk_file = tmp_path / "piv-pin", tmp_path / "piv-puk"
        pin_file.write_bytes(PIV_PIN + b"\n")
        puk_file.write_bytes(b"27182818\n")
        record = tmp_path / "enrolled-keys.json"
        enrol = subprocess.run(
            [sys.executable, "-c", ENROL_AND_RECORD, str(record), "card", "--home", str(home), "enroll",
             "--server", server.endpoint, "--server-key", fingerprint, "--serial", "scan-1", "--code", code,
             "--password-file", str(pw), "--pin-file", str(pin_file), "--puk-file", str(puk_file),
             "--scrypt-log2n", "10", "--pin-policy", "9c=once", "--json"],
            env=cards.env(), capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parent.parent,
        )
        assert enrol.returncode == 0, enrol.stderr
        keys = json.loads(record.read_text())
        record.unlink()
        assert [k["kind"] for k in keys] == ["rsa2048", "p256", "rsa2048", "p256"], keys
        ders = {slot: bytes.fromhex(k["der"]) for slot, k in zip(SLOTS, keys)}

        needles: dict[str, bytes] = {}
        for slot, der in ders.items():
            needles.update(key_needles(slot, der))
        value = os.urandom(48)
        needles["data:plaintext"] = value
        # reported only: the password and what it derives (the scrypt salt comes from the server's record)
        needles["password:utf8"] = PASSWORD.encode()

        # the positive control first: the scanner finds what it looks for
        control = _positive_control(ders["9a"], needles)
        assert "key:9a:pkcs8-der" in control.found(), control.found()
        assert "key:9a:p:little-endian" in control.found(), control.found()  # OpenSSL's BIGNUM of the loaded key
        report["positive_control"] = {"bytes_scanned": control.bytes_scanned, "found": sorted(control.found())}

        # the daemon, with the test-only gc hook
        hook_dir = tmp_path / "gc-hook"
        hook_dir.mkdir()
        (hook_dir / "sitecustomize.py").write_text(GC_HOOK)
        gc_log = tmp_path / "gc.log"
        pcsc_port = _free_port()
        daemon = cards.daemon(home, pw, name="scanned", extra=("--pcsc", f"listen:tcp:{pcsc_port}:interface=127.0.0.1"),
                              env={"PYTHONPATH": str(hook_dir), "VSC_TEST_GC_LOG": str(gc_log)}).start()
        status = cards.card(home, "status").json()
        for slot, der in ders.items():  # the recorded keys are the card's keys
            assert status["slots"][slot]["public_key_sha256"] == crypto.sha256(crypto.public_der_of(der)).hex()
        protection = _protection_key(data_dir, "scan-1")
        needles["password:protection-key"] = protection.protection_key
        needles["password:auth-key"] = protection.auth_key
        needles["password:wrapping-key"] = wrapping_key(protection.protection_key)

        scans: list[Scan] = []

        def take(label: str) -> Scan:
            assert daemon.running(), daemon.describe()
            s = scan(daemon.pid, needles, label)
            scans.append(s)
            return s

        take("after insert")
        msg = tmp_path / "msg"
        msg.write_bytes(b"sign me")
        for slot in SLOTS:
            cards.card(home, "sign", "--slot", slot, "--in", str(msg), "--out", str(tmp_path / f"{slot}.sig"))
        take("after signing with every slot")
        cards.card(home, "counter", "runs", "--add", "10")
        cards.card(home, "counter", "runs", "--sub", "1")
        take("after two counter steps")
        (tmp_path / "value").write_bytes(value)
        cards.card(home, "data", "put", "secret", "--in", str(tmp_path / "value"))
        (tmp_path / "value").unlink()
        take("after data put")
        cards.card(home, "data", "get", "secret", "--out", str(tmp_path / "value.out"))
        assert (tmp_path / "value.out").read_bytes() == value
        (tmp_path / "value.out").unlink()
        take("after data get")
        for slot in ("9a", "9c"):
            cards.card(home, "sign", "--slot", slot, "--in", str(msg), "--out", str(tmp_path / f"{slot}.sig2"))
        take("after two more signatures")
        report["piv"] = piv_rsa_operations(pcsc_port, ders)
        take("after PIV RSA: 2 signs, 1 decipher")
        daemon.send(signal.SIGUSR1)
        deadline = time.monotonic() + 10
        while not gc_log.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gc_log.exists(), daemon.describe()
        take("after gc.collect() in the daemon")

        for s in scans:
            report["scans"].append({
                "label": s.label, "bytes_scanned": s.bytes_scanned, "regions": s.regions,
                "unreadable_bytes": s.unreadable, "seconds": round(s.seconds, 2),
                "found": sorted(s.found()),
                "hits": [attrs.asdict(h) | {"address": hex(h.address)} for h in s.hits],
            })
        report["needles"] = {k: len(v) for k, v in needles.items()}
        report["gc_unreachable"] = gc_log.read_text().split()
        (tmp_path / "memory-scan.json").write_text(json.dumps(report, indent=1))
        print("\nmemory scan of the card daemon (pid %d), %d needles:" % (daemon.pid, len(needles)))
        for s in scans:
            print(f"  {s.label:<34} {s.bytes_scanned:>11,} bytes in {s.regions} regions ({s.seconds:.2f} s): "
                  + (", ".join(f"{n} x{sum(h.needle == n for h in s.hits)}" for n in sorted(s.found())) or "nothing"))

        key_hits = [h for s in scans for h in s.hits if h.needle.startswith("key:")]
        assert key_hits == [], key_hits
        assert all(s.bytes_scanned > 10_000_000 and s.unreadable == 0 for s in scans), report["scans"]

        cards.card(home, "remove")
        assert daemon.wait_exit() == 0
    finally:
        cards.close()
        servers.close()


def _protection_key(data_dir: Path, serial: str):
    """The password's keys, derived here from the KDF parameters in the server's record (for reporting)."""
    from tests.servers import open_store
    from vsc.card import ops
    from vsc.wire.ops import KdfParams

    store = open_store(data_dir)
    try:
        kdf = KdfParams.decode(store.get(serial).kdf)
    finally:
        store.close()
    return ops.derive_keys(PASSWORD, kdf)


# --------------------------------------------------------------------------- the free() audit of the PIV RSA path

FREE_AUDIT_C = r"""
/* TEST ONLY (tests/test_memory_scan.py): report every free()/realloc() of a heap block that still holds one of
   the needles in $VSC_AUDIT_NEEDLES (comma-separated hex, at most 32 of 16 bytes) to the fd $VSC_AUDIT_FD. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <malloc.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

static unsigned char needles[32][16];
static int count = -1, out_fd = -1;
static __thread int busy;
static void (*real_free)(void *);
static void *(*real_realloc)(void *, size_t);

static void setup(void) {
    const char *h = getenv("VSC_AUDIT_NEEDLES"), *fd = getenv("VSC_AUDIT_FD");
    count = 0;
    out_fd = fd ? atoi(fd) : -1;
    while (h && *h && count < 32) {
        for (int i = 0; i < 16; i++) { unsigned v; sscanf(h + 2 * i, "%2x", &v); needles[count][i] = (unsigned char)v; }
        count++;
        h = strchr(h, ',');
        if (h) h++;
    }
}

static void audit(void *p, const char *how) {
    if (!p || busy) return;
    busy = 1;
    if (count < 0) setup();
    size_t n = malloc_usable_size(p);
    for (int i = 0; i < count; i++) {
        if (n >= 16 && memmem(p, n, needles[i], 16)) {
            char line[64];
            int len = snprintf(line, sizeof line, "%s %d %zu\n", how, i, n);
            if (out_fd >= 0) (void)!write(out_fd, line, len);
        }
    }
    busy = 0;
}

void free(void *p) {
    if (!real_free) real_free = (void (*)(void *))dlsym(RTLD_NEXT, "free");
    audit(p, "free");
    real_free(p);
}

void *realloc(void *p, size_t size) {
    if (!real_realloc) real_realloc = (void *(*)(void *, size_t))dlsym(RTLD_NEXT, "realloc");
    audit(p, "realloc");
    return real_realloc(p, size);
}
"""

AUDITED_CHILD = textwrap.dedent("""
    # TEST ONLY: the PIV RSA path of vsc.crypto on a key read from a file straight into locked memory (never a
    # Python object), then, in mode "control", a malloc'ed copy of a needle freed as is (the shim must see it),
    # and in mode "autoprivatekey" what OpenSSL 3's d2i_AutoPrivateKey frees (reported by the test, not asserted).
    import ctypes, json, os, sys
    from vsc import crypto
    from vsc.card.memory import LockedBuffer
    mode, path, blocks, rounds = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), int(sys.argv[4])
    buf = LockedBuffer(os.path.getsize(path))
    fd = os.open(path, os.O_RDONLY)
    os.readv(fd, [buf.view])
    os.close(fd)
    results = []
    if mode == "piv":
        for _ in range(rounds):
            results = []
            for block in blocks:
                with crypto.PrivateKeyHandle(buf.view) as handle:
                    results.append(crypto.rsa_private_block(handle, bytes.fromhex(block)).hex())
    elif mode == "control":
        libc = ctypes.CDLL(None)
        libc.malloc.restype = ctypes.c_void_p
        libc.free.argtypes = [ctypes.c_void_p]
        needle = bytes.fromhex(os.environ["VSC_AUDIT_NEEDLES"].split(",")[0])
        p = libc.malloc(256)
        ctypes.memmove(p + 100, needle, len(needle))
        libc.free(p)
    elif mode == "autoprivatekey":
        lib = ctypes.CDLL("libcrypto.so.3")
        lib.d2i_AutoPrivateKey.restype = ctypes.c_void_p
        lib.d2i_AutoPrivateKey.argtypes = [ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_long]
        lib.EVP_PKEY_free.argtypes = [ctypes.c_void_p]
        raw = (ctypes.c_char * buf.size).from_buffer(buf.view)
        cursor = ctypes.c_void_p(ctypes.addressof(raw))
        lib.EVP_PKEY_free(lib.d2i_AutoPrivateKey(None, ctypes.byref(cursor), buf.size))
        del raw
    buf.free()
    print(json.dumps(results))
""")


def _audit(shim: Path, mode: str, key_file: Path, needles: list[bytes], blocks: list[bytes], rounds: int,
           log: Path) -> tuple[list[bytes], list[str]]:
    """Run AUDITED_CHILD under the shim; (its results, the shim's report lines)."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        env = dict(os.environ, LD_PRELOAD=str(shim), VSC_AUDIT_FD=str(fd),
                   VSC_AUDIT_NEEDLES=",".join(n.hex() for n in needles))
        proc = subprocess.run([sys.executable, "-c", AUDITED_CHILD, mode, str(key_file),
                               json.dumps([b.hex() for b in blocks]), str(rounds)],
                              env=env, pass_fds=(fd,), capture_output=True, text=True, timeout=120,
                              cwd=Path(__file__).resolve().parent.parent)
    finally:
        os.close(fd)
    assert proc.returncode == 0, proc.stderr
    return [bytes.fromhex(r) for r in json.loads(proc.stdout.strip().splitlines()[-1])], log.read_text().splitlines()


def test_the_piv_rsa_path_frees_no_uncleansed_key_bytes(tmp_path):
    """
    A process doing PIV RSA operations (PKCS#1 v1.5 signature block through
    cryptography, PSS block and a decipher through libcrypto) with its key in
    locked memory never frees or reallocs a heap block that still holds a
    16-byte piece of d, p, q, dP, dQ or qInv in either byte order; the results
    are right (so the operations ran); the shim reports a needle freed on
    purpose (positive control).
    """
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        missing("a C compiler (cc) to build the free() audit shim")
    shim = tmp_path / "free-audit.so"
    (tmp_path / "free-audit.c").write_text(FREE_AUDIT_C)
    subprocess.run([cc, "-shared", "-fPIC", "-O1", "-o", str(shim), str(tmp_path / "free-audit.c"), "-ldl"],
                   check=True, capture_output=True, timeout=120)

    der = crypto.generate_private_der(crypto.KEY_RSA2048)
    key = load_der_private_key(der, None)
    key_file = tmp_path / "key.der"
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(der)
    names, needles = [], []
    for name, be in secret_numbers(der).items():
        middle = len(be) // 2 - 8
        for order, value in (("big-endian", be), ("little-endian", be[::-1])):
            names.append(f"{name}:{order}")
            needles.append(value[middle:middle + 16])
    message = b"audited"
    blocks = [rsa_blocks.pkcs1_v15_block(256, "sha256", message), rsa_blocks.pss_block(key, message)[0],
              key.public_key().encrypt(b"secret", padding.PKCS1v15())]

    results, hits = _audit(shim, "piv", key_file, needles, blocks, 5, tmp_path / "piv.log")
    key.public_key().verify(results[0], message, padding.PKCS1v15(), hashes.SHA256())
    rsa_blocks.pss_verify(key.public_key(), message, results[1])
    assert rsa_blocks.eme_pkcs1_v15_decode(results[2]) == b"secret"
    assert hits == [], [f"{line} ({names[int(line.split()[1])]})" for line in hits]

    _, control = _audit(shim, "control", key_file, needles, [], 1, tmp_path / "control.log")
    assert len(control) == 1 and control[0].startswith("free 0 "), control

    _, auto = _audit(shim, "autoprivatekey", key_file, needles, [], 1, tmp_path / "auto.log")
    print(f"\nfree() audit: the PIV path freed 0 uncleansed blocks holding key bytes in 5 rounds; OpenSSL's "
          f"d2i_AutoPrivateKey (not used) freed {len(auto)} uncleansed blocks holding key bytes in one load")
