"""
The ``vsc`` command. Daemons run under twistd (``twistd -n vsc-server``,
``twistd -n vsc-card``); everything else is a subcommand here.

Every failure prints one clear line on stderr and exits non-zero; no
traceback reaches the user unless VSC_DEBUG=1.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Callable

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
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    else:
        print(text)


# ---------------------------------------------------------------- admin


def cmd_admin_init(args) -> int:
    from vsc.server import config

    cfg = config.init(args.data_dir, database=args.database or "", key_bits=args.key_bits)
    hook = _ADMIN_INIT_HOOKS[0] if _ADMIN_INIT_HOOKS else None
    if hook is not None:
        hook(cfg)
    fp = cfg.load_key().public_key().fingerprint()
    emit(
        args,
        {"data_dir": str(cfg.data_dir), "fingerprint": fp, "database": cfg.database_url, "listen": cfg.listen},
        f"initialised {cfg.data_dir}\ndatabase: {cfg.database_url}\nserver key fingerprint (cards pin this):\n{fp}",
    )
    return EXIT_OK


#: Called with the new ServerConfig after ``admin init`` (the store creates its schema here).
_ADMIN_INIT_HOOKS: list[Callable] = []


def cmd_admin_fingerprint(args) -> int:
    from vsc.server import config

    cfg = config.load(args.data_dir)
    fp = cfg.load_key().public_key().fingerprint()
    emit(args, {"fingerprint": fp}, fp)
    return EXIT_OK


# ---------------------------------------------------------------- ping


def _channel_config(args):
    from vsc.protocol.suites import ChannelConfig, ForwardSecrecy, parse_suites

    kwargs = {}
    if getattr(args, "suites", None):
        kwargs["suites"] = parse_suites(args.suites)
    if getattr(args, "allow_insecure", False):
        kwargs["allow_insecure"] = True
    if getattr(args, "forward_secrecy", None):
        kwargs["forward_secrecy"] = ForwardSecrecy(args.forward_secrecy)
    if getattr(args, "handshake_timeout", None):
        kwargs["handshake_timeout"] = args.handshake_timeout
    try:
        return ChannelConfig(**kwargs)
    except ValueError as e:
        raise CommandError(str(e), EXIT_USAGE) from None


def cmd_ping(args) -> int:
    """Open a channel, exchange sealed echo records, report the suite and timing."""
    from twisted.internet.task import react

    config = _channel_config(args)
    result: dict = {}

    async def run(reactor):
        from vsc.card.connect import connect
        from vsc.wire.messages import EchoReply, EchoRequest

        t0 = reactor.seconds()
        proto = await connect(reactor, args.server, args.server_key, config)
        t1 = reactor.seconds()
        rtts = []
        for i in range(args.count):
            payload = os.urandom(args.size)
            s = reactor.seconds()
            reply = await proto.request(EchoRequest(payload))
            rtts.append(reactor.seconds() - s)
            if not isinstance(reply, EchoReply) or reply.data != payload:
                raise CommandError("server answered the echo with something else")
        proto.closeChannel()
        await proto.whenClosed()
        result.update(
            suite=proto.info.suite.label,
            forward_secret=proto.info.forward_secret,
            server_key=proto.info.server_fingerprint,
            handshake_ms=round((t1 - t0) * 1000, 2),
            records=args.count,
            record_bytes=args.size,
            median_rtt_ms=round(sorted(rtts)[len(rtts) // 2] * 1000, 3) if rtts else None,
        )

    _react(react, run)
    emit(
        args,
        result,
        f"channel to {args.server}: suite {result['suite']}"
        f"{' + X25519' if result['forward_secret'] else ''}, server key {result['server_key']}\n"
        f"handshake {result['handshake_ms']} ms; {result['records']} sealed echo records of "
        f"{result['record_bytes']} bytes, median round trip {result['median_rtt_ms']} ms",
    )
    return EXIT_OK


def _react(react, fn) -> None:
    """Run ``fn(reactor)`` (async) under react, turning failures into CommandError."""
    failure_box: list = []

    async def main(reactor):
        try:
            await fn(reactor)
        except Exception as e:  # noqa: BLE001 - reported as one line below
            failure_box.append(e)

    from twisted.internet.defer import ensureDeferred

    try:
        react(lambda reactor: ensureDeferred(main(reactor)))
    except SystemExit as e:
        if e.code not in (0, None):
            raise CommandError(f"internal error (exit {e.code})") from None
    if failure_box:
        e = failure_box[0]
        if isinstance(e, CommandError):
            raise e
        raise CommandError(describe_error(e)) from e


def describe_error(e: BaseException) -> str:
    from twisted.internet import error as terror

    from vsc.net.channel import ChannelClosedError
    from vsc.wire import ErrorCode

    if isinstance(e, ChannelClosedError):
        hints = {
            ErrorCode.SERVER_KEY_MISMATCH: "the server's key is not the one pinned with --server-key (wrong server, or a man in the middle)",
            ErrorCode.NO_COMMON_SUITE: "the server accepts none of the suites offered",
            ErrorCode.INSECURE_SUITE_REFUSED: "the server does not enable des-cbc-md5",
            ErrorCode.FORWARD_SECRECY_REQUIRED: "one end requires forward secrecy (X25519) and the other does not offer it",
            ErrorCode.HANDSHAKE_TIMEOUT: "the handshake timed out",
        }
        return f"channel closed: {e.code.name}" + (f": {hints[e.code]}" if e.code in hints else f" ({e.reason})")
    if isinstance(e, terror.ConnectError):
        return f"cannot connect: {e.__class__.__name__}: {e.osError if hasattr(e, 'osError') else e}"
    return f"{e.__class__.__name__}: {e}"


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vsc", description="Virtual Smart Card (EP 0 936 530)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # admin
    admin = sub.add_parser("admin", help="administer a VSC Server's data directory")
    admin.add_argument("--data-dir", required=True, help="the server's data directory")
    asub = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")
    a = asub.add_parser("init", help="create the data dir, database schema and server key")
    a.add_argument("--database", help="postgresql://... (default: SQLite in the data dir)")
    a.add_argument("--key-bits", type=int, default=3072, choices=(2048, 3072, 4096))
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_admin_init)
    a = asub.add_parser("fingerprint", help="print the server key fingerprint that cards pin")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_admin_fingerprint)
    for extend in _PARSER_EXTENSIONS["admin"]:
        extend(asub)

    # ping
    a = sub.add_parser("ping", help="open a protected channel to a server and exchange sealed records")
    a.add_argument("--server", required=True, help="client endpoint, e.g. tcp:127.0.0.1:7390")
    a.add_argument("--server-key", required=True, help="the server key fingerprint to pin (SHA256:...)")
    _add_channel_options(a)
    a.add_argument("--count", type=int, default=3, help="sealed echo records to exchange")
    a.add_argument("--size", type=int, default=64, help="bytes per echo record")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_ping)

    for name, extend in _PARSER_EXTENSIONS.items():
        if name != "admin":
            for fn in extend:
                fn(sub)
    return p


def _add_channel_options(a: argparse.ArgumentParser) -> None:
    a.add_argument("--suites", help="comma-separated suites in preference order")
    a.add_argument("--allow-insecure", action="store_true", help="permit the patent's des-cbc-md5 suite")
    a.add_argument("--forward-secrecy", choices=("off", "prefer", "require"))
    a.add_argument("--handshake-timeout", type=float, help="seconds to wait for the handshake (default 30)")


#: Other modules add subcommands here: {"admin": [fn(subparsers)], "top": [fn(subparsers)]}.
_PARSER_EXTENSIONS: dict[str, list[Callable]] = {"admin": [], "top": []}


def _load_extensions() -> None:
    import importlib

    for mod in ("vsc.server.admin", "vsc.demo", "vsc.card.cli", "vsc.license_cli", "vsc.dongle.cli", "vsc.conformance", "vsc.bench_cli"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def main(argv: list[str] | None = None) -> int:
    _load_extensions()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or EXIT_OK
    except CommandError as e:
        print(f"vsc: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("vsc: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001
        if os.environ.get("VSC_DEBUG"):
            raise
        from vsc.server.config import ConfigError

        if isinstance(e, ConfigError):
            print(f"vsc: {e}", file=sys.stderr)
            return EXIT_FAIL
        print(f"vsc: {describe_error(e)} (set VSC_DEBUG=1 for a traceback)", file=sys.stderr)
        return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
