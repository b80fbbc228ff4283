"""``twistd vsc-server``: options and makeService (the plugin file only points here)."""

from __future__ import annotations

import sys

from twisted.application import service, strports
from twisted.python import usage

from vsc.server import config as server_config


class Options(usage.Options):
    synopsis = "--data-dir DIR [--listen ENDPOINT]"
    longdesc = (
        "Run the VSC Server: it keeps every card's protected information (encrypted under "
        "its owner's password) and mediates insert, remove, recover and destroy. "
        "Create DIR first with 'vsc admin --data-dir DIR init'."
    )
    optParameters = [
        ["data-dir", "d", None, "The server's data directory (created by 'vsc admin init')."],
        ["listen", "l", None, "Twisted server endpoint; default from the config file, else "
         f"{server_config.DEFAULT_LISTEN}. 'ssl:' endpoints give the TLS variant of [0079]."],
    ]

    def postOptions(self) -> None:
        if not self["data-dir"]:
            raise usage.UsageError("--data-dir is required")


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor

    from vsc.server.service import server_factory

    try:
        cfg = server_config.load(options["data-dir"])
        key = cfg.load_key()
    except server_config.ConfigError as e:
        sys.stderr.write(f"vsc-server: {e}\n")
        raise SystemExit(2)
    listen = options["listen"] or cfg.listen
    top = service.MultiService()
    factory = server_factory(cfg.channel, key, reactor)
    strports.service(listen, factory).setServiceParent(top)
    return top
