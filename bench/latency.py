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
  connection + call", what a fresh client pays besides its interpreter.
  Alternated with each call in the same client: the target's floor (load
  the PKCS#8 key + sign in this process), a sign with the key held, and a
  reference that is not the target's floor: the same load + sign in a
  minimal forked server process behind a UNIX socket (blocking, no Twisted),
  i.e. what any cross-process call costs on this machine;
* PC/SC — when pcscd, vsmartcard's vpcd and the system's pyscard are
  installed and no pcscd is running already (a running one belongs to
  someone else and is left alone): this script starts ``pcscd -f``, the card
  daemon connects to vpcd, and a client process (the system python3 with
  pyscard) sends bench/pcsc.py's APDUs (``piv_apdus``): SELECT the PIV
  application and VERIFY the PIN once, then GENERAL AUTHENTICATE timed per
  call: P-256 ECDSA over a SHA-256 digest in slot 9c, and a raw RSA-2048
  operation on a PKCS#1 v1.5 block in slot 9a (command chaining, 61xx + GET
  RESPONSE, as OpenSC does); the APDU round trip (GET DATA Discovery)
  against a no-op card on vpcd's second reader, present meanwhile: the same
  client takes turns exchange by exchange between the two, in PCSC_ROUNDS
  rounds, and the figure is the median of the rounds' ratios; and one
  ``pkcs11-tool --sign`` process per signature through OpenSC's PKCS#11 module;
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
import re
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

    from vsc import crypto

    out: dict = {}
    kinds = {"9a": crypto.KEY_RSA2048, "9c": crypto.KEY_P256}
    with ControlClient(home) as card:
        for slot in ("9a", "9c"):
            # the floor, in this process, alternated with the calls: load a PKCS#8 key of the slot's kind and
            # sign (what the card does per call), and sign with a key loaded once (OpenSSL's sign rate); and a
            # reference beside it, not the target's floor: the same load-and-sign in a minimal server process
            # behind a UNIX socket (what any cross-process call pays on this machine, without vsc's code)
            der = crypto.generate_private_der(kinds[slot])
            held = crypto.PrivateKeyHandle(der)
            ipc, ipc_pid = _ipc_signer(der)
            times, sigs, load_sign, held_sign, ipc_sign = [], [], [], [], []
            for i in range(n + 2):
                digest = hashlib.sha256(f"amp {slot} {i}".encode()).digest()
                t0 = time.perf_counter()
                sig = card.call(control.SIGN_DIGEST, slot=slot, digest=digest)["signature"]
                t1 = time.perf_counter()
                with crypto.PrivateKeyHandle(der) as key:
                    key.sign_digest(digest)
                t2 = time.perf_counter()
                held.sign_digest(digest)
                t3 = time.perf_counter()
                _ipc_sign(ipc, digest)
                t4 = time.perf_counter()
                if i >= 2:  # two warm-up calls
                    times.append((t1 - t0) * 1000.0)
                    load_sign.append((t2 - t1) * 1000.0)
                    held_sign.append((t3 - t2) * 1000.0)
                    ipc_sign.append((t4 - t3) * 1000.0)
                sigs.append(sig)
            held.__exit__(None, None, None)
            ipc.close()
            os.waitpid(ipc_pid, 0)
            out[slot] = {"ms": times, "sig_hex": sigs[-1].hex(), "data": f"amp {slot} {n + 1}"}
            out[f"load_sign_{slot}"] = {"ms": load_sign}
            out[f"held_sign_{slot}"] = {"ms": held_sign}
            out[f"ipc_sign_{slot}"] = {"ms": ipc_sign}
    fresh = []
    for i in range(max(5, n // 5)):
        digest = hashlib.sha256(f"fresh {i}".encode()).digest()
        t0 = time.perf_counter()
        with ControlClient(home) as card:
            card.call(control.SIGN_DIGEST, slot="9a", digest=digest)
        fresh.append((time.perf_counter() - t0) * 1000.0)
    out["fresh_9a"] = {"ms": fresh}
    print(json.dumps(out))


def _ipc_signer(der: bytes) -> tuple[socket.socket, int]:
    """
    A minimal signing server in a forked process on a socketpair: per request
    (a 32-byte digest) it loads ``der`` and signs, as the card does per call,
    and answers with a 2-byte length and the signature; blocking socket, no
    Twisted, no card memory, no PIN check. The AMP client times it beside the
    card: the cross-process cost of this machine (two wake-ups per call),
    which the in-process floor does not pay.
    """
    from vsc import crypto

    ours, theirs = socket.socketpair()
    pid = os.fork()
    if pid == 0:  # the server
        ours.close()
        try:
            while True:
                digest = theirs.recv(64)
                if not digest:
                    break
                with crypto.PrivateKeyHandle(der) as key:
                    sig = key.sign_digest(digest)
                theirs.sendall(len(sig).to_bytes(2, "big") + sig)
        finally:
            os._exit(0)
    theirs.close()
    return ours, pid


def _ipc_sign(sock: socket.socket, digest: bytes) -> bytes:
    sock.sendall(digest)
    data = b""
    while len(data) < 2 or len(data) < 2 + int.from_bytes(data[:2], "big"):
        chunk = sock.recv(4096)
        if not chunk:
            raise RuntimeError("the reference signer went away")
        data += chunk
    return data[2:]


# ---------------------------------------------------------------- the PC/SC client (system python3 + pyscard)

PCSC_CLIENT = r"""
import json, statistics, sys, time
from smartcard.System import readers

plan = json.loads(sys.argv[1])

def connect(prefix):
    deadline = time.time() + plan["wait"]
    last_error = ""
    while time.time() < deadline:
        try:
            rs = [r for r in readers() if str(r).startswith(prefix)]
            if rs:
                c = rs[0].createConnection()
                c.connect()
                return c
        except Exception as e:  # no reader yet, no card yet
            last_error = str(e)
        time.sleep(0.1)
    print(json.dumps({"error": "no card appeared in %s within %ss (%s)" % (prefix, plan["wait"], last_error)}))
    sys.exit(0)

conn = connect(plan["reader"])

def tx(apdu, c=None):
    c = c or conn
    data, sw1, sw2 = c.transmit(list(apdu))
    out = bytes(data)
    while sw1 == 0x61:  # GET RESPONSE, as OpenSC does
        more, sw1, sw2 = c.transmit([0x00, 0xC0, 0x00, 0x00, sw2])
        out += bytes(more)
    return out, (sw1 << 8) | sw2

def exchange(name, seq, c=None):
    # send the APDUs of seq in turn (each must answer 9000); the last answer's data
    last = b""
    for a in seq:
        last, sw = tx(a, c)
        if sw != 0x9000:
            print(json.dumps({"error": "%s: APDU answered %04X" % (name, sw)})); sys.exit(0)
    return last

def timed(name, seq, n, c=None):
    times, last = [], b""
    for i in range(n + 2):
        t0 = time.perf_counter()
        last = exchange(name, seq, c)
        if i >= 2:  # two warm-up calls
            times.append((time.perf_counter() - t0) * 1000.0)
    return times, last

for apdu in plan["setup"]:
    _, sw = tx(bytes.fromhex(apdu))
    if sw != 0x9000:
        print(json.dumps({"error": "setup APDU %s answered %04X" % (apdu[:16], sw)})); sys.exit(0)

out = {}
for name, seq in plan["ops"]:
    times, last = timed(name, [bytes.fromhex(a) for a in seq], plan["n"])
    out[name] = {"ms": times, "resp_hex": last.hex()}

alt = plan.get("alternate")
if alt:  # this card and a no-op card on another reader of the same pcscd + vpcd, in alternated rounds
    other = connect(alt["reader"])
    sides = {"card": ([bytes.fromhex(a) for a in alt["card"]], conn),
             "noop": ([bytes.fromhex(a) for a in alt["noop"]], other)}
    rounds = []
    for r in range(alt["rounds"]):  # within a round the two cards take turns exchange by exchange
        got = {"card": [], "noop": []}
        for i in range(alt["n"] + 2):
            for side in (("noop", "card") if i % 2 == 0 else ("card", "noop")):
                seq, c = sides[side]
                t0 = time.perf_counter()
                exchange(side, seq, c)
                if i >= 2:  # two warm-up exchanges
                    got[side].append((time.perf_counter() - t0) * 1000.0)
        rounds.append(got)
    other.disconnect()
    out["alternated"] = rounds
conn.disconnect()
print(json.dumps(out))
"""

#: the APDU round trip against a no-op card: this many rounds of ``n_pcsc`` exchanges on each side, taking turns
PCSC_ROUNDS = 9


def alternated_rounds(rounds: list[dict]) -> dict:
    """
    The APDU round trip measured in rounds in which the no-op card and ours
    take turns exchange by exchange (no-op, ours, ours, no-op, ...: the same
    client, the same pcscd + vpcd, the same method on both sides): each
    round's p50s and their ratio, the median of the rounds' ratios as the
    figure (as bench/flood.py does), and every sample of each side pooled
    (``card``, ``noop``).
    """
    import statistics

    each = []
    for rnd in rounds:
        card, noop = pct(rnd["card"], 0.50), pct(rnd["noop"], 0.50)
        each.append({"card": card, "noop": noop, "ratio": card / noop if card and noop else None})
    ratios = [r["ratio"] for r in each if r["ratio"] is not None]
    return {"rounds": each, "ratio": statistics.median(ratios) if ratios and len(ratios) == len(each) else None,
            "card": summary([x for rnd in rounds for x in rnd["card"]]),
            "noop": summary([x for rnd in rounds for x in rnd["noop"]])}


def _with_key_cache(world: "CardInUse", pcsc: bool, n_amp: int, n_pcsc: int, env: dict, publics: dict,
                    verified: dict) -> dict:
    """Restart the card daemon with ``key_cache = 9a, 9c`` in card.ini; the local API and PC/SC RSA calls again."""
    import configparser

    from vsc import crypto

    _stop(world.daemon)  # SIGTERM: the card is removed first
    world.daemon = None
    ini = world.home / "card.ini"
    parser = configparser.ConfigParser()
    parser.read(ini)
    parser["card"]["key_cache"] = "9a, 9c"
    with open(ini, "w") as f:
        parser.write(f)
    world.start_daemon(["--pcsc", VPCD_ENDPOINT] if pcsc else [])
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--amp", str(world.home), str(n_amp)],
                          env=env, capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    if proc.returncode != 0:
        raise RuntimeError(f"the AMP client failed: {proc.stderr.strip()[-400:]}")
    amp_res = json.loads(proc.stdout.strip().splitlines()[-1])
    out: dict = {"amp": {slot: summary(amp_res[slot]["ms"]) for slot in ("9a", "9c")}}
    verified["amp 9a (key cache)"] = crypto.verify_sha256(publics["9a"], amp_res["9a"]["data"].encode(),
                                                          bytes.fromhex(amp_res["9a"]["sig_hex"]))
    if pcsc:
        from bench import pcsc as bpcsc

        apdus = bpcsc.piv_apdus()
        plan = json.dumps({"reader": READER, "n": n_pcsc, "wait": 20, "setup": apdus["setup"],
                           "ops": [["9a", apdus["rsa"]], ["9a_ext", apdus["rsa_ext"]]]})
        p = subprocess.run([SYSTEM_PYTHON, "-c", PCSC_CLIENT, plan], env=env, capture_output=True, text=True,
                           timeout=600)
        pres = json.loads(p.stdout.strip().splitlines()[-1])
        if "error" in pres:
            raise RuntimeError(f"PC/SC client: {pres['error']}")
        out["pcsc"] = {k: summary(pres[k]["ms"]) for k in ("9a", "9a_ext")}
        verified["pcsc 9a_ext (key cache)"] = crypto.verify_sha256(publics["9a"], b"bench",
                                                                   _unwrap_ga(bytes.fromhex(pres["9a_ext"]["resp_hex"])))
    return out


def _reader_present(reader: str, env: dict) -> bool:
    """Is a card in ``reader`` (asked through the system python3's pyscard, as the clients do)?"""
    code = ("import sys\nfrom smartcard.System import readers\n"
            "r=[x for x in readers() if str(x).startswith(sys.argv[1])]\n"
            "import smartcard.Exceptions as E\n"
            "try:\n c=r[0].createConnection(); c.connect(); print('yes')\nexcept Exception:\n print('no')")
    p = subprocess.run([SYSTEM_PYTHON, "-c", code, reader], env=env, capture_output=True, text=True, timeout=60)
    return p.stdout.strip() == "yes"


def _unwrap_ga(resp: bytes) -> bytes:
    """7C { 82 result } -> result."""
    from vsc.wire import tlv

    outer = tlv.decode_one(resp, 0x7C)
    return tlv.to_dict(outer, allowed=(0x82,))[0x82]


# ---------------------------------------------------------------- OpenSC's own cost: one traced process, a replay card

_APDU_LOG = re.compile(r"(\d\d):(\d\d):(\d\d\.\d+) \[[^\]]*\] [^\n]*\n(Outgoing|Incoming) APDU \((\d+) bytes\):\n"
                       r"((?:[0-9A-F]{2}(?: [0-9A-F]{2})*[^\n]*\n)+)")


def opensc_apdus(log: str) -> list[dict]:
    """
    The APDUs of one OpenSC process from its debug log (``OPENSC_DEBUG=9``
    on stderr): ``[{"cmd": hex, "resp": hex, "ms": round trip as OpenSC
    logged it (1 ms resolution), "at": ms since the first APDU}]``.
    """
    out: list[dict] = []
    start = None
    for m in _APDU_LOG.finditer(log):
        t = (int(m.group(1)) * 3600 + int(m.group(2)) * 60 + float(m.group(3))) * 1000.0
        size, data = int(m.group(5)), b""
        for line in m.group(6).splitlines():  # 16 bytes a line as hex pairs, then the ASCII column
            data += bytes.fromhex("".join(line[3 * i:3 * i + 2] for i in range(min(16, size - len(data)))))
        if m.group(4) == "Outgoing":
            start = t if start is None else start
            out.append({"cmd": data.hex(), "resp": None, "ms": None, "at": round(t - start, 1), "_t": t})
        elif out and out[-1]["resp"] is None:
            out[-1]["resp"] = data.hex()
            out[-1]["ms"] = round(t - out[-1].pop("_t"), 1)
    return [a for a in out if a["resp"] is not None]


class Replay:
    """Answers each APDU of a recorded conversation with what the card answered, in order per command; else 6A82."""

    def __init__(self, apdus: list[dict]):
        self.table: dict[bytes, list[bytes]] = {}
        for a in apdus:
            self.table.setdefault(bytes.fromhex(a["cmd"]), []).append(bytes.fromhex(a["resp"]))
        self.pos: dict[bytes, int] = {}

    def __call__(self, apdu: bytes) -> bytes:
        answers = self.table.get(bytes(apdu))
        if not answers:
            return b"\x6a\x82"
        i = self.pos.get(bytes(apdu), 0)
        self.pos[bytes(apdu)] = i + 1
        return answers[i % len(answers)]


_INS = {0xA4: "SELECT", 0xCB: "GET DATA", 0xCA: "GET DATA (CA)", 0xC0: "GET RESPONSE", 0x20: "VERIFY",
        0x87: "GENERAL AUTHENTICATE", 0x47: "GENERATE"}


def opensc_floor(base: Path, env: dict, n: int, doc: Path) -> dict:
    """
    Where one ``pkcs11-tool --sign`` process spends its time on our card.
    One process with ``OPENSC_DEBUG=9`` gives its APDUs (count, kinds, the
    round trips OpenSC logged); then, alternately, ``n`` processes against
    our card and ``n`` against a replay card on vpcd's second reader that
    answers the same conversation from a table (bench/pcsc.py's FloorCard
    with a responder): what is left there is OpenSC's, pcscd's and the
    process's own cost with a card that costs nothing. Each side runs with
    an OPENSC_CONF that hides the other reader (``ignored_readers``), so
    OpenSC binds one card either way.
    """
    from bench import pcsc as bpcsc

    tool = shutil.which("pkcs11-tool")
    confs = {}
    for side, hide in (("card", bpcsc.FLOOR_READER), ("replay", READER)):
        confs[side] = base / f"opensc-{side}.conf"
        confs[side].write_text(f'app default {{\n  ignored_readers = "{hide}";\n}}\n')
    argv = [tool, "--module", OPENSC_MODULE, "--login", "--pin", PIN, "--sign", "--id", "01", "--mechanism",
            "SHA256-RSA-PKCS", "--input-file", str(doc), "--output-file", str(base / "doc.trace.sig")]
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=dict(env, OPENSC_DEBUG="9", OPENSC_CONF=str(confs["card"])), cwd=base,
                          capture_output=True, timeout=120, stdin=subprocess.DEVNULL)
    traced_ms = (time.perf_counter() - t0) * 1000.0
    if proc.returncode != 0:
        raise RuntimeError(f"traced pkcs11-tool failed: {proc.stderr.decode(errors='replace')[-300:]}")
    apdus = opensc_apdus(proc.stderr.decode(errors="replace"))
    kinds: dict[str, dict] = {}
    for a in apdus:
        ins = bytes.fromhex(a["cmd"])[1]
        k = kinds.setdefault(_INS.get(ins, f"INS {ins:02X}"), {"n": 0, "ms": 0.0})
        k["n"] += 1
        k["ms"] = round(k["ms"] + a["ms"], 1)
    out = {"apdus": len(apdus), "kinds": kinds, "traced_ms": round(traced_ms, 1),
           "first_to_last_ms": apdus[-1]["at"] + apdus[-1]["ms"] if apdus else None,
           "trace": [{k: a[k] for k in ("cmd", "resp", "ms", "at")} for a in apdus]}
    replay = bpcsc.FloorCard(35964, responder=Replay(apdus))
    replay.start()
    try:
        replay.connected.wait(10)
        _wait(lambda: _reader_present(bpcsc.FLOOR_READER, env), 20, "the replay card")
        times: dict[str, list[float]] = {"card": [], "replay": []}
        for i in range(n):
            for side in (("card", "replay") if i % 2 == 0 else ("replay", "card")):
                got, err = _timed_runs(argv, 1, dict(env, OPENSC_CONF=str(confs[side])), base)
                if err:
                    raise RuntimeError(f"pkcs11-tool against the {side}: {err}")
                times[side] += got
    finally:
        replay.stop()
    _wait(lambda: not _reader_present(bpcsc.FLOOR_READER, env), 20, "the replay card to leave")
    out["card"], out["replay"] = summary(times["card"]), summary(times["replay"])
    return out


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

    n_amp = 60 if quick else 200  # ~1 ms a call: enough calls for a p50 on a shared machine
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
        res["floor"] = {k: summary(amp_res[k]["ms"]) for k in ("load_sign_9a", "load_sign_9c", "held_sign_9a",
                                                               "held_sign_9c", "ipc_sign_9a", "ipc_sign_9c")}

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
            # the floor of the same pcscd + vpcd: a no-op card (9000 to everything) on vpcd's second reader, present
            # while this card is measured; the round trip alternates between the two in rounds (PCSC_ROUNDS)
            progress("  latency: PC/SC, with a no-op card on Virtual PCD 00 01 for the round trip's floor...")
            floor_card = bpcsc.FloorCard(35964)
            floor_card.start()
            try:
                floor_card.connected.wait(10)
                plan = json.dumps({"reader": READER, "n": n_pcsc, "wait": 20, "setup": apdus["setup"],
                                   "ops": [["9c", apdus["ecdsa"]], ["9a", apdus["rsa"]],
                                           ["9a_ext", apdus["rsa_ext"]]],
                                   "alternate": {"reader": bpcsc.FLOOR_READER, "rounds": PCSC_ROUNDS, "n": n_pcsc,
                                                 "card": apdus["getdata"], "noop": apdus["floor"]}})
                p = subprocess.run([SYSTEM_PYTHON, "-c", PCSC_CLIENT, plan], env=env, capture_output=True,
                                   text=True, timeout=600)
            finally:
                floor_card.stop()
            _wait(lambda: not _reader_present(bpcsc.FLOOR_READER, env), 20, "the no-op card to leave")
            try:
                pres = json.loads(p.stdout.strip().splitlines()[-1])
            except (IndexError, ValueError):
                pres = {"error": (p.stderr or p.stdout).strip()[-300:]}
            if "error" in pres:
                res["notes"].append(f"PC/SC client: {pres['error']}")
            else:
                alt = alternated_rounds(pres["alternated"])
                res["pcsc"] = {"roundtrip": alt["card"], "roundtrip_rounds": alt["rounds"],
                               "roundtrip_ratio": alt["ratio"]}
                res["pcsc_floor"] = alt["noop"]
                for slot in ("9c", "9a", "9a_ext"):
                    r = pres[slot]
                    res["pcsc"][slot] = summary(r["ms"])
                    # piv_apdus() signs SHA-256(b"bench"): the raw RSA result of its PKCS#1 v1.5 block IS the
                    # PKCS#1 v1.5 signature of b"bench", and the ECDSA result is a signature of it too
                    verified[f"pcsc {slot}"] = crypto.verify_sha256(publics[slot[:2]], b"bench",
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
                progress("  latency: pkcs11-tool's APDUs traced, and against a replay card (OpenSC's own cost)...")
                try:
                    res["opensc"] = opensc_floor(base, env, n_tool, base / "doc")
                except Exception as e:  # noqa: BLE001 - reported in the document
                    res["notes"].append(f"OpenSC's own cost not measured: {type(e).__name__}: {e}")

        # ---- the key-cache policy (card.ini ``key_cache``, off by default): the same calls with it on for 9a, 9c
        progress("  latency: the same with the key-cache policy on (card.ini key_cache = 9a, 9c)...")
        try:
            res["key_cache"] = _with_key_cache(world, pcscd is not None, n_amp, n_pcsc, env, publics, verified)
        except Exception as e:  # noqa: BLE001 - reported in the document
            res["notes"].append(f"key-cache policy not measured: {type(e).__name__}: {e}")

        # ---- SoftHSM2 (no card involved)
        progress("  latency: SoftHSM2...")
        try:
            res["softhsm"] = {k: summary(v["ms"]) if isinstance(v, dict) else v
                              for k, v in softhsm_measure(base, n_hsm, n_tool, env).items()}
        except Exception as e:  # noqa: BLE001 - reported in the document
            res["notes"].append(f"SoftHSM2 not measured: {type(e).__name__}: {e}")
        res["verified"] = verified
        res["targets"] = targets(res)
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


# ---------------------------------------------------------------- targets (issue 15)


def target(name: str, value: float | None, floor: float | None, unit: str, bound: float, higher: bool = False,
           floor_name: str = "", ratio: float | None = None) -> dict:
    """
    One row of issue 15's targets: ``value`` beside its ``floor`` measured in
    the same run, their ratio, and whether it is within ``bound`` (a ratio at
    most ``bound``; with ``higher``, a rate ratio at least ``bound``).
    ``ratio``: the figure's own ratio when it is not value / floor (the
    median of alternated rounds' ratios).
    """
    if ratio is None:
        ratio = (value / floor) if value and floor else None
    met = None if ratio is None else (ratio >= bound if higher else ratio <= bound)
    return {"target": name, "value": value, "floor": floor, "floor_name": floor_name, "unit": unit,
            "ratio": None if ratio is None else round(ratio, 3), "bound": bound,
            "bound_text": f"{'>=' if higher else '<='} {bound:g}x", "met": met}


def targets(res: dict) -> list[dict]:
    """The card-side targets this part measures, each beside its floor from the same run."""
    p50 = lambda d, *keys: _dig(d, *keys, "p50")  # noqa: E731
    ipc, amp = p50(res, "floor", "ipc_sign_9a"), p50(res, "amp", "9a")
    rows = [
        target("local API sign RSA-2048 (p50) / load-and-sign", amp,
               p50(res, "floor", "load_sign_9a"), "ms", 1.15, floor_name="load the PKCS#8 key + sign, same process" + (
                   f"; the same in a minimal server process behind a UNIX socket, alternated: {ipc:.3f} ms "
                   f"(ours {amp / ipc:.2f}x that)" if ipc and amp else "")),
    ]
    held, load = p50(res, "floor", "held_sign_9a"), p50(res, "floor", "load_sign_9a")
    ga, ga_ext = p50(res, "pcsc", "9a"), p50(res, "pcsc", "9a_ext")
    # decrypt-on-use loads the key for every signature: that alone allows at most held / load of the rate
    why = (f"OpenSSL RSA-2048 sign, key loaded once; decrypt-on-use allows at most {held / load:.2f}x "
           f"(the key loaded per signature)") if held and load else "OpenSSL RSA-2048 sign, key loaded once"
    rows.append(target("PIV RSA-2048 signatures/s over PC/SC (chained, as OpenSC) / OpenSSL sign rate",
                       1000.0 / ga if ga else None, 1000.0 / held if held else None, "/s", 0.5, higher=True,
                       floor_name=why))
    rows.append(target("PIV RSA-2048 signatures/s over PC/SC (one extended APDU) / OpenSSL sign rate",
                       1000.0 / ga_ext if ga_ext else None, 1000.0 / held if held else None, "/s", 0.5, higher=True,
                       floor_name=why))
    kc_amp, kc_ga = p50(res, "key_cache", "amp", "9a"), p50(res, "key_cache", "pcsc", "9a")
    kc_ext = p50(res, "key_cache", "pcsc", "9a_ext")
    rows.append(target("local API sign RSA-2048 (p50), key-cache policy on / a sign with the key held", kc_amp,
                       held, "ms", 1.15, floor_name="OpenSSL RSA-2048 sign, key loaded once, same process"))
    rows.append(target("PIV RSA-2048 signatures/s over PC/SC (chained, as OpenSC), key-cache policy on / OpenSSL "
                       "sign rate", 1000.0 / kc_ga if kc_ga else None, 1000.0 / held if held else None, "/s", 0.5,
                       higher=True, floor_name="OpenSSL RSA-2048 sign, key loaded once"))
    rows.append(target("PIV RSA-2048 signatures/s over PC/SC (one extended APDU), key-cache policy on / OpenSSL "
                       "sign rate", 1000.0 / kc_ext if kc_ext else None, 1000.0 / held if held else None, "/s", 0.5,
                       higher=True, floor_name="OpenSSL RSA-2048 sign, key loaded once"))
    replay = p50(res, "opensc", "replay")
    rows.append(target("`pkcs11-tool --sign` per process through OpenSC / SoftHSM2's", p50(res, "pcsc_tool_9a"),
                       p50(res, "softhsm", "tool_rsa2048"), "ms", 2.0,
                       floor_name="`pkcs11-tool --sign` on SoftHSM2" + (
                           f"; OpenSC + pcscd alone, against a replay card: {replay:.2f} ms" if replay else "")))
    rounds = _dig(res, "pcsc", "roundtrip_rounds") or []
    rows.append(target("APDU round trip (GET DATA Discovery) / a no-op card's", p50(res, "pcsc", "roundtrip"),
                       p50(res, "pcsc_floor"), "ms", 1.5,
                       floor_name="no-op card on the same pcscd + vpcd" + (
                           f"; the ratio is the median of {len(rounds)} alternated rounds' (each "
                           + ", ".join(f"{r['ratio']:.2f}" for r in rounds if r.get("ratio")) + ")" if rounds else ""),
                       ratio=_dig(res, "pcsc", "roundtrip_ratio")))
    return rows


def _dig(d, *keys):
    for k in keys:
        if not isinstance(d, dict) or d.get(k) is None:
            return None
        d = d[k]
    return d


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
    fl = res.get("floor", {})
    rows.append(["floor: load the PKCS#8 key + sign, in the AMP client's process", "RSA-2048",
                 *_cell(fl.get("load_sign_9a"))])
    rows.append(["floor: load the PKCS#8 key + sign, in the AMP client's process", "P-256", *_cell(fl.get("load_sign_9c"))])
    rows.append(["floor: sign with a key loaded once (OpenSSL's sign rate)", "RSA-2048", *_cell(fl.get("held_sign_9a"))])
    rows.append(["reference: load + sign in a minimal server process behind a UNIX socket (no Twisted)", "RSA-2048",
                 *_cell(fl.get("ipc_sign_9a"))])
    rows.append(["reference: load + sign in a minimal server process behind a UNIX socket (no Twisted)", "P-256",
                 *_cell(fl.get("ipc_sign_9c"))])
    if res.get("pcsc_floor"):
        rows.append(["floor: PC/SC round trip to a no-op card (9000 to everything), same pcscd + vpcd", "—",
                     *_cell(res.get("pcsc_floor"))])
    if pcsc:
        rows.append(["card: PC/SC round trip, GET DATA Discovery (pyscard)", "—", *_cell(pcsc.get("roundtrip"))])
        rows.append(["card: PC/SC GENERAL AUTHENTICATE (pyscard, PIN verified once)", "RSA-2048 raw (9a)",
                     *_cell(pcsc.get("9a"))])
        rows.append(["card: PC/SC GENERAL AUTHENTICATE as ONE extended-length APDU", "RSA-2048 raw (9a)",
                     *_cell(pcsc.get("9a_ext"))])
        rows.append(["card: PC/SC GENERAL AUTHENTICATE (pyscard, PIN verified once)", "P-256 (9c)",
                     *_cell(pcsc.get("9c"))])
    kc = res.get("key_cache", {})
    if kc:
        rows.append(["card, key-cache policy on: in-process AMP SignDigest", "RSA-2048 (9a)",
                     *_cell(kc.get("amp", {}).get("9a"))])
        rows.append(["card, key-cache policy on: in-process AMP SignDigest", "P-256 (9c)",
                     *_cell(kc.get("amp", {}).get("9c"))])
        if kc.get("pcsc"):
            rows.append(["card, key-cache policy on: PC/SC GENERAL AUTHENTICATE (chained, as OpenSC)",
                         "RSA-2048 raw (9a)", *_cell(kc["pcsc"].get("9a"))])
            rows.append(["card, key-cache policy on: PC/SC GENERAL AUTHENTICATE, one extended APDU",
                         "RSA-2048 raw (9a)", *_cell(kc["pcsc"].get("9a_ext"))])
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
    oc = res.get("opensc")
    if oc and oc.get("card"):
        kinds = ", ".join(f"{k['n']} {name} ({k['ms']:g} ms)" for name, k in oc["kinds"].items())
        lines += ["", f"One `pkcs11-tool --sign` process sends {oc['apdus']} APDUs to the card: {kinds}, as OpenSC "
                  f"logged them (1 ms resolution; OPENSC_DEBUG=9, which itself slows OpenSC: that process took "
                  f"{oc['traced_ms']:.1f} ms). The same command against a replay card on the same pcscd + vpcd "
                  f"(that conversation answered from a table, at no cost of its own): {oc['replay']['p50']:.2f} ms "
                  f"p50, beside {oc['card']['p50']:.2f} ms against this card, alternated ({oc['card']['n']} each): "
                  f"what is left at the replay card is OpenSC's, pcscd's and the process's own cost."]
    if res.get("targets"):
        lines += ["", targets_table(res["targets"]), ""]
    if res.get("pcsc_skipped"):
        lines.append(f"PC/SC not measured: {res['pcsc_skipped']}.")
    ver = res.get("verified", {})
    if ver:
        bad = [k for k, v in ver.items() if not v]
        lines.append("Every path's last signature was verified under the slot's public key: "
                     + ("all verify." if not bad else f"FAILED for {', '.join(bad)}."))
    for note in res.get("notes", []):
        lines.append(f"Note: {note}")
    lines += ["", PROFILE]
    return "\n".join(lines)


#: what py-spy showed in the card daemon (issue 15), and what was done about it; figures from the runs that guided it
PROFILE = """**Where the card's time goes** (py-spy of the card daemon, `py-spy record -r 1000`, under a client looping
on one request; the shares are of the daemon's busy samples).

* Local API SignDigest (8,000 P-256 calls): the `send` that answers (and wakes the client) is the largest share,
  then OpenSSL (the key load and the signature), AES-GCM's decryptor set-up and the locked buffer made per
  operation (mmap + mlock + munmap). Removed: Twisted AMP's dispatch for SignDigest (~14%: answered by the
  daemon's own box reader now), the seal AAD built by construct on every operation (~8%: cached), Twisted's
  write-on-next-turn (answers are sent in the turn that made them). For RSA-2048 about half of a signature is
  loading the key for that one operation (OpenSSL's per-key set-up on first use): the key-cache policy
  (card.ini `key_cache`, off by default) is what removes it.
* PIV GET DATA over vpcd: a construct Struct built per call to read the tag list (~26%: by index now),
  DeferredLock.run's Deferreds on every APDU (handled at once when nothing is in flight), a coroutine and its
  Deferred per APDU (the applet now runs to its answer at once unless an effect has to wait: a private-key
  operation or a change synced to the server); 36.5 -> 8.2 us per GET DATA inside the process. What remains
  per APDU is mostly the socket calls (TCP_QUICKACK, recv, send).
* Local API SignDigest, second round (issue 15's card-side pass): the PIN check opened three items per
  signature (the policy twice, the PIN record, whose bytes it copied) and every open mapped, locked and
  unmapped a fresh page. Now the policy and the PIN's tries left are Load(derive=...) values kept while
  their items are unchanged (the PIN is not copied), plaintexts go to pooled locked pages
  (vsc.card.memory.ScratchPool), require_usable skips Automat, and SignDigest runs synchronously when
  nothing holds the card: P-256 in-process 210 -> 72 us per call, RSA-2048 local API 1.7x -> 1.3x the
  load-and-sign floor. What is left is Python around the request (box parsing, the PIN decision, the
  answer) and Twisted's per-event path, about 60-90 us of CPU on the two sides.
* `pkcs11-tool --sign`: 42-46 APDUs per process with vsc's former ATR, 41 since the card answers a YubiKey 5's
  ATR (OpenSC then skips the CCC and the protected-object reads for the PIN state and asks GET VERSION once;
  tests/test_pcsc_atr.py, docs/pcsc.md "The ATR") (OpenSC's driver matching, Discovery read several times,
  every certificate read as 8 bytes then whole in 256-byte GET RESPONSE pieces, VERIFY status twice,
  VERIFY, the chained signature). The one slow answer is VERIFY with the PIN: one sync to the
  server (anti-hammering: every try is stored, right or wrong, before it is answered; the sync re-seals
  the card memory, waits for the server and fsyncs the freshness record). It made two before (decrement,
  compare, restore), 4-10 ms together. A
  replay card answering the same APDUs from a table takes 17-24 ms per process: OpenSC, pcscd and the
  process start alone are about 2.5-3x SoftHSM2's whole command (bench/profile.md, card side)."""


def targets_table(rows: list[dict]) -> str:
    """issue 15's card-side targets as a table (also used by bench/__main__.py's Targets section)."""
    from bench._util import markdown_table

    def fmt(v, unit):
        if v is None:
            return "—"
        return f"{v:,.0f} {unit}" if unit == "/s" else f"{v:.2f} {unit}"

    out = []
    for r in rows:
        ratio = "—" if r["ratio"] is None else f"{r['ratio']:.2f}x"
        met = "—" if r["met"] is None else ("met" if r["met"] else "NOT met")
        out.append([r["target"], fmt(r["value"], r["unit"]), f"{fmt(r['floor'], r['unit'])} ({r['floor_name']})",
                    ratio, r["bound_text"], met])
    return markdown_table(["target", "measured", "floor, same run", "ratio", "bound", ""], out)


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
