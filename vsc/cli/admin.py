"""
``vsc admin --data-dir DIR ACTION``: the VSC Server administrator's commands
on its data directory and the card database of [0034].

    init [--database URL]           the data dir, the server key and the database schema
    fingerprint                     the server key fingerprint that cards pin
    issue SERIAL [--ttl S]          a one-time enrolment code for a new card (printed once)
    list                            every card, and serials issued but not yet enrolled
    show SERIAL                     one card's record (never its protected information)
    history SERIAL                  the append-only history of one serial
    destroy SERIAL                  Figure 4's destroy 107: terminal, the information is wiped
    duplicate SERIAL NEW            [0102]: a second card with a copy of the same information
    replace SERIAL [--policy ...]   [0062]: a lost card; an exact copy (default) or a fresh card
    unlock SERIAL                   clear a lockout after failed authentications

Every action takes ``--json``. Failures are one line on stderr and a
non-zero exit (vsc.cli.CommandError).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sqlite3
import time  # clock-ok: a command-line tool (or the harness) reads the wall clock
from typing import Iterator

from vsc.cli import EXIT_OK, EXIT_USAGE, CommandError, emit

REPLACE_POLICIES = ("duplicate", "fresh")


# ---------------------------------------------------------------- helpers


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or "it failed without saying why"


def _redact(url: str) -> str:
    """The URL without a password, for messages."""
    from vsc.server.store import redact

    return redact(url)


def _when(t) -> str:
    """A stored time for people; whatever is stored (a huge, negative or non-number value) never raises."""
    if not t:
        return "-"
    try:
        return datetime.datetime.fromtimestamp(float(t), datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, ValueError, OSError, TypeError):
        return f"(unreadable time {str(t)[:32]})"


def _database_errors() -> tuple[type[BaseException], ...]:
    errors: tuple[type[BaseException], ...] = (sqlite3.Error,)
    try:
        import psycopg
    except ImportError:
        return errors
    return errors + (psycopg.Error,)


def _check_serial(serial: str) -> str:
    """A serial named to look a card up: its NFC form (docs/admin.md: Serials); one line if it cannot be one."""
    from vsc.protocol import serials
    from vsc.wire.ops import MAX_SERIAL

    nfc = serials.normalise(serial)
    if not nfc or not nfc.isprintable() or nfc != nfc.strip() or len(nfc.encode("utf-8", "replace")) > MAX_SERIAL:
        try:
            serials.check(serial)
        except serials.SerialError as e:
            raise CommandError(str(e), EXIT_USAGE) from None
    return nfc


def _new_serial(serial: str) -> str:
    """A serial for a new card: in the alphabet (NFC); one line if not. Confusables are the store's check."""
    from vsc.protocol import serials

    try:
        return serials.check(serial)
    except serials.SerialError as e:
        raise CommandError(str(e), EXIT_USAGE) from None


#: the range of a code's validity, as the code_ttl setting's (vsc.server.settings)
TTL_MIN, TTL_MAX = 60.0, 366 * 86400.0


def _ttl(text: str | None, default: float) -> float:
    """``--ttl``: checked before anything is stored; one line (not argparse's usage) when it is not acceptable."""
    import math

    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        raise CommandError(f"--ttl {text[:40]!r} is not a number of seconds", EXIT_USAGE) from None
    if not math.isfinite(value) or not TTL_MIN <= value <= TTL_MAX:
        raise CommandError(f"--ttl {text[:40]} must be from {TTL_MIN:.0f} to {TTL_MAX:.0f} seconds (366 days)",
                           EXIT_USAGE)
    return value


def open_store(url: str, policy):
    """A Store on ``url`` with its schema created or migrated; CommandError when that fails."""
    from vsc.server.store import Store, StoreError

    try:
        store = Store(url, time.time, policy.lockout)  # clock-ok
    except StoreError as e:
        raise CommandError(str(e)) from None
    try:
        store.migrate()
    except StoreError as e:
        store.close()
        raise CommandError(str(e)) from None
    except _database_errors() as e:
        store.close()
        raise CommandError(f"cannot open the database {_redact(url)}: {_one_line(e)}") from None
    return store


