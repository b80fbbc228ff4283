"""
The ``vsc card`` actions that open a protected channel to the VSC Server
(on the reactor): ``enroll`` (the card's keys made here, sealed under the
password, registered with a one-time code), ``recover`` and ``destroy``
(Figure 4, by the owner, without the daemon). The PIV PIN/PUK and the
self-signed slot certificates an enrolment stores are made here too.
"""

from __future__ import annotations

import os
import sys

from vsc.cli import CommandError, emit, run_async
from vsc.cli.card import SLOT_KEYS, card_config, explain, home_dir, read_password


#: channels an enrolment tries when the connection is lost before the answer (the request is the same each time)
ENROL_ATTEMPTS = 3


def cmd_enroll(args) -> int:
    from pathlib import Path

    from vsc import crypto
    from vsc.card import config as cc
    from vsc.card import ops
    from vsc.card.connect import connect
    from vsc.card.protected import PlainItem, seal_envelope
    from vsc.cli.ping import channel_config, check_server
    from vsc.wire.protected import ItemKind, KeyAlg

    from vsc.protocol import serials

    try:
        args.serial = serials.check(args.serial)
    except serials.SerialError as e:
        raise CommandError(str(e), 2) from None
    home = Path(home_dir(args))
    try:
        cc.check_home(home)  # before the one-time code is spent on the server
    except cc.CardConfigError as e:
        raise CommandError(str(e)) from None
    try:
        applications = cc.parse_applications(args.applications)
    except cc.CardConfigError as e:
        raise CommandError(str(e), 2) from None
    if (home / cc.CARD_INI).exists() and not args.force:
        raise CommandError(f"{home} already holds a card ({home / cc.CARD_INI}); use another --home")
    channel = channel_config(args)
    check_server(args)
    check_scrypt(args)
    pin_policy(args)  # a bad --pin-policy stops here, before any prompt
    code = enrolment_code(args)  # first: a code that cannot be read stops before the password is typed twice
    password = read_password(args.password_file, "New card password: ", confirm=True)
    piv_items, piv_note = _piv_secrets(args)
    rand = crypto.system_random
    kdf = ops.new_kdf(rand, legacy=args.legacy_kdf, log2_n=args.scrypt_log2n)
    keys = ops.derive_keys(password, kdf)
    items = []
    slots = {}
    publics = {}
    for slot, kind in SLOT_KEYS.items():
        der = crypto.generate_private_der(kind)
        public = crypto.public_der_of(der)
        publics[slot] = public
        alg = KeyAlg.RSA2048 if kind == "rsa2048" else KeyAlg.P256
        items.append(PlainItem(ItemKind.KEY, slot, der, alg, public))
        items.append(PlainItem(ItemKind.CERT, slot, _self_signed(der, args.serial, slot)))
        slots[slot] = kind
        del der
    items.extend(PlainItem(kind, name, value) for kind, name, value in piv_items)
    envelope = seal_envelope(args.serial, keys.protection_key, items, rand)
    items.clear()
    result: dict = {}
    registration = _registration(args.serial, keys, publics)
    reply: dict = {}

    async def run(reactor):
        from vsc.net.channel import ChannelClosedError

        # a connection lost before the answer came may have lost only the answer: the server answers the
        # identical request again ("same enrolment retried"), so send it again on a new channel
        for attempt in range(ENROL_ATTEMPTS):
            proto = await connect(reactor, args.server, args.server_key, channel)
            try:
                reply["registration"] = (await ops.enrol(proto, args.serial, code, keys, kdf, envelope,
                                                         registration)).registration
                break
            except ops.OperationRefused as e:
                raise CommandError(f"enrolment refused ({e.status.name}): check the serial and the one-time code")
            except ChannelClosedError:
                if attempt + 1 == ENROL_ATTEMPTS:
                    raise
            finally:
                proto.closeChannel()
        result.update(serial=args.serial, server=args.server, slots=slots, kdf=kdf.alg.name.lower(),
                      applications=list(applications))

    run_async(run)
    try:  # HOME is the new card's now: nothing of the card before it may be offered or applied for it
        cc.forget_previous_card(home)
    except cc.CardConfigError as e:
        raise CommandError(f"the card is enrolled, but {e}") from None
    values = dict(server=args.server, server_key=args.server_key, serial=args.serial,
                  kdf_floor="legacy" if args.legacy_kdf else f"scrypt:{args.scrypt_log2n}",
                  applications=",".join(applications))
    if not args.legacy_kdf:
        values["kdf_salt"] = kdf.salt.hex()  # every challenge must name it (vsc.card.ops.check_kdf)
    if args.suites:
        values["suites"] = args.suites
    if args.forward_secrecy:
        values["forward_secrecy"] = args.forward_secrecy
    if args.allow_insecure:
        values["allow_insecure"] = "true"
    implauth_info, implauth_text = _enrol_material(args, home, keys, publics, reply.get("registration", b""))
    if implauth_info.get("totp"):
        values["totp"] = "true"
    cc.save(home, **values)
    result.update(implauth_info)
    emit(args, dict(result, home=str(home)),
         implauth_text +
         f"card {args.serial} enrolled at {args.server}; settings in {home / cc.CARD_INI}\n"
         f"keys: " + ", ".join(f"{s} {k}" for s, k in slots.items()) + " (each with a self-signed certificate)\n"
         f"{piv_note}\n"
         f"applications: {', '.join(applications)}\n"
         f"insert it with: twistd -n vsc-card --home {home}")
    return 0


