"""
``vsc bench``: the benchmark runner (``python -m bench``) as a subcommand.
The benchmarks live in the source checkout (bench/), not in the installed
package: this command works where ``bench`` is importable (an editable
install, or run from the checkout).
"""

from __future__ import annotations

import shlex
import sys

from vsc import cli as vcli
from vsc.cli import CommandError


def _runner():
    try:
        from bench import __main__ as runner
    except ImportError as e:
        raise CommandError(f"the benchmarks are not importable here ({e}): run 'vsc bench' from a source checkout "
                           f"installed with 'pip install -e .', or 'python -m bench' in the checkout") from None
    return runner


def cmd_bench(args) -> int:
    runner = _runner()
    return runner.run(args, " ".join(["vsc bench", *map(shlex.quote, sys.argv[2:])]))


def extend(sub) -> None:
    p = sub.add_parser("bench", help="run every benchmark on this machine and write docs/benchmarks.md")
    try:
        from bench import __main__ as runner
    except ImportError:
        p.set_defaults(func=lambda args: _runner() and 1)
        return
    runner.add_arguments(p)
    p.set_defaults(func=cmd_bench)


vcli._PARSER_EXTENSIONS["top"].append(extend)
