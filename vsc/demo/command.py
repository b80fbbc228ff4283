"""
``vsc demo`` itself: its options, the order of the steps, and stopping on
every way out (an error, Ctrl-C, SIGTERM or SIGHUP: the card is removed and
the server stopped, each wait bounded).
"""

from __future__ import annotations

import signal
import sys

from vsc import cli
from vsc.demo.guidance import SERIAL, farewell, introduce, say, shown, try_next
from vsc.demo.processes import bindir
from vsc.demo.steps import DEFAULT_DIR, DEFAULT_PORT, Demo, clock

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class _Stop(BaseException):
    """SIGINT, SIGTERM or SIGHUP arrived: stop the demo (cleanly)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def cmd_demo(args) -> int:
    t_start = clock()
    demo = Demo(args)
    introduce(demo.root)

    stopping = {"now": False}

    def on_signal(signum, frame):
        if stopping["now"]:
            say(f"   ({signal.Signals(signum).name}: already stopping, please wait; every wait is bounded)")
            return
        raise _Stop(signum)

    previous = {s: signal.getsignal(s) for s in SIGNALS}
    for s in SIGNALS:
        signal.signal(s, on_signal)  # installed even when SIGINT was ignored (a background job)

    error: BaseException | None = None
    interrupted: int | None = None
    final: dict | None = None
    try:
        try:
            demo.prepare_server_dir()
            demo.start_server()
            demo.enrol_or_reuse()
            demo.insert()
            demo.sign_and_verify()
            demo.step_counter()
            demo.server_view()
            if args.channels:
                demo.channels()
            demo.up = True
            demo.up_after = clock() - t_start
            if not args.once:
                try_next(demo, bindir())
                demo.stay_up()
        except _Stop as e:
            interrupted = e.signum
            say()
            say(f"({signal.Signals(e.signum).name} received: stopping)")
        except KeyboardInterrupt:
            interrupted = signal.SIGINT
            say()
            say("(SIGINT received: stopping)")
        except cli.CommandError as e:
            error = e
        stopping["now"] = True
        try:
            final = demo.shutdown()
        except cli.CommandError as e:
            if error is None:
                error = e
            else:
                print(f"vsc: while stopping: {e}", file=sys.stderr, flush=True)
    finally:
        demo.kill_all()  # no-op unless something unexpected happened
        for s, h in previous.items():
            signal.signal(s, h)

    if error is not None:
        raise error
    state = final.get("state") if final is not None else None
    if state not in ("idle", None) or (state is None and demo.up):
        raise cli.CommandError(
            f"the demo card ended {state or 'missing'}, not idle; see {shown(demo.card_log)} "
            f"and {shown(demo.server_log)}"
        )
    elapsed = clock() - t_start
    say()
    if not demo.up:
        say(f"Interrupted before the demo was up, after {elapsed:.1f} s; nothing is left running.")
        return 128 + int(interrupted or signal.SIGINT)
    farewell(elapsed, args.once, demo.up_after, demo.signatures, bindir())
    return cli.EXIT_OK


def _add_demo_parser(sub) -> None:
    p = sub.add_parser(
        "demo",
        help="run a server and a demo card end to end, then stay up to try it (Ctrl-C stops it)",
        description=(
            "In a demo directory: create a VSC Server on SQLite and start it on 127.0.0.1, enrol the demo card "
            f"{SERIAL} (or reuse it), insert it with its own card process, sign a message with slots 9a and 9c "
            "and verify the signatures with openssl, step a counter, show the server's record, then stay up and "
            "print what to try next. Ctrl-C or SIGTERM removes the card, stops the server and prints the final state."
        ),
    )
    p.add_argument("--dir", help=f"the demo directory (default: $VSC_DEMO_DIR, else ./{DEFAULT_DIR})")
    p.add_argument("--port", type=int, help=f"TCP port on 127.0.0.1 (default: {DEFAULT_PORT}, or a free one if taken)")
    p.add_argument("--key-bits", type=int, default=3072, choices=(2048, 3072, 4096),
                   help="server key size when the server directory is created (default: 3072)")
    p.add_argument("--once", "--no-wait", dest="once", action="store_true",
                   help="do every step, then shut down at once (exit 0 only if every step succeeded)")
    p.add_argument("--channels", action="store_true",
                   help="also open a channel per modern suite with and without forward secrecy, "
                        "and show a wrong pinned server key refused")
    p.add_argument("--count", type=int, default=3, help="with --channels: sealed echo records per channel (default: 3)")
    p.set_defaults(func=cmd_demo)
