"""
The card's control socket, as data: AMP (vsc.wire.ampbox) over a UNIX
socket of mode 0600 in the user's runtime dir, served by the card daemon
while the card is in use.

Each row below is one command: its name, its arguments and its response
fields, each with a type. The daemon builds its ``amp.Command`` classes from
these rows (vsc.card.control) and the one client builds its requests and
reads the answers with them (vsc.card.client, through ``request`` and
``answer`` here), so the two sides cannot drift apart.

Types are AMP's, and encode exactly as Twisted's argument types do:

=========== ====================== =============================================
type        Twisted                on the wire
=========== ====================== =============================================
TEXT        ``amp.Unicode``        UTF-8
BYTES       ``amp.String``         the bytes
INT         ``amp.Integer``        decimal ASCII
FLOAT       ``amp.Float``          ``str(float)``
BOOL        ``amp.Boolean``        ``True`` / ``False``
TEXT_LIST   ``amp.ListOf(Unicode)`` each item: 16-bit length, UTF-8
Records(..) ``amp.AmpList([...])`` one AMP box per record, one after the other
=========== ====================== =============================================

Every refusal travels as AMP's error box with the code CARD_ERROR and one
line of text for the user. Like vsc.wire.ampbox, this module imports
neither construct nor enum nor json: it is on the path of every ``vsc card``
request (issue 15).
"""

from __future__ import annotations

import sys

from vsc.wire.ampbox import MAX_KEY, MAX_VALUE, Incomplete, Malformed, decode_box, encode_box

TEXT = "text"
BYTES = "bytes"
INT = "int"
FLOAT = "float"
BOOL = "bool"
TEXT_LIST = "text list"
SCALARS = (TEXT, BYTES, INT, FLOAT, BOOL, TEXT_LIST)


class Records:
    """A list of records, each with ``fields`` ((name, scalar type), ...): AMP's AmpList."""

    __slots__ = ("fields",)

    def __init__(self, *fields: tuple[str, str]):
        assert all(kind in SCALARS for _name, kind in fields), fields
        self.fields = fields


CARD_ERROR = b"CARD_ERROR"  # the one error code: the card refused, for the reason in the description

# AMP's own keys
COMMAND, ASK, ANSWER = b"_command", b"_ask", b"_answer"
ERROR, ERROR_CODE, ERROR_DESCRIPTION = b"_error", b"_error_code", b"_error_description"


class Command:
    """One control command: ``name``, ``arguments`` and ``response`` as ((field, type), ...)."""

    __slots__ = ("name", "arguments", "response", "doc")

    def __init__(self, name: str, arguments: tuple = (), response: tuple = (), doc: str = ""):
        for _field, kind in (*arguments, *response):
            assert kind in SCALARS or isinstance(kind, Records), kind
        self.name = name
        self.arguments = arguments
        self.response = response
        self.doc = doc

    def __repr__(self) -> str:
        return f"Command({self.name!r})"


STATUS = Command("Status", (), (
    ("state", TEXT), ("serial", TEXT), ("version", INT),
    ("server", TEXT),  # "" for a card on a token
    ("suite", TEXT),  # "" while no channel is open
    ("mode", TEXT), ("token", TEXT),  # "dongle" and the token's label for a card on a token, else ""
    ("slots", Records(("slot", TEXT), ("algorithm", TEXT), ("public_key_sha256", TEXT))),
    ("applications", TEXT_LIST),  # the card applications it carries (piv, openpgp)
    ("counters", TEXT_LIST), ("data", TEXT_LIST), ("memory_locked", BOOL),
    ("inserted_at", FLOAT),  # seconds since the epoch; 0.0 before the first insert
    # the PIN (vsc.card.pin): "9a=once,9c=always,..." ("" while not in use), how local paths verify, tries left
    # (-1 while not in use), and whether the local verification is open
    ("pin_policy", TEXT), ("pin_local", TEXT), ("pin_tries", INT), ("pin_verified", BOOL),
    ("pin_refusal", TEXT),  # the last key operation a local path (the agent...) refused for the PIN, and why
), "the card's state, serial, version, where it lives (server or token), channel suite, slot keys, counter and "
   "data object names, and its PIN policy and state")
PUBLIC_KEY = Command("PublicKey", (("slot", TEXT),), (("pem", BYTES),), "a slot's public key (PEM)")
SIGN_DIGEST = Command("SignDigest", (("slot", TEXT), ("digest", BYTES)), (("signature", BYTES),),
                      "sign a SHA-256 digest (32 bytes; 48: SHA-384) with a slot's key")
DECRYPT = Command("Decrypt", (("slot", TEXT), ("ciphertext", BYTES), ("padding", TEXT)), (("plaintext", BYTES),),
                  "decrypt with a slot's RSA key; padding pkcs1 or oaep")
