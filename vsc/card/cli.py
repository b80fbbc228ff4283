"""
``vsc card --home HOME ACTION``: enroll, recover and destroy run on their
own; every other action talks to the running card daemon over its control
socket.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from vsc import cli as vcli
from vsc.cli import CommandError, emit

SLOT_KEYS = {"9a": "rsa2048", "9c": "p256", "9d": "rsa2048", "9e": "p256"}


def _home(args) -> Path:
    from vsc.card.config import default_home

    return Path(args.home) if args.home else default_home()


def _react(fn) -> None:
    from twisted.internet.task import react

    vcli._react(react, fn)


def _explain(e: Exception) -> str:
    from vsc.card.session import explain

    return explain(e)


# ---------------------------------------------------------------- enroll / recover / destroy


def cmd_enroll(args) -> int:
    from vsc import crypto
    from vsc.card import config as cc
    from vsc.card import ops
    from vsc.card.connect import connect
    from vsc.card.protected import PlainItem, seal_envelope
    from vsc.wire.protected import ItemKind, KeyAlg

    home = _home(args)
    if (home / cc.CARD_INI).exists() and not args.force:
        raise CommandError(f"{home} already holds a card ({home / cc.CARD_INI}); use another --home")
    channel = vcli._channel_config(args)
    password = cc.read_password(args.password_file, "New card password: ", confirm=True)
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
        proto = await connect(reactor, args.server, args.server_key, channel)
        try:
            reply["registration"] = (await ops.enrol(proto, args.serial, args.code, keys, kdf, envelope,
                                                     registration)).registration
        except ops.OperationRefused as e:
            raise CommandError(f"enrolment refused ({e.status.name}): check the serial and the one-time code")
        proto.closeChannel()
        result.update(serial=args.serial, server=args.server, slots=slots, kdf=kdf.alg.name.lower())

    try:
        _react(run)
    except CommandError as e:
        if "ChannelClosed" in str(e) or "connect" in str(e):
            raise
        raise
    values = dict(server=args.server, server_key=args.server_key, serial=args.serial,
                  kdf_floor="legacy" if args.legacy_kdf else f"scrypt:{args.scrypt_log2n}")
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
         f"insert it with: twistd -n vsc-card --home {home}")
    return 0


def _registration(serial: str, keys, publics: dict) -> bytes:
    """What the server needs to issue this card a keyfile: its slot 9e public key and its keyfile-seal key."""
    from vsc.protocol import implauth
    from vsc.wire.implauth import Registration

    return Registration(card_key=publics.get("9e", b""), seal_key=implauth.seal_public(keys.protection_key, serial)).encode()


def _enrol_material(args, home: Path, keys, publics: dict, registration: bytes) -> tuple[dict, str]:
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
                           kdf_floor=cfg.settings.get("kdf_floor", ""))


def _offline(args, op: str) -> int:
    from vsc import crypto
    from vsc.card import config as cc
    from vsc.card import ops
    from vsc.card.connect import connect
    from vsc.card.machine import MachineLock, MachineLockHeld, compute_muk
    from vsc.protocol.auth import load_master_key

    cfg = cc.load(_home(args))
    if cfg.settings.get("mode") == "dongle":
        raise CommandError(f"{op} is for cards on a VSC Server; a dongle card is idle whenever its daemon is not "
                           "running (see docs/dongle.md)")
    password = cc.read_password(args.password_file)
    master = load_master_key(os.environ.get("VSC_MASTER_KEY_FILE"))
    lock = MachineLock()
    if op == "recover":
        try:
            lock.acquire()  # [0059]-[0060]: no other copy may run here while recovering
        except MachineLockHeld as e:
            raise CommandError(f"recover refused: {e}")
    muk = compute_muk()
    creds = _credentials(args, cfg)

    async def run(reactor):
        proto = await connect(reactor, cfg.server, cfg.server_key, cfg.channel)
        try:
            if op == "recover":
                await ops.recover(proto, cfg.serial, password, muk, master, crypto.system_random, creds=creds)
            else:
                await ops.destroy(proto, cfg.serial, password, master, muk, crypto.system_random, creds=creds)
        except ops.OperationRefused as e:
            text = _explain(e)
            raise CommandError(text if text.startswith(f"{op} refused") else f"{op} refused: {text}")
        except ops.WeakKdfRefused as e:
            raise CommandError(f"{op} {e}")
        finally:
            proto.closeChannel()

    try:
        _react(run)
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


# ---------------------------------------------------------------- daemon commands


def _call(args, command, **kwargs):
    """One AMP call to the running daemon; returns the response dict."""
    from twisted.internet.endpoints import UNIXClientEndpoint
    from twisted.internet.protocol import Factory
    from twisted.protocols import amp

    from vsc.card.config import control_socket_for

    sock = control_socket_for(_home(args))
    if not sock.exists():
        raise CommandError(f"no card daemon is running for {_home(args)} (start it: twistd -n vsc-card --home {_home(args)})")
    out: dict = {}

    async def run(reactor):
        proto = await UNIXClientEndpoint(reactor, str(sock), timeout=10).connect(Factory.forProtocol(amp.AMP))
        try:
            out.update(await proto.callRemote(command, **kwargs))
        except Exception as e:  # noqa: BLE001
            from vsc.card.session import CardError

            if isinstance(e, CardError) or e.__class__.__name__ == "CardError":
                raise CommandError(str(e))
            raise CommandError(_explain(e))
        finally:
            proto.transport.loseConnection()

    _react(run)
    return out


def _read_in(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror}") from None


def _write_out(path: str, data: bytes) -> None:
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror}") from None


def cmd_status(args) -> int:
    from vsc.card import control

    status = json.loads(_call(args, control.Status)["json"])
    slots = ", ".join(f"{k} {v['algorithm']}" for k, v in sorted(status["slots"].items()))
    emit(args, status,
         f"card {status['serial']}: {status['state']} (version {status['version']}, suite {status['suite']})\n"
         f"slots: {slots or 'none'}\ncounters: {', '.join(status['counters']) or 'none'}\n"
         f"data objects: {', '.join(status['data']) or 'none'}\nmemory locked: {status['memory_locked']}")
    return 0


def cmd_public_key(args) -> int:
    from vsc.card import control

    pem = _call(args, control.PublicKey, slot=args.slot)["pem"]
    emit(args, {"slot": args.slot, "pem": pem.decode()}, pem.decode().rstrip())
    return 0


def cmd_sign(args) -> int:
    from vsc import crypto
    from vsc.card import control

    digest = crypto.sha256(_read_in(args.input))
    sig = _call(args, control.SignDigest, slot=args.slot, digest=digest)["signature"]
    _write_out(args.output, sig)
    emit(args, {"slot": args.slot, "signature_bytes": len(sig), "out": args.output},
         f"signed with slot {args.slot}: {len(sig)} bytes written to {args.output}")
    return 0


def cmd_decrypt(args) -> int:
    from vsc.card import control

    plain = _call(args, control.Decrypt, slot=args.slot, ciphertext=_read_in(args.input), padding=args.padding)["plaintext"]
    _write_out(args.output, plain)
    emit(args, {"slot": args.slot, "bytes": len(plain), "out": args.output},
         f"decrypted with slot {args.slot}: {len(plain)} bytes written to {args.output}")
    return 0


def cmd_counter(args) -> int:
    from vsc.card import control

    delta = (args.add or 0) - (args.sub or 0)
    value = _call(args, control.Counter, name=args.name, delta=delta)["value"]
    emit(args, {"name": args.name, "value": value}, f"{args.name} = {value}")
    return 0


def cmd_data(args) -> int:
    from vsc.card import control

    if args.data_action == "put":
        _call(args, control.DataPut, name=args.name, value=_read_in(args.input))
        emit(args, {"name": args.name, "stored": True}, f"data object {args.name} stored (synced to the server)")
    else:
        value = _call(args, control.DataGet, name=args.name)["value"]
        _write_out(args.output, value)
        emit(args, {"name": args.name, "bytes": len(value), "out": args.output},
             f"data object {args.name}: {len(value)} bytes written to {args.output}")
    return 0


def cmd_passwd(args) -> int:
    """Change the password of the card in use (through its daemon; neither password reaches the server)."""
    from vsc.card import config as cc
    from vsc.card import control

    old = cc.read_password(args.password_file, "Current card password: ")
    new = cc.read_password(args.new_password_file, "New card password: ", confirm=True)
    if old == new:
        raise CommandError("the new password is the same as the current one")
    version = _call(args, control.ChangePassword, old=old, new=new)["version"]
    emit(args, {"changed": True, "version": version},
         f"password changed (version {version}); the old password no longer opens the card")
    return 0


def cmd_remove(args) -> int:
    from vsc.card import control

    _call(args, control.Remove)
    emit(args, {"state": "idle"}, "card removed")
    return 0


# ---------------------------------------------------------------- ssh (vsc.card.sshagent)


def _public_keys(args, slots: list[str]) -> dict:
    """The PEM public key of each slot, over ONE control connection; a slot without a key is left out."""
    from twisted.internet.endpoints import UNIXClientEndpoint
    from twisted.internet.protocol import Factory
    from twisted.protocols import amp

    from vsc.card import control
    from vsc.card.config import control_socket_for
    from vsc.card.session import CardError

    sock = control_socket_for(_home(args))
    if not sock.exists():
        raise CommandError(f"no card daemon is running for {_home(args)} (start it: twistd -n vsc-card --home {_home(args)})")
    out: dict = {}
    errors: list[str] = []

    async def run(reactor):
        proto = await UNIXClientEndpoint(reactor, str(sock), timeout=10).connect(Factory.forProtocol(amp.AMP))
        try:
            for slot in slots:
                try:
                    out[slot] = (await proto.callRemote(control.PublicKey, slot=slot))["pem"]
                except CardError as e:
                    errors.append(str(e))
        finally:
            proto.transport.loseConnection()

    _react(run)
    if not out:
        raise CommandError(errors[0] if errors else "the card has no keys")
    return out


def cmd_ssh_pubkey(args) -> int:
    from vsc import crypto
    from vsc.card import config as cc
    from vsc.card.sshagent import key_comment, openssh_line

    try:
        cfg = cc.load(_home(args))
    except cc.CardConfigError as e:
        raise CommandError(str(e)) from None
    pems = _public_keys(args, [args.slot] if args.slot else sorted(SLOT_KEYS))
    keys = []
    for slot, pem in sorted(pems.items()):
        line = openssh_line(crypto.public_der_from_pem(pem), key_comment(cfg.serial, slot))
        keys.append({"slot": slot, "algorithm": line.split()[0], "line": line})
    emit(args, {"serial": cfg.serial, "keys": keys}, "\n".join(k["line"] for k in keys))
    return 0


def cmd_ssh_agent_env(args) -> int:
    import shlex

    from vsc.card.sshagent import agent_socket_for

    path = agent_socket_for(_home(args))
    if not path.exists():
        raise CommandError(f"no ssh-agent socket at {path}: is the card daemon for {_home(args)} running "
                           f"(it serves one unless started with --no-ssh-agent or --ssh-agent PATH)?")
    emit(args, {"SSH_AUTH_SOCK": str(path)}, f"SSH_AUTH_SOCK={shlex.quote(str(path))}; export SSH_AUTH_SOCK;")
    return 0


# ---------------------------------------------------------------- PIV: PIN, PUK, certificates (vsc.protocol.piv)


def _piv_secrets(args) -> tuple[list, str]:
    """
    The PIV PIN and PUK for enrolment (--pin-file / --puk-file, else the
    terminal; without a terminal the PIV defaults 123456 / 12345678, to be
    changed with yubico-piv-tool -a change-pin / change-puk), and the default
    management key. Returns (kind, name, value) items and a line for the user.
    """
    from vsc.card import config as cc
    from vsc.protocol import piv
    from vsc.wire import apdu
    from vsc.wire.protected import ItemKind

    def read(source, what, default):
        if not source and not sys.stdin.isatty():
            return default, True
        value = cc.read_password(source, f"New PIV {what} (6-8 characters): ", confirm=True).encode()
        if not 6 <= len(value) <= 8 or b"\xff" in value:
            raise CommandError(f"the PIV {what} must have 6 to 8 characters")
        return value, False

    pin, pin_default = read(args.pin_file, "PIN", piv.DEFAULT_PIN)
    puk, puk_default = read(args.puk_file, "PUK", piv.DEFAULT_PUK)
    tries = piv.DEFAULT_TRIES
    items = [
        (ItemKind.PIN, piv.PIN_ITEM[piv.PIN_REF], apdu.encode_secret(apdu.SecretRecord(apdu.pad_pin(pin), tries, tries))),
        (ItemKind.PIN, piv.PIN_ITEM[piv.PUK_REF], apdu.encode_secret(apdu.SecretRecord(apdu.pad_pin(puk), tries, tries))),
        (ItemKind.PIN, piv.MGMT_ITEM, apdu.encode_mgmt(piv.DEFAULT_MGMT)),
    ]
    defaults = [w for w, d in (("PIN 123456", pin_default), ("PUK 12345678", puk_default)) if d]
    note = "PIV: PIN and PUK set (3 tries each); management key: the PIV default (change it with yubico-piv-tool)"
    if defaults:
        note += f"; no terminal and no file, so the default {' and '.join(defaults)}: change them"
    return items, note


def _self_signed(private_der, serial: str, slot: str) -> bytes:
    """A self-signed certificate for a slot key, CN = "<serial> <slot>" (stored as a CERT item, not secret)."""
    import time  # clock-ok: enrolment (a command) stamps the certificate's validity

    from vsc import crypto

    now = time.time()  # clock-ok
    return crypto.self_signed_certificate(private_der, f"{serial} {slot}", now, crypto.system_random)


def _control_session(args, fn) -> None:
    """Run ``await fn(amp_protocol)`` on one control connection to the daemon (several calls, one reactor run)."""
    from twisted.internet.endpoints import UNIXClientEndpoint
    from twisted.internet.protocol import Factory
    from twisted.protocols import amp

    from vsc.card.config import control_socket_for

    sock = control_socket_for(_home(args))
    if not sock.exists():
        raise CommandError(f"no card daemon is running for {_home(args)} (start it: twistd -n vsc-card --home {_home(args)})")

    async def run(reactor):
        proto = await UNIXClientEndpoint(reactor, str(sock), timeout=10).connect(Factory.forProtocol(amp.AMP))
        try:
            await fn(proto)
        except CommandError:
            raise
        except Exception as e:  # noqa: BLE001
            if e.__class__.__name__ == "CardError":
                raise CommandError(str(e))
            raise CommandError(_explain(e))
        finally:
            proto.transport.loseConnection()

    _react(run)


def cmd_cert(args) -> int:
    """Import a slot's certificate, export it, or make a CSR signed by the slot's key (through the daemon)."""
    from vsc import crypto
    from vsc.card import control
    from vsc.wire import tlv

    if args.import_file:
        try:
            der = crypto.certificate_der(_read_in(args.import_file))
        except ValueError as e:
            raise CommandError(f"{args.import_file} is not a PEM or DER certificate: {e}")
        _call(args, control.CertPut, slot=args.slot, der=der)
        emit(args, {"slot": args.slot, "stored": True, "subject": crypto.certificate_subject(der)},
             f"certificate for slot {args.slot} stored (synced to the server): {crypto.certificate_subject(der)}")
        return 0
    if args.csr:
        if not args.subject or not args.output:
            raise CommandError("--csr needs --subject and --out")
        try:
            subject = crypto.name_der(args.subject)
        except ValueError as e:
            raise CommandError(f"--subject: {e}")
        made: dict = {}

        async def sign(proto):
            # one connection, one reactor run: the public key, then the signature over the request info
            spki = crypto.public_der_from_pem((await proto.callRemote(control.PublicKey, slot=args.slot))["pem"])
            made["info"] = info = tlv.csr_info(subject, spki)
            made["alg"] = tlv.ALG_SHA256_RSA if crypto.public_kind(spki).startswith("rsa") else tlv.ALG_ECDSA_SHA256
            made["sig"] = (await proto.callRemote(control.SignDigest, slot=args.slot,
                                                  digest=crypto.sha256(info)))["signature"]

        _control_session(args, sign)
        info, algorithm, signature = made["info"], made["alg"], made["sig"]
        try:
            pem = crypto.csr_pem(tlv.csr(info, algorithm, signature))
        except (crypto.CryptoError, ValueError) as e:
            raise CommandError(f"the card made a request that does not verify: {e}")
        _write_out(args.output, pem)
        emit(args, {"slot": args.slot, "subject": args.subject, "out": args.output},
             f"certification request for slot {args.slot} ({args.subject}) written to {args.output}")
        return 0
    der = _call(args, control.CertGet, slot=args.slot)["der"]
    if not der:
        raise CommandError(f"slot {args.slot} has no certificate")
    pem = crypto.certificate_pem(der)
    if args.output:
        _write_out(args.output, pem)
    emit(args, {"slot": args.slot, "subject": crypto.certificate_subject(der), "pem": pem.decode()},
         pem.decode().rstrip() if not args.output else f"certificate of slot {args.slot} written to {args.output}")
    return 0


# ---------------------------------------------------------------- parser


def extend(sub) -> None:
    card = sub.add_parser("card", help="use a Virtual Smart Card (enroll, status, sign, remove, ...)")
    card.add_argument("--home", help="the card's home (default $VSC_HOME or ~/.config/vsc)")
    csub = card.add_subparsers(dest="card_command", required=True, metavar="ACTION")

    def add(name, func, help_):
        p = csub.add_parser(name, help=help_)
        p.add_argument("--json", action="store_true", help="machine-readable output")
        p.set_defaults(func=func)
        return p

    p = add("enroll", cmd_enroll, "create the card's keys locally and enrol it with a server")
    p.add_argument("--server", required=True, help="server endpoint, e.g. tcp:127.0.0.1:7390")
    p.add_argument("--server-key", required=True, help="the server key fingerprint to pin (SHA256:...)")
    p.add_argument("--serial", required=True)
    p.add_argument("--code", required=True, help="the one-time enrolment code from 'vsc admin issue'")
    p.add_argument("--password-file", help="read the new password from this file or fd:N")
    p.add_argument("--legacy-kdf", action="store_true", help="the patent's MD5+SALT derivation (conformance only)")
    p.add_argument("--scrypt-log2n", type=int, default=15, help="scrypt cost, log2(N) (default 15)")
    p.add_argument("--force", action="store_true", help="overwrite the settings of a card already in HOME")
    p.add_argument("--pin-file", help="read the new PIV PIN (6-8 characters) from this file or fd:N (default: prompt)")
    p.add_argument("--puk-file", help="read the new PIV PUK (6-8 characters) from this file or fd:N (default: prompt)")
    vcli._add_channel_options(p)

    for name, func, help_ in (("recover", cmd_recover, "free a card lost in a crash (only on the same machine)"),
                              ("destroy", cmd_destroy, "destroy the card for good")):
        p = add(name, func, help_)
        p.add_argument("--password-file")
        p.add_argument("--totp", help="the current TOTP code, when the server requires one")
        p.add_argument("--totp-file", help="read the TOTP code from this file")
        if name == "destroy":
            p.add_argument("--yes", action="store_true", help="do not ask for confirmation")

    add("status", cmd_status, "state, serial, slots, counters")
    p = add("public-key", cmd_public_key, "print a slot's public key (PEM)")
    p.add_argument("--slot", required=True, choices=sorted(SLOT_KEYS))
    p = add("sign", cmd_sign, "sign a file (SHA-256), as openssl dgst -sha256 -sign")
    p.add_argument("--slot", required=True, choices=sorted(SLOT_KEYS))
    p.add_argument("--in", dest="input", required=True)
    p.add_argument("--out", dest="output", required=True)
    p = add("decrypt", cmd_decrypt, "decrypt a file with a slot's RSA key")
    p.add_argument("--slot", required=True, choices=sorted(SLOT_KEYS))
    p.add_argument("--in", dest="input", required=True)
    p.add_argument("--out", dest="output", required=True)
    p.add_argument("--padding", choices=("pkcs1", "oaep"), default="pkcs1",
                   help="pkcs1 (openssl pkeyutl -encrypt default) or oaep (SHA-256)")
    p = add("counter", cmd_counter, "read or step a counter (synced before it is acknowledged)")
    p.add_argument("name")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--add", type=int)
    g.add_argument("--sub", type=int)
    p = add("data", cmd_data, "store or read a confidential data object")
    dsub = p.add_subparsers(dest="data_action", required=True)
    dp = dsub.add_parser("put")
    dp.add_argument("name")
    dp.add_argument("--in", dest="input", required=True)
    dp.add_argument("--json", action="store_true")
    dg = dsub.add_parser("get")
    dg.add_argument("name")
    dg.add_argument("--out", dest="output", required=True)
    dg.add_argument("--json", action="store_true")
    add("remove", cmd_remove, "remove the card: upload, set idle, stop the daemon")
    p = add("passwd", cmd_passwd, "change the password of the card in use (the daemon re-wraps its data key)")
    p.add_argument("--password-file", help="read the current password from this file or fd:N")
    p.add_argument("--new-password-file", help="read the new password from this file or fd:N")
    p = add("cert", cmd_cert, "a slot's X.509 certificate: print it, --import one, or make a --csr signed by the card")
    p.add_argument("--slot", required=True, choices=sorted(SLOT_KEYS))
    g = p.add_mutually_exclusive_group()
    g.add_argument("--import", dest="import_file", metavar="FILE", help="store this certificate (PEM or DER) for the slot")
    g.add_argument("--csr", action="store_true", help="write a PKCS#10 request signed by the slot's key")
    p.add_argument("--subject", help="the CSR subject, e.g. /CN=alice/O=Example")
    p.add_argument("--out", dest="output", help="write the CSR (or the certificate) here")
    p = add("ssh-pubkey", cmd_ssh_pubkey, "print the card's keys as authorized_keys lines (ssh-rsa, ecdsa-sha2-nistp256)")
    p.add_argument("--slot", choices=sorted(SLOT_KEYS), help="only this slot (default: every slot)")
    add("ssh-agent-env", cmd_ssh_agent_env, "print SSH_AUTH_SOCK=... for the card's ssh-agent (eval \"$(vsc card ssh-agent-env)\")")


vcli._PARSER_EXTENSIONS["top"].append(extend)
