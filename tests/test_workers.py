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


def _wait_idle(pool: WorkerPool, n: int) -> None:
    """Until ``n`` workers wait for work (bounded: a failure, not a speed budget)."""
    pause = threading.Event()
    for _ in range(int(WAIT * 1000)):
        with pool._lock:
            if len(pool._idle) == n:
                return
        pause.wait(0.001)
    raise AssertionError(f"{n} workers never became idle")


def test_the_most_recently_idle_worker_takes_the_next_call():
    """Calls one at a time all run on one thread (last in, first out), not on each of the pool's threads in turn."""
    pool = WorkerPool(4, "test")
    pool.start()
    names = []
    try:
        for _ in range(12):
            _wait_idle(pool, 4)
            done = threading.Event()
            pool.callInThreadWithCallback(lambda ok, r: done.set(), lambda: names.append(threading.current_thread().name))
            assert done.wait(WAIT)
    finally:
        pool.stop()
    assert len(set(names[1:])) == 1, names


def test_calls_that_find_no_idle_worker_run_in_order_and_calls_before_start_wait_for_it():
    """A busy pool's backlog is first in, first out; calls made before start() run once it starts."""
    pool = WorkerPool(1, "test")
    ran: list = []
    pool.callInThread(ran.append, "early")
    pool.start()
    gate = threading.Event()
    started = threading.Event()

    def block():
        started.set()
        assert gate.wait(WAIT)

    try:
        pool.callInThread(block)
        assert started.wait(WAIT)
        for i in range(10):
            pool.callInThread(ran.append, i)
        gate.set()
    finally:
        pool.stop()
    assert ran == ["early"] + list(range(10))