@contextlib.contextmanager
def _database(args) -> Iterator[tuple]:
    """(config, policy, store) for ``args.data_dir``; store errors become one-line CommandErrors."""
    from vsc.server import config
    from vsc.server.policy import Policy
    from vsc.server.store import StoreError

    try:
        cfg = config.load(args.data_dir)
    except config.ConfigError as e:
        raise CommandError(str(e)) from None
    try:
        policy = Policy.from_settings(cfg.settings)
    except ValueError as e:
        raise CommandError(f"{cfg.data_dir / config.CONFIG_NAME}: {e}") from None
    store = open_store(cfg.database_url, policy)
    try:
        yield cfg, policy, store
    except StoreError as e:
        raise CommandError(str(e)) from None
    except _database_errors() as e:
        raise CommandError(f"database {_redact(cfg.database_url)}: {_one_line(e)}") from None
    finally:
        store.close()


def _card(store, serial: str):
    card = store.get(serial)
    if card is None:
        pending = store.enrolment(serial)
        if pending is not None:
            raise CommandError(f"card {serial} is issued but not enrolled yet (code valid until {_when(pending[2])})")
        raise CommandError(f"no card {serial}")
    return card


def _is_free(store, serial: str) -> bool:
    return store.get(serial) is None and store.enrolment(serial) is None


def _new_code(store, policy, serial: str, ttl: float) -> tuple[str, float]:
    from vsc.server.policy import code_hash, new_enrolment_code

    code = new_enrolment_code()
    store.issue(serial, code_hash(code), policy.initial_auth_info(), ttl)
    expires = store.enrolment(serial)[2]
    return code, expires


def _code_text(serial: str, code: str, expires: float) -> str:
    return (
        f"enrolment code for card {serial} (shown only now; valid until {_when(expires)}):\n\n"
        f"    {code}\n\n"
        "give it to the card's owner, who enrols the card with it; it works once"
    )


def _code_file(path: str) -> int:
    """A new file of mode 0600 for the code, made before anything is issued (an existing file is not overwritten)."""
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise CommandError(f"{path} exists; not overwriting it (remove it, or name another file)") from None
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror}") from None


# ---------------------------------------------------------------- commands


def cmd_issue(args) -> int:
    serial = _new_serial(args.serial)
    _ttl(args.ttl, 60.0)  # checked before the database is even opened
    # the file first: one that exists stops the command before a new code replaces the one the owner holds
    fd = _code_file(args.code_file) if args.code_file else None
    try:
        with _database(args) as (_cfg, policy, store):
            if store.get(serial) is not None:
                raise CommandError(f"card {serial} already exists")
            replaced = store.enrolment(serial) is not None
            code, expires = _new_code(store, policy, serial, _ttl(args.ttl, policy.code_ttl))
    except BaseException:
        if fd is not None:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(args.code_file)
        raise
    text = _code_text(serial, code, expires)
    if fd is not None:
        with os.fdopen(fd, "w") as f:
            f.write(code + "\n")
        text = (f"enrolment code for card {serial} written to {args.code_file} (valid until {_when(expires)}); "
                "give it to the card's owner, who enrols the card with it; it works once")
    if replaced:
        text += "\n(the earlier code for this serial no longer works)"
    emit(args, {"serial": serial, "code": code, "expires": expires, "replaced": replaced}, text)
    return EXIT_OK


