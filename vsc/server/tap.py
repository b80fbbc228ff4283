"""``twistd vsc-server``: options and makeService (the plugin file only points here)."""

from __future__ import annotations

import os
import sys

from twisted.application import service, strports
from twisted.python import usage

from vsc.server import config as server_config
from vsc.util.twistdopts import OneLineOptions


class Options(OneLineOptions):
    plugin = "vsc-server"
    synopsis = "--data-dir DIR [--listen ENDPOINT] [--threads N]"
    longdesc = (
        "Run the VSC Server: it keeps every card's protected information (encrypted under "
        "its owner's password) and mediates enrol, insert, sync, remove, recover and destroy. "
        "Create DIR first with 'vsc admin --data-dir DIR init'. JSON logs: twistd --logger "
        "vsc.server.tap.json_logger -n vsc-server ..."
    )
    optParameters = [
        ["data-dir", "d", None, "The server's data directory (created by 'vsc admin init')."],
        ["listen", "l", None, "Twisted server endpoint; default from the config file, else "
         f"{server_config.DEFAULT_LISTEN}. 'ssl:' endpoints give the TLS variant of [0079]."],
        ["threads", "t", None, "Database worker threads (default 8)."],
    ]

    def postOptions(self) -> None:
        if not self["data-dir"]:
            raise usage.UsageError("--data-dir is required")
        default_pidfile(self, os.path.join(self["data-dir"], "twistd.pid"))


def default_pidfile(options: usage.Options, path: str, argv: list[str] | None = None) -> None:
    """
    twistd's pid file defaults to ./twistd.pid, so a server and a card started
    from one directory collide ("Another twistd server is running"). Unless
    --pidfile was given, the plugin's own default is used instead: the server's
    data directory, the card's home.
    """
    parent = getattr(options, "parent", None)
    if parent is None or "pidfile" not in parent:
        return
    argv = sys.argv[1:] if argv is None else argv  # twistd parses sys.argv; an explicit --pidfile is kept
    given = any(a == "--pidfile" or a.startswith("--pidfile=") for a in argv)
    if not given and parent["pidfile"] == "twistd.pid":
        parent["pidfile"] = path


class PoolService(service.Service):
    """Starts and stops the database thread pool with the application; closes the store."""

    def __init__(self, pool, store):
        self.pool = pool
        self.store = store

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self):
        super().stopService()
        self.pool.stop()
        if self.store is not None:
            self.store.close()


