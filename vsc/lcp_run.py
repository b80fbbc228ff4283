"""
``vsc run``: the digital ignition key ([0008], [0017]). Starts the program
only after the keyfile verified and the inserted card proved possession of
its key (and paid for the run, for rental keyfiles); re-proves every
``interval`` seconds; stops the program (SIGTERM, then SIGKILL after
``grace``) when the card is removed or stops answering.
"""

from __future__ import annotations

import os
import signal

from twisted.internet.defer import ensureDeferred
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from vsc import lcp


class _Child(ProcessProtocol):
    def __init__(self, owner: "IgnitionKey"):
        self.owner = owner

    def processEnded(self, reason) -> None:
        self.owner.ended(reason.value)


class IgnitionKey:
    log = Logger()

    def __init__(self, reactor, home, lic, program: list[str], interval: float, grace: float, prove, charge):
        self.reactor = reactor
        self.home = home
        self.lic = lic
        self.program = program
        self.interval = interval
        self.grace = grace
        self._prove = prove
        self._charge = charge
        self.process = None
        self.loop: LoopingCall | None = None
        self.exit_code = 0
        self.refusal = ""
        self.stopping = False

    def start(self) -> None:
        ensureDeferred(self._start()).addErrback(self._failed_start)

    async def _start(self) -> None:
        await self._prove(self.reactor, self.home, self.lic)
        if self.lic.runs or self.lic.counter:
            left = await self._charge(self.reactor, self.home, self.lic)  # synced before the program starts
            self.log.info("licence {product}: one run charged, {left} left", product=self.lic.product, left=left)
        try:
            self.process = self.reactor.spawnProcess(
                _Child(self), self.program[0], self.program, env=os.environ.copy(), childFDs={0: 0, 1: 1, 2: 2}
            )
        except OSError as e:
            raise lcp.LicenseError(f"cannot start {self.program[0]}: {e.strerror}") from None
        self.loop = LoopingCall(self._reprove)
        self.loop.clock = self.reactor
        self.loop.start(self.interval, now=False)

    def _failed_start(self, failure) -> None:
        err = failure.value
        self.refusal = str(err) if isinstance(err, lcp.LicenseError) else f"licence check failed: {err}"
        self.exit_code = lcp.EXIT_LICENSE
        self.reactor.stop()

    def _reprove(self):
        d = ensureDeferred(self._prove(self.reactor, self.home, self.lic))
        d.addErrback(lambda f: self.stop(str(f.value) if isinstance(f.value, lcp.LicenseError) else "the card stopped answering"))
        return None  # a slow proof must not stall the loop; failures stop the program

    def stop(self, why: str) -> None:
        if self.stopping or self.process is None:
            return
        self.stopping = True
        self.refusal = f"stopping {self.program[0]}: {why}"
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

    def ended(self, value) -> None:
        if self.loop is not None and self.loop.running:
            self.loop.stop()
        if self.stopping:
            self.exit_code = lcp.EXIT_LICENSE
        else:
            code = getattr(value, "exitCode", None)
            sig = getattr(value, "signal", None)
            self.exit_code = code if code is not None else (128 + sig if sig else 1)
        if self.reactor.running:
            self.reactor.stop()
