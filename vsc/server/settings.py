"""
Every setting of DIR/vsc-server.ini's [server] section, with its type,
default and range, checked once when the server (or `vsc admin`) starts:
a bad value is one line naming the setting and what it accepts, and the
server exits 2 instead of starting with it (``handshake_timeout = nan``
used to start a server that hung every connection). An unknown name is
refused too (a typo would otherwise silently keep a default).

docs/admin.md §5 lists the same settings; tests/test_settings.py checks the
page against ``SETTINGS``.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import attrs


class SettingError(ValueError):
    """A setting's value is not acceptable (message names the setting, for one line)."""


@attrs.frozen
class Setting:
    name: str
    default: Any
    parse: Callable[[str], Any]
    accepts: str  # what the docs and the error say it accepts


def _number(kind: type, lo: float, hi: float) -> Callable[[str], Any]:
    def parse(text: str):
        try:
            value = kind(text.strip())
        except ValueError:
            raise SettingError(f"is not a{'n integer' if kind is int else ' number'}") from None
        if isinstance(value, float) and not math.isfinite(value):
            raise SettingError("must be a finite number")
        if not lo <= value <= hi:
            raise SettingError(f"must be from {lo:g} to {hi:g}")
        return value
    return parse


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("true", "yes", "on", "1"):
        return True
    if low in ("false", "no", "off", "0"):
        return False
    raise SettingError("must be true or false")


def _choice(*names: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.strip() not in names:
            raise SettingError("must be one of " + ", ".join(names))
        return text.strip()
    return parse


def _text(text: str) -> str:
    return text.strip()


def _int(lo: int, hi: int) -> tuple[Callable[[str], Any], str]:
    return _number(int, lo, hi), f"an integer from {lo:,} to {hi:,}"


def _float(lo: float, hi: float, unit: str = "seconds") -> tuple[Callable[[str], Any], str]:
    return _number(float, lo, hi), f"{lo:g} to {hi:g} {unit}"


def _s(name: str, default: Any, parse_accepts) -> Setting:
    parse, accepts = parse_accepts
    return Setting(name, default, parse, accepts)


SETTINGS: dict[str, Setting] = {s.name: s for s in (
    _s("listen", "tcp:7390:interface=127.0.0.1", (_text, "a Twisted server endpoint string")),
    _s("database", "", (_text, "empty, sqlite:///PATH or postgresql://...")),
    _s("suites", "aes256-gcm,chacha20-poly1305,aes256-cbc-hmac-sha256", (_text, "1 to 8 suite names, comma-separated")),
    _s("allow_insecure", False, (_bool, "true or false")),
    _s("forward_secrecy", "prefer", (_choice("off", "prefer", "require"), "off, prefer or require")),
    _s("handshake_timeout", 30.0, _float(0.1, 3600)),
    _s("impl_auth", "master-key", (_text, "comma-separated method names (password, master-key, keyfile, "
                                           "one-time-agent, totp); empty = password only")),
    _s("lockout_threshold", 5, _int(1, 1000)),
    _s("lockout_shared", 20, _int(1, 100000)),
    _s("lockout_source", 50, _int(1, 1000000)),
    _s("lockout_base", 30.0, _float(0.1, 86400)),
    _s("lockout_max", 3600.0, _float(1, 30 * 86400)),
    _s("auth_deadline", 30.0, _float(1, 600)),
    _s("code_ttl", 7 * 86400.0, _float(60, 366 * 86400)),
    _s("threads", 8, _int(1, 256)),
    _s("master_key_file", "", (_text, "a path, or empty")),
    _s("max_unauthenticated", 1024, _int(1, 1000000)),
    _s("max_unauthenticated_per_source", 64, _int(1, 1000000)),
    _s("max_unauthenticated_body", 65536, _int(4096, 1 << 20)),
    _s("unauthenticated_idle", 60.0, _float(1, 3600)),
    _s("idle_timeout", 600.0, _float(0, 86400)),
    _s("handshakes_per_second", 20.0, _float(0.01, 100000, "per source")),
    _s("handshake_burst", 40, _int(1, 100000)),
    _s("max_pending_handshakes", 64, _int(1, 100000)),
    _s("handshake_threads", 2, _int(1, 256)),
    _s("max_channels_per_card", 4, _int(1, 1000)),
)}


def validate(raw: dict[str, str], where: str = "vsc-server.ini") -> dict[str, Any]:
    """Every setting, typed, with defaults filled in; SettingError (one line) on the first bad one."""
    unknown = sorted(set(raw) - set(SETTINGS))
    if unknown:
        raise SettingError(f"{where}: unknown setting {unknown[0]!r} (known: {', '.join(SETTINGS)})")
    out: dict[str, Any] = {}
    for name, setting in SETTINGS.items():
        if name not in raw:
            out[name] = setting.default
            continue
        try:
            out[name] = setting.parse(raw[name])
        except SettingError as e:
            raise SettingError(f"{where}: {name} = {raw[name]!r} {e} (accepted: {setting.accepts})") from None
    if out["unauthenticated_idle"] <= out["auth_deadline"]:
        raise SettingError(f"{where}: unauthenticated_idle ({out['unauthenticated_idle']:g}) must be longer than "
                           f"auth_deadline ({out['auth_deadline']:g}), or a card would be cut off while it answers")
    if out["lockout_max"] < out["lockout_base"]:
        raise SettingError(f"{where}: lockout_max ({out['lockout_max']:g}) is less than lockout_base "
                           f"({out['lockout_base']:g})")
    return out


def override(settings: dict[str, Any], name: str, text: str, where: str) -> dict[str, Any]:
    """A command-line value for one setting, checked like the file's."""
    try:
        value = SETTINGS[name].parse(text)
    except SettingError as e:
        raise SettingError(f"{where} {text!r} {e} (accepted: {SETTINGS[name].accepts})") from None
    return dict(settings, **{name: value})
