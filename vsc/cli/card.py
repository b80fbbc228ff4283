"""
``vsc card --home HOME ACTION``. Enroll, recover and destroy open a channel
to the server (vsc.cli.enrol); every other action is one or two requests
to the running card daemon through the control client (vsc.card.client),
without a reactor. This module imports nothing heavy at the top: ``vsc card
status`` and ``vsc card sign`` cost little more than starting Python
(bench/startup.py).
"""

from __future__ import annotations

import os
import stat

from vsc.card import paths
from vsc.cli import CommandError, emit
from vsc.cli.argspec import Namespace, Option, add_options, parse_plain
from vsc.wire import control
from vsc.wire.slots import SLOT_REFS, slot_order

SLOT_KEYS = {"9a": "rsa2048", "9c": "p256", "9d": "rsa2048", "9e": "p256"}


def home_dir(args) -> str:
    return paths.home_of(args.home)


def explain(e: Exception) -> str:
    from vsc.card.session import explain

    return explain(e)


def card_config(args):
    """The card's settings (card.ini); CommandError when they are missing or invalid."""
    from vsc.card import config as cc

    try:
        return cc.load(home_dir(args))
    except cc.CardConfigError as e:
        raise CommandError(str(e)) from None


def read_password(source: str | None, prompt: str = "Card password: ", confirm: bool = False) -> str:
    """
    A password from ``source`` (a file or fd:N), else from the terminal; with
    neither, one line saying what to do (rather than getpass's warnings and
    an echoing read from stdin).
    """
    from vsc.card import config as cc

    if not source and not _have_terminal():
        raise CommandError("no password given (use --password-file for automation)")
    try:
        return cc.read_password(source, prompt, confirm)
    except cc.CardConfigError as e:
        raise CommandError(str(e)) from None


def _have_terminal() -> bool:
    """vsc.card.config.have_terminal, imported when needed (the CLI's start imports little)."""
    from vsc.card.config import have_terminal

    return have_terminal()


# ---------------------------------------------------------------- daemon commands


class _daemon:
    """``with _daemon(args) as card``: one control connection to the daemon of HOME; failures as CommandErrors."""

    def __init__(self, args):
        from vsc.card import client

        self.client = client
        self.home = home_dir(args)
        self.card = client.ControlClient(self.home)

    def __enter__(self):
        try:
            self.card.connect()
        except self.client.ControlError as e:
            raise self._error(e) from None
        return self.card

    def __exit__(self, kind, e, tb) -> None:
        self.card.close()
        if isinstance(e, self.client.ControlError):
            raise self._error(e) from None

    def _error(self, e) -> CommandError:
        if isinstance(e, self.client.NotRunning):
            why = "the card daemon does not answer (it stopped?)" if e.stale else "no card daemon is running"
            return CommandError(f"{why} for {self.home} (start it: twistd -n vsc-card --home {self.home})")
        return CommandError(str(e))


def _call(args, command: control.Command, **kwargs) -> dict:
    """One request to the running daemon; returns the response fields."""
    with _daemon(args) as card:
        return card.call(command, **kwargs)


def _read_pin(source: str | None, what: str = "PIN", confirm: bool = False) -> bytes:
    """A PIN or PUK from a file (or fd:N), else from the terminal."""
    if not source and not _have_terminal():
        raise CommandError(f"no {what} given (no terminal: give it in a file, e.g. --pin-file FILE)")
    value = read_password(source, f"{'New card ' if confirm else 'Card '}{what}: ", confirm=confirm).encode("utf-8")
    if not value:
        raise CommandError(f"no {what} given")
    return value


def _key_call(args, command: control.Command, **kwargs) -> dict:
    """
    A private-key request; with ``--pin-file`` the PIN is verified for this
    one request first, on the same connection (what a slot of PIN policy
    "always" needs; vsc.card.pin).
    """
    pin = _read_pin(args.pin_file) if getattr(args, "pin_file", None) else None
    with _daemon(args) as card:
        if pin is not None:
            card.call(control.VERIFY_PIN, pin=pin, keep=False)
        return card.call(command, **kwargs)