COUNTER = Command("Counter", (("name", TEXT), ("delta", INT)), (("value", INT),),
                  "read (delta 0) or step a counter; synced to the server before it answers")
DATA_PUT = Command("DataPut", (("name", TEXT), ("value", BYTES)), (), "store a confidential data object (synced)")
DATA_GET = Command("DataGet", (("name", TEXT),), (("value", BYTES),), "read a confidential data object")
LICENSE_FUND = Command(
    "LicenseFund", (("keyfile", TEXT), ("vendor_key", BYTES)), (("name", TEXT), ("value", INT)),
    "fund a rental grant's counter once: the card verifies the keyfile's vendor signature and that it names this "
    "card's own key, and takes the counter's name and units from the signed keyfile, never from the caller")
CERT_PUT = Command("CertPut", (("slot", TEXT), ("der", BYTES)), (),
                   "store a slot's X.509 certificate (DER), synced")
CERT_GET = Command("CertGet", (("slot", TEXT),), (("der", BYTES),), "a slot's certificate (DER; empty: none)")
CHANGE_PASSWORD = Command("ChangePassword", (("old", TEXT), ("new", TEXT)), (("version", INT),),
                          "change the owner's password while the card is in use (the daemon stores neither)")
REMOVE = Command("Remove", (), (), "remove the card (upload, set idle); the daemon then exits")
VERIFY_PIN = Command("VerifyPin", (("pin", BYTES), ("keep", BOOL)), (),
                     "verify the user PIN (counted like PC/SC's VERIFY): keep True opens the local verification until "
                     "remove; keep False verifies for the next private-key operation on this connection only")
FORGET_PIN = Command("ForgetPin", (), (), "close the local PIN verification")
CHANGE_PIN = Command("ChangePin", (("which", TEXT), ("old", BYTES), ("new", BYTES)), (),
                     "change the PIN (which=pin) or the PUK (which=puk), given the current one")
UNBLOCK_PIN = Command("UnblockPin", (("puk", BYTES), ("new", BYTES)), (),
                      "set a new PIN with its tries restored, given the PUK")

COMMANDS = (STATUS, PUBLIC_KEY, SIGN_DIGEST, DECRYPT, COUNTER, DATA_PUT, DATA_GET, LICENSE_FUND, CERT_PUT, CERT_GET,
            CHANGE_PASSWORD, REMOVE, VERIFY_PIN, FORGET_PIN, CHANGE_PIN, UNBLOCK_PIN)


def status_fields(status: dict) -> dict:
    """The Status answer's fields from the card's status (vsc.card.session's ``status()``)."""
    return {
        "state": status["state"], "serial": status["serial"], "version": status["version"],
        "server": status.get("server") or "", "suite": status.get("suite") or "",
        "mode": status.get("mode") or "", "token": status.get("token") or "",
        "slots": [{"slot": slot, **info} for slot, info in sorted(status["slots"].items())],
        "applications": list(status.get("applications", ())),
        "counters": list(status["counters"]), "data": list(status["data"]),
        "memory_locked": bool(status["memory_locked"]), "inserted_at": float(status["inserted_at"] or 0.0),
        "pin_policy": status.get("pin_policy") or "", "pin_local": status.get("pin_local") or "",
        "pin_tries": int(status.get("pin_tries", -1)), "pin_verified": bool(status.get("pin_verified")),
        "pin_refusal": status.get("pin_refusal") or "",
    }


def status_of(fields: dict) -> dict:
    """The card's status (what ``vsc card status --json`` prints) from the Status answer's fields."""
    status = {
        "state": fields["state"], "serial": fields["serial"], "version": fields["version"],
        "server": fields["server"] or None, "suite": fields["suite"] or None,
        "slots": {r["slot"]: {"algorithm": r["algorithm"], "public_key_sha256": r["public_key_sha256"]}
                  for r in fields["slots"]},
        "applications": fields.get("applications", []),
        "counters": fields["counters"], "data": fields["data"], "memory_locked": fields["memory_locked"],
        "inserted_at": fields["inserted_at"] or None,
    }
    if fields["mode"]:
        status.update(mode=fields["mode"], token=fields["token"])
    if fields["pin_policy"]:
        status.update(pin_policy=fields["pin_policy"], pin_local=fields["pin_local"], pin_tries=fields["pin_tries"],
                      pin_verified=fields["pin_verified"], pin_refusal=fields["pin_refusal"])
    return status


class Refused(Exception):
    """The daemon answered with an error box: ``code`` (CARD_ERROR, or AMP's own) and one line of text."""

    def __init__(self, code: bytes, text: str):
        super().__init__(text)
        self.code = code


