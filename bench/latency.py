"""
Sign latency of a Virtual Smart Card in use, through each way an application
reaches it, beside SoftHSM2 (a software PKCS#11 token) in the same run.

    .venv/bin/python bench/latency.py [--quick] [--no-pcsc] [--keep]

This is a benchmark, not a test (it does check that every signature verifies
under the slot's public key).

Set-up (all on loopback, all in a temporary directory): a real ``twistd -n
vsc-server`` (SQLite, RSA-2048 server key) started by bench/server.py's
ServerProcess; one card enrolled with the real CLI (``vsc card enroll``,
scrypt log2(N) = 10 for a quick enrolment: it does not change the sign path;
slot 9a RSA-2048, slot 9c P-256); the real card daemon ``twistd -n vsc-card
--no-ssh-agent`` with a private XDG_RUNTIME_DIR (control socket) and
VSC_LOCK_DIR (machine lock), plus ``--pcsc tcp:127.0.0.1:35963`` when PC/SC
is measured. Per-call wall-clock latency, p50 and p95 (nearest rank):

* ``vsc card sign`` — the whole CLI process per signature (interpreter
  start, imports, one AMP call on the control socket, file I/O);
* in-process AMP — one long-lived client process calls ``SignDigest`` on the
  control socket through the one control client (vsc.card.client; the daemon
  loads the slot's key from its locked memory and signs); also "new
  connection + call", what a fresh client pays besides its interpreter;
* PC/SC — when pcscd, vsmartcard's vpcd and the system's pyscard are
  installed and no pcscd is running already (a running one belongs to
  someone else and is left alone): this script starts ``pcscd -f``, the card
  daemon connects to vpcd, and a client process (the system python3 with
  pyscard) sends bench/pcsc.py's APDUs (``piv_apdus``): SELECT the PIV
  application and VERIFY the PIN once, then GENERAL AUTHENTICATE timed per
  call: P-256 ECDSA over a SHA-256 digest in slot 9c, and a raw RSA-2048
  operation on a PKCS#1 v1.5 block in slot 9a (command chaining, 61xx + GET
  RESPONSE, as OpenSC does); and one ``pkcs11-tool --sign`` process per
  signature through OpenSC's PKCS#11 module;
* SoftHSM2 — a token in a temporary SOFTHSM2_CONF tokendir; python-pkcs11 in
  one process (SHA256-RSA-PKCS with RSA-2048, CKM_ECDSA over a digest with
  P-256), and one ``pkcs11-tool --sign`` process per signature.

Every process started here (server, card daemon, pcscd, clients) is stopped
in a ``finally``.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make ``bench`` and ``vsc`` importable from the checkout
    sys.path.insert(0, str(ROOT))

from bench import server as bserver  # noqa: E402

BIN = Path(sys.executable).parent
VSC = BIN / "vsc"
TWISTD = BIN / "twistd"
SOFTHSM_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
OPENSC_MODULE = "/usr/lib/x86_64-linux-gnu/opensc-pkcs11.so"
PCSCD_SOCKET = "/run/pcscd/pcscd.comm"
VPCD_ENDPOINT = "tcp:127.0.0.1:35963"
READER = "Virtual PCD 00 00"
SYSTEM_PYTHON = "/usr/bin/python3"
PIN = "135790"  # the same as bench/pcsc.py's, whose VERIFY APDU this part sends
PUK = "24680246"
PASSWORD = "latency benchmark password"
SERIAL = "lat-0001"


def pct(values: list[float], q: float) -> float | None:
    return bserver.percentile(sorted(values), q) if values else None


def summary(values_ms: list[float]) -> dict:
    return {"n": len(values_ms), "p50": pct(values_ms, 0.50), "p95": pct(values_ms, 0.95),
            "min": min(values_ms) if values_ms else None}


# ---------------------------------------------------------------- the local API client (child process)


def amp_main(home: str, n: int) -> None:
    """``--amp HOME N``: time SignDigest calls through vsc.card.client on one connection, and new connection + call."""
    from vsc.card.client import ControlClient
    from vsc.wire import control

    out: dict = {}
    with ControlClient(home) as card:
        for slot in ("9a", "9c"):
            times, sigs = [], []
            for i in range(n + 2):
                digest = hashlib.sha256(f"amp {slot} {i}".encode()).digest()
                t0 = time.perf_counter()
                sig = card.call(control.SIGN_DIGEST, slot=slot, digest=digest)["signature"]
                if i >= 2:  # two warm-up calls
                    times.append((time.perf_counter() - t0) * 1000.0)
                sigs.append(sig)
            out[slot] = {"ms": times, "sig_hex": sigs[-1].hex(), "data": f"amp {slot} {n + 1}"}
    fresh = []
    for i in range(max(5, n // 5)):
        digest = hashlib.sha256(f"fresh {i}".encode()).digest()
        t0 = time.perf_counter()
        with ControlClient(home) as card:
            card.call(control.SIGN_DIGEST, slot="9a", digest=digest)
        fresh.append((time.perf_counter() - t0) * 1000.0)
    out["fresh_9a"] = {"ms": fresh}
    print(json.dumps(out))


# ---------------------------------------------------------------- the PC/SC client (system python3 + pyscard)

PCSC_CLIENT = r"""
import json, sys, time
from smartcard.System import readers

