"""
``vsc license keygen|issue|show|check`` (the vendor's keyfile generator and
the customer's check) and ``vsc run`` (the digital ignition key). The card
is asked through the licensing API itself (vsc.licensing.lcp), so the
command line and a protected program make the very same proof.
"""

from __future__ import annotations

import calendar
import math
import os
import shutil
import sys
import time  # clock-ok: a command-line tool (or the harness) reads the wall clock
from pathlib import Path

from vsc import crypto
from vsc.cli import EXIT_USAGE, CommandError, emit
from vsc.licensing import lcp


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror}") from None


def _parse_date(text: str) -> int:
    """YYYY-MM-DD (UTC midnight) or seconds since the epoch."""
    if text.isdigit():
        return int(text)
    try:
        return calendar.timegm(time.strptime(text, "%Y-%m-%d"))
    except ValueError:
        raise CommandError(f"--expires {text!r}: use YYYY-MM-DD or seconds since the epoch") from None


def cmd_keygen(args) -> int:
    private, public = crypto.vendor_keygen()
    for path, data, mode in ((args.private, private, 0o600), (args.public, public, 0o644)):
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        except FileExistsError:
            raise CommandError(f"{path} exists; refusing to overwrite a vendor key") from None
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    emit(args, {"private": args.private, "public": args.public},
         f"vendor signing key: {args.private} (keep it secret)\nvendor public key: {args.public} (ship it with the program)")
    return 0


def cmd_issue(args) -> int:
    from vsc.wire.license import License

    try:
        card_key = crypto.public_der_from_pem(_read(args.card_key))
    except ValueError as e:
        raise CommandError(f"{args.card_key}: not a PEM public key ({e})") from None
    if args.runs is not None and args.runs < 1:
        raise CommandError("--runs must be at least 1 (leave it out for unlimited runs)")
    if args.cost < 1:
        raise CommandError("--cost must be at least 1")
    if args.counter and not args.counter.startswith(lcp.LICENCE_PREFIX):
        raise CommandError(f"--counter must start with {lcp.LICENCE_PREFIX!r}: only such counters are funded by "
                           "keyfiles and cannot be increased by the user")
    lic = License(
        product=args.product,
        license_id=crypto.system_random(16),
        card_key=card_key,
        slot=args.slot,
        issued=int(time.time()),  # clock-ok: the vendor's tool stamps the issue date
        expires=_parse_date(args.expires) if args.expires else 0,
        runs=args.runs or 0,
        counter=args.counter or "",
        cost=args.cost,
        features=tuple(f.strip() for f in (args.features or "").split(",") if f.strip()),
        vendor=args.vendor or "",
    )
    vendor_key = _read(args.vendor_key)
    try:
        text = lcp.issue(vendor_key, lic)
    except crypto.CryptoError as e:
        raise CommandError(f"cannot sign with {args.vendor_key}: {e}") from None
    except ValueError as e:
        raise CommandError(f"cannot issue this keyfile: {e}") from None
    Path(args.out).write_text(text)
    emit(args, {"out": args.out, "product": lic.product, "license_id": lic.license_id.hex()},
         f"keyfile for {lic.product} written to {args.out} (licence {lic.license_id.hex()})")
    return 0


def _describe(lic, vendor_pem: bytes) -> dict:
    from vsc import crypto

    return {
        "product": lic.product,
        "license_id": lic.license_id.hex(),
        "slot": lic.slot,
        "card_key_sha256": crypto.sha256(lic.card_key).hex(),
        "issued": lic.issued,
        "expires": lic.expires or None,
        "runs": lic.runs or None,
        "counter": lcp.counter_name(lic, vendor_pem) if lcp.is_rental(lic) else None,
        "cost": lic.cost,
        "features": list(lic.features),
        "vendor": lic.vendor,
    }


def _load(args, limits: bool = True):
    """The verified keyfile; a licence refusal exits with EXIT_LICENSE (75)."""
    try:
        lic = lcp.load(args.license, _read(args.vendor_key))
        if limits:
            lcp.check_limits(lic, time.time(), getattr(args, "feature", None))  # clock-ok: the CLI checks expiry
    except lcp.LicenseError as e:
        raise CommandError(str(e), lcp.EXIT_LICENSE) from None
    return lic


def cmd_show(args) -> int:
    """Verify the signature and print the keyfile, also when it expired (then exit 75 after printing)."""
    lic = _load(args, limits=False)
    d = _describe(lic, _read(args.vendor_key))
    try:
        lcp.check_limits(lic, time.time(), args.feature)  # clock-ok: CLI-level expiry check
        problem = ""
    except lcp.LicenseError as e:
        problem = str(e)
    d["valid"] = not problem
    emit(args, d, "\n".join(f"{k}: {v}" for k, v in d.items()))
    if problem:
        print(f"vsc: {problem}", file=sys.stderr)
        return lcp.EXIT_LICENSE
    return 0


# ---------------------------------------------------------------- talking to the card


def cmd_check(args) -> int:
    """Verify the keyfile, have the inserted card prove it (and, with --charge, pay for one run)."""
    lic = _load(args)
    vendor_pem = _read(args.vendor_key)
    out: dict = {}
    try:
        lcp.prove_sync(lic, args.home)
        if args.charge and lcp.is_rental(lic):
            out["remaining"] = lcp.charge_sync(lic, _read(args.license).decode(), vendor_pem, args.home)
    except lcp.LicenseError as e:
        raise CommandError(str(e), lcp.EXIT_LICENSE) from None
    emit(args, dict(_describe(lic, vendor_pem), ok=True, **out), f"licence for {lic.product}: valid, card present"
         + (f", {out['remaining']} runs left" if "remaining" in out else ""))
    return 0


