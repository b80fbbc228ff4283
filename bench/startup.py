"""
Start-up cost of the ``vsc`` command as a whole process, beside the floor of
any Python program: ``python -c pass`` of the same interpreter.

    .venv/bin/python bench/startup.py [--quick] [--json] [--keep]

Set-up: bench/latency.py's CardInUse (a real ``twistd -n vsc-server``, one
card enrolled with the real CLI, its real card daemon ``twistd -n vsc-card``
with a private runtime dir). Then, in alternated pairs (the baseline and the
command one after the other, the order swapped every pair, so a neighbour's
burst of CPU use on a shared machine hits both alike):

* ``python -c pass`` vs ``vsc card status`` (one request on the control socket);
* ``python -c pass`` vs ``vsc card sign --slot 9c`` (hash a file, one
  SignDigest request, write the signature; the signature is verified);
* ``python -c pass`` vs ``vsc --help`` (the parser alone).

Reported per command: the median wall time of each side and their ratio
(issue 15 asks for <= 2x on ``card status`` and ``card sign``), plus which of
Twisted, construct and cryptography the command imported (``python -X
importtime``: the request path should import none of them).

The vsc package is byte-compiled first (``compileall``), as an installed
package is, and PYTHONDONTWRITEBYTECODE is dropped from the commands'
environment: otherwise every run would compile vsc's modules from source.

This is a benchmark, not a test: it reads the clock directly.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):  # run as a script: make ``bench`` and ``vsc`` importable from the checkout
    sys.path.insert(0, str(ROOT))

from bench import latency  # noqa: E402

PYTHON = Path(sys.executable)
VSC = latency.VSC
HEAVY = ("twisted", "construct", "cryptography", "Crypto")


def _time(argv: list[str], env: dict, cwd: Path) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, timeout=120)
    elapsed = (time.perf_counter() - t0) * 1000.0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])}... failed (exit {proc.returncode}): "
                           f"{(proc.stderr or proc.stdout).decode(errors='replace').strip()[-300:]}")
    return elapsed


def pairs(argv: list[str], n: int, env: dict, cwd: Path) -> dict:
    """``n`` alternated pairs of (python -c pass, argv): medians in ms and their ratio."""
    base_argv = [str(PYTHON), "-c", "pass"]
    for _ in range(2):  # warm the page cache for both
        _time(base_argv, env, cwd)
        _time(argv, env, cwd)
    base, cmd = [], []
    for i in range(n):
        if i % 2 == 0:
            base.append(_time(base_argv, env, cwd))
            cmd.append(_time(argv, env, cwd))
        else:
            cmd.append(_time(argv, env, cwd))
            base.append(_time(base_argv, env, cwd))
    b, c = statistics.median(base), statistics.median(cmd)
    return {"n": n, "python_ms": round(b, 2), "command_ms": round(c, 2), "ratio": round(c / b, 2),
            "pair_ratio_median": round(statistics.median(x / y for x, y in zip(cmd, base)), 2)}


def heavy_imports(argv: list[str], env: dict, cwd: Path) -> list[str]:
    """Which of HEAVY the command imports (``python -X importtime`` on the console script)."""
    proc = subprocess.run([str(PYTHON), "-X", "importtime", *argv], env=env, cwd=cwd, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=120)
    found = set()
    for line in proc.stderr.splitlines():
        if "|" not in line:
            continue
        name = line.rsplit("|", 1)[1].strip()
        top = name.split(".")[0]
        if top in HEAVY:
            found.add(top)
    return sorted(found)


def run(quick: bool = False, keep: bool = False, progress=lambda m: None) -> dict:
    from vsc import crypto

    n = 10 if quick else 40
    base = Path(tempfile.mkdtemp(prefix="vscs-", dir="/tmp"))  # short: UNIX socket paths <= 108 bytes
    world = latency.CardInUse(base)
    res: dict = {"n": n}
    try:
        world.enrol()
        world.start_daemon()
        progress("  startup: card inserted; timing whole vsc processes in alternated pairs...")
        subprocess.run([str(PYTHON), "-m", "compileall", "-q", str(ROOT / "vsc")], capture_output=True, timeout=300)
        env, home = dict(world.env), str(world.home)
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        doc, sig = base / "doc", base / "doc.sig"
        doc.write_bytes(b"a document to sign\n" * 50)
        commands = {
            "card status": [str(VSC), "card", "--home", home, "status"],
            "card sign": [str(VSC), "card", "--home", home, "sign", "--slot", "9c", "--in", str(doc),
                          "--out", str(sig)],
            "--help": [str(VSC), "--help"],
        }
        for name, argv in commands.items():
            res[name] = pairs(argv, n, env, base)
            res[name]["imports"] = heavy_imports(argv, env, base)
        pem = subprocess.run([str(VSC), "card", "--home", home, "public-key", "--slot", "9c"], env=env,
                             capture_output=True, timeout=60).stdout
        res["verified"] = crypto.verify_sha256(crypto.public_der_from_pem(pem), doc.read_bytes(), sig.read_bytes())
        # last: `vsc card remove` end to end (the check-in with the server included), then the daemon's exit
        t0 = time.perf_counter()
        _time([str(VSC), "card", "--home", home, "remove"], env, base)
        res["card remove"] = {"command_ms": round((time.perf_counter() - t0) * 1000.0, 1)}
        world.daemon.wait(60)
        res["card remove"]["daemon_exit_ms"] = round((time.perf_counter() - t0) * 1000.0, 1)
        world.daemon = None
        res["targets"] = targets(res)
        return res
    finally:
        world.close()
        if keep:
            print(f"startup logs kept in {base}", file=sys.stderr)
        else:
            shutil.rmtree(base, ignore_errors=True)


def targets(res: dict) -> list[dict]:
    """issue 15's CLI targets: each command's median beside `python -c pass` alternated with it (<= 2x)."""
    from bench.latency import target

    return [target(f"`vsc {name}` as a whole process / `python -c pass`", res[name]["command_ms"],
                   res[name]["python_ms"], "ms", 2.0, floor_name="`python -c pass`, alternated in pairs")
            for name in ("card status", "card sign") if res.get(name)]


def report(res: dict) -> str:
    from bench._util import markdown_table

    rows = []
    for name in ("card status", "card sign", "--help"):
        r = res.get(name)
        if not r:
            continue
        rows.append([f"`vsc {name}`", f"{r['command_ms']:.1f}", f"{r['python_ms']:.1f}", f"{r['ratio']:.2f}x",
                     f"{r['pair_ratio_median']:.2f}x", ", ".join(r["imports"]) or "none"])
    lines = [markdown_table(["process", "median ms", "`python -c pass` median ms", "ratio of medians",
                             "median of pair ratios", "imports of twisted / construct / cryptography"], rows), ""]
    lines.append(f"{res.get('n')} alternated pairs per row (order swapped every pair), against a real card daemon; "
                 "the `card sign` signature " + ("verified." if res.get("verified") else "did NOT verify."))
    rm = res.get("card remove")
    if rm:
        lines.append(f"`vsc card remove` (upload, check-in, set idle) returned in {rm['command_ms']:.0f} ms; the card "
                     f"daemon had exited {rm['daemon_exit_ms']:.0f} ms after the command started.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="bench/startup.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    ap.add_argument("--json", action="store_true", help="print the raw results as one JSON line")
    args = ap.parse_args(argv)
    res = run(args.quick, args.keep, lambda m: print(m, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps(res))
    else:
        print("# vsc start-up\n")
        print(report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
