"""
The card's home (HOME, default $VSC_HOME or ~/.config/vsc): non-secret
settings only. The password is never stored; the protected information
lives on the server (or a dongle).

    HOME/card.ini    [card] server, server_key, serial, channel policy, polling,
                     totp = true when the server gave the card a TOTP seed,
                     kdf_floor and kdf_salt: the password derivation the card
                     accepts from a server (vsc.card.ops.check_kdf)
    HOME/keyfile.vsc the keyfile for keyfile authentication ([0044]-[0046]), when the
                     server issued one. It is kept HERE, not in the protected information,
                     because it authenticates the very insert that downloads the protected
                     information. It is not secret: as1 inside is sealed to a key derived
                     from the password's protection key (vsc.protocol.implauth), and the
                     server's signature makes it tamper-evident.
    HOME/keyfile.vsc.new  the keyfile re-sealed for a new password while a password
                     change is in flight; it replaces keyfile.vsc once the server has
                     stored the change (and is tried second if the change was interrupted)
"""

from __future__ import annotations

import configparser
import io
import os
from pathlib import Path

import attrs

from vsc.card import paths
from vsc.util.textfile import TextFileError, read_text
from vsc.protocol.suites import DEFAULT_SUITES, ChannelConfig, ForwardSecrecy, parse_suites

CARD_INI = "card.ini"
#: the card applications a card can carry (card.ini ``applications``, chosen at enrolment)
APPLICATIONS = ("piv", "openpgp")
KEYFILE_NAME = "keyfile.vsc"
PENDING_KEYFILE_NAME = KEYFILE_NAME + ".new"


class CardConfigError(Exception):
    """Missing or invalid card settings (message is user-facing)."""


def default_home() -> Path:
    return Path(paths.default_home())


def runtime_dir() -> Path:
    return Path(paths.runtime_dir())


@attrs.frozen
class CardConfig:
    home: Path
    server: str
    server_key: str
    serial: str
    channel: ChannelConfig = ChannelConfig()
    muk_poll: float = 60.0
    clock_poll: float = 3600.0
    clock_tolerance: float = 5400.0
    reconnect_attempts: int = 5
    settings: dict = attrs.field(factory=dict)

    @property
    def control_socket(self) -> Path:
        return control_socket_for(self.home)


def control_socket_for(home: Path) -> Path:
    return Path(paths.control_socket_for(home))


