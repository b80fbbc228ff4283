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

    from vsc.licensing import lcp
    VENDOR_KEY = b"-----BEGIN PUBLIC KEY-----\\n...\\n-----END PUBLIC KEY-----\\n"   # embedded
    lic = lcp.check("app.keyfile", VENDOR_KEY, product="editor")   # raises lcp.LicenseError
    if "pro" in lic.features: ...
    guard = lcp.Guard("app.keyfile", VENDOR_KEY, product="editor", interval=60)
    guard.start()   # re-proves in a background thread; os._exit(75) when the card goes

``check`` does the whole proof inside the calling process: it verifies the
keyfile with the vendor key it was given, picks the nonce itself, asks the
card daemon (over its control socket, with vsc.card.client: no reactor, no
Twisted) to sign the challenge and verifies that signature with the card
key named in the keyfile. Nothing outside the program is trusted to say "yes".

Time and randomness come from the caller: ``check(..., now=T, rand=R)`` and
``Guard(..., clock=C, rand=R)`` check expiry against ``T`` (or ``C()``) and
draw nonces from ``R(n)``; left out, they are the wall clock and
vsc.crypto's system randomness, read here, at the edge of the API. The
keyfile logic itself is vsc.protocol.licence (pure functions, re-exported here).
"""

from __future__ import annotations

import os
import threading
import time  # clock-ok: the API's edge reads the wall clock when the caller passes no time
from pathlib import Path
from typing import Callable

from vsc import crypto
from vsc.card import client as control_client
from vsc.protocol.licence import (
    LICENCE_PREFIX,
    LicenseError,
    check_limits,
    counter_name,
    counter_problem,
    is_rental,
    issue,
    loads,
    no_runs_left,
    proof_challenge,
    verify_proof,
)
from vsc.util.textfile import TextFileError, read_text
from vsc.wire import control
from vsc.wire.license import MAX_KEYFILE_TEXT, License

__all__ = [
    "EXIT_LICENSE", "LICENCE_PREFIX", "Guard", "License", "LicenseError", "charge_sync", "check", "check_limits",
    "counter_name", "is_rental", "issue", "load", "loads", "no_runs_left", "proof_challenge", "prove_sync",
    "verify_proof", "wall_clock",
]

EXIT_LICENSE = 75  # EX_TEMPFAIL: what `vsc run` exits with when the licence refuses or stops the program
NONCE_BYTES = 32


def wall_clock() -> float:
    """The default clock of this API (seconds since the epoch)."""
    return time.time()  # clock-ok: the edge of the API (pass now= / clock= to check on another clock)


def load(keyfile: str | os.PathLike, vendor_public_pem: bytes) -> License:
    """Read a keyfile and check the vendor's signature over it."""
    return loads(read_keyfile(keyfile), vendor_public_pem, str(keyfile))


def read_keyfile(keyfile: str | os.PathLike) -> str:
    """
    A keyfile's text: a regular file of at most MAX_KEYFILE_TEXT bytes, opened
    without blocking. A FIFO in its place (which would block a Guard's check
    for ever), a device or an oversize file is refused unread.
    """
    try:
        return read_text(keyfile, MAX_KEYFILE_TEXT)
    except TextFileError as e:
        why = {
            "not-regular": f"{keyfile} is not a regular file: not a vsc keyfile",
            "too-large": f"{keyfile} is longer than any keyfile: not a vsc keyfile",
            "not-utf8": f"{keyfile} is not a vsc keyfile",
        }.get(e.kind, f"cannot read the keyfile {keyfile}: {e.strerror}")
        raise LicenseError(why) from None


def vendor_pem(vendor_public_key) -> bytes:
    """The vendor key given as PEM bytes (embedded in the program: preferred) or as a file path."""
    if isinstance(vendor_public_key, (bytes, bytearray)):
        return bytes(vendor_public_key)
    try:
        return Path(vendor_public_key).read_bytes()
    except OSError as e:
        raise LicenseError(f"cannot read the vendor public key {vendor_public_key}: {e.strerror}") from None


# ---------------------------------------------------------------- the card's part (vsc.card.client)