plan = json.loads(sys.argv[1])
deadline = time.time() + plan["wait"]
conn, last_error = None, ""
while time.time() < deadline:
    try:
        rs = [r for r in readers() if str(r).startswith(plan["reader"])]
        if rs:
            c = rs[0].createConnection()
            c.connect()
            conn = c
            break
    except Exception as e:  # no reader yet, no card yet
        last_error = str(e)
    time.sleep(0.1)
if conn is None:
    print(json.dumps({"error": "no card appeared in %s within %ss (%s)" % (plan["reader"], plan["wait"], last_error)}))
    sys.exit(0)

def tx(apdu):
    data, sw1, sw2 = conn.transmit(list(apdu))
    out = bytes(data)
    while sw1 == 0x61:  # GET RESPONSE, as OpenSC does
        more, sw1, sw2 = conn.transmit([0x00, 0xC0, 0x00, 0x00, sw2])
        out += bytes(more)
    return out, (sw1 << 8) | sw2

for apdu in plan["setup"]:
    _, sw = tx(bytes.fromhex(apdu))
    if sw != 0x9000:
        print(json.dumps({"error": "setup APDU %s answered %04X" % (apdu[:16], sw)})); sys.exit(0)

out = {}
for name, seq in plan["ops"]:
    seq = [bytes.fromhex(a) for a in seq]
    times, last = [], b""
    for i in range(plan["n"] + 2):
        t0 = time.perf_counter()
        for a in seq:
            last, sw = tx(a)
            if sw != 0x9000:
                print(json.dumps({"error": "%s: APDU answered %04X" % (name, sw)})); sys.exit(0)
        if i >= 2:  # two warm-up calls
            times.append((time.perf_counter() - t0) * 1000.0)
    out[name] = {"ms": times, "resp_hex": last.hex()}
