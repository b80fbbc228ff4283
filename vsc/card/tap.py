"""``twistd vsc-card``: options and makeService (the plugin file only points here)."""

from __future__ import annotations

import os
import sys

from twisted.application import service
from twisted.internet.defer import ensureDeferred
from twisted.logger import Logger
from twisted.python import usage

from vsc.card import config as card_config


class Options(usage.Options):
    synopsis = "--home HOME [--password-file F]"
    longdesc = (
        "Insert the Virtual Smart Card enrolled in HOME and serve it while it is in use: "
        "the local control socket for 'vsc card ...' commands, and an ssh-agent (see --ssh-agent). "
        "SIGTERM removes the card, "
        "then exits. A refused insert exits non-zero with one line on stderr."
    )
    optParameters = [
        ["home", "H", None, "The card's home (default $VSC_HOME or ~/.config/vsc)."],
        ["password-file", "p", None, "Read the password from this file or fd:N (default: the terminal)."],
        ["totp", None, None, "The current TOTP code of the card's reader-less device, when the server requires one."],
        ["totp-file", None, None, "Read the TOTP code from this file when the server asks for it (default: the "
         "terminal, when the card has a TOTP seed)."],
        ["dongle", None, None, "Run from a PKCS#11 token instead of a server (claim 10): pkcs11:token=LABEL;"
         "module-path=LIB (default: the token in HOME's card.ini when it was enrolled with 'vsc dongle enroll')."],
        ["token-pin-file", None, None, "Read the token PIN from this file (dongle mode)."],
        ["ssh-agent", None, None, "Serve the card's ssh-agent on this UNIX socket (default: the runtime dir, "
         "next to the control socket; 'vsc card ssh-agent-env' prints it)."],
        ["ssh-agent-slots", None, None, "Offer only these slots through the ssh-agent, e.g. 9a,9c (default: all)."],
        ["pcsc", None, None, "Also present the card to PC/SC as a PIV card: connect to vsmartcard's vpcd at this "
         "endpoint, e.g. tcp:127.0.0.1:35963 (reader 'Virtual PCD 00 00'), or listen for vpcd in reversed mode: "
         "listen:tcp:35965:interface=127.0.0.1; see docs/pcsc.md."],
    ]
    optFlags = [
        ["no-ssh-agent", None, "Do not serve an ssh-agent."],
    ]