def enrolment_code(args) -> str:
    """
    The one-time code: ``--code-file`` (a file or fd:N), else the terminal; ``--code`` (scripts) puts it in
    argv, where every local user can read it while the enrolment runs.
    """
    from vsc.cli.card import _have_terminal

    if args.code:
        return args.code
    if args.code_file:
        from vsc.card.config import CardConfigError, read_secret_line

        try:
            code = read_secret_line(args.code_file, "the enrolment code file").strip()
        except CardConfigError as e:
            raise CommandError(str(e)) from None
        if not code:
            raise CommandError(f"the enrolment code file {args.code_file} holds no enrolment code")
        return code
    if not _have_terminal():
        raise CommandError("no enrolment code given (use --code-file FILE for automation)")
    import getpass

    try:
        code = getpass.getpass("One-time enrolment code: ").strip()
    except (EOFError, KeyboardInterrupt):
        code = ""
    if not code:
        raise CommandError("no enrolment code given")
    return code


def _registration(serial: str, keys, publics: dict) -> bytes:
    """What the server needs to issue this card a keyfile: its slot 9e public key and its keyfile-seal key."""
    from vsc.protocol import implauth
    from vsc.wire.implauth import Registration

    return Registration(card_key=publics.get("9e", b""), seal_key=implauth.seal_public(keys.protection_key, serial)).encode()


def _enrol_material(args, home, keys, publics: dict, registration: bytes) -> tuple[dict, str]:
    """
    Keep what the server issued for implementation authentication: the keyfile
    (checked: signed by the pinned server key, for this serial and this card's
    9e key, and it opens with this password), saved in HOME; and the TOTP seed,
    shown ONCE (it is not stored on this machine: it belongs on the device).
    """
    from vsc.card import config as cc
    from vsc.protocol import implauth
    from vsc.wire import WireError
    from vsc.wire.implauth import EnrolReply

    if not registration:
        return {}, ""
    try:
        reply = EnrolReply.decode(registration)
    except WireError as e:
        raise CommandError(f"the card is enrolled, but the server's enrolment reply is malformed: {e}") from None
    info: dict = {}
    text = ""
    if reply.keyfile:
        try:
            body = implauth.open_keyfile(reply.keyfile, args.serial, keys.protection_key, args.server_key)
        except implauth.KeyfileError as e:
            raise CommandError(f"the card is enrolled, but the server's keyfile is not usable: {e}") from None
        if body.card_key != publics.get("9e"):
            raise CommandError("the card is enrolled, but the server's keyfile names another card key")
        path = cc.save_keyfile(home, reply.keyfile)
        info["keyfile"] = str(path)
        text += f"keyfile (keyfile authentication) saved in {path}\n"
    if reply.totp_secret:
        secret = implauth.base32(reply.totp_secret)
        uri = implauth.otpauth_uri(reply.totp_secret, args.serial, digits=reply.totp_digits, period=reply.totp_period)
        info["totp"] = {"secret": secret, "uri": uri, "digits": reply.totp_digits, "period": reply.totp_period}
        text += (f"TOTP (reader-less device): add this secret to your authenticator app NOW; it is shown only once\n"
                 f"  secret: {secret}\n  uri: {uri}\n"
                 f"  every insert, recover and destroy then asks for the current code (--totp / --totp-file)\n")
    return info, text


def _credentials(args, cfg):
    """Keyfile, pinned key and TOTP source for recover/destroy."""
    from vsc.card import config as cc
    from vsc.card import ops

    totp = cc.totp_source(getattr(args, "totp", None), getattr(args, "totp_file", None),
                          cfg.settings.get("totp", "").lower() == "true")
    return ops.Credentials(keyfiles=cc.load_keyfiles(cfg.home), server_key=cfg.server_key, totp=totp,
                           kdf_floor=cfg.settings.get("kdf_floor", ""), kdf_salt=cc.kdf_salt(cfg.settings))


