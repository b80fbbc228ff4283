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
    VENDOR_KEY = b"-----BEGIN PUBLIC KEY-----\\n...\\n-----END PUBLIC KEY-----\\n"   # embedded
    lic = lcp.check("app.keyfile", VENDOR_KEY, product="editor")   # raises lcp.LicenseError
    if "pro" in lic.features: ...
    guard = lcp.Guard("app.keyfile", VENDOR_KEY, product="editor", interval=60)
    guard.start()   # re-proves in a background thread; os._exit(75) when the card goes

``check`` does the whole proof inside the calling process: it verifies the
keyfile with the vendor key it was given, picks the nonce itself, asks the
card daemon (over its control socket, no reactor needed) to sign the
challenge and verifies that signature with the card key named in the
keyfile. Nothing outside the program is trusted to say "yes".
"""

from __future__ import annotations

import os
import socket
import threading
import time  # clock-ok: a command-line tool (or the harness) reads the wall clock
from pathlib import Path
from typing import Callable

from vsc import crypto
from vsc.wire import WireError
from vsc.wire.ampbox import Incomplete, decode_box, encode_box
from vsc.wire.license import License, challenge, decode_body, dearmor

EXIT_LICENSE = 75  # EX_TEMPFAIL: what `vsc run` exits with when the licence refuses or stops the program
LICENCE_PREFIX = "lic:"  # the card only funds, and never lets the user increase, counters named so


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
    return loads(text, vendor_public_pem, str(keyfile))


def loads(text: str, vendor_public_pem: bytes, name: str = "keyfile") -> License:
    """``load`` for a keyfile already in memory."""
    try:
        body, signature = dearmor(text)
    except WireError as e:
        raise LicenseError(f"{name}: {e.message}") from None
    try:
        good = crypto.vendor_verify(vendor_public_pem, body, signature)
    except (crypto.CryptoError, ValueError) as e:
        raise LicenseError(f"the vendor public key is not usable: {e}") from None
    if not good:
        raise LicenseError(f"{name}: the vendor's signature does not verify (forged or altered keyfile)")
    try:
        return decode_body(body)
    except WireError as e:
        raise LicenseError(f"{name}: {e.message}") from None


def check_limits(lic: License, now: float, feature: str | None = None, product: str | None = None) -> None:
    if product is not None and lic.product != product:
        raise LicenseError(f"the keyfile is for {lic.product!r}, not {product!r}")
    if lic.expires and now >= lic.expires:
        raise LicenseError(f"the licence for {lic.product} expired")
    if feature is not None and feature not in lic.features:
        raise LicenseError(f"the licence for {lic.product} does not include the feature {feature!r}")


def is_rental(lic: License) -> bool:
    """Does each run cost units of a card counter?"""
    return bool(lic.runs or lic.counter)


def counter_name(lic: License, vendor_public_pem: bytes) -> str:
    """
    The card counter a run costs: the keyfile's own, or one per rental grant —
    always qualified by the vendor key, so a keyfile signed with some other
    key (the user's own, say) can never fund or drain the real vendor's counter.
    """
    vendor = crypto.sha256(crypto.vendor_public_der(vendor_public_pem)).hex()[:12]
    if lic.counter:
        return f"{lic.counter}:{vendor}"
    return f"{LICENCE_PREFIX}{lic.product}:{lic.license_id.hex()[:16]}:{vendor}"


def proof_challenge(lic: License, nonce: bytes) -> bytes:
    return challenge(lic.product, lic.license_id, nonce)


def verify_proof(lic: License, nonce: bytes, signature: bytes) -> bool:
    """Does ``signature`` over the challenge verify with the card key named in the keyfile?"""
    try:
        return crypto.verify_sha256(lic.card_key, proof_challenge(lic, nonce), signature)
    except ValueError:  # a card key the crypto library cannot load: nothing verifies with it
        return False


def no_runs_left(lic: License, reason: str, name: str = "") -> LicenseError | None:
    """The user-facing error for a counter refusal that means "the rental is used up", else None."""
    if "below zero" in reason or "no counter" in reason:
        return LicenseError(f"no runs left on the licence for {lic.product}" + (f" (counter {name})" if name else ""))
    return None


def fund_request(keyfile_text: str, vendor_public_pem: bytes, card_public_keys: dict[str, bytes]) -> tuple[str, int]:
    """
    What the CARD checks before it creates a rental counter: the keyfile's
    vendor signature, that it names one of this card's own keys, and that it
    is a rental; the counter's name and funding come from the signed keyfile,
    never from the caller.
    """
    lic = loads(keyfile_text, vendor_public_pem)
    if card_public_keys.get(lic.slot) != lic.card_key:
        raise LicenseError(f"the keyfile for {lic.product} was not issued to this card's slot {lic.slot}")
    if not lic.runs:
        raise LicenseError(f"the keyfile for {lic.product} grants no runs")
    return counter_name(lic, vendor_public_pem), lic.runs


def issue(vendor_private_pem: bytes, lic: License) -> str:
    """The vendor's keyfile generator: sign and armor. ValueError for a licence that does not encode."""
    from vsc.wire.license import armor, encode_body

    try:
        body = encode_body(lic)
    except WireError as e:
        raise ValueError(e.message) from None
    return armor(body, crypto.vendor_sign(vendor_private_pem, body))


# ---------------------------------------------------------------- for protected programs


def _vendor_pem(vendor_public_key) -> bytes:
    """The vendor key given as PEM bytes (embedded in the program: preferred) or as a file path."""
    if isinstance(vendor_public_key, (bytes, bytearray)):
        return bytes(vendor_public_key)
    try:
        return Path(vendor_public_key).read_bytes()
    except OSError as e:
        raise LicenseError(f"cannot read the vendor public key {vendor_public_key}: {e.strerror}") from None


def _home(home) -> Path:
    from vsc.card.config import default_home

    return Path(home).expanduser() if home else default_home()


class _Refused(Exception):
    """The card daemon answered with an error (its one-line reason)."""


def _amp_call(home: Path, command: bytes, args: dict[bytes, bytes], timeout: float) -> dict[bytes, bytes]:
    """One AMP request to the card daemon's control socket, without a reactor."""
    from vsc.card.config import control_socket_for

    sock_path = control_socket_for(home)
    if not sock_path.exists():
        raise LicenseError(f"no card is inserted (no card daemon for {home})")
    deadline = time.monotonic() + timeout  # clock-ok: a blocking socket call bounds its own wait
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        try:
            s.connect(str(sock_path))
        except OSError:
            raise LicenseError(f"no card is inserted (cannot reach the card daemon for {home})") from None
        box = {b"_command": command, b"_ask": b"1", **args}
        buf = b""
        try:
            s.sendall(encode_box(box))
            while True:
                try:
                    answer, _ = decode_box(buf)
                    break
                except Incomplete:
                    pass
                left = deadline - time.monotonic()  # clock-ok
                if left <= 0:
                    raise socket.timeout
                s.settimeout(left)
                chunk = s.recv(65536)
                if not chunk:
                    raise LicenseError("the card daemon closed the connection (the card was removed)")
                buf += chunk
        except (socket.timeout, TimeoutError):
            raise LicenseError("the card did not answer in time") from None
        except OSError as e:
            raise LicenseError(f"the card daemon connection failed: {e.strerror or e}") from None
    finally:
        s.close()
    if b"_error" in answer:
        raise _Refused(answer.get(b"_error_description", b"refused").decode("utf-8", "replace"))
    return answer


def prove_sync(lic: License, home=None, timeout: float = 30.0) -> None:
    """The inserted card signs a fresh challenge (our nonce); we verify it with the keyfile's card key."""
    nonce = os.urandom(32)
    digest = crypto.sha256(proof_challenge(lic, nonce))
    try:
        resp = _amp_call(_home(home), b"SignDigest", {b"slot": lic.slot.encode(), b"digest": digest}, timeout)
    except _Refused as e:
        raise LicenseError(f"the card refused: {e}") from None
    if not verify_proof(lic, nonce, resp.get(b"signature", b"")):
        raise LicenseError("the inserted card does not hold the key this licence was issued to")


def charge_sync(lic: License, keyfile_text: str, vendor_pem: bytes, home=None, timeout: float = 60.0) -> int:
    """Have the card fund the grant's counter (once, from the signed keyfile) and take ``cost`` units; synced first."""
    name = counter_name(lic, vendor_pem)
    h = _home(home)
    try:
        if lic.runs:
            resp = _amp_call(h, b"LicenseFund", {b"keyfile": keyfile_text.encode(), b"vendor_key": vendor_pem}, timeout)
            name = resp[b"name"].decode()
        resp = _amp_call(h, b"Counter", {b"name": name.encode(), b"delta": str(-lic.cost).encode()}, timeout)
    except _Refused as e:
        raise no_runs_left(lic, str(e), name) or LicenseError(f"the card refused: {e}") from None
    return int(resp[b"value"])


def check(keyfile: str, vendor_public_key, home: str | None = None, feature: str | None = None,
          charge: bool = False, timeout: float = 30.0, product: str | None = None) -> License:
    """
    Verify the keyfile with the vendor key (PEM bytes embedded in the
    program, or a path), check expiry / feature / product, and have the
    inserted card prove possession of the key the keyfile names. With
    ``charge``, a rental keyfile also takes one run from its counter. Returns
    the licence; raises LicenseError with a one-line reason otherwise.
    """
    vendor_pem = _vendor_pem(vendor_public_key)
    lic = load(keyfile, vendor_pem)
    check_limits(lic, time.time(), feature, product)  # clock-ok: the program checks expiry against its clock
    prove_sync(lic, home, timeout)
    if charge and is_rental(lic):
        charge_sync(lic, Path(keyfile).read_text(), vendor_pem, home, timeout)
    return lic


class Guard:
    """Re-proves the licence every ``interval`` seconds in a daemon thread; calls ``on_failure(reason)`` once."""

    def __init__(self, keyfile: str, vendor_public_key, interval: float = 60.0, home: str | None = None,
                 on_failure: Callable[[str], None] = lambda why: os._exit(EXIT_LICENSE),
                 product: str | None = None, feature: str | None = None):
        self.args = (keyfile, vendor_public_key)
        self.home = home
        self.product = product
        self.feature = feature
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
                check(*self.args, home=self.home, product=self.product, feature=self.feature,
                      timeout=max(self.interval, 10.0))
            except LicenseError as e:
                if not self._stop.is_set():
                    self.on_failure(str(e))
                return