def cmd_list(args) -> int:
    with _database(args) as (_cfg, _policy, store):
        now = store.now()
        cards = [
            {"serial": c.serial, "state": c.state.value, "version": c.version, "locked_out": c.summary(now)["locked_out"]}
            for c in store.list_cards()
        ]
        pending = [
            {"serial": s, "state": "issued", "version": None, "locked_out": False, "expires": exp, "expired": exp < now}
            for s, exp in store.pending()
        ]
    rows = sorted(cards + pending, key=lambda r: r["serial"])
    if not rows:
        text = "no cards"
    else:
        width = max(6, *(len(r["serial"]) for r in rows))
        lines = [f"{'SERIAL':<{width}}  {'STATE':<9}  {'VERSION':>7}  LOCKED"]
        for r in rows:
            if r["state"] == "issued":
                note = f"code {'expired' if r['expired'] else 'valid until'} {_when(r['expires'])}"
                lines.append(f"{r['serial']:<{width}}  {'issued':<9}  {'-':>7}  -       ({note})")
            else:
                locked = "yes" if r["locked_out"] else "no"
                lines.append(f"{r['serial']:<{width}}  {r['state']:<9}  {r['version']:>7}  {locked}")
        text = "\n".join(lines)
    emit(args, {"cards": rows}, text)
    return EXIT_OK


def cmd_show(args) -> int:
    serial = _check_serial(args.serial)
    with _database(args) as (_cfg, _policy, store):
        now = store.now()
        card = store.get(serial)
        if card is None:
            pending = store.enrolment(serial)
            if pending is None:
                raise CommandError(f"no card {serial}")
            info = {
                "serial": serial, "state": "issued", "muk": None, "locked_out": False, "version": None,
                "expires": pending[2], "expired": pending[2] < now,
                "auth": json.loads(pending[1] or "{}").get("methods", []),
            }
        else:
            info = card.summary(now)
    lines = [f"serial:      {info['serial']}", f"state:       {info['state']}"]
    if info["state"] == "issued":
        lines.append(f"code:        {'expired' if info['expired'] else 'valid until'} {_when(info['expires'])}")
    else:
        lines += [
            f"version:     {info['version']}",
            f"muk:         {info['muk'] or '-'}",
            f"locked out:  {'until ' + _when(info['locked_until']) if info['locked_out'] else 'no'}"
            f" ({info['failures']} failures from other machines, {info.get('machine_failures', 0)} from its last machine)",
            f"protected:   {info['protected_bytes']} bytes",
        ]
        if info["channel"]:
            ch = info["channel"]
            lines.append(
                f"in use:      since {_when(ch.get('since'))}"
                + "".join(f", {k} {ch[k]}" for k in sorted(ch) if k not in ("since", "session"))
            )
        lines += [f"created:     {_when(info['created'])}", f"updated:     {_when(info['updated'])}"]
    lines.append(f"auth:        {', '.join(info['auth']) or '-'}")
    emit(args, info, "\n".join(lines))
    return EXIT_OK


def cmd_history(args) -> int:
    serial = _check_serial(args.serial)
    with _database(args) as (_cfg, _policy, store):
        entries = [e.as_dict() for e in store.history(serial)]
        if not entries and store.get(serial) is None:
            raise CommandError(f"no card {serial} and no history for it")
    lines = []
    for e in entries:
        muk = f"  muk {e['muk'][:16]}" if e["muk"] else ""
        peer = f"  by {e['peer']}" if e["peer"] else ""
        detail = f"  ({e['detail']})" if e["detail"] else ""
        lines.append(f"{_when(e['at'])}  {e['op']:<9} {e['result']:<12}{peer}{muk}{detail}")
    emit(args, {"serial": serial, "history": entries}, "\n".join(lines) or f"no history for {serial}")
    return EXIT_OK


def _destroy(store, serial: str) -> None:
    from vsc.wire.ops import Status

    status = store.destroy_by_admin(serial, peer="admin")
    if status is Status.REFUSED:
        raise CommandError(f"no card {serial}")
    if status is Status.DESTROYED:
        raise CommandError(f"card {serial} is already destroyed")