def _offline(args, op: str) -> int:
    from vsc import crypto
    from vsc.card import ops
    from vsc.card.connect import connect
    from vsc.card.machine import MachineKeyError, MachineLock, MachineLockHeld, machine_muk
    from vsc.protocol.auth import load_master_key

    cfg = card_config(args)
    if cfg.settings.get("mode") == "dongle":
        raise CommandError(f"{op} is for cards on a VSC Server; a dongle card is idle whenever its daemon is not "
                           "running (see docs/dongle.md)")
    password = read_password(args.password_file)
    master = load_master_key(os.environ.get("VSC_MASTER_KEY_FILE"))
    lock = MachineLock()
    if op == "recover":
        try:
            lock.acquire()  # [0059]-[0060]: no other copy may run here while recovering
        except MachineLockHeld as e:
            raise CommandError(f"recover refused: {e}")
    try:
        muk = machine_muk(cfg.home)  # what this machine's insert sent: recover needs the same
    except MachineKeyError as e:
        lock.release()
        raise CommandError(f"{op} refused: {e}") from None
    creds = _credentials(args, cfg)

    async def run(reactor):
        proto = await connect(reactor, cfg.server, cfg.server_key, cfg.channel)
        try:
            if op == "recover":
                await ops.recover(proto, cfg.serial, password, muk, master, crypto.system_random, creds=creds)
            else:
                await ops.destroy(proto, cfg.serial, password, master, muk, crypto.system_random, creds=creds)
        except ops.OperationRefused as e:
            text = explain(e)
            raise CommandError(text if text.startswith(f"{op} refused") else f"{op} refused: {text}")
        except ops.WeakKdfRefused as e:
            raise CommandError(f"{op} {e}")
        finally:
            proto.closeChannel()

    try:
        run_async(run)
    finally:
        lock.release()
    state = "idle" if op == "recover" else "destroyed"
    emit(args, {"serial": cfg.serial, "state": state}, f"card {cfg.serial} is now {state}")
    return 0


def cmd_recover(args) -> int:
    return _offline(args, "recover")


def cmd_destroy(args) -> int:
    if not args.yes and sys.stdin.isatty():
        answer = input("Destroying a card is final: every later operation on it is refused. Type 'destroy': ")
        if answer.strip() != "destroy":
            raise CommandError("not destroyed")
    return _offline(args, "destroy")


def _piv_secrets(args) -> tuple[list, str]:
    """
    The PIV PIN and PUK for enrolment (--pin-file / --puk-file, else the
    terminal; without a terminal the PIV defaults 123456 / 12345678, to be
    changed with yubico-piv-tool -a change-pin / change-puk), and the default
    management key. Returns (kind, name, value) items and a line for the user.
    """
    from vsc.protocol import piv
    from vsc.wire import apdu, pinpolicy
    from vsc.wire.protected import ItemKind

    def read(source, what, default):
        if not source and not sys.stdin.isatty():
            return default, True
        value = read_password(source, f"New PIV {what} (6-8 characters): ", confirm=True).encode()
        if not 6 <= len(value) <= 8 or b"\xff" in value:
            raise CommandError(f"the PIV {what} must have 6 to 8 characters")
        return value, False

    policy = pin_policy(args)
    pin, pin_default = read(args.pin_file, "PIN", piv.DEFAULT_PIN)
    puk, puk_default = read(args.puk_file, "PUK", piv.DEFAULT_PUK)
    tries = piv.DEFAULT_TRIES
    items = [
        (ItemKind.PIN, piv.PIN_ITEM[piv.PIN_REF], apdu.encode_secret(apdu.SecretRecord(apdu.pad_pin(pin), tries, tries))),
        (ItemKind.PIN, piv.PIN_ITEM[piv.PUK_REF], apdu.encode_secret(apdu.SecretRecord(apdu.pad_pin(puk), tries, tries))),
        (ItemKind.PIN, piv.MGMT_ITEM, apdu.encode_mgmt(piv.DEFAULT_MGMT)),
        (ItemKind.PIN, pinpolicy.POLICY_ITEM, pinpolicy.encode_policy(policy)),
    ]
    defaults = [w for w, d in (("PIN 123456", pin_default), ("PUK 12345678", puk_default)) if d]
    note = (f"PIV: PIN and PUK set (3 tries each); PIN policy {policy.text()}, local paths: "
            f"{'the insert counts as one PIN verification' if policy.local.name == 'INSERT' else 'vsc card verify-pin'}"
            "; management key: the PIV default (change it with yubico-piv-tool)")
    if defaults:
        note += f"; no terminal and no file, so the default {' and '.join(defaults)}: change them"
    return items, note


def check_scrypt(args) -> None:
    """``--scrypt-log2n``: one this card can derive (scrypt_refusal, r = 8, p = 1), or a usage line before any read."""
    from vsc import crypto

    if getattr(args, "legacy_kdf", False):
        return
    why = crypto.scrypt_refusal(args.scrypt_log2n, 8, 1)
    if why is not None:
        usable = [n for n in range(10, 23) if crypto.scrypt_refusal(n, 8, 1) is None]
        raise CommandError(f"--scrypt-log2n {args.scrypt_log2n}: {why}; use {usable[0]} to {usable[-1]}", 2)