def _read_in(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CommandError(f"cannot read {path}: {e.strerror}") from None


def _write_out(path: str, data: bytes) -> None:
    """
    Write ``data`` (a decrypted plaintext, a data object) to ``path``, a
    file of mode 0600: the mode os.open gives applies to a new file only, so
    an existing regular file is made 0600 (or refused: another user's) before
    it is emptied and written. A pipe or terminal (/dev/stdout) is left as it is.
    """
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "wb") as f:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.fchmod(fd, 0o600)
                os.ftruncate(fd, 0)
            f.write(data)
    except OSError as e:
        raise CommandError(f"cannot write {path}: {e.strerror}") from None


def cmd_status(args) -> int:
    status = control.status_of(_call(args, control.STATUS))
    held = sorted(status["slots"].items(), key=lambda kv: slot_order(kv[0]))  # 9a.. 9e, then the retired 82..95
    slots = ", ".join(f"{k} {v['algorithm']}" for k, v in held)
    pin = ""
    if status.get("pin_policy"):
        tries = status["pin_tries"]
        state = "BLOCKED (unblock it with the PUK: vsc card unblock-pin)" if tries == 0 else f"{tries} tries left"
        local = ("the insert counts as verified" if status["pin_local"] == "insert"
                 else "verified" if status["pin_verified"] else "not verified (vsc card verify-pin)")
        pin = f"\nPIN: {state}; policy {status['pin_policy']}; local paths: {local}"
        if status.get("pin_refusal"):
            pin += f"\nlast PIN refusal: {status['pin_refusal']}"
    emit(args, status,
         f"card {status['serial']}: {status['state']} (version {status['version']}, suite {status['suite']})\n"
         f"applications: {', '.join(status.get('applications') or []) or 'none'}\n"
         f"slots: {slots or 'none'}\ncounters: {', '.join(status['counters']) or 'none'}\n"
         f"data objects: {', '.join(status['data']) or 'none'}\nmemory locked: {status['memory_locked']}{pin}")
    return 0


def cmd_verify_pin(args) -> int:
    """Open the local PIN verification (until remove), or close it (--forget)."""
    if args.forget:
        _call(args, control.FORGET_PIN)
        emit(args, {"verified": False}, "local PIN verification closed")
        return 0
    _call(args, control.VERIFY_PIN, pin=_read_pin(args.pin_file), keep=True)
    emit(args, {"verified": True},
         "PIN verified: slots of PIN policy once are open to the local API, vsc card and the ssh-agent until the "
         "card is removed (slots of policy always still need --pin-file with each use)")
    return 0


def cmd_change_pin(args) -> int:
    what = "PUK" if args.puk else "PIN"
    old = _read_pin(args.old_file, f"current {what}")
    new = _read_pin(args.new_file, what, confirm=True)
    _call(args, control.CHANGE_PIN, which=what.lower(), old=old, new=new)
    emit(args, {"changed": what.lower()}, f"{what} changed (synced before this answer)")
    return 0


def cmd_unblock_pin(args) -> int:
    puk = _read_pin(args.puk_file, "PUK")
    new = _read_pin(args.new_file, "PIN", confirm=True)
    _call(args, control.UNBLOCK_PIN, puk=puk, new=new)
    emit(args, {"unblocked": True}, "PIN set and unblocked (3 tries)")
    return 0


def cmd_public_key(args) -> int:
    pem = _call(args, control.PUBLIC_KEY, slot=args.slot)["pem"]
    emit(args, {"slot": args.slot, "pem": pem.decode()}, pem.decode().rstrip())
    return 0


def cmd_sign(args) -> int:
    from vsc import crypto

    data = _read_in(args.input)
    # SHA-256 by default, for every key type (a P-384 key too: ECDSA with SHA-256, what openssl dgst -sha256 -sign
    # gives); --sha384 sends a SHA-384 digest, which the card signs as SHA-384 (RSA PKCS#1 v1.5 or ECDSA)
    digest = crypto.sha384(data) if getattr(args, "sha384", False) else crypto.sha256_light(data)
    sig = _key_call(args, control.SIGN_DIGEST, slot=args.slot, digest=digest)["signature"]
    _write_out(args.output, sig)
    emit(args, {"slot": args.slot, "signature_bytes": len(sig), "out": args.output},
         f"signed with slot {args.slot}: {len(sig)} bytes written to {args.output}")
    return 0