def cmd_destroy(args) -> int:
    serial = _check_serial(args.serial)
    with _database(args) as (_cfg, _policy, store):
        before = _card(store, serial).state.value
        _destroy(store, serial)
    emit(
        args,
        {"serial": serial, "state": "destroyed", "was": before},
        f"card {serial} destroyed (was {before}); this is final: its protected information is wiped",
    )
    return EXIT_OK


def cmd_revoke(args) -> int:
    serial = _check_serial(args.serial)
    with _database(args) as (_cfg, _policy, store):
        expires = store.revoke(serial, peer="admin")
    emit(args, {"serial": serial, "state": "revoked", "expires": expires},
         f"enrolment code for card {serial} revoked (it was valid until {_when(expires)}); it no longer works")
    return EXIT_OK


def cmd_duplicate(args) -> int:
    serial, new = _check_serial(args.serial), _new_serial(args.new_serial)
    with _database(args) as (_cfg, _policy, store):
        store.duplicate(serial, new, peer="admin")
        copy = store.get(new)
    emit(
        args,
        {"serial": serial, "new_serial": new, "state": copy.state.value, "version": copy.version},
        f"card {new} is a copy of {serial} (idle, version {copy.version}); "
        "its owner inserts it with the same password",
    )
    return EXIT_OK


def cmd_replace(args) -> int:
    serial = _check_serial(args.serial)
    _ttl(args.ttl, 60.0)
    with _database(args) as (_cfg, policy, store):
        card = _card(store, serial)
        if args.new_serial:
            new = _new_serial(args.new_serial)
            if not _is_free(store, new):
                raise CommandError(f"serial {new} is already in use (a card or a pending enrolment)")
        else:
            n = 1
            while not _is_free(store, f"{serial}-r{n}"):
                n += 1
            new = _new_serial(f"{serial}-r{n}")
        data = {"serial": serial, "new_serial": new, "policy": args.policy}
        if args.policy == "duplicate":
            from vsc.server.store import CardState
            from vsc.wire.ops import Status

            if card.state is CardState.DESTROYED:
                raise CommandError(
                    f"card {serial} is destroyed and its information is gone: use --policy fresh"
                )
            # the copy and the destroy in one transaction: a failure leaves no copy beside a lost card still alive
            if store.replace(serial, new, peer="admin") is not Status.OK:
                raise CommandError(f"card {serial} is already destroyed")
            copy = store.get(new)
            data.update(version=copy.version, state=copy.state.value)
            text = (
                f"card {serial} destroyed; {new} is an exact copy of it (idle, version {copy.version}): "
                "the owner inserts it with the same password"
            )
        else:
            from vsc.server.policy import code_hash, new_enrolment_code

            # the code and the destroy in one transaction: a new serial the store refuses (one that looks like
            # another) or a failure leaves the card as it was; destroyed (before or meanwhile) is destroyed too
            code = new_enrolment_code()
            store.replace(serial, new, peer="admin",
                          fresh=(code_hash(code), policy.initial_auth_info(), _ttl(args.ttl, policy.code_ttl)))
            expires = store.enrolment(new)[2]
            data.update(code=code, expires=expires, state="issued")
            text = f"card {serial} destroyed; its replacement {new} starts afresh.\n" + _code_text(new, code, expires)
    emit(args, data, text)
    return EXIT_OK


def cmd_unlock(args) -> int:
    serial = _check_serial(args.serial)
    with _database(args) as (_cfg, _policy, store):
        card = _card(store, serial)
        was = card.failures + card.machine_failures
        store.unlock(serial, peer="admin")
    emit(
        args,
        {"serial": serial, "locked_out": False, "failures": 0, "failures_cleared": was},
        f"card {serial} unlocked ({was} failed authentications cleared)",
    )
    return EXIT_OK


# ---------------------------------------------------------------- init, fingerprint