def makeService(options: Options) -> service.IService:
    from twisted.internet import reactor
    from vsc.protocol.auth import load_master_key
    from vsc.server.policy import Policy
    import attrs

    from vsc.server.admission import Admission, AdmissionLimits
    from vsc.server.service import Backend, server_factory
    from vsc.net import endpoints
    from vsc.net.transport import LeanRefusalsEndpoint
    from vsc.server.settings import SettingError, override
    from vsc.server.store import Store, StoreError
    from vsc.server.workers import WorkerPool

    try:
        cfg = server_config.load(options["data-dir"])
        key = cfg.load_key()
        policy = Policy.from_settings(cfg.settings)
        master = load_master_key(cfg.settings.get("master_key_file") or os.environ.get("VSC_MASTER_KEY_FILE") or None)
    except (server_config.ConfigError, ValueError, OSError) as e:
        sys.stderr.write(f"vsc-server: {e}\n")
        raise SystemExit(2)
    try:  # only the database from here: the catch-all below names it
        store = Store(cfg.database_url, reactor.seconds, policy.lockout)
        store.migrate()
        store.close()
    except (server_config.ConfigError, StoreError, ValueError, OSError) as e:
        sys.stderr.write(f"vsc-server: {e}\n")
        raise SystemExit(2)
    except Exception as e:  # a database that cannot be reached, for one
        from vsc.server.store import redact

        why = " ".join(str(e).split()) or type(e).__name__
        sys.stderr.write(f"vsc-server: cannot open the database {redact(cfg.database_url)}: {why}\n")
        raise SystemExit(2)
    listen = options["listen"] or cfg.listen
    try:
        endpoints.server(reactor, listen, "--listen" if options["listen"] else f"{server_config.CONFIG_NAME} listen")
    except endpoints.EndpointError as e:
        sys.stderr.write(f"vsc-server: {e}\n")
        raise SystemExit(2)
    settings = cfg.settings
    if options["threads"]:
        try:
            settings = override(settings, "threads", options["threads"], "--threads")
        except SettingError as e:
            sys.stderr.write(f"vsc-server: {e}\n")
            raise SystemExit(2)
    descriptors = raise_fd_limit()
    top = service.MultiService()
    pool = WorkerPool(settings["threads"], "vsc-db")
    PoolService(pool, store).setServiceParent(top)
    limits = AdmissionLimits(**{f.name: settings[f.name] for f in attrs.fields(AdmissionLimits)})
    limits = fit_to_descriptors(limits, descriptors)
    rsa_pool = WorkerPool(limits.handshake_threads, "vsc-rsa")
    PoolService(rsa_pool, None).setServiceParent(top)
    admission = Admission(limits, reactor.seconds, reactor, rsa_pool)
    backend = Backend(reactor, store, pool)
    factory = server_factory(cfg.channel, key, reactor, backend=backend, ops_policy=policy.ops(), master=master,
                             admission=admission)
    listening = strports.service(with_backlog(listen), factory)
    listening.endpoint = LeanRefusalsEndpoint(listening.endpoint)  # refusals answered on the socket (vsc.net.transport)
    listening.setServiceParent(top)
    return top


#: The listen queue a TCP or SSL endpoint gets unless its description names one (the kernel caps it at
#: net.core.somaxconn). Twisted's default is 50: when every in-use card reconnects at once after a restart,
#: connections beyond the queue are left half-open, and those cards wait out their handshake timeout (30 s).
LISTEN_BACKLOG = 4096


def with_backlog(listen: str) -> str:
    """``listen`` with ``:backlog=LISTEN_BACKLOG`` added to a tcp/ssl/tcp6 endpoint that names none."""
    kind = listen.split(":", 1)[0].lower()
    if kind in ("tcp", "tcp6", "ssl") and "backlog=" not in listen:
        return f"{listen}:backlog={LISTEN_BACKLOG}"
    return listen


#: descriptors kept for everything but unauthenticated connections: authenticated cards, the database, logs, threads
FD_RESERVE = 128


def fit_to_descriptors(limits, descriptors: int):
    """
    Unauthenticated connections may take at most the descriptors left after
    FD_RESERVE (and a quarter of the limit): a cap above what the process can
    open would let strangers exhaust the descriptors, and then accept() fails
    for everyone, the owner too (issue 11: 1,200 one-byte connections under
    ``ulimit -n 1024`` refused everyone for 30 s). Logs the cap it lowered.
    """
    import attrs
    from twisted.logger import Logger

    room = max(1, min(descriptors - FD_RESERVE, descriptors * 3 // 4))
    if limits.max_unauthenticated <= room:
        return limits
    Logger().warn("max_unauthenticated lowered from {was} to {now}: the open-file limit is {fds} descriptors",
                  was=limits.max_unauthenticated, now=room, fds=descriptors)
    return attrs.evolve(limits, max_unauthenticated=room,
                        max_unauthenticated_per_source=min(limits.max_unauthenticated_per_source, room))


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (connections are descriptors); log and return what we got."""
    import resource

    from twisted.logger import Logger

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    Logger().info("open-file limit: {soft} descriptors", soft=soft)
    return soft


def json_logger():
    """A twistd --logger factory writing one JSON object per line to stdout."""
    from twisted.logger import jsonFileLogObserver

    return jsonFileLogObserver(sys.stdout)
