"""
``vsc run``: the digital ignition key ([0008], [0017]). Starts the program
only after the keyfile verified and the inserted card proved possession of
its key (and paid for the run, for rental keyfiles); re-proves every
``interval`` seconds; stops the program (SIGTERM, then SIGKILL after
``grace``) when the card is removed or stops answering.

It is a launcher, not tamper-proofing: see docs/licensing.md. What it does
take care of: a proof that does not answer within ``answer_timeout`` counts
as a removed card; stopping ``vsc run`` (SIGTERM, Ctrl-C) stops the program
first; and on Linux the program is killed if ``vsc run`` itself dies
(kill -9), so it never keeps running unwatched.
"""

from __future__ import annotations

import os
import signal
import sys

from twisted.internet import threads
from twisted.internet.defer import Deferred, TimeoutError as AnswerTimeout, ensureDeferred
from twisted.internet.error import ReactorNotRunning
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from vsc.licensing import lcp

# Run between spawn and exec (Linux): die with vsc run (PR_SET_PDEATHSIG = 1), then become the program.
_EXEC_WITH_PARENT = (
    "import ctypes,os,sys\n"
    "ctypes.CDLL(None).prctl(1, 9)\n"
    "if os.getppid() != int(sys.argv[1]): os._exit(75)\n"
    "try: os.execvp(sys.argv[2], sys.argv[2:])\n"
    "except OSError as e: sys.stderr.write(f'vsc: cannot start {sys.argv[2]}: {e.strerror}\\n'); os._exit(127)\n"
)


def tied_to_parent(program: list[str]) -> tuple[str, list[str]]:
    """(executable, argv) that runs ``program`` (same pid) and kills it when this process dies (Linux)."""
    if not sys.platform.startswith("linux"):
        return program[0], program
    return sys.executable, [sys.executable, "-I", "-S", "-c", _EXEC_WITH_PARENT, str(os.getpid()), *program]


def card_steps(keyfile_text: str, vendor_pem: bytes, timeout: float):
    """
    (prove, charge) for an IgnitionKey: the licensing API's own proof and
    rental charge (vsc.licensing.lcp, over the blocking control client), run
    in the reactor's thread pool so that the reactor keeps supervising the
    program meanwhile; each call is bounded by ``timeout``.
    """

    async def prove(reactor, home, lic) -> None:
        await threads.deferToThreadPool(reactor, reactor.getThreadPool(), lcp.prove_sync, lic, home, timeout)

    async def charge(reactor, home, lic) -> int:
        return await threads.deferToThreadPool(reactor, reactor.getThreadPool(), lcp.charge_sync, lic,
                                               keyfile_text, vendor_pem, home, max(timeout, 60.0))

    return prove, charge


class _Child(ProcessProtocol):
    def __init__(self, owner: "IgnitionKey"):
        self.owner = owner

    def processEnded(self, reason) -> None:
        self.owner.ended(reason.value)


class IgnitionKey:
    log = Logger()

    def __init__(self, reactor, home, lic, program: list[str], interval: float, grace: float, prove, charge,
                 answer_timeout: float | None = None, spawn_argv=tied_to_parent):
        self.reactor = reactor
        self.home = home
        self.lic = lic
        self.program = program
        self.interval = interval
        self.grace = grace
        self.answer_timeout = answer_timeout if answer_timeout is not None else max(interval, 10.0)
        self._prove = prove
        self._charge = charge
        self._spawn_argv = spawn_argv
        self.process = None
        self.loop: LoopingCall | None = None
        self.exit_code = 0
        self.refusal = ""
        self.stopping = False
        self.started = False
        self._done: Deferred | None = None

    def start(self) -> None:
        ensureDeferred(self._start()).addErrback(self._failed_start)

    def _proof(self) -> Deferred:
        d = ensureDeferred(self._prove(self.reactor, self.home, self.lic))
        d.addTimeout(self.answer_timeout, self.reactor)
        return d

    async def _start(self) -> None:
        await self._proof()
        if lcp.is_rental(self.lic):
            left = await self._charge(self.reactor, self.home, self.lic)  # synced before the program starts
            self.log.info("licence {product}: one run charged, {left} left", product=self.lic.product, left=left)
        executable, argv = self._spawn_argv(self.program)
        try:
            self.process = self.reactor.spawnProcess(
                _Child(self), executable, argv, env=os.environ.copy(), childFDs={0: 0, 1: 1, 2: 2}
            )
        except OSError as e:
            raise lcp.LicenseError(f"cannot start {self.program[0]}: {e.strerror}") from None
        self.started = True
        self.reactor.addSystemEventTrigger("before", "shutdown", self._on_shutdown)
        self.loop = LoopingCall(self._reprove)
        self.loop.clock = self.reactor
        self.loop.start(self.interval, now=False)

    def _failed_start(self, failure) -> None:
        err = failure.value
        if isinstance(err, lcp.LicenseError):
            self.refusal = str(err)
        elif failure.check(AnswerTimeout):
            self.refusal = "the card did not answer in time"
        else:
            self.refusal = f"licence check failed: {err}"
        self.exit_code = lcp.EXIT_LICENSE
        self._stop_reactor()

    def _reprove(self):
        d = self._proof()
        d.addErrback(lambda f: self.stop(str(f.value) if isinstance(f.value, lcp.LicenseError) else "the card stopped answering"))
        return None  # a slow proof must not stall the loop; failures (and timeouts) stop the program

    def stop(self, why: str) -> None:
        """Licence gone: SIGTERM now, SIGKILL after ``grace``; ``vsc run`` then exits 75."""
        if self.stopping or self.process is None:
            return
        self.stopping = True
        self.refusal = f"stopping {self.program[0]}: {why}"
        self._terminate()

    def _terminate(self) -> None:
        if self.loop is not None and self.loop.running:
            self.loop.stop()
        try:
            self.process.signalProcess(signal.SIGTERM)
        except Exception:  # noqa: BLE001 - already gone
            return
        self.reactor.callLater(self.grace, self._kill)

    def _kill(self) -> None:
        try:
            self.process.signalProcess(signal.SIGKILL)
        except Exception:  # noqa: BLE001 - ended within the grace period
            pass

    def _on_shutdown(self):
        """``vsc run`` itself is stopping (SIGTERM, Ctrl-C): stop the program first, then let the reactor go."""
        if self.process is None or self.process.pid is None:
            return None
        self._done = Deferred()
        if not self.stopping:
            self._terminate()
        return self._done

    def ended(self, value) -> None:
        if self.loop is not None and self.loop.running:
            self.loop.stop()
        if self.stopping:
            self.exit_code = lcp.EXIT_LICENSE
        else:
            code = getattr(value, "exitCode", None)
            sig = getattr(value, "signal", None)
            self.exit_code = code if code is not None else (128 + sig if sig else 1)
        if self._done is not None:
            done, self._done = self._done, None
            done.callback(None)
        self._stop_reactor()

    def _stop_reactor(self) -> None:
        try:
            self.reactor.stop()
        except ReactorNotRunning:  # already shutting down (vsc run was interrupted)
            pass
