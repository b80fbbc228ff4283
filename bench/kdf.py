"""
The offline cost of one password guess against what a stolen database holds
(the verifier and the KDF parameters), per key derivation: scrypt N=2^15,
r=8, p=1 (what cards use) against the patent's legacy MD5(password || SALT).
A figure, not a test (it moved here from tests/attacks/test_attacks.py, which
asserted the ratio: a wall-clock ratio on a loaded machine is no test).

    .venv/bin/python -m bench.kdf [--json]
"""

from __future__ import annotations

import argparse
import json
import time

from vsc import crypto
from vsc.card import ops
from vsc.wire.ops import KdfAlg, KdfParams


def guess_costs(scrypt_guesses: int = 3, md5_guesses: int = 20000) -> dict[str, float]:
    """Seconds per guess for each derivation (the mean of the given number of guesses)."""
    costs = {}
    for name, kdf, n in (("scrypt N=2^15 r=8 p=1", KdfParams(alg=KdfAlg.SCRYPT, salt=crypto.system_random(16)),
                          scrypt_guesses),
                         ("legacy MD5(password||SALT)", KdfParams(alg=KdfAlg.LEGACY_MD5, log2_n=0, r=0, p=0),
                          md5_guesses)):
        t0 = time.perf_counter()
        for i in range(n):
            ops.derive_keys(f"guess {i}", kdf)
        costs[name] = (time.perf_counter() - t0) / n
    return costs


def main() -> None:
    p = argparse.ArgumentParser(description="offline cost of one password guess per key derivation")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    costs = guess_costs()
    ratio = costs["scrypt N=2^15 r=8 p=1"] / costs["legacy MD5(password||SALT)"]
    if args.json:
        print(json.dumps({"seconds_per_guess": costs, "scrypt_over_md5": round(ratio)}, indent=2))
        return
    for name, seconds in costs.items():
        print(f"{name:30} {seconds * 1e3:10.4f} ms per guess")
    print(f"scrypt costs an offline guesser {ratio:,.0f} times what the legacy MD5 derivation does")


if __name__ == "__main__":
    main()
