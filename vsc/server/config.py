"""
The server's data directory: its config file, its RSA key pair, and (by
default) its SQLite database.

    DIR/vsc-server.ini      settings (listen endpoint, database, channel policy)
    DIR/server-key.pem      the server's private key, mode 0600
    DIR/vsc.sqlite3         the embedded database (when not PostgreSQL)
"""

from __future__ import annotations

import configparser
import contextlib
import os
import stat
from pathlib import Path

import attrs

from vsc import crypto
from vsc.protocol.suites import DEFAULT_SUITES, ChannelConfig, ForwardSecrecy, parse_suites
from vsc.server.settings import SettingError, validate
from vsc.util.textfile import TextFileError, read_text

CONFIG_NAME = "vsc-server.ini"
KEY_NAME = "server-key.pem"
SQLITE_NAME = "vsc.sqlite3"
DEFAULT_LISTEN = "tcp:7390:interface=127.0.0.1"


class ConfigError(Exception):
    """The data directory or its config is missing or invalid (message is for the user)."""


@attrs.frozen
class ServerConfig:
    data_dir: Path
    listen: str = DEFAULT_LISTEN
    database: str = ""
    channel: ChannelConfig = ChannelConfig()
    settings: dict = attrs.field(factory=dict)

    @property
    def key_path(self) -> Path:
        return self.data_dir / KEY_NAME

    @property
    def database_url(self) -> str:
        return self.database or f"sqlite:///{self.data_dir / SQLITE_NAME}"

    def load_key(self) -> crypto.RSAPrivateKey:
        try:
            key = crypto.RSAPrivateKey.from_pem(self.key_path.read_bytes())
        except FileNotFoundError:
            raise ConfigError(f"{self.key_path} is missing: run 'vsc admin --data-dir {self.data_dir} init'") from None
        except (ValueError, TypeError) as e:  # TypeError: encrypted (the server has no passphrase to give)
            raise ConfigError(f"{self.key_path} is not a usable private key: {e}") from None
        if not 2048 <= key.bits <= 4096:  # docs/protocol.md §5.2: cards refuse a shorter one, a longer one's
            # KEY_TRANSPORT ciphertext does not fit (§5.3): every handshake would fail
            raise ConfigError(f"{self.key_path} is a {key.bits}-bit RSA key; the server key must have 2048 to 4096 bits")
        return key


def channel_config_from(settings: dict) -> ChannelConfig:
    """The channel policy from validated settings (vsc.server.settings)."""
    try:
        suites = parse_suites(settings["suites"])
        return ChannelConfig(
            suites=suites,
            allow_insecure=settings["allow_insecure"],
            forward_secrecy=ForwardSecrecy(settings["forward_secrecy"]),
            handshake_timeout=settings["handshake_timeout"],
        )
    except ValueError as e:
        raise ConfigError(f"invalid channel setting: {e}") from None


def load(data_dir: str | os.PathLike) -> ServerConfig:
    data_dir = Path(data_dir).absolute()
    path = data_dir / CONFIG_NAME
    if not path.exists():
        raise ConfigError(f"{path} not found: run 'vsc admin --data-dir {data_dir} init' first")
    parser = configparser.ConfigParser(interpolation=None)  # plain values: a database URL is %-encoded
    try:
        parser.read_string(read_text(path), source=str(path))
    except TextFileError as e:
        raise ConfigError(str(e)) from None
    except configparser.Error as e:
        raise ConfigError(f"{path}: {e}") from None
    if not parser.has_section("server"):
        raise ConfigError(f"{path} has no [server] section")
    others = [name for name in parser.sections() if name != "server"]
    if others:  # a setting there would be silently ignored, its default kept (a typo of [server], say)
        raise ConfigError(f"{path}: unknown section [{others[0]}]: every setting goes in [server] (docs/admin.md §5)")
    try:
        settings = validate(dict(parser["server"]), str(path))
    except SettingError as e:
        raise ConfigError(str(e)) from None
    return ServerConfig(
        data_dir=data_dir,
        listen=settings["listen"] or DEFAULT_LISTEN,
        database=settings["database"],
        channel=channel_config_from(settings),
        settings=settings,
    )


def _check_own(data_dir: Path) -> None:
    """
    The data directory holds the server key and (by default) the database: one another local user owns, or
    anyone may write, would let them swap the key or the config. Root's own is trusted, as is ours.
    """
    st = os.stat(data_dir)
    if st.st_uid not in (os.geteuid(), 0):
        raise ConfigError(f"{data_dir} belongs to another user (uid {st.st_uid}); the server's data directory "
                          "must be its own: use a new directory, or chown it first")
    if st.st_mode & 0o022:
        raise ConfigError(f"{data_dir} can be written by other users (mode {stat.S_IMODE(st.st_mode):o}); "
                          "the server's data directory must not be: chmod go-w it, or use a new directory")


def init(data_dir: str | os.PathLike, database: str = "", key_bits: int = 3072, listen: str = DEFAULT_LISTEN) -> ServerConfig:
    """Create the data dir, config file and key pair. Refuses to overwrite a key."""
    data_dir = Path(data_dir).absolute()
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    _check_own(data_dir)
    key_path = data_dir / KEY_NAME
    if key_path.exists():
        raise ConfigError(f"{key_path} already exists; refusing to replace the server key cards have pinned")
    if key_bits not in (2048, 3072, 4096):
        raise ConfigError("--key-bits must be 2048, 3072 or 4096")
    key = crypto.RSAPrivateKey.generate(key_bits)
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.to_pem())
    # no %-interpolation: it refused a %-encoded database password, quoting the URL
    parser = configparser.ConfigParser(interpolation=None)
    parser["server"] = {
        "listen": listen,
        "database": database,
        "suites": ",".join(s.label for s in DEFAULT_SUITES),
        "allow_insecure": "false",
        "forward_secrecy": "prefer",
        "handshake_timeout": "30",
    }
    # it may hold the database password (postgresql://USER:PASSWORD@...): a new file (never through a link
    # found there; one there is replaced, as before), the owner's only
    config_path = data_dir / CONFIG_NAME
    with contextlib.suppress(FileNotFoundError):
        config_path.unlink()
    fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("# vsc server settings; see docs/admin.md\n")
        parser.write(f)
    return load(data_dir)