def cmd_decrypt(args) -> int:
    plain = _key_call(args, control.DECRYPT, slot=args.slot, ciphertext=_read_in(args.input),
                      padding=args.padding)["plaintext"]
    _write_out(args.output, plain)
    emit(args, {"slot": args.slot, "bytes": len(plain), "out": args.output},
         f"decrypted with slot {args.slot}: {len(plain)} bytes written to {args.output}")
    return 0


def cmd_counter(args) -> int:
    delta = (args.add or 0) - (args.sub or 0)
    value = _call(args, control.COUNTER, name=args.name, delta=delta)["value"]
    emit(args, {"name": args.name, "value": value}, f"{args.name} = {value}")
    return 0


def cmd_data(args) -> int:
    if args.data_action == "put":
        _call(args, control.DATA_PUT, name=args.name, value=_read_in(args.input))
        emit(args, {"name": args.name, "stored": True}, f"data object {args.name} stored (synced to the server)")
    else:
        value = _call(args, control.DATA_GET, name=args.name)["value"]
        _write_out(args.output, value)
        emit(args, {"name": args.name, "bytes": len(value), "out": args.output},
             f"data object {args.name}: {len(value)} bytes written to {args.output}")
    return 0


def cmd_passwd(args) -> int:
    """Change the password of the card in use (through its daemon; neither password reaches the server)."""
    old = read_password(args.password_file, "Current card password: ")
    new = read_password(args.new_password_file, "New card password: ", confirm=True)
    if old == new:
        raise CommandError("the new password is the same as the current one")
    version = _call(args, control.CHANGE_PASSWORD, old=old, new=new)["version"]
    emit(args, {"changed": True, "version": version},
         f"password changed (version {version}); the old password no longer opens the card")
    return 0


def cmd_remove(args) -> int:
    _call(args, control.REMOVE)
    emit(args, {"state": "idle"}, "card removed")
    return 0


# ---------------------------------------------------------------- ssh (vsc.card.sshagent)


def _public_keys(args, slots: list[str] | None) -> dict:
    """
    The PEM public key of each slot (None: every key slot that holds a key, as the card's status lists them),
    over ONE control connection; a slot without a key is left out.
    """
    from vsc.card import client

    out: dict = {}
    errors: list[str] = []
    with _daemon(args) as card:
        if slots is None:
            held = control.status_of(card.call(control.STATUS))["slots"]
            slots = [s for s in SLOTS if s in held]
        for slot in slots:
            try:
                out[slot] = card.call(control.PUBLIC_KEY, slot=slot)["pem"]
            except client.Refused as e:
                errors.append(str(e))
    if not out:
        raise CommandError(errors[0] if errors else "the card has no keys")
    return out


def cmd_ssh_pubkey(args) -> int:
    from vsc import crypto
    from vsc.card.sshagent import key_comment, openssh_line

    cfg = card_config(args)
    pems = _public_keys(args, [args.slot] if args.slot else None)
    keys = []
    for slot, pem in sorted(pems.items(), key=lambda item: slot_order(item[0])):
        line = openssh_line(crypto.public_der_from_pem(pem), key_comment(cfg.serial, slot))
        keys.append({"slot": slot, "algorithm": line.split()[0], "line": line})
    emit(args, {"serial": cfg.serial, "keys": keys}, "\n".join(k["line"] for k in keys))
    return 0


def cmd_ssh_agent_env(args) -> int:
    import shlex
    import stat

    path = paths.agent_socket_for(home_dir(args))
    # ssh, ssh-add and ssh -A trust whatever this names: only a socket in the user's own 0700 runtime dir
    # (another user may have made /tmp/vsc-UID first and put their own agent there), and of this user
    try:
        paths.check_runtime_dir()
    except paths.UnsafeDirectory as e:
        raise CommandError(str(e)) from None
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        st = None
    if st is not None and (not stat.S_ISSOCK(st.st_mode) or st.st_uid != os.getuid()):
        raise CommandError(f"{path} is not a socket of yours: not used")
    if st is None:
        raise CommandError(f"no ssh-agent socket at {path}: is the card daemon for {home_dir(args)} running "
                           f"(it serves one unless started with --no-ssh-agent or --ssh-agent PATH)?")
    emit(args, {"SSH_AUTH_SOCK": path}, f"SSH_AUTH_SOCK={shlex.quote(path)}; export SSH_AUTH_SOCK;")
    return 0


