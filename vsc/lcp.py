"""
Licence and copy protection with the Virtual Smart Card as the "digital
ignition key" ([0008], [0017], [0064]-[0065], claim 8).

A vendor signs a keyfile (``vsc license issue``) that binds a product to one
customer card's public key. A protected program runs only while the card
that holds the matching private key is inserted and proves possession by
signing a fresh challenge; rental keyfiles charge a unit from a counter in
the card's protected information before each run (synced to the server
first, so no crash or kill hands a unit back).

Python API for a protected program::

    from vsc import lcp
    lic = lcp.check("app.keyfile", "vendor.pub", home="~/.config/vsc")   # raises lcp.LicenseError
    if "pro" in lic.features: ...
    guard = lcp.Guard("app.keyfile", "vendor.pub", interval=60, on_failure=lambda why: os._exit(75))
    guard.start()   # re-proves in a background thread

``check`` and the guard run ``vsc license check`` (the same code as ``vsc run``)
in a child process, so the program needs no reactor of its own.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Callable

from vsc import crypto
from vsc.wire import WireError
from vsc.wire.license import License, challenge, decode_body, dearmor

EXIT_LICENSE = 75  # EX_TEMPFAIL: what `vsc run` exits with when the licence stops the program


class LicenseError(Exception):
    """The licence does not allow this run (message is user-facing)."""


def load(keyfile: str | os.PathLike, vendor_public_pem: bytes) -> License:
    """Read a keyfile and check the vendor's signature over it."""
    try:
        text = Path(keyfile).read_text()
    except OSError as e:
        raise LicenseError(f"cannot read the keyfile {keyfile}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise LicenseError(f"{keyfile} is not a vsc keyfile") from None
    try:
        body, signature = dearmor(text)
    except WireError as e:
        raise LicenseError(f"{keyfile}: {e.message}") from None
    try:
        good = crypto.vendor_verify(vendor_public_pem, body, signature)
    except (crypto.CryptoError, ValueError) as e:
        raise LicenseError(f"the vendor public key is not usable: {e}") from None
    if not good:
        raise LicenseError(f"{keyfile}: the vendor's signature does not verify (forged or altered keyfile)")
    try:
        return decode_body(body)
    except WireError as e:
        raise LicenseError(f"{keyfile}: {e.message}") from None


def check_limits(lic: License, now: float, feature: str | None = None, product: str | None = None) -> None:
    if product is not None and lic.product != product:
        raise LicenseError(f"the keyfile is for {lic.product!r}, not {product!r}")
    if lic.expires and now >= lic.expires:
        raise LicenseError(f"the licence for {lic.product} expired")
    if feature is not None and feature not in lic.features:
        raise LicenseError(f"the licence for {lic.product} does not include the feature {feature!r}")


def counter_name(lic: License) -> str:
    """The card counter a run costs: the keyfile's own, or one per rental grant."""
    if lic.counter:
        return lic.counter
    return f"lic:{lic.product}:{lic.license_id.hex()[:16]}"


def proof_challenge(lic: License, nonce: bytes) -> bytes:
    return challenge(lic.product, lic.license_id, nonce)


def verify_proof(lic: License, nonce: bytes, signature: bytes) -> bool:
    """Does ``signature`` over the challenge verify with the card key named in the keyfile?"""
    return crypto.verify_sha256(lic.card_key, proof_challenge(lic, nonce), signature)


def issue(vendor_private_pem: bytes, lic: License) -> str:
    """The vendor's keyfile generator: sign and armor."""
    from vsc.wire.license import armor, encode_body

    body = encode_body(lic)
    return armor(body, crypto.vendor_sign(vendor_private_pem, body))


# ---------------------------------------------------------------- for protected programs


def _vsc() -> list[str]:
    exe = Path(sys.executable).with_name("vsc")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "vsc.cli"]


def check(keyfile: str, vendor_public_key: str, home: str | None = None, feature: str | None = None,
          charge: bool = False, timeout: float = 30.0) -> License:
    """
    Verify the keyfile and have the inserted card prove possession of its key
    (and, with ``charge``, take one run from a rental counter). Returns the
    licence; raises LicenseError with the reason otherwise.
    """
    cmd = _vsc() + ["license", "check", "--license", str(keyfile), "--vendor-key", str(vendor_public_key)]
    if home:
        cmd = _vsc() + ["license", "check", "--home", str(home), "--license", str(keyfile), "--vendor-key", str(vendor_public_key)]
    if feature:
        cmd += ["--feature", feature]
    if charge:
        cmd += ["--charge"]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise LicenseError("the card did not answer in time") from None
    if r.returncode != 0:
        raise LicenseError((r.stderr.strip().splitlines() or ["licence check failed"])[-1].removeprefix("vsc: "))
    with open(vendor_public_key, "rb") as f:
        return load(keyfile, f.read())


class Guard:
    """Re-proves the licence every ``interval`` seconds in a daemon thread; calls ``on_failure(reason)`` once."""

    def __init__(self, keyfile: str, vendor_public_key: str, interval: float = 60.0, home: str | None = None,
                 on_failure: Callable[[str], None] = lambda why: os._exit(EXIT_LICENSE)):
        self.args = (keyfile, vendor_public_key)
        self.home = home
        self.interval = interval
        self.on_failure = on_failure
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vsc-licence-guard", daemon=True)

    def start(self) -> "Guard":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                check(*self.args, home=self.home)
            except LicenseError as e:
                self.on_failure(str(e))
                return
