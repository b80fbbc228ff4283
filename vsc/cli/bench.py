"""
``vsc bench``: the benchmark runner (``python -m bench``) as a subcommand.
The benchmarks live in the source checkout (bench/ beside vsc/), not in the
installed package: this command finds that directory next to the vsc
package it runs from (a checkout installed with ``pip install -e .``, or
run from it), and otherwise says in one line how to run them.
"""

from __future__ import annotations

import os
import shlex
import sys

import vsc
from vsc.cli import CommandError

CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(vsc.__file__)))
NOT_HERE = ("the benchmarks are not installed with vsc: in a vsc source checkout, run "
            "'python -m bench' (or 'vsc bench' from a 'pip install -e .' of that checkout)")


def _runner():
    """bench/__main__.py of the checkout this vsc runs from, or None."""
    if not os.path.isfile(os.path.join(CHECKOUT, "bench", "__main__.py")):
        return None
    if CHECKOUT not in sys.path:
        sys.path.insert(0, CHECKOUT)
    from bench import __main__ as runner

    return runner


def cmd_bench(args) -> int:
    runner = _runner()
    if runner is None:
        raise CommandError(NOT_HERE)
    return runner.run(args, " ".join(["vsc bench", *map(shlex.quote, sys.argv[2:])]))


def configure(p) -> None:
    runner = _runner()
    if runner is not None:
        runner.add_arguments(p)
    else:  # whatever options were given, the answer is NOT_HERE (see vsc.cli.main)
        p.description = NOT_HERE
        p.set_defaults(any_options=True)
    p.set_defaults(func=cmd_bench)
