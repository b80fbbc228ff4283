"""
``vsc conformance`` as a command: its options (``extend``), running the items
of vsc.conformance.items in server or card mode, and the pass/fail table (or
JSON: each item with its area, name, result, the § of docs/protocol.md it
checks and the §12 rules it covers). Exits non-zero on any failure.
"""

from __future__ import annotations

import json
import os
import shlex
import sys
import time  # clock-ok: the harness measures how long each item took

import attrs

from vsc import cli
from vsc.conformance.card import run_card_items
from vsc.conformance.items import CARD_ITEMS, SERVER_ITEMS, Item, Result
from vsc.conformance.raw import Failed
from vsc.conformance.server import ServerHarness, ServerSettings


async def run_server_items(harness: ServerHarness, items: tuple[Item, ...] = SERVER_ITEMS,
                           only: set[str] | None = None) -> list[Result]:
    """
    Run every item (of the ``only`` areas), in order. An item whose needs the run
    lacks (a provisioning or storage hook, an insecure-suite server) is reported
    as skipped, with what it needs: never silently left out, never a pass.
    """
    results = []
    fields = attrs.asdict(harness.settings)
    for item in items:
        if only and item.area not in only:
            continue
        name = item.name.format(**fields)
        missing = harness.hooks(item.requires)
        if missing:
            results.append(Result(item.area, name, True, f"skipped: needs {_NEEDS_TEXT[missing]}", 0.0, item.section,
                                  item.rules, skipped=True))
            continue
        t0 = time.monotonic()  # clock-ok
        try:
            await item.check(harness, *item.args)
            ok, detail = True, ""
        except Failed as e:
            ok, detail = False, str(e)
        except Exception as e:  # noqa: BLE001 - a check that crashed is a failure, reported
            ok, detail = False, f"{e.__class__.__name__}: {e}"
        results.append(Result(item.area, name, ok, detail, time.monotonic() - t0, item.section, item.rules))  # clock-ok
    return results


_NEEDS_TEXT = {
    "provision": "--provision or --admin-data-dir (it creates cards)",
    "storage": "--fill-storage and --free-storage (commands that fill and free the server's database storage)",
    "insecure": "--allow-insecure (a server that enables des-cbc-md5)",
}


def table(results: list[Result]) -> str:
    lines = ["| area | check | § | result | time | detail |", "|---|---|---|---|---:|---|"]
    for r in results:
        verdict = "SKIP" if r.skipped else ("PASS" if r.ok else "FAIL")
        lines.append(f"| {r.area} | {r.name} | {r.section} | {verdict} | {r.seconds:.2f} s | {r.detail} |")
    passed = sum(r.ok and not r.skipped for r in results)
    skipped = sum(r.skipped for r in results)
    lines.append("")
    lines.append(f"{passed} passed, {len(results) - passed - skipped} failed, {skipped} skipped")
    return "\n".join(lines)


def _vsc() -> str:
    return os.path.join(os.path.dirname(sys.executable), "vsc")


def cmd_conformance(args) -> int:
    from twisted.internet.task import react

    from vsc.protocol.auth import load_master_key

    results: list[Result] = []

    async def run(reactor):
        if args.card:
            results.extend(await run_card_items(reactor, CARD_ITEMS, args.card_command, args.key_bits, args.timeout,
                                                args.card_driver or None))
            return
        if not args.server or not args.server_key:
            raise cli.CommandError("server mode needs --server and --server-key (or use --card)")
        provision = args.provision
        if not provision and args.admin_data_dir:
            provision = (f"{shlex.quote(_vsc())} admin --data-dir {shlex.quote(args.admin_data_dir)} "
                         "issue {serial} --json")
        settings = ServerSettings(handshake_timeout=args.handshake_timeout,
                                  unauthenticated_idle=args.unauthenticated_idle, idle_timeout=args.idle_timeout,
                                  unauthenticated_body=args.unauthenticated_body,
                                  unauthenticated_per_source=args.unauthenticated_per_source,
                                  lockout_threshold=args.lockout_threshold, suites=_suites(args.server_suites))
        harness = ServerHarness(reactor, args.server, args.server_key, provision, args.allow_insecure,
                                args.auth_deadline, load_master_key(os.environ.get("VSC_MASTER_KEY_FILE")),
                                settings=settings, fill_storage=args.fill_storage, free_storage=args.free_storage)
        only = set(args.only.split(",")) if args.only else None
        results.extend(await run_server_items(harness, SERVER_ITEMS, only))

    cli._react(react, run)
    if args.json:
        print(json.dumps([attrs.asdict(r) for r in results], indent=2))
    else:
        print(table(results))
    return 0 if results and all(r.ok for r in results) and not all(r.skipped for r in results) else 1


