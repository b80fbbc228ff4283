"""
``vsc dongle provision|enroll|replace``: putting a card on a PKCS#11
token (claim 10, Figures 14 and 15).

* provision (the issuer): a fresh DongleKey on the token (generated there,
  non-extractable) and the challenge table of Figure 14 (1201-1203); the
  issuer keeps a record of the card for replacement.
* enroll (the owner): keys generated locally, the protected information
  sealed under the owner's password key and written to the token.
* replace (the issuer, [0107]): a lost token → a new token with a new
  DongleKey and table, loaded from the issuer's records.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from urllib.parse import quote

from vsc.card.paths import write_private
from vsc.cli import EXIT_USAGE, CommandError, emit
from vsc.dongle.config import TABLE_NAME, read_pin

#: a challenge table's entries: at least MIN_ENTRIES, and at most what its format holds (vsc.wire.dongle)
MIN_ENTRIES, MAX_ENTRIES = 8, 4096


def _ref(uri: str, pin_file: str | None):
    from vsc.card.config import CardConfigError
    from vsc.dongle.token import TokenError, TokenRef

    try:
        return TokenRef.from_command_line(uri, read_pin(pin_file))
    except (TokenError, CardConfigError) as e:
        raise CommandError(str(e)) from None


def _new_table(ref, serial: str, entries: int):
    from vsc.dongle.token import Token, TokenError
    from vsc.wire.dongle import ChallengeTable

    rows = []
    try:
        with Token(ref, rw=True) as tok:
            tok.create_dongle_key()
            for _ in range(entries):
                challenge = os.urandom(16)
                rows.append((challenge, tok.respond(challenge)))
    except TokenError as e:
        raise CommandError(str(e)) from None
    return ChallengeTable(serial=serial, entries=tuple(rows))


def _issuer_record(issuer_dir: str | None, serial: str) -> Path | None:
    if not issuer_dir:
        return None
    d = Path(issuer_dir)
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    return d / f"{serial}.json"


def _check_entries(entries: int) -> None:
    """--entries: what a challenge table holds, checked before the token is opened (a DongleKey is made once)."""
    if not MIN_ENTRIES <= entries <= MAX_ENTRIES:
        raise CommandError(f"--entries {entries} must be from {MIN_ENTRIES} to {MAX_ENTRIES} (what a challenge "
                           "table holds)", EXIT_USAGE)


def _check_poll(poll: float) -> None:
    """--poll: what card.ini's dongle_poll accepts (vsc.card.config.POLL), before anything is read or written."""
    import math

    from vsc.card.config import POLL

    _kind, lo, hi, _off = POLL
    if not (math.isfinite(poll) and (poll == 0 or lo <= poll <= hi)):
        raise CommandError(f"--poll {poll:g} must be 0 (no periodic check) or from {lo:g} to {hi:g} seconds",
                           EXIT_USAGE)


def cmd_provision(args) -> int:
    from vsc.wire.dongle import encode_table

    _check_entries(args.entries)
    ref = _ref(args.token, args.token_pin_file)
    table = _new_table(ref, args.serial, args.entries)
    write_private(Path(args.table), encode_table(table))
    record = _issuer_record(args.issuer_dir, args.serial)
    if record is not None:
        write_private(record, json.dumps({"serial": args.serial, "token": ref.token_label,
                                           "table": base64.b64encode(encode_table(table)).decode()},
                                          indent=2).encode())
    emit(args, {"serial": args.serial, "token": ref.token_label, "entries": len(table.entries), "table": args.table},
         f"token {ref.token_label}: DongleKey generated on the token (non-extractable); "
         f"{len(table.entries)} challenges written to {args.table}")
    return 0