class CardDaemon(service.Service):
    log = Logger()

    dongle = None  # (TokenRef, ChallengeTable, poll seconds) in dongle mode
    ssh_agent = None  # (socket path, slots or None) to serve the card's ssh-agent (vsc.card.sshagent)
    agent_port = None
    pcsc = None  # the vpcd endpoint to present the card to PC/SC (vsc.card.vpcd)
    pcsc_link = None
    totp = None  # where TOTP codes come from (vsc.card.config.totp_source)

    def __init__(self, reactor, cfg, password: str, master: bytes):
        self.reactor = reactor
        self.cfg = cfg
        self._password = password
        self.master = master
        self.session = None
        self.port = None
        self.exit_code = 0

    def startService(self) -> None:
        super().startService()
        from vsc.card.session import CardSession

        if self.dongle is not None:
            from vsc.dongle.session import DongleSession

            token, table, poll = self.dongle
            self.session = DongleSession(self.cfg, self.reactor, token, table, poll, on_exit=self.exit)
        else:
            self.session = CardSession(self.cfg, self.reactor, self.master, on_exit=self.exit, totp=self.totp)
        d = ensureDeferred(self._start())
        d.addErrback(lambda f: self.log.failure("card start failed", f) or self.exit(1, "internal error"))

    async def _start(self) -> None:
        from twisted.internet.endpoints import UNIXServerEndpoint

        from vsc.card.control import ControlFactory, prepare_socket_path
        from vsc.card.session import explain

        try:
            sock = self.cfg.control_socket
            prepare_socket_path(sock)
            password, self._password = self._password, ""
            await self.session.insert(password)
        except Exception as e:  # noqa: BLE001 - one clear line, non-zero exit
            self.exit(1, f"insert refused: {explain(e)}")
            return
        factory = ControlFactory(self.session, on_remove=lambda: self.exit(0, ""))
        self.port = await UNIXServerEndpoint(self.reactor, str(sock), mode=0o600).listen(factory)
        self.log.info("card {serial} in use; control socket {sock}", serial=self.cfg.serial, sock=str(sock))
        print(f"vsc-card: card {self.cfg.serial} inserted; control socket {sock}", file=sys.stderr, flush=True)
        if self.ssh_agent is not None:
            await self._start_ssh_agent(*self.ssh_agent)
        if self.pcsc is not None:
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
        from vsc.card.session import explain

        try:
            self.agent_port = await sshagent.listen(self.reactor, self.session, path, slots)
        except Exception as e:  # noqa: BLE001 - one line for the user
            self.log.warn("ssh-agent not started on {path}: {why}", path=str(path), why=explain(e))
            print(f"vsc-card: ssh-agent not started on {path}: {explain(e)}", file=sys.stderr, flush=True)
            return
        self.log.info("ssh-agent on {path} (slots {slots})", path=str(path), slots=",".join(slots or ()) or "all")
        print(f"vsc-card: ssh-agent on {path}; use it with: export SSH_AUTH_SOCK={path}", file=sys.stderr, flush=True)

    def exit(self, code: int, why: str) -> None:
        if why:
            # twistd -n routes sys.stderr into its log: the user's line goes to the real stderr
            self.log.info("card daemon exits ({code}): {why}", code=code, why=why)
            print(f"vsc-card: {why}", file=sys.__stderr__ or sys.stderr, flush=True)
        self.exit_code = code
        if code:
            # twistd has no exit status of its own: leave with ours once shut down
            self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, code)
        if self.reactor.running:
            self.reactor.stop()
        else:
            self.reactor.callWhenRunning(self.reactor.stop)

    def stopService(self):
        super().stopService()
        d = ensureDeferred(self._stop())
        return d

    async def _stop(self) -> None:
        if self.pcsc_link is not None:  # first: PC/SC sees the card leave
            await self.pcsc_link.stop()
        if self.agent_port is not None:
            await self.agent_port.stopListening()
        if self.port is not None:
            await self.port.stopListening()
        if self.session is not None and self.session.state == "in-use":
            try:
                await self.session.remove("the card process is stopping")
                print(f"vsc-card: card {self.cfg.serial} removed", file=sys.stderr, flush=True)
                # removed normally: status 0 (twistd would otherwise re-raise the SIGTERM it stopped on)
                self.reactor.addSystemEventTrigger("after", "shutdown", os._exit, 0)
            except Exception as e:  # noqa: BLE001
                from vsc.card.session import explain

                print(f"vsc-card: remove failed: {explain(e)}; recover from this machine later", file=sys.stderr, flush=True)
                self.session._wipe()


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    from vsc.protocol.auth import load_master_key

    try:
        cfg = card_config.load(options["home"])
        master = load_master_key(os.environ.get("VSC_MASTER_KEY_FILE"))
        password = card_config.read_password(options["password-file"])
    except (card_config.CardConfigError, ValueError, OSError) as e:
        sys.stderr.write(f"vsc-card: {e}\n")
        raise SystemExit(2)
    daemon = CardDaemon(reactor, cfg, password, master)
    daemon.totp = card_config.totp_source(options["totp"], options["totp-file"],
                                          cfg.settings.get("totp", "").lower() == "true")
    if options["dongle"] or cfg.settings.get("mode") == "dongle":
        from vsc.dongle.config import dongle_setup

        try:
            daemon.dongle = dongle_setup(cfg, options["dongle"], options["token-pin-file"])
        except Exception as e:  # noqa: BLE001 - one line for the user
            sys.stderr.write(f"vsc-card: {e}\n")
            raise SystemExit(2)
    if options["pcsc"]:
        daemon.pcsc = options["pcsc"]
    if not options["no-ssh-agent"]:
        from pathlib import Path

        from vsc.card import sshagent

        try:
            slots = sshagent.parse_slots(options["ssh-agent-slots"])
        except ValueError as e:
            sys.stderr.write(f"vsc-card: --ssh-agent-slots: {e}\n")
            raise SystemExit(2)
        path = Path(options["ssh-agent"]).absolute() if options["ssh-agent"] else sshagent.agent_socket_for(cfg.home)
        daemon.ssh_agent = (path, slots)
    return daemon