conn.disconnect()
print(json.dumps(out))
"""


def _unwrap_ga(resp: bytes) -> bytes:
    """7C { 82 result } -> result."""
    from vsc.wire import tlv

    outer = tlv.decode_one(resp, 0x7C)
    return tlv.to_dict(outer, allowed=(0x82,))[0x82]


# ---------------------------------------------------------------- SoftHSM2


def softhsm_measure(base: Path, n: int, n_tool: int, env: dict) -> dict:
    """python-pkcs11 in this process + pkcs11-tool per call, on a fresh token in ``base``."""
    import pkcs11
    from pkcs11 import Attribute, KeyType, Mechanism
    from pkcs11.util.ec import encode_named_curve_parameters

    tokendir = base / "softhsm-tokens"
    tokendir.mkdir()
    conf = base / "softhsm2.conf"
    conf.write_text(f"directories.tokendir = {tokendir}\nobjectstore.backend = file\nlog.level = ERROR\n")
    env = dict(env, SOFTHSM2_CONF=str(conf))
    os.environ["SOFTHSM2_CONF"] = str(conf)  # python-pkcs11 below reads it from this process's environment
    subprocess.run(["softhsm2-util", "--init-token", "--free", "--label", "bench", "--pin", "1234",
                    "--so-pin", "5678"], env=env, check=True, capture_output=True, timeout=60)
    lib = pkcs11.lib(SOFTHSM_MODULE)
    token = lib.get_token(token_label="bench")
    out: dict = {}
    with token.open(user_pin="1234", rw=True) as session:
        _pub, rsa = session.generate_keypair(KeyType.RSA, 2048, id=b"\x01", label="rsa", store=True)
        params = session.create_domain_parameters(
            KeyType.EC, {Attribute.EC_PARAMS: encode_named_curve_parameters("secp256r1")}, local=True)
        _pub, ec = params.generate_keypair(store=True, id=b"\x02", label="ec")
        for name, key, mech, prep in (
            ("rsa2048", rsa, Mechanism.SHA256_RSA_PKCS, lambda d: d),
            ("p256", ec, Mechanism.ECDSA, lambda d: hashlib.sha256(d).digest()),
        ):
            times = []
            for i in range(n + 2):
                data = f"softhsm {name} {i}".encode()
                t0 = time.perf_counter()
                key.sign(prep(data), mechanism=mech)
                if i >= 2:
                    times.append((time.perf_counter() - t0) * 1000.0)
            out[name] = {"ms": times}
    tool = shutil.which("pkcs11-tool")
    if tool:
        data = base / "softhsm-data"
        data.write_bytes(b"softhsm pkcs11-tool data")
        times = []
        for i in range(n_tool):
            t0 = time.perf_counter()
            proc = subprocess.run([tool, "--module", SOFTHSM_MODULE, "--token-label", "bench", "--login", "--pin",
                                   "1234", "--sign", "--id", "01", "--mechanism", "SHA256-RSA-PKCS",
                                   "--input-file", str(data), "--output-file", str(base / "softhsm-sig")],
                                  env=env, capture_output=True, timeout=60)
            if proc.returncode != 0:
                out["tool_error"] = proc.stderr.decode(errors="replace").strip()[-200:]
                break
            times.append((time.perf_counter() - t0) * 1000.0)
        out["tool_rsa2048"] = {"ms": times}
    return out


# ---------------------------------------------------------------- processes


def pcsc_unavailable() -> str | None:
    """Why PC/SC cannot be measured here, or None."""
    if shutil.which("pcscd") is None and not os.path.exists("/usr/sbin/pcscd"):
        return "pcscd is not installed"
    if not os.path.exists("/etc/reader.conf.d/vpcd"):
        return "vsmartcard's vpcd is not installed (/etc/reader.conf.d/vpcd)"
    if not (ROOT / "vsc" / "card" / "vpcd.py").exists():
        return "this checkout has no vsc/card/vpcd.py"
    try:
        from bench import pcsc as bpcsc
    except ImportError as e:
        return f"bench/pcsc.py is not importable ({e})"
    if bpcsc.PIN != PIN:
        return "bench/pcsc.py's PIN differs from this part's"
    if not os.path.exists(SYSTEM_PYTHON) or subprocess.run(
            [SYSTEM_PYTHON, "-c", "import smartcard"], capture_output=True, timeout=30).returncode != 0:
        return "the system python3 has no pyscard (python3-pyscard)"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(PCSCD_SOCKET)
        return "a pcscd is already running (someone else's; left alone)"
    except OSError:
        pass
    finally:
        s.close()
    for port in (35963, 35964):  # vpcd listens there once pcscd loads it
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
            t.settimeout(0.3)
            if t.connect_ex(("127.0.0.1", port)) == 0:
                return f"something already listens on vpcd's port {port}"
    return None


def _stop(proc: subprocess.Popen | None, sig: int = signal.SIGTERM, timeout: float = 15.0) -> None:
    if proc is None or proc.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(sig)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(5)


def _wait(cond, timeout: float, what: str, proc: subprocess.Popen | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: the process exited ({proc.returncode})"
                               + (f":\n{log.read_text(errors='replace')[-1500:]}" if log else ""))
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not ready within {timeout:g} s"
                               + (f":\n{log.read_text(errors='replace')[-1500:]}" if log else ""))
        time.sleep(0.05)


def _timed_runs(argv: list[str], n: int, env: dict, cwd: Path) -> tuple[list[float], str | None]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        proc = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            return times, (proc.stderr or proc.stdout).decode(errors="replace").strip()[-300:]
        times.append((time.perf_counter() - t0) * 1000.0)
    return times, None


# ---------------------------------------------------------------- the measurement


class CardInUse:
    """
    The set-up every card benchmark shares, in ``base``: a real ``twistd -n
    vsc-server`` (SQLite, RSA-2048 key), the card ``SERIAL`` enrolled with the
    real CLI (scrypt log2(N) = 10), and (``start_daemon``) its card daemon
    with a private XDG_RUNTIME_DIR and VSC_LOCK_DIR. ``close`` stops both.
    """

    def __init__(self, base: Path):
        self.base = base
        self.home = base / "card"
        self.server = None
        self.daemon: subprocess.Popen | None = None
        self._daemon_log = None
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VSC_", "SOFTHSM2_"))}
        self.run_dir = base / "run"
        self.run_dir.mkdir(mode=0o700)
        (base / "lock").mkdir(mode=0o700)
        env.update(XDG_RUNTIME_DIR=str(self.run_dir), VSC_LOCK_DIR=str(base / "lock"), PYTHONUNBUFFERED="1",
                   HOME=str(base))  # OpenSC's cache goes to $HOME/.cache
        self.env = env

    @property
    def socket(self) -> Path:
        """The card daemon's control socket (vsc.util.paths.control_socket_for, in our runtime dir)."""
        return self.run_dir / "vsc" / f"card-{hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:12]}.sock"

    def enrol(self) -> None:
        from vsc.protocol import auth
        from vsc.server import config
        from vsc.server.policy import Policy, new_enrolment_code
        from vsc.server.store import Store

        base = self.base
        data_dir = bserver.make_data_dir(base, "srv", None, "", 2048)
        fp = config.load(data_dir).load_key().public_key().fingerprint()
        self.server = bserver.ServerProcess(data_dir, base / "server.log")
        self.server.wait_port()
        code = new_enrolment_code()
        store = Store(config.load(data_dir).database_url, time.time)
        try:
            store.issue(SERIAL, auth.code_hash(code), Policy().initial_auth_info(), 3600, peer="bench")
        finally:
            store.close()
        for name, value in (("pw", PASSWORD), ("pin", PIN), ("puk", PUK)):
            (base / name).write_text(value + "\n")
        proc = subprocess.run([str(VSC), "card", "--home", str(self.home), "enroll", "--server",
                               self.server.endpoint, "--server-key", fp, "--serial", SERIAL, "--code", code,
                               "--password-file", str(base / "pw"), "--pin-file", str(base / "pin"), "--puk-file",
                               str(base / "puk"), "--scrypt-log2n", "10", "--pin-policy", "9c=once", "--json"],
                              env=self.env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"vsc card enroll failed: {proc.stderr.strip()[-500:]}")

    def start_daemon(self, extra: list[str] = ()) -> None:
        argv = [str(TWISTD), "-n", "--pidfile=", "vsc-card", "--home", str(self.home), "--password-file",
                str(self.base / "pw"), "--no-ssh-agent", *extra]
        self._daemon_log = open(self.base / "card.log", "wb")
        self.daemon = subprocess.Popen(argv, env=self.env, cwd=self.base, stdin=subprocess.DEVNULL,
                                       stdout=self._daemon_log, stderr=subprocess.STDOUT)
        _wait(self.socket.exists, 60, "the card daemon", self.daemon, self.base / "card.log")

    def close(self) -> None:
        _stop(self.daemon)  # SIGTERM: the card is removed (uploaded, set idle) before it exits
        if self.server is not None:
            self.server.stop()
        if self._daemon_log is not None:
            self._daemon_log.close()