# ---------------------------------------------------------------- certificates (vsc.protocol.piv)


def cmd_cert(args) -> int:
    """Import a slot's certificate, export it, or make a CSR signed by the slot's key (through the daemon)."""
    from vsc import crypto
    from vsc.wire import tlv

    if args.import_file:
        try:
            der = crypto.certificate_der(_read_in(args.import_file))
        except ValueError as e:
            raise CommandError(f"{args.import_file} is not a PEM or DER certificate: {e}")
        _call(args, control.CERT_PUT, slot=args.slot, der=der)
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
        with _daemon(args) as card:  # one connection: the public key, then the signature over the request info
            spki = crypto.public_der_from_pem(card.call(control.PUBLIC_KEY, slot=args.slot)["pem"])
            info = tlv.csr_info(subject, spki)
            algorithm = tlv.ALG_SHA256_RSA if crypto.public_kind(spki).startswith("rsa") else tlv.ALG_ECDSA_SHA256
            if args.pin_file:
                card.call(control.VERIFY_PIN, pin=_read_pin(args.pin_file), keep=False)
            signature = card.call(control.SIGN_DIGEST, slot=args.slot, digest=crypto.sha256(info))["signature"]
        try:
            pem = crypto.csr_pem(tlv.csr(info, algorithm, signature))
        except (crypto.CryptoError, ValueError) as e:
            raise CommandError(f"the card made a request that does not verify: {e}")
        _write_out(args.output, pem)
        emit(args, {"slot": args.slot, "subject": args.subject, "out": args.output},
             f"certification request for slot {args.slot} ({args.subject}) written to {args.output}")
        return 0
    der = _call(args, control.CERT_GET, slot=args.slot)["der"]
    if not der:
        raise CommandError(f"slot {args.slot} has no certificate")
    pem = crypto.certificate_pem(der)
    if args.output:
        _write_out(args.output, pem)
    emit(args, {"slot": args.slot, "subject": crypto.certificate_subject(der), "pem": pem.decode()},
         pem.decode().rstrip() if not args.output else f"certificate of slot {args.slot} written to {args.output}")
    return 0


# ---------------------------------------------------------------- parser


#: every key slot ``--slot`` takes: the four enrolment slots and the retired 82..95 (keys put there by
#: yubico-piv-tool / ykman: GENERATE or IMPORT over PC/SC)
SLOTS = tuple(SLOT_REFS)
_SLOT = Option("--slot", required=True, choices=SLOTS)
_IN = Option("--in", dest="input", required=True)
_OUT = Option("--out", dest="output", required=True)
_JSON = Option("--json", "machine-readable output", switch=True)
_PIN = Option("--pin-file", "verify the PIN for this one request first (a slot of PIN policy always needs it); "
              "a file or fd:N")

#: The requests to the daemon with plain options: name -> (function, help, options). argparse is built
#: from these rows (configure), and so is the fast path that reads a plain argv without argparse (fast_args).
REQUESTS = {
    "status": (cmd_status, "state, serial, slots, counters", ()),
    "public-key": (cmd_public_key, "print a slot's public key (PEM)", (_SLOT,)),
    "sign": (cmd_sign, "sign a file (SHA-256), as openssl dgst -sha256 -sign", (
        _SLOT, _IN, _OUT, _PIN,
        Option("--sha384", "hash with SHA-384 instead, as openssl dgst -sha384 -sign (the natural hash of a P-384 "
               "key)", switch=True))),
    "decrypt": (cmd_decrypt, "decrypt a file with a slot's RSA key", (
        _SLOT, _IN, _OUT, _PIN,
        Option("--padding", "pkcs1 (openssl pkeyutl -encrypt default) or oaep (SHA-256)", choices=("pkcs1", "oaep"),
               default="pkcs1"))),
    "counter": (cmd_counter, "read or step a counter (synced before it is acknowledged)", (
        Option("name"), Option("--add", type=int, group="step"), Option("--sub", type=int, group="step"))),
    "remove": (cmd_remove, "remove the card: upload, set idle, stop the daemon", ()),
    "ssh-agent-env": (cmd_ssh_agent_env, "print SSH_AUTH_SOCK=... for the card's ssh-agent "
                                         "(eval \"$(vsc card ssh-agent-env)\")", ()),
}


