"""
``twistd vsc-card``: options and makeService (the plugin file only points
here). This is where a card process is composed: the card daemon
(vsc.card.daemon.CardDaemon) is given the storage its protected information
lives in — a VSC Server (vsc.card.storage.ServerStorage) or, with card.ini's
``mode = dongle`` or ``--dongle``, a token (vsc.dongle.storage.TokenStorage).
The card package never imports the dongle package; this module knows both.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from twisted.application import service

from vsc.card import config as card_config
from vsc.card import sshagent
from vsc.card.daemon import CardDaemon
from vsc.card.storage import CardStorage, ServerStorage
from vsc.dongle.storage import TokenStorage, detached_worker
from vsc.protocol.auth import load_master_key
from vsc.util.twistdopts import OneLineOptions


class Options(OneLineOptions):
    plugin = "vsc-card"
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


    def postOptions(self) -> None:
        from vsc.card import paths
        from vsc.server.tap import default_pidfile

        default_pidfile(self, os.path.join(paths.home_of(self["home"]), "twistd.pid"))


def _fail(line: str):
    sys.stderr.write(f"vsc-card: {line}\n")
    raise SystemExit(2)


def storage_for(options: Options, cfg: card_config.CardConfig, reactor, master: bytes) -> CardStorage:
    """The card's storage: the token in dongle mode (``--dongle`` or card.ini ``mode = dongle``), else its server."""
    if options["dongle"] or cfg.settings.get("mode") == "dongle":
        from vsc.dongle.config import dongle_setup  # only in dongle mode

        try:
            token, table, poll = dongle_setup(cfg, options["dongle"], options["token-pin-file"])
        except Exception as e:  # noqa: BLE001 - one line for the user
            _fail(str(e))
        # a thread per token call that shutdown does not join: a hung token cannot keep the process up
        return TokenStorage(cfg, token, table, poll, clock=reactor, worker=detached_worker(reactor))
    totp = card_config.totp_source(options["totp"], options["totp-file"],
                                   cfg.settings.get("totp", "").lower() == "true")
    return ServerStorage(cfg, reactor, master, totp=totp)


def check_endpoints(options: Options, cfg: card_config.CardConfig, reactor) -> None:
    """card.ini's server (unless the card runs from a token) and --pcsc must be endpoints: one line if not."""
    from vsc.net import endpoints

    try:
        if not (options["dongle"] or cfg.settings.get("mode") == "dongle"):
            endpoints.client(reactor, cfg.server, f"{card_config.CARD_INI}'s server")
        pcsc = options["pcsc"]
        if pcsc is not None:
            listen = "listen:"  # vsc.card.vpcd.LISTEN_PREFIX: vpcd's reversed mode
            if pcsc.startswith(listen):
                endpoints.server(reactor, pcsc[len(listen):], "--pcsc")
            else:
                endpoints.client(reactor, pcsc, "--pcsc")
    except endpoints.EndpointError as e:
        _fail(str(e))


def pidfile_of(options: Options) -> str | None:
    """The absolute path of twistd's pid file (it is written relative to --rundir), or None without one."""
    parent = getattr(options, "parent", None)
    if parent is None or not parent.get("pidfile"):
        return None
    return os.path.abspath(os.path.join(parent.get("rundir") or ".", parent["pidfile"]))


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    try:
        cfg = card_config.load(options["home"])
        master = load_master_key(os.environ.get("VSC_MASTER_KEY_FILE"))
        check_endpoints(options, cfg, reactor)  # before the password is asked for
        password = card_config.read_password(options["password-file"])
    except (card_config.CardConfigError, ValueError, OSError) as e:
        _fail(str(e))
    daemon = CardDaemon(reactor, cfg, password, storage_for(options, cfg, reactor, master))
    daemon.pidfile = pidfile_of(options)
    if options["pcsc"]:
        daemon.pcsc = options["pcsc"]
    if not options["no-ssh-agent"]:
        try:
            slots = sshagent.parse_slots(options["ssh-agent-slots"])
        except ValueError as e:
            _fail(f"--ssh-agent-slots: {e}")
        path = Path(options["ssh-agent"]).absolute() if options["ssh-agent"] else sshagent.agent_socket_for(cfg.home)
        daemon.ssh_agent = (path, slots)
    return daemon
