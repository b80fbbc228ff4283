"""
Shared helpers for the benchmarks: time-budgeted rate measurement and
markdown tables. Benchmarks may read the clock directly (they are not
library code); everything here uses ``time.perf_counter``.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from typing import Callable, Sequence


def rate(fn: Callable[[], object], budget: float, repeats: int = 3, min_ops: int = 2, cpu: bool = False) -> float:
    """
    Operations per second of ``fn()``: the median of ``repeats`` windows of
    ``budget / repeats`` seconds each (a median resists a neighbour's burst of
    CPU use on a shared machine). Fast operations run in batches sized so that
    the clock is read at most every ~5 ms. With ``cpu`` (single-threaded CPU
    floors and per-core figures) the operations are divided by the CPU time of
    this thread, not the wall time, so waiting for a CPU that other load on the
    machine holds does not lower the figure; without it (anything that waits for
    another process or a disk) by the wall time.
    """
    fn()  # warm up (first-call allocations, lazy imports)
    window = budget / repeats
    batch = 1
    rates = []
    for _ in range(repeats):
        ops = 0
        start, cpu0 = time.perf_counter(), time.thread_time()
        deadline = start + window
        while True:
            t0 = time.perf_counter()
            for _ in range(batch):
                fn()
            t1 = time.perf_counter()
            ops += batch
            if t1 >= deadline and ops >= min_ops:
                break
            if t1 - t0 < 0.005:
                batch *= 2
        spent = time.thread_time() - cpu0 if cpu else t1 - start
        rates.append(ops / (spent if spent > 0 else t1 - start))
    return statistics.median(rates)


def fmt_rate(x: float | None) -> str:
    """A rate with sensible significant figures; '—' when not measured."""
    if x is None:
        return "—"
    if x >= 100:
        return f"{x:,.0f}"
    if x >= 10:
        return f"{x:,.1f}"
    return f"{x:,.2f}"


def fmt_ratio(num: float | None, den: float | None) -> str:
    if not num or not den:
        return "—"
    r = num / den
    return f"{r:.3f}" if r < 0.1 else f"{r:.2f}"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub-flavoured markdown table; numeric-looking columns right-aligned."""
    widths = [len(h) for h in headers]
    for row in rows:
        for i, cell in enumerate(row):
            widths[i] = max(widths[i], len(cell))

    def numeric(i: int) -> bool:
        cells = [r[i] for r in rows if r[i] != "—"]
        return bool(cells) and all(c.replace(",", "").replace(".", "").replace("×", "").isdigit() for c in cells)

    right = [numeric(i) for i in range(len(headers))]
    out = ["| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |"]
    out.append("|" + "|".join(("-" * (w + 1) + ":") if r else ("-" * (w + 2)) for w, r in zip(widths, right)) + "|")
    for row in rows:
        cells = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(row, widths, right)]
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def machine_line() -> str:
    """One line describing where the figures were measured."""
    try:
        from cryptography.hazmat.backends.openssl import backend

        ssl = backend.openssl_version_text()
    except Exception:  # noqa: BLE001 - informational only
        ssl = "OpenSSL ?"
    return (
        f"Python {platform.python_version()} ({sys.implementation.name}), {ssl}, "
        f"{os.cpu_count()} CPU(s), {platform.machine()} {platform.system()}"
    )


def describe_failure(e: BaseException) -> str:
    """One short label for a failed benchmark operation (a refusal, a closed channel, EMFILE, or the type)."""
    from vsc.card import ops

    if isinstance(e, ops.OperationRefused):
        return str(e)
    code = getattr(e, "code", None)
    if code is not None and hasattr(code, "name"):
        return f"channel closed: {code.name}"
    text = str(e)
    if "Too many open files" in text or "EMFILE" in text:
        return "EMFILE (too many open files)"
    return type(e).__name__
