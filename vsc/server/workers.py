"""
The server's worker threads: a fixed set of threads fed from one queue, with
Twisted ThreadPool's ``callInThreadWithCallback`` interface (so
``twisted.internet.threads.deferToThreadPool`` and the tests' manual pools
work unchanged) and none of its per-call machinery: ThreadPool hands each call
through a coordinator (``Team``/``LockWorker``) and a copied log context,
which a profile of the server under cycling load put at about a tenth of its
Python time. Here a call is one ``SimpleQueue.put`` and one ``get``.

The database calls (vsc.server.store: one connection per thread) and the
handshake decryptions (vsc.server.admission) each get their own pool.

Idle threads are woken last-in, first-out: a call goes to the thread that
went idle most recently, so under a load that needs one or two threads the
same one or two do the work, with their caches (and their database
connections, each a PostgreSQL backend process) warm, instead of every call
waking the next of eight cold ones in turn. Calls that find no idle thread
wait in a first-in, first-out backlog.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable

from twisted.python.failure import Failure

_STOP = object()


class _Idle:
    """One worker's wake-up: the pool hands it a call and releases its lock."""

    __slots__ = ("wake", "item")

    def __init__(self):
        self.wake = threading.Lock()
        self.wake.acquire()
        self.item: Any = None


class WorkerPool:
    """``threads`` daemon threads, started by ``start`` and joined by ``stop`` (after the calls already queued)."""

    def __init__(self, threads: int, name: str):
        if threads < 1:
            raise ValueError("a worker pool needs at least one thread")
        self.size = threads
        self.name = name
        self._lock = threading.Lock()
        self._idle: list[_Idle] = []  # a stack: the most recently idle worker is woken first
        self._backlog: collections.deque = collections.deque()  # calls that found no idle worker, in order
        self._threads: list[threading.Thread] = []

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def start(self) -> None:
        if self._threads:
            return
        for i in range(self.size):
            t = threading.Thread(target=self._work, name=f"{self.name}-{i}", daemon=True)
            t.start()
            self._threads.append(t)

    def stop(self) -> None:
        threads, self._threads = self._threads, []
        for _ in threads:
            self._submit(_STOP)  # after every call already submitted: each thread takes one and ends
        for t in threads:
            t.join()

    def _submit(self, item: Any) -> None:
        with self._lock:
            if self._idle:
                worker = self._idle.pop()
                worker.item = item
                worker.wake.release()
                return
            self._backlog.append(item)

    def callInThreadWithCallback(self, onResult: Callable[[bool, Any], None] | None,  # noqa: N802 - ThreadPool's name
                                 func: Callable, *args, **kw) -> None:
        """Run ``func(*args, **kw)`` on a worker; then ``onResult(True, result)`` or ``onResult(False, Failure)`` there."""
        self._submit((onResult, func, args, kw))

    def callInThread(self, func: Callable, *args, **kw) -> None:  # noqa: N802 - ThreadPool's name
        self.callInThreadWithCallback(None, func, *args, **kw)

    def _next(self, me: _Idle) -> Any:
        """The next call from the backlog, else wait (idle, on top of the stack) until one is handed over."""
        with self._lock:
            if self._backlog:
                return self._backlog.popleft()
            self._idle.append(me)
        me.wake.acquire()
        item, me.item = me.item, None
        return item

    def _work(self) -> None:
        me = _Idle()
        while True:
            item = self._next(me)
            if item is _STOP:
                return
            on_result, func, args, kw = item
            try:
                result = func(*args, **kw)
                ok = True
            except BaseException:  # noqa: BLE001 - handed to the caller as a Failure, as ThreadPool does
                result = Failure()
                ok = False
            del item, func, args, kw
            if on_result is not None:
                try:
                    on_result(ok, result)
                except BaseException:  # noqa: BLE001 - a broken callback must not end the worker
                    pass
            del result
