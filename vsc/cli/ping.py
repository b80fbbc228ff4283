"""
``vsc ping``: open a protected channel to a server, exchange sealed echo
records, report the suite and timing. Also the channel options every
command that opens a channel takes (``--suites``, ``--forward-secrecy``...).
"""

from __future__ import annotations

import argparse

from vsc.cli import EXIT_OK, EXIT_USAGE, CommandError, emit, run_async


def add_channel_options(a: argparse.ArgumentParser) -> None:
    a.add_argument("--suites", help="comma-separated suites in preference order")
    a.add_argument("--allow-insecure", action="store_true", help="permit the patent's des-cbc-md5 suite")
    a.add_argument("--forward-secrecy", choices=("off", "prefer", "require"))
    a.add_argument("--handshake-timeout", type=float, help="seconds to wait for the handshake (default 30)")


def channel_config(args):
    """The ChannelConfig the channel options ask for; CommandError (usage) for a bad combination."""
    from vsc.protocol.suites import ChannelConfig, ForwardSecrecy, parse_suites

    kwargs = {}
    try:
        if getattr(args, "suites", None):
            kwargs["suites"] = parse_suites(args.suites)
        if getattr(args, "allow_insecure", False):
            kwargs["allow_insecure"] = True
        if getattr(args, "forward_secrecy", None):
            kwargs["forward_secrecy"] = ForwardSecrecy(args.forward_secrecy)
        if getattr(args, "handshake_timeout", None):
            kwargs["handshake_timeout"] = args.handshake_timeout
        return ChannelConfig(**kwargs)
    except ValueError as e:
        raise CommandError(str(e), EXIT_USAGE) from None


def check_server(args) -> None:
    """
    ``--server`` must name a client endpoint and ``--server-key`` be a fingerprint in the form ``vsc admin
    fingerprint`` prints: CommandError (usage) if not, before anything is read or sent (a pin of another form
    could only fail later as a key mismatch, the alarm for a man in the middle).
    """
    from twisted.internet import reactor

    from vsc import crypto
    from vsc.net.endpoints import EndpointError, client

    if not crypto.is_fingerprint(args.server_key):
        raise CommandError(f"--server-key {args.server_key[:80]!r} is not a server key fingerprint: it is SHA256: "
                           "and 43 base64 characters, as 'vsc admin fingerprint' prints it", EXIT_USAGE)
    try:
        client(reactor, args.server, "--server")
    except EndpointError as e:
        raise CommandError(str(e), EXIT_USAGE) from None


#: what ``vsc ping`` exchanges at most: records per run, and bytes per record (the conformance echo's 32 KiB,
#: well inside an unauthenticated channel's frame limit)
MAX_COUNT = 100_000
MAX_SIZE = 32 * 1024


def cmd_ping(args) -> int:
    """Open a channel, exchange sealed echo records, report the suite and timing."""
    from vsc import crypto

    config = channel_config(args)
    check_server(args)
    if not 1 <= args.count <= MAX_COUNT:
        raise CommandError(f"--count {args.count} must be from 1 to {MAX_COUNT}", EXIT_USAGE)
    if not 0 <= args.size <= MAX_SIZE:
        raise CommandError(f"--size {args.size} must be from 0 to {MAX_SIZE} bytes (one echo record)", EXIT_USAGE)
    result: dict = {}

    async def run(reactor):
        from vsc.card.connect import connect
        from vsc.wire.messages import EchoReply, EchoRequest

        t0 = reactor.seconds()
        proto = await connect(reactor, args.server, args.server_key, config)
        t1 = reactor.seconds()
        rtts = []
        for _ in range(args.count):
            payload = crypto.system_random(args.size)
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

    run_async(run)
    emit(
        args,
        result,
        f"channel to {args.server}: suite {result['suite']}"
        f"{' + X25519' if result['forward_secret'] else ''}, server key {result['server_key']}\n"
        f"handshake {result['handshake_ms']} ms; {result['records']} sealed echo records of "
        f"{result['record_bytes']} bytes, median round trip {result['median_rtt_ms']} ms",
    )
    return EXIT_OK


def configure(a: argparse.ArgumentParser) -> None:
    a.add_argument("--server", required=True, help="client endpoint, e.g. tcp:127.0.0.1:7390")
    a.add_argument("--server-key", required=True, help="the server key fingerprint to pin (SHA256:...)")
    add_channel_options(a)
    a.add_argument("--count", type=int, default=3, help="sealed echo records to exchange")
    a.add_argument("--size", type=int, default=64, help="bytes per echo record")
    a.add_argument("--json", action="store_true")
    a.set_defaults(func=cmd_ping)
