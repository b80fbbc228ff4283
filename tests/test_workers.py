"""
vsc.server.workers.WorkerPool: ThreadPool's callInThreadWithCallback
interface on a fixed set of threads. Real threads, no clock: each test waits
on events with a generous timeout (a failure, not a speed budget).
"""

from __future__ import annotations

import threading

import pytest

from vsc.server.workers import WorkerPool

WAIT = 30.0


def test_results_and_failures_reach_the_callback_on_a_worker_thread():
    """A call's result comes back as (True, result), an exception as (False, Failure) — both on a pool thread."""
    pool = WorkerPool(2, "test")
    pool.start()
    got: list = []
    done = threading.Event()

    def on_result(ok, result):
        got.append((ok, result, threading.current_thread().name))
        if len(got) == 2:
            done.set()

    def boom():
        raise ValueError("no")

    try:
        pool.callInThreadWithCallback(on_result, lambda a, b=0: a + b, 2, b=3)
        pool.callInThreadWithCallback(on_result, boom)
        assert done.wait(WAIT)
    finally:
        pool.stop()
    results = sorted(got, key=lambda g: g[0])
    assert results[1][:2] == (True, 5)
    assert results[0][0] is False and results[0][1].check(ValueError)
    assert all(name.startswith("test-") for _, _, name in got)


def test_stop_runs_what_was_queued_and_joins_every_thread():
    """stop() lets the queued calls finish, then every worker thread has ended; start() after stop starts anew."""
    pool = WorkerPool(3, "test")
    pool.start()
    threads = list(pool._threads)
    ran = []
    for i in range(20):
        pool.callInThread(ran.append, i)
    pool.stop()
    assert sorted(ran) == list(range(20))
    assert not any(t.is_alive() for t in threads) and not pool.started
    pool.start()
    try:
        assert pool.started and len(pool._threads) == 3
    finally:
        pool.stop()


def test_a_raising_callback_does_not_end_the_worker():
    """An exception in onResult is swallowed: the worker goes on to the next call."""
    pool = WorkerPool(1, "test")
    pool.start()
    done = threading.Event()
    try:
        pool.callInThreadWithCallback(lambda ok, r: 1 / 0, lambda: None)
        pool.callInThreadWithCallback(lambda ok, r: done.set(), lambda: None)
        assert done.wait(WAIT)
    finally:
        pool.stop()


def test_at_least_one_thread():
    """A pool of zero threads is refused."""
    with pytest.raises(ValueError):
        WorkerPool(0, "test")
