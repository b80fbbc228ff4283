"""
Micro-benchmarks of vsc.crypto's hot paths (issue 15), in this process:

    .venv/bin/python -m bench.crypto [--budget SECONDS] [--json]

* PIV RSA-2048 per GENERAL AUTHENTICATE, the key loaded from its PKCS#8 DER
  per call as the card does: a PKCS#1 v1.5 SHA-256 block (signed through
  cryptography) and a PSS block (RSA without padding in libcrypto), beside
  OpenSSL's RSA-2048 sign with the key held and loaded per call;
* the handshake's key crumbs: the server's Hello key
  (``RSAPrivateKey.public_key().spki_der``), the card parsing it
  (``RSAPublicKey(spki)``) and encrypting to it (OAEP, pycryptodome);
* sealed records in memory: seal + open of 64 bytes per suite;
* the import of ``vsc.crypto.hashes`` (what ``vsc card sign`` needs) against
  ``python -c pass``, as whole processes.

It uses only names that exist before and after vsc.crypto became a package
(the PIV operation falls back to the old ``rsa_raw_private``), so the same
file measures an older checkout too: ``PYTHONPATH=/path/to/checkout``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding

from bench._util import fmt_rate, machine_line, markdown_table, rate
from vsc import crypto

DIGEST_INFO_SHA256 = bytes.fromhex("3031300d060960864801650304020105000420")


def _piv_op():
    """vsc's PIV private operation on (handle, block), whichever this checkout has."""
    new = getattr(crypto, "rsa_private_block", None)
    if new is not None:
        return new
    return lambda handle, block: crypto.rsa_raw_private(handle, block, crypto.system_random)


def piv_blocks(der: bytes) -> dict[str, bytes]:
    """A PKCS#1 v1.5 SHA-256 signature block and a PSS block for the RSA-2048 key ``der``."""
    key = serialization.load_der_private_key(der, None)
    digest = crypto.sha256(b"bench")
    pkcs1 = b"\x00\x01" + b"\xff" * (256 - 3 - len(DIGEST_INFO_SHA256) - 32) + b"\x00" + DIGEST_INFO_SHA256 + digest
    sig = key.sign(b"bench", padding.PSS(mgf=padding.MGF1(hashes.SHA256()), salt_length=32), hashes.SHA256())
    nums = key.public_key().public_numbers()
    pss = pow(int.from_bytes(sig, "big"), nums.e, nums.n).to_bytes(256, "big")  # public operation: the PSS block
    return {"pkcs1": pkcs1, "pss": pss}


def piv_rates(budget: float) -> dict[str, float]:
    """PIV RSA-2048 per call (key loaded per call) for both kinds of block, and OpenSSL's sign beside them."""
    der = crypto.generate_private_der(crypto.KEY_RSA2048)
    blocks = piv_blocks(der)
    op = _piv_op()
    digest = crypto.sha256(b"bench")

    def piv(block: bytes):
        def once() -> None:
            with crypto.PrivateKeyHandle(der) as handle:
                op(handle, block)
        return once

    def load_sign() -> None:
        with crypto.PrivateKeyHandle(der) as handle:
            handle.sign_digest(digest)

    held = crypto.PrivateKeyHandle(der)
    return {
        "piv_pkcs1_load": rate(piv(blocks["pkcs1"]), budget),
        "piv_pss_load": rate(piv(blocks["pss"]), budget),
        "openssl_sign_held": rate(lambda: held.sign_digest(digest), budget),
        "openssl_load_sign": rate(load_sign, budget),
    }


def handshake_rates(budget: float) -> dict[str, float]:
    """The per-handshake key work around the RSA decrypt: the server's Hello key, the card's parse and encrypt."""
    key = crypto.RSAPrivateKey.generate(3072)
    spki = key.public_key().spki_der
    secret = os.urandom(96)
    return {
        "server_hello_key": rate(lambda: key.public_key().spki_der, budget),
        "server_fingerprint": rate(lambda: key.public_key().fingerprint(), budget),
        "card_parse_server_key": rate(lambda: crypto.RSAPublicKey(spki), budget),
        "card_oaep_encrypt": rate(lambda: crypto.RSAPublicKey(spki).oaep_encrypt(secret, os.urandom), budget),
    }