def cmd_enroll(args) -> int:
    from vsc import crypto
    from vsc.card import config as cc
    from vsc.card import ops
    from vsc.cli.card import SLOT_KEYS
    from vsc.cli.card import read_password
    from vsc.cli.enrol import _piv_secrets, _self_signed, check_scrypt, pin_policy
    from vsc.card.protected import PlainItem, seal_envelope
    from vsc.dongle.token import KDF_LABEL, PROTECTED_LABEL, Token, TokenError
    from vsc.wire.dongle import decode_table
    from vsc.wire.protected import ItemKind, KeyAlg

    _check_poll(args.poll)  # numbers first: before the token, the table or a password is read
    check_scrypt(args)
    home = Path(args.home) if args.home else cc.default_home()
    try:
        cc.check_home(home)  # before anything is written to the token or to HOME
    except cc.CardConfigError as e:
        raise CommandError(str(e)) from None
    if (home / cc.CARD_INI).exists() and not args.force:
        raise CommandError(f"{home} already holds a card; use another --home")
    table_bytes = Path(args.table).read_bytes()
    try:
        table = decode_table(table_bytes)
    except Exception as e:  # noqa: BLE001 - WireError
        raise CommandError(f"{args.table}: {e}") from None
    ref = _ref(args.token, args.token_pin_file)
    pin_policy(args)  # a bad --pin-policy stops here, before any prompt
    password = read_password(args.password_file, "New card password: ", confirm=True)
    piv_items, piv_note = _piv_secrets(args)
    kdf = ops.new_kdf(crypto.system_random, log2_n=args.scrypt_log2n)
    keys = ops.derive_keys(password, kdf)
    items = []
    # the same card as vsc card enroll makes: the four slot keys, each with a self-signed certificate (what
    # OpenSC's PIV driver finds keys by), the PIN, PUK, management key and PIN policy
    for slot, kind in SLOT_KEYS.items():
        der = crypto.generate_private_der(kind)
        alg = KeyAlg.RSA2048 if kind == "rsa2048" else KeyAlg.P256
        items.append(PlainItem(ItemKind.KEY, slot, der, alg, crypto.public_der_of(der)))
        items.append(PlainItem(ItemKind.CERT, slot, _self_signed(der, table.serial, slot)))
        del der
    items.extend(PlainItem(kind, name, value) for kind, name, value in piv_items)
    envelope = seal_envelope(table.serial, keys.protection_key, items, crypto.system_random)
    items.clear()
    from vsc.card.protected import rewrap
    from vsc.dongle.storage import bound_key, token_check

    try:
        if not token_check(ref, table, int.from_bytes(os.urandom(4), "big")):
            raise CommandError("this token does not match the challenge table (wrong token?)")
        # the token's copy needs the token to open; the issuer's record (for replace) needs the password only
        on_token = rewrap(table.serial, envelope, keys.protection_key, bound_key(ref, keys.protection_key, kdf),
                          crypto.system_random)
        with Token(ref, rw=True) as tok:
            tok.write(KDF_LABEL, kdf.encode())
            tok.write(PROTECTED_LABEL, on_token)
    except TokenError as e:
        raise CommandError(str(e)) from None
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:  # HOME is the new card's now (vsc card enroll does the same)
        cc.forget_previous_card(home)
    except cc.CardConfigError as e:
        raise CommandError(f"the card is enrolled on the token, but {e}") from None
    write_private(home / TABLE_NAME, table_bytes)
    # --keep-pin-in-uri: the PIN from --token-pin-file goes into card.ini's URI (never onto a command line)
    token_uri = f"{args.token};pin-value={quote(ref.pin, safe='')}" if args.keep_pin_in_uri else args.token
    # the table's name, resolved against HOME when the card starts (a relative --home must not make it cwd-relative)
    cc.save(home, mode="dongle", serial=table.serial, token=token_uri, table=TABLE_NAME,
            dongle_poll=str(args.poll))
    record = _issuer_record(args.issuer_dir, table.serial)
    if record is not None:
        data = json.loads(record.read_text()) if record.exists() else {"serial": table.serial}
        data.update(envelope=base64.b64encode(envelope).decode(), kdf=base64.b64encode(kdf.encode()).decode())
        write_private(record, json.dumps(data, indent=2).encode())
    emit(args, {"serial": table.serial, "home": str(home), "token": ref.token_label},
         f"card {table.serial} enrolled on the token {ref.token_label}; settings in {home / cc.CARD_INI}\n"
         f"keys: " + ", ".join(f"{s} {k}" for s, k in SLOT_KEYS.items()) + " (each with a self-signed certificate)\n"
         f"{piv_note}\n"
         f"insert it with: twistd -n vsc-card --home {home} --token-pin-file PINFILE")
    return 0


