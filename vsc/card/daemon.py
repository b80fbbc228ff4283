"""
The card daemon's service (``twistd vsc-card``; its options and the choice
of storage are composed in vsc.daemon.card_tap): insert the card from the
storage it is given, serve the control socket, the ssh-agent and the PC/SC
link while it is in use, and remove it when the process stops.
"""

from __future__ import annotations

import os
import sys

from twisted.application import service
from twisted.internet.defer import ensureDeferred
from twisted.internet.task import deferLater
from twisted.logger import Logger

from vsc.card.session import EXIT_REMOVE_FAILED, EXIT_STORAGE, CardSession, LifeState, explain
from vsc.card.storage import CardStorage


class CardDaemon(service.Service):
    log = Logger()

    ssh_agent = None  # (socket path, slots or None) to serve the card's ssh-agent (vsc.card.sshagent)
    agent_port = None
    pcsc = None  # the vpcd endpoint to present the card to PC/SC (vsc.card.vpcd)
    pcsc_link = None
    pidfile = None  # twistd's pid file (vsc.daemon.card_tap), removed when the daemon leaves with its own status

    def __init__(self, reactor, cfg, password: str, storage: CardStorage):
        self.reactor = reactor
        self.cfg = cfg
        self._password = password
        self.storage = storage
        self.session: CardSession | None = None
        self.port = None
        self.exit_code = 0
        self._status: int | None = None  # the status the process leaves with (an os._exit after shutdown)
        self._starting = None  # the insert and the start of the services (_start)
        self._said = ""  # the last exit line printed (an exit reached twice says it once)
        self._stop_asked = False

    def startService(self) -> None:
        super().startService()
        self.session = CardSession(self.cfg, self.reactor, self.storage, on_exit=self.exit)
        d = self._starting = ensureDeferred(self._start())
        d.addErrback(lambda f: self.log.failure("card start failed", f) or self.exit(1, "internal error"))

    async def _start(self) -> None:
        from vsc.card.control import ControlFactory, prepare_socket_path
        from vsc.card.control import listen as control_listen

        try:
            sock = self.cfg.control_socket
            prepare_socket_path(sock)
            password, self._password = self._password, ""
            await self.session.insert(password)
        except Exception as e:  # noqa: BLE001 - one clear line, non-zero exit
            self.exit(1, f"insert refused: {explain(e)}")
            return
        if not self.running:  # stopped (SIGTERM) while inserting: serve nothing; _stop removes the card
            return
        factory = ControlFactory(self.session, on_remove=lambda: self.exit(0, ""))
        self.port = control_listen(self.reactor, str(sock), factory)  # reads into locked memory (issue 15)
        self.log.info("card {serial} in use; control socket {sock}", serial=self.cfg.serial, sock=str(sock))
        print(f"vsc-card: card {self.cfg.serial} inserted; control socket {sock}", file=sys.stderr, flush=True)
        if self.ssh_agent is not None:
            await self._start_ssh_agent(*self.ssh_agent)
        if self.pcsc is not None and self.running:
            from vsc.card.vpcd import PcscLink

            link = PcscLink(self.reactor, self.session, self.pcsc)
            try:
                await link.start()
            except Exception as e:  # noqa: BLE001 - like the ssh-agent: the card stays in use without it
                self.log.warn("PC/SC link not started on {endpoint}: {why}", endpoint=self.pcsc, why=str(e))
                print(f"vsc-card: PC/SC link not started on {self.pcsc}: {e}", file=sys.stderr, flush=True)
            else:
                self.pcsc_link = link
                print(f"vsc-card: presenting the card to PC/SC through vpcd at {self.pcsc}", file=sys.stderr,
                      flush=True)

    async def _start_ssh_agent(self, path, slots) -> None:
        """The ssh-agent is a convenience: if its socket cannot be served, the card stays in use without it."""
        from vsc.card import sshagent

        try:
            self.agent_port = await sshagent.listen(self.reactor, self.session, path, slots)
        except Exception as e:  # noqa: BLE001 - one line for the user
            self.log.warn("ssh-agent not started on {path}: {why}", path=str(path), why=explain(e))
            print(f"vsc-card: ssh-agent not started on {path}: {explain(e)}", file=sys.stderr, flush=True)
            return
        self.log.info("ssh-agent on {path} (slots {slots})", path=str(path), slots=",".join(slots or ()) or "all")
        print(f"vsc-card: ssh-agent on {path}; use it with: export SSH_AUTH_SOCK={path}", file=sys.stderr, flush=True)

    def exit(self, code: int, why: str) -> None:
        if why and why != self._said:
            self._said = why
            # twistd -n routes sys.stderr into its log: the user's line goes to the real stderr
            self.log.info("card daemon exits ({code}): {why}", code=code, why=why)
            print(f"vsc-card: {why}", file=sys.__stderr__ or sys.stderr, flush=True)
        self.exit_code = code
        if code:
            # twistd has no exit status of its own: leave with ours once shut down
            self._leave_with(code)
        if not self.running or self._stop_asked:  # already stopping (SIGTERM, or an exit before)
            return  # (a second reactor.stop() raises ReactorNotRunning)
        self._stop_asked = True
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def _leave_with(self, code: int) -> None:
        """Leave with status ``code`` once shut down (the first status decided wins)."""
        if self._status is None:
            self._status = code
            self.reactor.addSystemEventTrigger("after", "shutdown", self._exit_process, code)

    def _exit_process(self, code: int) -> None:
        """
        Leave with ``code`` now. twistd removes its pid file only once the
        reactor has returned, which this skips: the pid file is removed here
        (if it still names this process), or the next start would meet a
        stale one naming a pid some other process may hold by then.
        """
        if self.pidfile:
            try:
                with open(self.pidfile) as f:
                    mine = f.read().strip() == str(os.getpid())
                if mine:
                    os.unlink(self.pidfile)
            except (OSError, ValueError):
                pass
        os._exit(code)

    def stopService(self):
        super().stopService()
        d = ensureDeferred(self._stop())
        return d

    async def _stop(self) -> None:
        if self._starting is not None:  # an insert under way (SIGTERM while inserting): it ends first
            await self._starting
        if self.pcsc_link is not None:  # first: PC/SC sees the card leave
            await self.pcsc_link.stop()
        if self.agent_port is not None:
            await self.agent_port.stopListening()
        if self.port is not None:
            await self.port.stopListening()
        session = self.session
        if session is None:
            return
        if session.life is LifeState.REMOVING:  # `vsc card remove` under way: its check-in is not cut off
            await session.removal()
            # one turn: whoever asked for that remove says how the process leaves first (a clock check: 4)
            await deferLater(self.reactor, 0, lambda: None)
            if session.life is LifeState.IDLE:
                self._leave_with(0)  # removed normally
        if session.usable:
            try:
                await session.remove("the card process is stopping")
                print(f"vsc-card: card {self.cfg.serial} removed", file=sys.stderr, flush=True)
                # removed normally: status 0 (twistd would otherwise re-raise the SIGTERM it stopped on)
                self._leave_with(0)
            except Exception as e:  # noqa: BLE001
                if session.life is LifeState.IDLE:  # removed anyway (a token: every change is on it), code 5
                    self.exit(EXIT_STORAGE, explain(e))  # now: its own exit (a callLater) may not run any more
                    return
                why = f"remove failed: {explain(e)}; recover from this machine later"
                print(f"vsc-card: {why}", file=sys.stderr, flush=True)
                if session.usable:  # still in use (a server card): wipe it, exit without remove
                    session.abort(why, code=None)
                # its own status (twistd would re-raise SIGTERM: 143, which a service manager takes for a clean stop)
                self._leave_with(EXIT_REMOVE_FAILED)