def check_home(home: Path) -> None:
    """
    HOME decides where the password goes (card.ini's server, pinned key and
    ``kdf_floor``) and holds the machine secret: it must be a directory of
    this user (or root) that nobody else can write. A missing one passes
    (``save`` makes it 0700); anything else is one CardConfigError line, and
    HOME is not used — never repaired: a directory another user made is theirs.
    """
    import stat

    try:
        st = os.stat(home)
    except FileNotFoundError:
        return
    except OSError as e:
        raise CardConfigError(f"cannot use the card's home {home}: {e.strerror}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise CardConfigError(f"the card's home {home} is not a directory")
    if st.st_uid not in (0, os.getuid()):
        raise CardConfigError(f"the card's home {home} belongs to {paths._who(st.st_uid)}, not to you: vsc will "
                              f"not use it")
    mode = stat.S_IMODE(st.st_mode)
    if mode & 0o022:
        raise CardConfigError(f"the card's home {home} is writable by others (mode {mode:04o}): vsc will not use it "
                              f"(chmod go-w {home} if it is yours and nobody else changed what it holds)")


def load(home: str | os.PathLike | None) -> CardConfig:
    home = Path(home) if home else default_home()
    check_home(home)
    path = home / CARD_INI
    if not path.exists():
        raise CardConfigError(f"{path} not found: enroll first with 'vsc card --home {home} enroll ...'")
    parser = configparser.ConfigParser(interpolation=None)  # plain values: a kept token URI is %-encoded
    try:
        text = read_text(path)
    except TextFileError as e:
        raise CardConfigError(str(e)) from None
    try:
        parser.read_string(text, source=str(path))
        others = [name for name in parser.sections() if name != "card"]
        if others:  # its settings would be silently ignored
            raise CardConfigError(f"{path}: unknown section [{others[0]}]: every setting goes in [card]")
        s = parser["card"]
        channel = ChannelConfig(
            suites=parse_suites(s.get("suites", ",".join(x.label for x in DEFAULT_SUITES))),
            allow_insecure=s.getboolean("allow_insecure", False),
            forward_secrecy=ForwardSecrecy(s.get("forward_secrecy", "prefer")),
            handshake_timeout=s.getfloat("handshake_timeout", 30.0),
        )
        return CardConfig(
            home=home.absolute(),
            server=s.get("server", "") if s.get("mode") == "dongle" else s["server"],
            server_key=s.get("server_key", "") if s.get("mode") == "dongle" else s["server_key"],
            serial=_serial(path, s["serial"]),
            channel=channel,
            muk_poll=_number(path, s, "muk_poll", 60.0, POLL),
            clock_poll=_number(path, s, "clock_poll", 3600.0, POLL),
            clock_tolerance=_number(path, s, "clock_tolerance", 5400.0, TOLERANCE),
            reconnect_attempts=_number(path, s, "reconnect_attempts", 5, ATTEMPTS),
            settings=_checked(path, s),
        )
    except (KeyError, ValueError, configparser.Error) as e:
        raise CardConfigError(f"{path}: invalid or missing setting: {e}") from None


#: card.ini's numbers: (type, lowest, highest, 0 also accepted (off)); a poll faster than POLL's lowest would spin
POLL = (float, 0.1, 30 * 86400.0, True)
TOLERANCE = (float, 1.0, 366 * 86400.0, False)
ATTEMPTS = (int, 1, 100, False)


def _number(path: Path, s, name: str, default, rule):
    """card.ini's ``name``: a finite number in its range (NaN and infinities refused), else one line naming it."""
    import math

    kind, lo, hi, zero_off = rule
    text = s.get(name)
    if text is None:
        return default
    try:
        value = kind(text.strip())
    except ValueError:
        value = None
    if value is None or not math.isfinite(value) or not (lo <= value <= hi or (zero_off and value == 0)):
        what = "an integer" if kind is int else "a number"
        accepts = f"{'0 (off) or ' if zero_off else ''}{what} from {lo:g} to {hi:g}"
        raise CardConfigError(f"{path}: {name} = {text[:40]!r} is not accepted ({accepts})")
    return value


#: every name card.ini may hold (docs/card.md, Settings; docs/dongle.md): another one (a typo) is refused, never
#: silently left at its default
SETTINGS = frozenset({
    "server", "server_key", "serial", "suites", "allow_insecure", "forward_secrecy", "handshake_timeout",
    "muk_poll", "clock_poll", "clock_tolerance", "reconnect_attempts", "kdf_floor", "kdf_salt", "mode",
    "key_cache", "applications", "totp", "token", "table", "dongle_poll",
})


def _checked(path: Path, s) -> dict:
    """The section as a dict, once the cross-checks and the values read elsewhere are checked."""
    settings = dict(s)
    unknown = sorted(set(settings) - SETTINGS)
    if unknown:
        raise CardConfigError(f"{path}: unknown setting {unknown[0]!r} (known: {', '.join(sorted(SETTINGS))})")
    # values read elsewhere, checked here so that a bad one stops the card at load: kdf_salt, kdf_floor (never
    # read as no floor), applications (a typo must not widen what PC/SC sees to every application)
    for name, check in (("kdf_salt", lambda: kdf_salt(settings)),
                        ("kdf_floor", lambda: kdf_floor_cost(settings["kdf_floor"])),
                        ("applications", lambda: parse_applications(settings["applications"]))):
        if name in settings:
            try:
                check()
            except CardConfigError as e:
                raise CardConfigError(f"{path}: {e}") from None
    if "dongle_poll" in settings:
        _number(path, s, "dongle_poll", 60.0, POLL)
    poll = _number(path, s, "clock_poll", 3600.0, POLL)
    tolerance = _number(path, s, "clock_tolerance", 5400.0, TOLERANCE)
    if poll and tolerance <= poll:
        raise CardConfigError(f"{path}: clock_tolerance ({tolerance:g}) must be longer than clock_poll ({poll:g}), or "
                              "the first clock check would remove the card")
    return settings


#: the salt scrypt takes (vsc.wire.ops.KdfParams): 16 bytes by default, at most 64
SALT_SIZES = (16, 64)


def kdf_salt(settings: dict) -> bytes:
    """
    card.ini's ``kdf_salt``: the salt the card derives its password keys
    with, chosen at enrolment (or pinned at the first insert of a card
    enrolled before it existed) and kept across password changes; b"" when
    there is none. A challenge naming another salt is refused (vsc.card.ops.check_kdf).
    """
    text = (settings.get("kdf_salt") or "").strip()
    if not text:
        return b""
    lo, hi = SALT_SIZES
    try:
        salt = bytes.fromhex(text)
    except ValueError:
        salt = None
    if salt is None or not lo <= len(salt) <= hi:
        raise CardConfigError(f"kdf_salt = {text[:40]!r} is not accepted (hex, {lo} to {hi} bytes)")
    return salt


def kdf_floor_cost(text: str) -> int | None:
    """
    card.ini's ``kdf_floor``: the least scrypt cost (log2 N) the card accepts
    from a server, or None for no floor (empty: a card enrolled before the
    floor, pinned at its next insert; ``legacy``: enrolled with the patent's
    derivation). ``scrypt`` alone is 2^15. Anything else is CardConfigError:
    never read as no floor, which would let a server ask for the legacy one.
    """
    text = (text or "").strip()
    if text in ("", "legacy"):
        return None
    alg, colon, cost = text.partition(":")
    if alg == "scrypt" and not colon:
        return 15
    if alg == "scrypt" and cost.strip().isdigit() and len(cost.strip()) <= 2:
        return int(cost)
    raise CardConfigError(f"kdf_floor = {text[:40]!r} is not accepted (scrypt:N, scrypt or legacy)")


def parse_applications(text: str) -> tuple[str, ...]:
    """``piv,openpgp`` -> the names in the card's order; CardConfigError for an unknown or empty list."""
    names = [x.strip().lower() for x in text.split(",") if x.strip()]
    unknown = [n for n in names if n not in APPLICATIONS]
    if unknown or not names:
        raise CardConfigError(f"applications: {', '.join(unknown) or 'none'} (choose from {', '.join(APPLICATIONS)})")
    return tuple(a for a in APPLICATIONS if a in names)


def applications_of(config: "CardConfig") -> tuple[str, ...]:
    """The applications the card carries: card.ini's ``applications``, both when it does not say (older cards)."""
    try:
        settings = getattr(config, "settings", None) or {}
        return parse_applications(settings.get("applications", ",".join(APPLICATIONS)))
    except CardConfigError:
        return APPLICATIONS


def _serial(path: Path, text: str) -> str:
    """card.ini's serial in NFC (vsc.protocol.serials): "café" typed either way is one card."""
    from vsc.protocol import serials

    try:
        return serials.check(text)
    except serials.SerialError as e:
        raise CardConfigError(f"{path}: {e}") from None


def save(home: Path, **values: str) -> None:
    check_home(home)
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    check_home(home)  # again: another user may have made it between the check and the mkdir (in /tmp, say)
    # no %-interpolation: it refused a %-encoded token URI (--keep-pin-in-uri) quoting it, PIN and all
    parser = configparser.ConfigParser(interpolation=None)
    parser["card"] = {k: str(v) for k, v in values.items()}
    text = io.StringIO()
    text.write("# vsc card settings (no secrets here); see docs/card.md\n")
    parser.write(text)
    # 0600 all the same: a token URI kept with its PIN (vsc dongle enroll --keep-pin-in-uri) is one
    paths.write_private(home / CARD_INI, text.getvalue().encode("utf-8"))


def pin(home: Path, **values: str) -> dict:
    """
    Add ``values`` that card.ini does not hold yet to it (a setting already
    there is kept) and return what was added; nothing when there is no
    card.ini. The rest of the file is written back as it was read.
    """
    check_home(home)
    path = home / CARD_INI
    if not path.exists():
        return {}
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(read_text(path), source=str(path))
        section = parser["card"]
    except (TextFileError, KeyError, configparser.Error) as e:
        raise CardConfigError(f"{path}: {e}") from None
    added = {k: str(v) for k, v in values.items() if not section.get(k)}
    if added:
        save(home, **dict(section, **added))
    return added


def have_terminal() -> bool:
    """Can getpass prompt on a terminal (it opens /dev/tty)?"""
    try:
        os.close(os.open("/dev/tty", os.O_RDWR | os.O_NOCTTY))
    except OSError:
        return False
    return True


#: the longest first line a password (or PIN) file may have: one without an end of line is not read forever
MAX_SECRET_LINE = 65536


def read_secret_line(source: str, what: str = "the password file") -> str:
    """
    The first line of the file ``source`` or of ``fd:N``, bounded (MAX_SECRET_LINE), without its end of line;
    CardConfigError (one line naming ``what``, never a byte of the secret) if it cannot be read or is empty.
    """
    try:
        if source.startswith("fd:"):
            fd = source[3:]
            if not fd.isascii() or not fd.isdigit() or len(fd) > 9:
                raise CardConfigError(f"{what} {source} is not fd:N with N an open file descriptor's number")
            with os.fdopen(int(fd), "r", closefd=False) as f:
                text = f.readline(MAX_SECRET_LINE + 1)
        else:
            with open(source) as f:
                text = f.readline(MAX_SECRET_LINE + 1)
    except OSError as e:
        raise CardConfigError(f"cannot read {what} {source}: {e.strerror or e}") from None
    except UnicodeDecodeError:  # not the codec's text: it quotes a byte of the secret and its position
        raise CardConfigError(f"{what} {source} is not UTF-8 text") from None
    if len(text) > MAX_SECRET_LINE:  # /dev/zero, say: no end of line to stop at
        raise CardConfigError(f"the first line of {what} {source} is longer than {MAX_SECRET_LINE} characters")
    text = text.rstrip("\r\n")
    if not text:
        raise CardConfigError(f"{what} {source} is empty")
    return text


def read_password(source: str | None, prompt: str = "Card password: ", confirm: bool = False) -> str:
    """From a file, from ``fd:N``, or from the terminal (default)."""
    if source:
        return read_secret_line(source)
    if not have_terminal():  # else getpass reads stdin, echoing, with warnings (and fails if stdin is closed)
        raise CardConfigError("no password given (no terminal to ask on: use --password-file)")
    import getpass

    try:
        pw = getpass.getpass(prompt)
        if confirm and getpass.getpass("Again: ") != pw:
            raise CardConfigError("the passwords differ")
    except (EOFError, KeyboardInterrupt):
        raise CardConfigError("no password given (use --password-file for automation)") from None
    if not pw:
        raise CardConfigError("the password is empty")
    return pw


# ---------------------------------------------------------------- keyfile and TOTP (implementation authentication)


def keyfile_path(home: Path, pending: bool = False) -> Path:
    return Path(home) / (PENDING_KEYFILE_NAME if pending else KEYFILE_NAME)


def load_keyfiles(home: Path) -> tuple[bytes, ...]:
    """The keyfile, then a pending one left by an interrupted password change (either may be absent)."""
    out = []
    for pending in (False, True):
        try:
            out.append(keyfile_path(home, pending).read_bytes())
        except FileNotFoundError:
            continue
        except OSError as e:
            raise CardConfigError(f"cannot read {keyfile_path(home, pending)}: {e.strerror}") from None
    return tuple(out)


def save_keyfile(home: Path, data: bytes, pending: bool = False) -> Path:
    """Write the keyfile (mode 0600, atomically)."""
    Path(home).mkdir(mode=0o700, parents=True, exist_ok=True)
    path = keyfile_path(home, pending)
    paths.write_private(path, data)
    return path


def commit_pending_keyfile(home: Path) -> None:
    """The password change is stored: the re-sealed keyfile becomes the keyfile."""
    os.replace(keyfile_path(home, True), keyfile_path(home, False))


def forget_previous_card(home: Path) -> list[str]:
    """
    A new card was just enrolled into ``home`` (``vsc card enroll``, with
    ``--force`` over another card): remove what belonged to the card before
    it — its keyfile, a pending re-sealed one, a pending accept-rollback —
    so none of it is offered to, or applied for, the new card. Returns the
    names removed. The freshness records stay (each keyed by its card ID
    and authenticated with that card's data key: another card's is ignored).
    """
    from vsc.card.freshness import ACCEPT_NAME

    removed = []
    for name in (KEYFILE_NAME, PENDING_KEYFILE_NAME, ACCEPT_NAME):
        try:
            (Path(home) / name).unlink()
        except FileNotFoundError:
            continue
        except OSError as e:
            raise CardConfigError(f"cannot remove the previous card's {Path(home) / name}: {e.strerror}") from None
        removed.append(name)
    return removed


def discard_pending_keyfile(home: Path) -> None:
    try:
        keyfile_path(home, True).unlink()
    except FileNotFoundError:
        pass


def totp_source(code: str | None, path: str | None, wanted: bool, prompt: bool = True):
    """
    Where TOTP codes come from: ``--totp CODE``, ``--totp-file F`` (read when
    the server asks, so the file may be written just in time), or the terminal
    (asked once, now, when the card has a TOTP seed and stdin is a terminal).
    Returns a callable for vsc.card.ops.Credentials, or None.
    """
    if code:
        return lambda: code
    if path:
        def read() -> str:
            try:
                with open(path) as f:
                    line = f.readline(MAX_SECRET_LINE + 1)
            except OSError as e:
                raise CardConfigError(f"cannot read the TOTP file {path}: {e.strerror}") from None
            except UnicodeDecodeError:
                raise CardConfigError(f"the TOTP file {path} is not UTF-8 text") from None
            if len(line) > MAX_SECRET_LINE:
                raise CardConfigError(f"the first line of the TOTP file {path} is longer than {MAX_SECRET_LINE} "
                                      "characters")
            return line.strip()

        return read
    if wanted and prompt:
        import sys

        if sys.stdin is not None and sys.stdin.isatty():
            try:
                typed = input("TOTP code from your device: ").strip()
            except (EOFError, KeyboardInterrupt):
                typed = ""
            return lambda: typed
    return None
