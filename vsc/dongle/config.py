"""
A dongle card's daemon settings (claim 10): the PKCS#11 token and the
Figure 14 challenge table, from ``twistd vsc-card`` options and card.ini.
``vsc dongle enroll`` writes them (vsc.cli.dongle); the daemon reads them here.
"""

from __future__ import annotations

from pathlib import Path

TABLE_NAME = "dongle-table"  # the challenge table's file in the card's home


def read_pin(pin_file: str | None) -> str | None:
    """The token PIN from a file (or fd:N), or None (the URI's pin-value, or none)."""
    if not pin_file:
        return None
    from vsc.card.config import read_password

    return read_password(pin_file)


def dongle_setup(cfg, uri: str | None, pin_file: str | None):
    """For twistd vsc-card: (TokenRef, ChallengeTable, poll) from options and card.ini."""
    from vsc.dongle.token import PIN_ON_COMMAND_LINE, TokenRef
    from vsc.wire.dongle import decode_table
    from vsc.wire.errors import WireError

    if uri and TokenRef.strip_pin(uri) != uri:  # --dongle: a command line, readable by every local user
        raise ValueError(PIN_ON_COMMAND_LINE)
    uri = uri or cfg.settings.get("token")
    if not uri:
        raise ValueError("dongle mode needs --dongle pkcs11:token=...;module-path=...")
    table_path = str(cfg.home / (cfg.settings.get("table") or TABLE_NAME))  # relative: to HOME
    try:
        table = decode_table(Path(table_path).read_bytes())
    except OSError as e:
        raise ValueError(f"cannot read the challenge table {table_path}: {e.strerror}") from None
    except WireError as e:
        raise ValueError(f"{table_path} is not a challenge table: {e}") from None
    if table.serial != cfg.serial:
        raise ValueError(f"the challenge table {table_path} is for the card {table.serial!r}, not {cfg.serial!r}")
    ref = TokenRef.parse(uri, read_pin(pin_file))
    return ref, table, float(cfg.settings.get("dongle_poll", 60))