def encode_value(kind, value) -> bytes:
    if kind == TEXT:
        return value.encode("utf-8")
    if kind == INT:
        return b"%d" % value
    if kind == FLOAT:
        return str(float(value)).encode("ascii")
    if kind == BOOL:
        return b"True" if value else b"False"
    if kind == TEXT_LIST:
        items = [item.encode("utf-8") for item in value]
        return b"".join(len(item).to_bytes(2, "big") + item for item in items)
    if isinstance(kind, Records):
        return b"".join(encode_box({name.encode("ascii"): encode_value(k, record[name]) for name, k in kind.fields})
                        for record in value)
    return bytes(value)


def decode_value(kind, field: str, raw: bytes):
    """The value of ``field`` from its bytes; Malformed when they are not of ``kind``."""
    if kind == BYTES:
        return raw
    try:
        if kind == TEXT:
            return raw.decode("utf-8")
        if kind == INT:
            digits = raw[1:] if raw[:1] == b"-" else raw
            if not digits.isdigit() or len(raw) > 40:
                raise ValueError
            return int(raw)
        if kind == FLOAT:
            return float(raw.decode("ascii"))
        if kind == BOOL:
            return {b"True": True, b"False": False}[raw]
        if kind == TEXT_LIST:
            items, pos = [], 0
            while pos < len(raw):
                end = pos + 2 + int.from_bytes(raw[pos:pos + 2], "big")
                if pos + 2 > len(raw) or end > len(raw):
                    raise ValueError
                items.append(raw[pos + 2:end].decode("utf-8"))
                pos = end
            return items
        records, pos = [], 0
        while pos < len(raw):
            box, used = decode_box(raw[pos:])
            records.append(_fields(kind.fields, box, field))
            pos += used
        return records
    except (ValueError, KeyError, Incomplete):
        raise Malformed(f"control answer: {field} is not {_NAMES.get(kind, 'a list of records')}") from None


_NAMES = {TEXT: "UTF-8 text", INT: "an integer", FLOAT: "a number", BOOL: "True or False",
          TEXT_LIST: "a list of UTF-8 texts"}


def _fields(fields: tuple, box: dict[bytes, bytes], where: str) -> dict:
    out = {}
    for name, kind in fields:
        raw = box.get(name.encode("ascii"))
        if raw is None:
            raise Malformed(f"control answer: {where} without {name}")
        out[name] = decode_value(kind, name, raw)
    return out


#: the longest box either side reads, a request the daemon takes or an answer the client takes: four of
#: AMP's longest values with their keys, and then some (no command's box comes near it)
MAX_BOX = 4 * (MAX_VALUE + MAX_KEY + 4) + 2


def peer_uid(ucred: bytes) -> int:
    """The uid in a Linux ``struct ucred`` (what SO_PEERCRED gives: pid, uid, gid, native 32-bit integers)."""
    if len(ucred) != 12:
        raise Malformed(f"SO_PEERCRED gave {len(ucred)} bytes, not 12")
    return int.from_bytes(ucred[4:8], sys.byteorder)


def socket_wait(seconds: float) -> bytes:
    """
    The ``struct timeval`` (two native 64-bit integers: seconds, microseconds)
    that SO_RCVTIMEO / SO_SNDTIMEO take: the client's bound on one blocking
    send or receive (vsc.card.client), at least 1 us (zero would mean "wait forever").
    """
    us = max(1, int(seconds * 1_000_000))
    return (us // 1_000_000).to_bytes(8, sys.byteorder) + (us % 1_000_000).to_bytes(8, sys.byteorder)


def request(command: Command, ask: int, args: dict) -> dict[bytes, bytes]:
    """The request box for ``command`` with ``args`` (exactly its arguments: a caller's typo is a bug)."""
    names = [name for name, _kind in command.arguments]
    if sorted(args) != sorted(names):
        raise TypeError(f"{command.name} takes {', '.join(names) or 'no arguments'}, not {', '.join(args)}")
    box = {COMMAND: command.name.encode("ascii"), ASK: b"%d" % ask}
    for name, kind in command.arguments:
        box[name.encode("ascii")] = encode_value(kind, args[name])
    return box


def answer(command: Command, ask: int, box: dict[bytes, bytes]) -> dict:
    """
    The response fields of the answer box to request ``ask``; Refused for an
    error box; vsc.wire.ampbox.Malformed for an answer to another request, a
    missing field or a value of the wrong type.
    """
    tag = b"%d" % ask
    if box.get(ERROR) == tag:
        text = box.get(ERROR_DESCRIPTION, b"refused").decode("utf-8", "replace")
        raise Refused(box.get(ERROR_CODE, b""), " ".join(text.split()) or "refused")
    if box.get(ANSWER) != tag:
        raise Malformed(f"control answer: not an answer to this {command.name} request")
    return _fields(command.response, box, command.name)