def pin_policy(args):
    """The PIN policy of --pin-policy / --local-pin over YubiKey's defaults (vsc.wire.pinpolicy)."""
    from vsc.wire import pinpolicy

    try:
        return pinpolicy.parse_text(getattr(args, "pin_policy", None) or "", pinpolicy.DEFAULT,
                                    getattr(args, "local_pin", None))
    except ValueError as e:
        raise CommandError(str(e), 2) from None


def add_pin_options(p) -> None:
    """--pin-file, --puk-file, --pin-policy, --local-pin (vsc card enroll and vsc dongle enroll)."""
    p.add_argument("--pin-file", help="read the new PIV PIN (6-8 characters) from this file or fd:N (default: prompt)")
    p.add_argument("--puk-file", help="read the new PIV PUK (6-8 characters) from this file or fd:N (default: prompt)")
    p.add_argument("--pin-policy", metavar="SLOT=POLICY,...",
                   help="when each slot's key needs the PIN: never, once or always (default, as a YubiKey: "
                        "9a=once,9c=always,9d=once,9e=never, 82-95 once); on every path")
    p.add_argument("--local-pin", choices=("insert", "pin"), default=None,
                   help="how the local paths (vsc card, the local API, the ssh-agent) verify the PIN: insert (the "
                        "insert password counts as one verification; the default) or pin (vsc card verify-pin)")


def _self_signed(private_der, serial: str, slot: str) -> bytes:
    """A self-signed certificate for a slot key, CN = "<serial> <slot>" (stored as a CERT item, not secret)."""
    import time  # clock-ok: enrolment (a command) stamps the certificate's validity

    from vsc import crypto

    now = time.time()  # clock-ok
    return crypto.self_signed_certificate(private_der, f"{serial} {slot}", now, crypto.system_random)


# ---------------------------------------------------------------- parser


def cmd_accept_rollback(args) -> int:
    """
    The owner's deliberate choice after a real disaster (a server restored
    from a backup, a token replaced from the issuer's record): the next
    insert may load a copy older than this machine has seen stored. Rental
    runs and PIN tries are kept as last stored (vsc.card.freshness).
    """
    from pathlib import Path

    from vsc.card.freshness import FreshnessStore

    home = Path(home_dir(args))
    if not (home / "card.ini").exists():
        raise CommandError(f"no card is enrolled in {home}")
    FreshnessStore(home).accept_next_rollback()
    emit(args, {"home": str(home), "accept_rollback": True},
         "the next insert will accept an older copy of this card, once; rental runs and PIN tries stay as "
         "they were last stored")
    return 0


def add_actions(add) -> None:
    """Add enroll, recover and destroy to ``vsc card``; ``add(name, func, help)`` makes an action's parser."""
    from vsc.cli.ping import add_channel_options

    p = add("enroll", cmd_enroll, "create the card's keys locally and enrol it with a server")
    p.add_argument("--server", required=True, help="server endpoint, e.g. tcp:127.0.0.1:7390")
    p.add_argument("--server-key", required=True, help="the server key fingerprint to pin (SHA256:...)")
    p.add_argument("--serial", required=True)
    code = p.add_mutually_exclusive_group()
    code.add_argument("--code-file", help="read the one-time enrolment code from 'vsc admin issue' from this file or "
                                          "fd:N (default: prompt)")
    code.add_argument("--code", help="the one-time enrolment code itself (visible to other local users while the "
                                     "enrolment runs: prefer --code-file)")
    p.add_argument("--applications", default="piv,openpgp",
                   help="the card applications the card carries on PC/SC: piv, openpgp or both (default piv,openpgp)")
    p.add_argument("--password-file", help="read the new password from this file or fd:N")
    p.add_argument("--legacy-kdf", action="store_true", help="the patent's MD5+SALT derivation (conformance only)")
    p.add_argument("--scrypt-log2n", type=int, default=15, help="scrypt cost, log2(N) (default 15)")
    p.add_argument("--force", action="store_true", help="overwrite the settings of a card already in HOME")
    add_pin_options(p)
    add_channel_options(p)

    for name, func, help_ in (("recover", cmd_recover, "free a card lost in a crash (only on the same machine)"),
                              ("destroy", cmd_destroy, "destroy the card for good")):
        p = add(name, func, help_)
        p.add_argument("--password-file")
        p.add_argument("--totp", help="the current TOTP code, when the server requires one")
        p.add_argument("--totp-file", help="read the TOTP code from this file")
        if name == "destroy":
            p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    add("accept-rollback", cmd_accept_rollback,
        "let the next insert load an older copy of the card (after a restored backup or a replaced token), once")
