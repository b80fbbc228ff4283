"""
The ``vsc`` command. Daemons run under twistd (``twistd -n vsc-server``,
``twistd -n vsc-card``); everything else is a subcommand here.

SUBCOMMANDS below is the whole list: each name with its help line and the
module (and function) that builds its arguments. The parser is built from
it, and only the module of the subcommand being run is imported: ``vsc card
status`` loads no server, no Twisted, no crypto library (``vsc --help``
imports none of them). A new subcommand is one row here.

A subcommand may also name a ``fast`` function that reads its argv when it
is in the plain form, without argparse (vsc.cli.argspec): the requests of
``vsc card`` to the card daemon then start in little more than the
interpreter's own start-up. Anything else (help, errors, unusual spellings)
goes to argparse, which is imported only then.

Every failure prints one clear line on stderr and exits non-zero: commands
raise CommandError, and anything else is worded by ``describe`` (never a
Python class name); no traceback reaches the user unless VSC_DEBUG=1.
"""

from __future__ import annotations

import os
import sys

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


class CommandError(Exception):
    """A failure to report as one line (``exit_code`` defaults to 1)."""

    def __init__(self, message: str, exit_code: int = EXIT_FAIL):
        super().__init__(message)
        self.exit_code = exit_code


def emit(args, data: dict, text: str) -> None:
    """Print ``data`` as JSON when --json was given, else ``text``."""
    if getattr(args, "json", False):
        import json

        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        print(text)


class Subcommand:
    """
    One row of SUBCOMMANDS: ``entry`` in ``module`` is called with the
    subcommand's parser (made here, with ``help``) to add its arguments and
    set ``func``; with ``adds_parser``, it is given the subparsers and adds
    the parser itself (the entry points of vsc.demo and vsc.conformance).
    ``fast`` in ``module``, if named, is given the argv after the
    subcommand's name and returns its arguments, or None for argparse.
    """

    __slots__ = ("help", "module", "entry", "adds_parser", "fast")

    def __init__(self, help: str, module: str, entry: str = "configure", adds_parser: bool = False,
                 fast: str | None = None):
        self.help = help
        self.module = module
        self.entry = entry
        self.adds_parser = adds_parser
        self.fast = fast

    def load(self, name: str):
        """The function ``name`` of this subcommand's module (imported now)."""
        return getattr(__import__(self.module, fromlist=[name]), name)


SUBCOMMANDS: dict[str, Subcommand] = {
    "admin": Subcommand("administer a VSC Server's data directory", "vsc.cli.admin"),
    "ping": Subcommand("open a protected channel to a server and exchange sealed records", "vsc.cli.ping"),
    "card": Subcommand("use a Virtual Smart Card (enroll, status, sign, remove, ...)", "vsc.cli.card",
                       fast="fast_args"),
    "dongle": Subcommand("a card on a PKCS#11 token instead of a server (claim 10)", "vsc.cli.dongle"),
    "license": Subcommand("licence keyfiles: the vendor's generator and the customer's check", "vsc.licensing.cli",
                          "configure_license"),
    "run": Subcommand("run a program only while the licensed card is inserted (digital ignition key)",
                      "vsc.licensing.cli", "configure_run"),
    "demo": Subcommand("run a server and a demo card end to end, then stay up to try it (Ctrl-C stops it)",
                       "vsc.demo", "_add_demo_parser", adds_parser=True),
    "conformance": Subcommand("run the protocol conformance suite against a server (or, with --card, a card)",
                              "vsc.conformance", "extend", adds_parser=True),
    "bench": Subcommand("run every benchmark on this machine and write docs/benchmarks.md (from a source checkout)",
                        "vsc.cli.bench"),
}


def build_parser(command: str | None = None):
    """
    The ``vsc`` argparse parser. Only ``command``'s module is imported, to
    build its arguments; every other subcommand is its name and help line
    (enough for ``vsc --help`` and for argparse to name the choices).
    """
    import argparse

    p = argparse.ArgumentParser(prog="vsc", description="Virtual Smart Card (EP 0 936 530)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, row in SUBCOMMANDS.items():
        if name != command:
            sub.add_parser(name, help=row.help, add_help=False)
            continue
        entry = row.load(row.entry)
        if row.adds_parser:
            entry(sub)
        else:
            entry(sub.add_parser(name, help=row.help, description=row.help))
    return p


def chosen(argv: list[str]) -> str | None:
    """The subcommand ``argv`` names (its first word that is not an option), if it is one of SUBCOMMANDS."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in SUBCOMMANDS else None


def parse(argv: list[str]):
    """The arguments of ``vsc ARGV``: the subcommand's fast path when it has one and takes argv, else argparse."""
    command = chosen(argv)
    row = SUBCOMMANDS.get(command)
    if row is not None and row.fast and argv[0] == command:
        args = row.load(row.fast)(argv[1:])
        if args is not None:
            return args
    parser = build_parser(command)
    args, unknown = parser.parse_known_args(argv)
    if unknown and not getattr(args, "any_options", False):  # a subcommand may take any options (vsc bench)
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else list(argv))
    try:
        return args.func(args) or EXIT_OK
    except CommandError as e:
        print(f"vsc: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("vsc: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - one line for the user
        if os.environ.get("VSC_DEBUG"):
            raise
        print(f"vsc: {describe(e)}", file=sys.stderr)
        return EXIT_FAIL


# Errors whose message is written for the user (module, class): shown as they are. Looked up in
# sys.modules, as vsc.net.errors does: an error of a module that was never imported cannot be at hand.
USER_FACING = (
    ("vsc.server.config", "ConfigError"),
    ("vsc.card.config", "CardConfigError"),
    ("vsc.card.client", "ControlError"),
    ("vsc.card.session", "CardError"),
    ("vsc.protocol.licence", "LicenseError"),
    ("vsc.dongle.token", "TokenError"),
    ("vsc.net.endpoints", "EndpointError"),
)


def describe(e: BaseException) -> str:
    """One line for an error no command turned into a CommandError: plain words, never a Python class name."""
    from vsc.net.errors import describe as describe_net

    text = describe_net(e)
    if text is not None:
        return text
    for module, name in USER_FACING:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(e, cls):
            return " ".join(str(e).split())
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    wire = sys.modules.get("vsc.wire.errors")
    if wire is not None and isinstance(e, wire.WireError):
        return e.message
    text = " ".join(str(e).split()) or "internal error"
    return f"{text} (set VSC_DEBUG=1 for a traceback)"


def _react(react, fn) -> None:
    """Run ``fn(reactor)`` (async) under ``react``, turning any failure into a one-line CommandError."""
    from twisted.internet.defer import ensureDeferred

    failure_box: list = []

    async def main(reactor):
        try:
            await fn(reactor)
        except Exception as e:  # noqa: BLE001 - reported as one line below
            failure_box.append(e)

    try:
        react(lambda reactor: ensureDeferred(main(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            raise CommandError(f"internal error (exit {e.code})") from None
    if failure_box:
        e = failure_box[0]
        if isinstance(e, CommandError):
            raise e
        raise CommandError(describe(e)) from e


def run_async(fn) -> None:
    """``fn(reactor)`` (async) on the reactor, once; failures as one-line CommandErrors (see _react)."""
    from twisted.internet.task import react

    _react(react, fn)