def cmd_replace(args) -> int:
    from vsc.dongle.token import KDF_LABEL, PROTECTED_LABEL, Token, TokenError
    from vsc.wire.dongle import encode_table

    _check_entries(args.entries)
    record = _issuer_record(args.issuer_dir, args.serial)
    if record is None or not record.exists():
        raise CommandError(f"no issuer record for {args.serial} in {args.issuer_dir}")
    data = json.loads(record.read_text())
    if "envelope" not in data:
        raise CommandError(f"the issuer record for {args.serial} holds no enrolled card")
    ref = _ref(args.token, args.token_pin_file)
    cfg = None
    if args.home:
        from vsc.card import config as cc

        try:
            cfg = cc.load(args.home)
        except cc.CardConfigError as e:
            raise CommandError(str(e)) from None
        if cfg.serial != args.serial:
            raise CommandError(f"{args.home} holds the card {cfg.serial!r}, not {args.serial!r}")
    table = _new_table(ref, args.serial, args.entries)
    try:
        with Token(ref, rw=True) as tok:
            tok.write(KDF_LABEL, base64.b64decode(data["kdf"]))
            tok.write(PROTECTED_LABEL, base64.b64decode(data["envelope"]))
    except TokenError as e:
        raise CommandError(str(e)) from None
    write_private(Path(args.table), encode_table(table))
    data.update(token=ref.token_label, table=base64.b64encode(encode_table(table)).decode())
    write_private(record, json.dumps(data, indent=2).encode())
    if cfg is not None:
        from vsc.card import config as cc

        write_private(cfg.home / TABLE_NAME, encode_table(table))
        values = dict(cfg.settings)
        values.update(token=args.token, table=TABLE_NAME)  # no pin-value= (refused on the command line)
        cc.save(cfg.home, **values)
        # the issuer's record is the card as enrolled: older than what this HOME has seen stored. Restoring
        # it here is the owner's deliberate choice, so the next insert accepts it once (vsc.card.freshness;
        # rental runs and PIN tries stay as they were last stored)
        from vsc.card.freshness import FreshnessStore

        FreshnessStore(cfg.home).accept_next_rollback()
    emit(args, {"serial": args.serial, "token": ref.token_label, "table": args.table},
         f"card {args.serial} restored onto the token {ref.token_label} from the issuer's records; "
         f"the old token's DongleKey no longer matches (new table {args.table})")
    return 0


def configure(d) -> None:
    dsub = d.add_subparsers(dest="dongle_command", required=True, metavar="ACTION")

    def token_opts(p):
        p.add_argument("--token", required=True,
                       help="pkcs11:token=LABEL;module-path=/path/to/lib.so (the PIN: --token-pin-file)")
        p.add_argument("--token-pin-file", help="read the token's user PIN from this file")
        p.add_argument("--json", action="store_true")

    p = dsub.add_parser("provision", help="issuer: DongleKey on the token and the Figure 14 challenge table")
    token_opts(p)
    p.add_argument("--serial", required=True)
    p.add_argument("--table", required=True, help="where to write the challenge table")
    p.add_argument("--entries", type=int, default=64)
    p.add_argument("--issuer-dir", help="keep the issuer's record of this card here (for replace)")
    p.set_defaults(func=cmd_provision)

    p = dsub.add_parser("enroll", help="owner: create the card's keys and store them on the token")
    token_opts(p)
    p.add_argument("--home", help="the card's home (default $VSC_HOME or ~/.config/vsc)")
    p.add_argument("--table", required=True, help="the challenge table from provision")
    p.add_argument("--password-file")
    p.add_argument("--scrypt-log2n", type=int, default=15)
    p.add_argument("--poll", type=float, default=60.0, help="repeat the token check every N seconds (default 60)")
    p.add_argument("--issuer-dir", help="update the issuer's record (the sealed card, for replace)")
    p.add_argument("--keep-pin-in-uri", action="store_true",
                   help="store the token PIN (from --token-pin-file) as pin-value= in card.ini (automation only)")
    p.add_argument("--force", action="store_true")
    from vsc.cli.enrol import add_pin_options

    add_pin_options(p)  # the card's PIV PIN/PUK and PIN policy, as vsc card enroll (not the token's PIN)
    p.set_defaults(func=cmd_enroll)

    p = dsub.add_parser("replace", help="issuer: a lost token → a new token from the issuer's records ([0107])")
    token_opts(p)
    p.add_argument("--serial", required=True)
    p.add_argument("--issuer-dir", required=True)
    p.add_argument("--table", required=True, help="where to write the new challenge table")
    p.add_argument("--entries", type=int, default=64)
    p.add_argument("--home", help="also point this card home at the new token and table")
    p.set_defaults(func=cmd_replace)

