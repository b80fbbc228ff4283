"""
The card's home (HOME, default $VSC_HOME or ~/.config/vsc): non-secret
settings only. The password is never stored; the protected information
lives on the server (or a dongle).

    HOME/card.ini    [card] server, server_key, serial, channel policy, polling
"""

from __future__ import annotations

import configparser
import hashlib
import os
from pathlib import Path

import attrs

from vsc.protocol.suites import DEFAULT_SUITES, ChannelConfig, ForwardSecrecy, parse_suites

CARD_INI = "card.ini"


class CardConfigError(Exception):
    """Missing or invalid card settings (message is user-facing)."""


def default_home() -> Path:
    return Path(os.environ.get("VSC_HOME") or Path.home() / ".config" / "vsc")


def runtime_dir() -> Path:
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and os.access(base, os.W_OK):
        return Path(base) / "vsc"
    return Path(f"/tmp/vsc-{os.getuid()}")


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
        tag = hashlib.sha256(str(self.home.resolve()).encode()).hexdigest()[:12]
        return runtime_dir() / f"card-{tag}.sock"


def control_socket_for(home: Path) -> Path:
    tag = hashlib.sha256(str(Path(home).resolve()).encode()).hexdigest()[:12]
    return runtime_dir() / f"card-{tag}.sock"


def load(home: str | os.PathLike | None) -> CardConfig:
    home = Path(home) if home else default_home()
    path = home / CARD_INI
    if not path.exists():
        raise CardConfigError(f"{path} not found: enroll first with 'vsc card --home {home} enroll ...'")
    parser = configparser.ConfigParser()
    try:
        parser.read(path)
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
            serial=s["serial"],
            channel=channel,
            muk_poll=s.getfloat("muk_poll", 60.0),
            clock_poll=s.getfloat("clock_poll", 3600.0),
            clock_tolerance=s.getfloat("clock_tolerance", 5400.0),
            reconnect_attempts=s.getint("reconnect_attempts", 5),
            settings=dict(s),
        )
    except (KeyError, ValueError, configparser.Error) as e:
        raise CardConfigError(f"{path}: invalid or missing setting: {e}") from None


def save(home: Path, **values: str) -> None:
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    parser = configparser.ConfigParser()
    parser["card"] = {k: str(v) for k, v in values.items()}
    tmp = home / (CARD_INI + ".tmp")
    with open(tmp, "w") as f:
        f.write("# vsc card settings (no secrets here); see docs/card.md\n")
        parser.write(f)
    os.replace(tmp, home / CARD_INI)


def read_password(source: str | None, prompt: str = "Card password: ", confirm: bool = False) -> str:
    """From a file, from ``fd:N``, or from the terminal (default)."""
    if source:
        if source.startswith("fd:"):
            with os.fdopen(int(source[3:]), "r", closefd=False) as f:
                text = f.readline()
        else:
            try:
                with open(source) as f:
                    text = f.readline()
            except OSError as e:
                raise CardConfigError(f"cannot read the password file {source}: {e.strerror}") from None
        text = text.rstrip("\r\n")
        if not text:
            raise CardConfigError(f"the password file {source} is empty")
        return text
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
