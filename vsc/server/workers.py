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
"""

from __future__ import annotations

import queue
import threading
from typing import Any, Callable

from twisted.python.failure import Failure

_STOP = object()


class WorkerPool:
    """``threads`` daemon threads, started by ``start`` and joined by ``stop`` (after the calls already queued)."""

    def __init__(self, threads: int, name: str):
        if threads < 1:
            raise ValueError("a worker pool needs at least one thread")
        self.size = threads
        self.name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
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
            self._queue.put(_STOP)
        for t in threads:
            t.join()

    def callInThreadWithCallback(self, onResult: Callable[[bool, Any], None] | None,  # noqa: N802 - ThreadPool's name
                                 func: Callable, *args, **kw) -> None:
        """Run ``func(*args, **kw)`` on a worker; then ``onResult(True, result)`` or ``onResult(False, Failure)`` there."""
        self._queue.put((onResult, func, args, kw))

    def callInThread(self, func: Callable, *args, **kw) -> None:  # noqa: N802 - ThreadPool's name
        self.callInThreadWithCallback(None, func, *args, **kw)

    def _work(self) -> None:
        get = self._queue.get
        while True:
            item = get()
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