# ---------------------------------------------------------------- vsc run


#: vsc run: --interval's range (a shorter one proves in a busy loop) and --grace's most, in seconds
RUN_INTERVAL = (0.1, 86400.0)
RUN_GRACE_MAX = 3600.0


def cmd_run(args) -> int:
    from twisted.internet import reactor

    from vsc.card.paths import home_of
    from vsc.licensing.run import IgnitionKey, card_steps

    if not args.program:
        raise CommandError("no program given: vsc run --license K --vendor-key V -- PROGRAM ARGS")
    program = args.program[1:] if args.program[0] == "--" else args.program
    if not program:
        raise CommandError("no program given: vsc run --license K --vendor-key V -- PROGRAM ARGS")
    # finite (NaN compares false, and an infinite interval never proves again), before anything is read
    if not (math.isfinite(args.interval) and RUN_INTERVAL[0] <= args.interval <= RUN_INTERVAL[1]):
        raise CommandError(f"--interval {args.interval:g} must be from {RUN_INTERVAL[0]:g} to {RUN_INTERVAL[1]:g} "
                           "seconds", EXIT_USAGE)
    if not (math.isfinite(args.grace) and 0 <= args.grace <= RUN_GRACE_MAX):
        raise CommandError(f"--grace {args.grace:g} must be from 0 to {RUN_GRACE_MAX:g} seconds", EXIT_USAGE)
    lic = _load(args)
    # before the card is asked (and a rental unit charged): a typo must not cost a run
    if shutil.which(program[0]) is None:
        raise CommandError(f"cannot start {program[0]}: no such executable", 127)
    answer_timeout = max(args.interval, 10.0)  # a proof not answered in time counts as a removed card
    prove, charge = card_steps(_read(args.license).decode(), _read(args.vendor_key), answer_timeout)
    key = IgnitionKey(reactor, home_of(args.home), lic, program, interval=args.interval, grace=args.grace,
                      prove=prove, charge=charge, answer_timeout=answer_timeout)
    reactor.callWhenRunning(key.start)
    reactor.run()
    if key.refusal:
        print(f"vsc: {key.refusal}", file=sys.stderr)
    return key.exit_code


def configure_license(lic) -> None:
    lsub = lic.add_subparsers(dest="license_command", required=True, metavar="ACTION")
    p = lsub.add_parser("keygen", help="create a vendor signing key (Ed25519)")
    p.add_argument("--private", required=True, help="where to write the private key (0600)")
    p.add_argument("--public", required=True, help="where to write the public key (ship it with the program)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_keygen)
    p = lsub.add_parser("issue", help="sign a keyfile binding a product to a customer card's key")
    p.add_argument("--vendor-key", required=True, help="the vendor's private signing key (PEM)")
    p.add_argument("--product", required=True)
    p.add_argument("--card-key", required=True, help="the customer card's public key (PEM, from 'vsc card public-key')")
    p.add_argument("--slot", default="9e", choices=("9a", "9c", "9d", "9e"),
                   help="the card slot holding that key (default 9e: card authentication, PIN policy never, so every proof works without a PIN)")
    p.add_argument("--expires", help="YYYY-MM-DD or epoch seconds (default: never)")
    p.add_argument("--runs", type=int, help="a rental grant: this many runs, counted on the card")
    p.add_argument("--counter", help="charge runs to this named card counter instead of one per grant")
    p.add_argument("--cost", type=int, default=1, help="units per run (default 1)")
    p.add_argument("--features", help="comma-separated features (try-before-buy tiers)")
    p.add_argument("--vendor", help="vendor name to record")
    p.add_argument("--out", required=True)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_issue)
    for name, func, help_ in (("show", cmd_show, "verify and print a keyfile (and the card counter a run costs)"),
                              ("check", cmd_check, "verify a keyfile and have the inserted card prove it")):
        p = lsub.add_parser(name, help=help_)
        p.add_argument("--license", required=True)
        p.add_argument("--vendor-key", required=True, help="the vendor's public key (PEM)")
        p.add_argument("--feature", help="also require this feature")
        p.add_argument("--home", help="the card's home (default $VSC_HOME or ~/.config/vsc)")
        p.add_argument("--json", action="store_true")
        if name == "check":
            p.add_argument("--charge", action="store_true", help="take one run from a rental counter")
        p.set_defaults(func=func)


def configure_run(p) -> None:
    p.add_argument("--license", required=True)
    p.add_argument("--vendor-key", required=True, help="the vendor's public key (PEM)")
    p.add_argument("--home", help="the card's home (default $VSC_HOME or ~/.config/vsc)")
    p.add_argument("--feature", help="require this feature")
    p.add_argument("--interval", type=float, default=5.0, help="re-prove every N seconds (default 5)")
    p.add_argument("--grace", type=float, default=5.0, help="seconds between SIGTERM and SIGKILL (default 5)")
    p.add_argument("program", nargs="*", help="-- PROGRAM ARGS")
    p.set_defaults(func=cmd_run)