def _suites(text: str) -> tuple:
    from vsc.wire.messages import Suite

    by_label = {s.label: s for s in Suite}
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_label]
    if unknown or not names:
        raise cli.CommandError(f"--server-suites: unknown suite {unknown[0] if unknown else '(none)'}; "
                               f"known: {', '.join(by_label)}")
    return tuple(by_label[n] for n in names)


def extend(sub) -> None:
    p = sub.add_parser("conformance", help="run the protocol conformance suite against a server (or, with --card, a card)")
    p.add_argument("--server", help="the server under test, e.g. tcp:127.0.0.1:7390")
    p.add_argument("--server-key", help="its key fingerprint (SHA256:...)")
    p.add_argument("--provision", help="command that creates a test card and prints its enrolment code; {serial} is replaced")
    p.add_argument("--admin-data-dir", help="shortcut: provision with 'vsc admin --data-dir DIR issue {serial} --json'")
    p.add_argument("--allow-insecure", action="store_true", help="the server under test enables des-cbc-md5")
    p.add_argument("--auth-deadline", type=float, default=30.0, help="the server's implementation-auth deadline (s)")
    p.add_argument("--handshake-timeout", type=float, default=30.0,
                   help="the server's handshake_timeout (s); the handshake-timer item waits that long")
    p.add_argument("--unauthenticated-idle", type=float, default=60.0,
                   help="the server's unauthenticated_idle (s); the idle items wait about 1.6 times it")
    p.add_argument("--idle-timeout", type=float, default=600.0,
                   help="the server's idle_timeout (s); the authenticated idle item waits that long")
    p.add_argument("--unauthenticated-body", type=int, default=65536, help="the server's max_unauthenticated_body")
    p.add_argument("--unauthenticated-per-source", type=int, default=64,
                   help="the server's max_unauthenticated_per_source")
    p.add_argument("--lockout-threshold", type=int, default=5, help="the server's lockout_threshold")
    p.add_argument("--server-suites", default="aes256-gcm,chacha20-poly1305,aes256-cbc-hmac-sha256",
                   help="the server's suites setting, in its order of preference")
    p.add_argument("--fill-storage", help="command that fills the server's database storage (STORAGE_FULL item)")
    p.add_argument("--free-storage", help="command that frees it again")
    p.add_argument("--only", help="comma-separated areas: handshake,record,limits,life cycle,binding,versions,refusal")
    p.add_argument("--card", action="store_true", help="play the server for a card under test")
    p.add_argument("--card-command", default=None,
                   help="card to test; {endpoint} and {fingerprint} are replaced "
                        "(default: vsc ping --server {endpoint} --server-key {fingerprint} --count 2 --handshake-timeout 5)")
    p.add_argument("--card-driver", default=None,
                   help="card mode with operations: command run with {action} (enrol, insert, step, remove, stop), "
                        "{dir}, {endpoint}, {fingerprint}, {serial}, {code} replaced (default: vsc's card, "
                        "python -m vsc.conformance.vscdriver ...; '' skips the operations items)")
    p.add_argument("--key-bits", type=int, default=2048, help="card mode: the harness server's key size")
    p.add_argument("--timeout", type=float, default=30.0, help="card mode: seconds per scenario")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_defaults(cmd_conformance))


def _defaults(fn):
    def wrapped(args):
        if args.card_driver is None:
            args.card_driver = (f"{shlex.quote(sys.executable)} -m vsc.conformance.vscdriver {{action}} --dir {{dir}} "
                                "--endpoint {endpoint} --fingerprint {fingerprint} --serial {serial} --code {code}")
        if args.card_command is None:
            args.card_command = (f"{shlex.quote(_vsc())} ping --server {{endpoint}} --server-key {{fingerprint}} "
                                 "--count 2 --handshake-timeout 5")
        return fn(args)

    return wrapped