def cmd_init(args) -> int:
    """The data dir, its config and server key, then the database schema; on a database failure, nothing is left."""
    from vsc.server import config
    from vsc.server.policy import Policy

    try:
        cfg = config.init(args.data_dir, database=args.database or "", key_bits=args.key_bits)
    except config.ConfigError as e:
        raise CommandError(str(e)) from None
    try:
        open_store(cfg.database_url, Policy.from_settings(cfg.settings)).close()
    except CommandError as e:
        # The key was created by this very command (init refuses to replace one) and nobody has
        # pinned it yet: remove it and the config so that init can simply be run again.
        for path in (cfg.key_path, cfg.data_dir / config.CONFIG_NAME):
            with contextlib.suppress(OSError):
                path.unlink()
        raise CommandError(f"{e} (nothing was initialised)") from None
    fp = cfg.load_key().public_key().fingerprint()
    emit(
        args,
        {"data_dir": str(cfg.data_dir), "fingerprint": fp, "database": cfg.database_url, "listen": cfg.listen},
        f"initialised {cfg.data_dir}\ndatabase: {cfg.database_url}\nserver key fingerprint (cards pin this):\n{fp}",
    )
    return EXIT_OK


def cmd_fingerprint(args) -> int:
    from vsc.server import config

    try:
        fp = config.load(args.data_dir).load_key().public_key().fingerprint()
    except config.ConfigError as e:
        raise CommandError(str(e)) from None
    emit(args, {"fingerprint": fp}, fp)
    return EXIT_OK


# ---------------------------------------------------------------- parser


def configure(admin: argparse.ArgumentParser) -> None:
    admin.add_argument("--data-dir", required=True, help="the server's data directory")
    asub = admin.add_subparsers(dest="admin_command", required=True, metavar="ACTION")

    def action(name: str, func, help: str, *serials: str) -> argparse.ArgumentParser:
        a = asub.add_parser(name, help=help, description=help)
        for s in serials:
            a.add_argument(s, metavar=s.upper())
        a.add_argument("--json", action="store_true", help="machine-readable output")
        a.set_defaults(func=func)
        return a

    a = action("init", cmd_init, "create the data dir, database schema and server key")
    a.add_argument("--database", help="postgresql://... (default: SQLite in the data dir)")
    a.add_argument("--key-bits", type=int, default=3072, choices=(2048, 3072, 4096))
    action("fingerprint", cmd_fingerprint, "print the server key fingerprint that cards pin")
    a = action("issue", cmd_issue, "issue a one-time enrolment code for a new card", "serial")
    a.add_argument("--ttl", metavar="SECONDS", help="code validity, 60 s to 366 days (default: code_ttl, 7 days)")
    a.add_argument("--code-file", metavar="FILE", help="write the code to this new file (mode 0600) instead of "
                                                      "showing it")
    action("list", cmd_list, "list every card and pending enrolment")
    action("show", cmd_show, "show one card's record", "serial")
    action("history", cmd_history, "show the history of one serial", "serial")
    action("destroy", cmd_destroy, "destroy a card (final; its information is wiped)", "serial")
    action("revoke", cmd_revoke, "revoke the enrolment code of a card issued but not enrolled yet", "serial")
    action("duplicate", cmd_duplicate, "make a new card with a copy of a card's information ([0102])",
           "serial", "new_serial")
    a = action("replace", cmd_replace, "replace a lost card ([0062]): destroy it and issue a replacement", "serial")
    a.add_argument("--policy", choices=REPLACE_POLICIES, default="duplicate",
                   help="duplicate: an exact copy the owner inserts with the same password (default); "
                        "fresh: a new card with a new enrolment code")
    a.add_argument("--new-serial", metavar="NEW", help="the replacement's serial (default: SERIAL-rN, first free N)")
    a.add_argument("--ttl", metavar="SECONDS", help="with --policy fresh: the code's validity (60 s to 366 days)")
    action("unlock", cmd_unlock, "clear a card's lockout after failed authentications", "serial")
