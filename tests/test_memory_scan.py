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
* (reported, not asserted) the password and the keys derived from it.

A positive control proves the scanner finds what it looks for: a throwaway
Python process holding a known DER in a bytes object, and the same key
loaded into OpenSSL (its p found little-endian).

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
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import attrs
import pytest
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import load_der_private_key

from tests.cards import Cards
from tests.integration import missing
from tests.servers import Servers, init_data_dir
from vsc import crypto
from vsc.card.protected import wrapping_key

pytestmark = pytest.mark.integration

PASSWORD = "memory-scan password 7f3a"
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


def key_needles(slot: str, der: bytes) -> dict[str, bytes]:
    """The full DER and every secret number of the key, big- and little-endian."""
    out = {f"key:{slot}:pkcs8-der": der}
    key = load_der_private_key(der, None)
    if isinstance(key, rsa.RSAPrivateKey):
        n = key.private_numbers()
        numbers = {"p": n.p, "q": n.q, "d": n.d, "dp": n.dmp1, "dq": n.dmq1, "qinv": n.iqmp}
    else:
        assert isinstance(key, ec.EllipticCurvePrivateKey)
        numbers = {"scalar": key.private_numbers().private_value}
    for name, value in numbers.items():
        be = value.to_bytes((value.bit_length() + 7) // 8, "big")
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


# --------------------------------------------------------------------------- the test


def test_no_private_key_material_in_the_card_daemons_memory(tmp_path):
    """
    Keys (PKCS#8 DER, RSA p/q/d/dP/dQ/qInv, EC scalar, both byte orders) are
    never found in the card daemon's memory after insert and between
    operations (sign with every slot, counter steps, data put/get); the
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
        record = tmp_path / "enrolled-keys.json"
        enrol = subprocess.run(
            [sys.executable, "-c", ENROL_AND_RECORD, str(record), "card", "--home", str(home), "enroll",
             "--server", server.endpoint, "--server-key", fingerprint, "--serial", "scan-1", "--code", code,
             "--password-file", str(pw), "--scrypt-log2n", "10", "--json"],
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
        daemon = cards.daemon(home, pw, name="scanned",
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