def _card_call(home, command: control.Command, timeout: float, **args) -> dict:
    """One control request; every failure but the card's own refusal becomes a LicenseError."""
    try:
        return control_client.call(home, command, timeout, **args)
    except control_client.NotRunning as e:
        why = "cannot reach the card daemon" if e.stale else "no card daemon"
        raise LicenseError(f"no card is inserted ({why} for {e.home})") from None
    except control_client.Refused:
        raise
    except control_client.ControlError as e:
        raise LicenseError(str(e)) from None


def prove_sync(lic: License, home=None, timeout: float = 30.0, rand: Callable[[int], bytes] | None = None) -> None:
    """The inserted card signs a fresh challenge (our nonce); we verify it with the keyfile's card key."""
    nonce = (rand or crypto.system_random)(NONCE_BYTES)
    digest = crypto.sha256(proof_challenge(lic, nonce))
    try:
        resp = _card_call(home, control.SIGN_DIGEST, timeout, slot=lic.slot, digest=digest)
    except control_client.Refused as e:
        raise LicenseError(f"the card refused: {e}") from None
    if not verify_proof(lic, nonce, resp["signature"]):
        raise LicenseError("the inserted card does not hold the key this licence was issued to")


def charge_sync(lic: License, keyfile_text: str, vendor_public_pem: bytes, home=None, timeout: float = 60.0) -> int:
    """
    Take one run of a rental keyfile: the card funds the grant's counter
    (once, from the signed keyfile), then ``cost`` units are taken; the card
    syncs with the server before it answers. Returns the units left.
    """
    if counter_problem(lic):  # a counter the user could increase (or no card could hold): never used
        raise LicenseError(f"the keyfile for {lic.product} cannot be used: {counter_problem(lic)}")
    name = counter_name(lic, vendor_public_pem)
    try:
        # always through the card's fund check, which also refuses a counter another vendor key funded
        name = _card_call(home, control.LICENSE_FUND, timeout, keyfile=keyfile_text,
                          vendor_key=vendor_public_pem)["name"]
        return _card_call(home, control.COUNTER, timeout, name=name, delta=-lic.cost)["value"]
    except control_client.Refused as e:
        raise no_runs_left(lic, str(e), name) or LicenseError(f"the card refused: {e}") from None


def check(keyfile: str, vendor_public_key, home: str | None = None, feature: str | None = None,
          charge: bool = False, timeout: float = 30.0, product: str | None = None, *,
          now: float | None = None, rand: Callable[[int], bytes] | None = None) -> License:
    """
    Verify the keyfile with the vendor key (PEM bytes embedded in the
    program, or a path), check product / expiry (at ``now``) / feature, and
    have the inserted card prove possession of the key the keyfile names
    (nonce from ``rand``). With ``charge``, a rental keyfile also takes one
    run from its counter. Returns the licence; raises LicenseError with a
    one-line reason otherwise.
    """
    pem = vendor_pem(vendor_public_key)
    text = read_keyfile(keyfile)
    lic = loads(text, pem, str(keyfile))
    check_limits(lic, wall_clock() if now is None else now, feature, product)
    prove_sync(lic, home, timeout, rand)
    if charge and is_rental(lic):
        charge_sync(lic, text, pem, home, timeout)
    return lic


class Guard:
    """
    Re-proves the licence every ``interval`` seconds in a daemon thread; calls ``on_failure(reason)`` once
    when a check fails, for whatever reason (fail closed: an unexpected error stops the program too).
    """

    def __init__(self, keyfile: str, vendor_public_key, interval: float = 60.0, home: str | None = None,
                 on_failure: Callable[[str], None] = lambda why: os._exit(EXIT_LICENSE),
                 product: str | None = None, feature: str | None = None, *,
                 clock: Callable[[], float] = wall_clock, rand: Callable[[int], bytes] | None = None):
        self.args = (keyfile, vendor_public_key)
        self.home = home
        self.product = product
        self.feature = feature
        self.interval = interval
        self.on_failure = on_failure
        self.clock = clock
        self.rand = rand
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
                check(*self.args, home=self.home, product=self.product, feature=self.feature,
                      timeout=max(self.interval, 10.0), now=self.clock(), rand=self.rand)
            except Exception as e:  # noqa: BLE001 - fail closed: a check that cannot finish stops the program
                if not self._stop.is_set():
                    why = str(e) if isinstance(e, LicenseError) else \
                        f"licence check failed: {getattr(e, 'strerror', None) or e or type(e).__name__}"
                    self.on_failure(why)
                return