def fast_args(argv: list[str]):
    """
    The arguments of ``vsc card [--home HOME] REQUEST ...`` when argv is in
    its plain form (vsc.cli.argspec), read without argparse; else None, and
    argparse parses it.
    """
    home = None
    if argv[:1] == ["--home"]:
        if len(argv) < 2 or argv[1].startswith("-"):
            return None
        home, argv = argv[1], argv[2:]
    if not argv or argv[0] not in REQUESTS:
        return None
    func, _help, options = REQUESTS[argv[0]]
    values = parse_plain(argv[1:], (*options, _JSON))
    if values is None:
        return None
    return Namespace(command="card", home=home, card_command=argv[0], func=func, **values)


def configure(card) -> None:
    from vsc.cli import enrol

    card.add_argument("--home", help="the card's home (default $VSC_HOME or ~/.config/vsc)")
    csub = card.add_subparsers(dest="card_command", required=True, metavar="ACTION")

    def add(name, func, help_, options=()):
        p = csub.add_parser(name, help=help_)
        add_options(p, (*options, _JSON))
        p.set_defaults(func=func)
        return p

    enrol.add_actions(add)
    for name in ("status", "public-key", "sign", "decrypt", "counter"):
        add(name, *REQUESTS[name])
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
    add("remove", *REQUESTS["remove"])
    p = add("passwd", cmd_passwd, "change the password of the card in use (the daemon re-wraps its data key)")
    p.add_argument("--password-file", help="read the current password from this file or fd:N")
    p.add_argument("--new-password-file", help="read the new password from this file or fd:N")
    p = add("cert", cmd_cert, "a slot's X.509 certificate: print it, --import one, or make a --csr signed by the card")
    p.add_argument("--slot", required=True, choices=SLOTS)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--import", dest="import_file", metavar="FILE", help="store this certificate (PEM or DER) for the slot")
    g.add_argument("--csr", action="store_true", help="write a PKCS#10 request signed by the slot's key")
    p.add_argument("--subject", help="the CSR subject, e.g. /CN=alice/O=Example")
    p.add_argument("--out", dest="output", help="write the CSR (or the certificate) here")
    p.add_argument("--pin-file", help="with --csr: verify the PIN for the signature first (a file or fd:N)")
    p = add("verify-pin", cmd_verify_pin, "verify the PIN for the local paths (vsc card, the local API, the ssh-agent) "
                                          "until the card is removed")
    p.add_argument("--pin-file", help="read the PIN from this file or fd:N (default: the terminal)")
    p.add_argument("--forget", action="store_true", help="close the local verification instead")
    p = add("change-pin", cmd_change_pin, "change the PIN (or, with --puk, the PUK): the same PIN on every path")
    p.add_argument("--puk", action="store_true", help="change the PUK instead of the PIN")
    p.add_argument("--old-file", help="read the current PIN/PUK from this file or fd:N")
    p.add_argument("--new-file", help="read the new PIN/PUK (6-8 characters) from this file or fd:N")
    p = add("unblock-pin", cmd_unblock_pin, "set a new PIN with the PUK (restores its tries)")
    p.add_argument("--puk-file", help="read the PUK from this file or fd:N")
    p.add_argument("--new-file", help="read the new PIN (6-8 characters) from this file or fd:N")
    p = add("ssh-pubkey", cmd_ssh_pubkey, "print the card's keys as authorized_keys lines (ssh-rsa, "
                                          "ecdsa-sha2-nistp256, ecdsa-sha2-nistp384)")
    p.add_argument("--slot", choices=SLOTS, help="only this slot (default: every slot)")
    add("ssh-agent-env", *REQUESTS["ssh-agent-env"])