def run(quick: bool = False, pcsc: bool = True, keep: bool = False, progress=lambda m: None) -> dict:
    from vsc import crypto

    n_amp = 15 if quick else 200
    n_cli = 2 if quick else 10
    n_pcsc = 10 if quick else 100
    n_tool = 2 if quick else 8
    n_hsm = 40 if quick else 300
    base = Path(tempfile.mkdtemp(prefix="vscl-", dir="/tmp"))  # short: UNIX socket paths <= 108 bytes
    res: dict = {"n": {"amp": n_amp, "cli": n_cli, "pcsc": n_pcsc, "tool": n_tool, "softhsm": n_hsm},
                 "notes": []}
    world = CardInUse(base)
    pcscd = pcscd_log = None
    try:
        env, home = world.env, world.home

        # ---- server and enrolment
        world.enrol()

        # ---- PC/SC (optional): pcscd first, so the card daemon finds vpcd
        why = pcsc_unavailable() if pcsc else "disabled (--no-pcsc)"
        if why is None:
            pcscd_log = open(base / "pcscd.log", "wb")
            pcscd = subprocess.Popen(["pcscd", "-f"], stdin=subprocess.DEVNULL, stdout=pcscd_log,
                                     stderr=subprocess.STDOUT)
            try:
                _wait(lambda: os.path.exists(PCSCD_SOCKET), 10, "pcscd", pcscd, base / "pcscd.log")
            except RuntimeError as e:
                why = f"pcscd did not start: {str(e)[:200]}"
                _stop(pcscd)
                pcscd = None
        res["pcsc_skipped"] = why

        # ---- the card daemon
        world.start_daemon(["--pcsc", VPCD_ENDPOINT] if pcscd is not None else [])
        progress("  latency: card inserted; measuring the local API...")

        # ---- the local API: in-process AMP (a child process with its own reactor)
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--amp", str(home), str(n_amp)],
                              env=env, capture_output=True, text=True, timeout=600, cwd=str(ROOT))
        if proc.returncode != 0:
            raise RuntimeError(f"the AMP client failed: {proc.stderr.strip()[-800:]}")
        amp_res = json.loads(proc.stdout.strip().splitlines()[-1])
        publics = {}
        for slot in ("9a", "9c"):
            p = subprocess.run([str(VSC), "card", "--home", str(home), "public-key", "--slot", slot],
                               env=env, capture_output=True, timeout=60)
            publics[slot] = crypto.public_der_from_pem(p.stdout)
        verified = {}
        for slot in ("9a", "9c"):
            r = amp_res[slot]
            verified[f"amp {slot}"] = crypto.verify_sha256(publics[slot], r["data"].encode(),
                                                           bytes.fromhex(r["sig_hex"]))
        res["amp"] = {"9a": summary(amp_res["9a"]["ms"]), "9c": summary(amp_res["9c"]["ms"]),
                      "fresh_9a": summary(amp_res["fresh_9a"]["ms"])}

        # ---- the local API: the whole CLI per signature
        (base / "doc").write_bytes(b"a document to sign\n" * 50)
        cli = {}
        for slot in ("9a", "9c"):
            times, err = _timed_runs([str(VSC), "card", "--home", str(home), "sign", "--slot", slot, "--in",
                                      str(base / "doc"), "--out", str(base / f"doc.{slot}.sig")], n_cli, env, base)
            if err:
                res["notes"].append(f"vsc card sign --slot {slot} failed: {err}")
            else:
                verified[f"cli {slot}"] = crypto.verify_sha256(publics[slot], (base / "doc").read_bytes(),
                                                               (base / f"doc.{slot}.sig").read_bytes())
            cli[slot] = summary(times)
        res["cli"] = cli

        # ---- PC/SC
        if pcscd is not None:
            from bench import pcsc as bpcsc

            progress("  latency: PC/SC (pyscard GENERAL AUTHENTICATE, pkcs11-tool through OpenSC)...")
            apdus = bpcsc.piv_apdus()  # bench/pcsc.py's: SELECT + VERIFY, GENERAL AUTHENTICATE as OpenSC sends it
            plan = json.dumps({"reader": READER, "n": n_pcsc, "wait": 20, "setup": apdus["setup"],
                               "ops": [["9c", apdus["ecdsa"]], ["9a", apdus["rsa"]]]})
            p = subprocess.run([SYSTEM_PYTHON, "-c", PCSC_CLIENT, plan], env=env, capture_output=True, text=True,
                               timeout=600)
            try:
                pres = json.loads(p.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                pres = {"error": (p.stderr or p.stdout).strip()[-300:]}
            if "error" in pres:
                res["notes"].append(f"PC/SC client: {pres['error']}")
            else:
                res["pcsc"] = {}
                for slot in ("9c", "9a"):
                    r = pres[slot]
                    res["pcsc"][slot] = summary(r["ms"])
                    # piv_apdus() signs SHA-256(b"bench"): the raw RSA result of its PKCS#1 v1.5 block IS the
                    # PKCS#1 v1.5 signature of b"bench", and the ECDSA result is a signature of it too
                    verified[f"pcsc {slot}"] = crypto.verify_sha256(publics[slot], b"bench",
                                                                    _unwrap_ga(bytes.fromhex(r["resp_hex"])))
            tool = shutil.which("pkcs11-tool")
            if tool and os.path.exists(OPENSC_MODULE):
                times, err = _timed_runs([tool, "--module", OPENSC_MODULE, "--login", "--pin", PIN, "--sign",
                                          "--id", "01", "--mechanism", "SHA256-RSA-PKCS", "--input-file",
                                          str(base / "doc"), "--output-file", str(base / "doc.p11.sig")],
                                         n_tool, env, base)
                if err:
                    res["notes"].append(f"pkcs11-tool through OpenSC failed: {err}")
                else:
                    verified["pkcs11-tool opensc 9a"] = crypto.verify_sha256(
                        publics["9a"], (base / "doc").read_bytes(), (base / "doc.p11.sig").read_bytes())
                res["pcsc_tool_9a"] = summary(times)

        # ---- SoftHSM2 (no card involved)
        progress("  latency: SoftHSM2...")
        try:
            res["softhsm"] = {k: summary(v["ms"]) if isinstance(v, dict) else v
                              for k, v in softhsm_measure(base, n_hsm, n_tool, env).items()}
        except Exception as e:  # noqa: BLE001 - reported in the document
            res["notes"].append(f"SoftHSM2 not measured: {type(e).__name__}: {e}")
        res["verified"] = verified
        return res
    finally:
        world.close()
        _stop(pcscd)
        if pcscd_log is not None:
            pcscd_log.close()
        os.environ.pop("SOFTHSM2_CONF", None)
        if keep:
            print(f"latency logs kept in {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


def namespace_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "not root"
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        return "unshare(1) or ip(8) is missing"
    return None


def enter_namespace_setup() -> None:
    """Inside ``unshare --mount --net``: loopback up, and a private /run/pcscd (our pcscd, nobody else's)."""
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True, timeout=30)
    os.makedirs("/run/pcscd", exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=0755", "tmpfs", "/run/pcscd"], check=True, timeout=30)


def run_isolated(quick: bool = False, pcsc: bool = True, keep: bool = False, progress=lambda m: None) -> dict:
    """
    ``run`` in a private mount + network namespace (``unshare --mount --net``):
    pcscd's socket directory and vpcd's TCP ports 35963/35964 are then ours
    alone, so a pcscd someone else runs on this machine is neither used nor
    disturbed. Falls back to ``run`` here when namespaces are not available.
    """
    why = namespace_unavailable()
    if why is not None or not pcsc:
        res = run(quick, pcsc, keep, progress)
        res["namespace"] = f"none ({why or 'PC/SC not measured'})"
        return res
    argv = ["unshare", "--mount", "--net", "--propagation", "private", sys.executable,
            str(Path(__file__).resolve()), "--isolated", "--json"] + (["--quick"] if quick else []) \
        + (["--keep"] if keep else [])
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
    out_lines: list[str] = []
    try:
        for line in proc.stderr:  # progress lines pass through
            progress(line.rstrip("\n"))
        out_lines = proc.stdout.read().splitlines()
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(30)
    if proc.returncode != 0 or not out_lines:
        raise RuntimeError(f"the latency part failed in its namespace (exit {proc.returncode})")
    res = json.loads(out_lines[-1])
    res["namespace"] = "private mount + network namespace (unshare --mount --net): its own pcscd, vpcd ports and loopback"
    return res


# ---------------------------------------------------------------- report


def _cell(s: dict | None) -> list[str]:
    if not s or not s.get("n"):
        return ["—", "—", "0"]
    return [f"{s['p50']:.2f}", f"{s['p95']:.2f}", str(s["n"])]


def report(res: dict, floor: dict | None = None) -> str:
    """``floor``: optional {"rsa2048_sign": ops/s, "p256_sign": ops/s, "rsa2048_load_sign":..., "p256_load_sign":...}."""
    from bench._util import markdown_table

    rows = []
    amp, cli, hsm = res.get("amp", {}), res.get("cli", {}), res.get("softhsm", {})
    pcsc = res.get("pcsc", {})
    rows.append(["card: in-process AMP SignDigest (one connection)", "RSA-2048 (9a)", *_cell(amp.get("9a"))])
    rows.append(["card: in-process AMP SignDigest (one connection)", "P-256 (9c)", *_cell(amp.get("9c"))])
    rows.append(["card: new control connection + SignDigest", "RSA-2048 (9a)", *_cell(amp.get("fresh_9a"))])
    rows.append(["card: `vsc card sign` (whole CLI process)", "RSA-2048 (9a)", *_cell(cli.get("9a"))])
    rows.append(["card: `vsc card sign` (whole CLI process)", "P-256 (9c)", *_cell(cli.get("9c"))])
    if pcsc:
        rows.append(["card: PC/SC GENERAL AUTHENTICATE (pyscard, PIN verified once)", "RSA-2048 raw (9a)",
                     *_cell(pcsc.get("9a"))])
        rows.append(["card: PC/SC GENERAL AUTHENTICATE (pyscard, PIN verified once)", "P-256 (9c)",
                     *_cell(pcsc.get("9c"))])
    if res.get("pcsc_tool_9a"):
        rows.append(["card: `pkcs11-tool --sign` through OpenSC + PC/SC (process per call)", "RSA-2048 (9a)",
                     *_cell(res.get("pcsc_tool_9a"))])
    rows.append(["SoftHSM2: python-pkcs11 in one process", "RSA-2048", *_cell(hsm.get("rsa2048"))])
    rows.append(["SoftHSM2: python-pkcs11 in one process", "P-256 (CKM_ECDSA on a digest)", *_cell(hsm.get("p256"))])
    if hsm.get("tool_rsa2048"):
        rows.append(["SoftHSM2: `pkcs11-tool --sign` (process per call)", "RSA-2048", *_cell(hsm.get("tool_rsa2048"))])
    lines = [markdown_table(["path", "key", "p50 ms", "p95 ms", "calls"], rows), ""]
    if floor and all(floor.get(k) for k in ("rsa2048_sign", "p256_sign", "rsa2048_load_sign", "p256_load_sign")):
        lines.append(
            f"The floor per call in the same run (section 1, mean of a single thread): vsc.crypto sign with the key "
            f"loaded once, RSA-2048 {1000.0 / floor['rsa2048_sign']:.3f} ms, P-256 {1000.0 / floor['p256_sign']:.3f} "
            f"ms; loading the PKCS#8 key and signing, as the card does for every call, RSA-2048 "
            f"{1000.0 / floor['rsa2048_load_sign']:.3f} ms, P-256 {1000.0 / floor['p256_load_sign']:.3f} ms."
        )
    if res.get("pcsc_skipped"):
        lines.append(f"PC/SC not measured: {res['pcsc_skipped']}.")
    ver = res.get("verified", {})
    if ver:
        bad = [k for k, v in ver.items() if not v]
        lines.append("Every path's last signature was verified under the slot's public key: "
                     + ("all verify." if not bad else f"FAILED for {', '.join(bad)}."))
    for note in res.get("notes", []):
        lines.append(f"Note: {note}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--amp"]:
        amp_main(argv[1], int(argv[2]))
        return 0
    ap = argparse.ArgumentParser(prog="bench/latency.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--no-pcsc", action="store_true", help="do not start pcscd / measure PC/SC")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    ap.add_argument("--here", action="store_true", help="do not use a private namespace (PC/SC only if no pcscd runs)")
    ap.add_argument("--isolated", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--json", action="store_true", help="print the raw results as one JSON line")
    args = ap.parse_args(argv)
    progress = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    if args.isolated:
        enter_namespace_setup()
        res = run(args.quick, not args.no_pcsc, args.keep, progress)
    elif args.here:
        res = run(args.quick, not args.no_pcsc, args.keep, progress)
    else:
        res = run_isolated(args.quick, not args.no_pcsc, args.keep, progress)
    if args.json:
        print(json.dumps(res))
        return 0
    print("# vsc sign latency\n")
    print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