def record_rates(budget: float) -> dict[str, float]:
    """Seal + open of a 64-byte record per suite (one direction's cipher object, reused)."""
    out = {}
    data, aad = os.urandom(64), b"aad"
    ciphers = {
        "aes256-gcm": crypto.AEADRecordCipher("aes256-gcm", os.urandom(32), os.urandom(12)),
        "chacha20-poly1305": crypto.AEADRecordCipher("chacha20-poly1305", os.urandom(32), os.urandom(12)),
        "aes256-cbc-hmac-sha256": crypto.CBCHMACRecordCipher(os.urandom(32), os.urandom(32), os.urandom),
    }
    for label, cipher in ciphers.items():
        seq = (7).to_bytes(8, "big")
        out[label] = rate(lambda c=cipher: c.open(seq, c.seal(seq, data, aad), aad), budget)
    return out


def process_ms(code: str, runs: int) -> float:
    """The fastest of ``runs`` whole ``python -c code`` processes, in ms."""
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        best = min(best, time.perf_counter() - t0)
    return best * 1000


def import_figures(runs: int) -> dict[str, float]:
    """Whole processes, alternated: ``pass``, hashing through vsc.crypto, importing cryptography; and -X importtime."""
    codes = {
        "python_pass": "pass",
        "vsc_crypto_sha256": "from vsc import crypto; crypto.sha256(b'')",
        "cryptography_import": "import cryptography.hazmat.primitives.asymmetric.rsa",
    }
    samples: dict[str, list[float]] = {k: [] for k in codes}
    for _ in range(runs):
        for name, code in codes.items():
            samples[name].append(process_ms(code, 1))
    out = {f"{k}_ms": min(v) for k, v in samples.items()}
    cumulative = []
    for _ in range(runs):
        err = subprocess.run([sys.executable, "-X", "importtime", "-c", "from vsc import crypto; crypto.sha256(b'')"],
                             capture_output=True, text=True, check=True).stderr
        total = 0
        for line in err.splitlines():
            if not line.startswith("import time:") or line.count("|") != 2:
                continue
            _, cum, name = line.split("|")
            if cum.strip().isdigit() and name.startswith(" vsc"):  # top-level imports (no indent) of vsc modules
                total += int(cum)
        cumulative.append(total / 1000)
    out["vsc_crypto_import_ms"] = statistics.median(cumulative)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.crypto", description=__doc__.split("\n\n")[0])
    p.add_argument("--budget", type=float, default=1.5, help="seconds per rate (median of 3 windows)")
    p.add_argument("--runs", type=int, default=15, help="processes per import figure")
    p.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = p.parse_args(argv)
    figures = {"piv": piv_rates(args.budget), "handshake": handshake_rates(args.budget),
               "records": record_rates(args.budget), "imports": import_figures(args.runs)}
    if args.json:
        print(json.dumps(figures))
        return 0
    piv, hs, rec, imp = figures["piv"], figures["handshake"], figures["records"], figures["imports"]

    def row(label: str, r: float, note: str = "") -> list[str]:
        return [label, fmt_rate(r), f"{1000 / r:.3f}", note]

    rows = [
        row("PIV raw RSA-2048 (OpenSSL): PKCS#1 v1.5 block, key loaded per call", piv["piv_pkcs1_load"],
            f"{piv['piv_pkcs1_load'] / piv['openssl_sign_held']:.2f}× OpenSSL sign"),
        row("PIV raw RSA-2048 (OpenSSL): PSS block, key loaded per call", piv["piv_pss_load"],
            f"{piv['piv_pss_load'] / piv['openssl_sign_held']:.2f}× OpenSSL sign"),
        row("OpenSSL RSA-2048 sign, key held", piv["openssl_sign_held"]),
        row("OpenSSL RSA-2048 sign, key loaded per call", piv["openssl_load_sign"]),
        row("server: Hello key (public_key().spki_der), RSA-3072", hs["server_hello_key"]),
        row("server: its key's fingerprint", hs["server_fingerprint"]),
        row("card: parse the server key (RSAPublicKey)", hs["card_parse_server_key"]),
        row("card: parse + OAEP encrypt to the server key", hs["card_oaep_encrypt"]),
        *[row(f"record seal + open, 64 B, {label}", r) for label, r in rec.items()],
    ]
    print(markdown_table(["operation", "per second", "ms per op", "note"], rows))
    print()
    print(f"Whole processes (fastest of {args.runs}, alternated): python -c pass {imp['python_pass_ms']:.1f} ms; "
          f"hashing through vsc.crypto {imp['vsc_crypto_sha256_ms']:.1f} ms; importing cryptography's RSA "
          f"{imp['cryptography_import_ms']:.1f} ms. vsc + vsc.crypto modules' own import time (-X importtime, "
          f"median): {imp['vsc_crypto_import_ms']:.1f} ms.")
    print(machine_line())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
