"""
What a card's serial may be, and when two serials are one card
(issue 11; docs/admin.md "Serials", docs/protocol.md §10.1).

A serial names a card to its owner, to the administrator and on the wire, so
it must mean one thing. vsc therefore:

* **normalises** it to Unicode NFC: "café" typed as e + U+0301 (NFD) and as
  U+00E9 (NFC) is one serial, wherever it enters — `vsc admin`, the card's
  ``card.ini`` and ``--serial``, and every request the server receives;
* restricts it to an **alphabet**: 1 to 64 bytes of UTF-8; letters of any
  script (Unicode categories L*), combining marks after a letter (Mn, Mc),
  decimal digits (Nd) and the four characters ``- _ . @``; the first
  character a letter or a digit (so a serial never reads as an option);
* refuses a **new** serial that is *confusable* with one that exists (a card
  or a pending enrolment): two serials are confusable when their skeletons
  are equal. The skeleton is the serial decomposed (NFKD), without combining
  marks, case-folded, every character that Unicode's confusables data
  (UTS #39) maps to an ASCII letter or digit replaced by it, and the ASCII
  look-alikes 0/o, 1/l, rn/m and vv/w folded. So a Cyrillic "аlice", "Alice",
  "ALICE" and "alicé" are all refused once "alice" exists.

What the skeleton does not cover: look-alikes that map to no ASCII letter
(two scripts that resemble each other but not Latin), and fonts that make
other characters look alike. An administrator who wants none of that
restricts serials to ASCII by convention.

Pure: no I/O, nothing from vsc but vsc.protocol._confusables.
"""

from __future__ import annotations

import unicodedata

MAX_BYTES = 64  # vsc.wire.ops.MAX_SERIAL
PUNCTUATION = "-_.@"
ALPHABET_TEXT = ("1 to 64 bytes (UTF-8) of letters, digits and - _ . @, starting with a letter or a digit "
                 "(docs/admin.md: Serials)")


class SerialError(ValueError):
    """A serial that is not acceptable (the message is one plain line)."""


def normalise(serial: str) -> str:
    """The serial in NFC (what the server, the card and `vsc admin` compare and store)."""
    return unicodedata.normalize("NFC", serial)


def _shown(serial: str) -> str:
    """The serial for a message: non-printable characters escaped (never echoed raw)."""
    return "".join(c if c.isprintable() and unicodedata.category(c)[0] != "M" else f"U+{ord(c):04X}"
                   for c in serial[:80])


def for_log(serial: str) -> str:
    """A serial as it came off the wire, for a log line: as it is when printable, else escaped (one line, no
    terminal escape sequences: a stranger's serial cannot forge log lines)."""
    return serial if serial.isprintable() else _shown(serial)


def problem(serial: str) -> str:
    """Why ``serial`` (already NFC) is outside the alphabet; '' when it is fine."""
    if not serial:
        return "it is empty"
    size = len(serial.encode("utf-8", "surrogatepass"))
    if size > MAX_BYTES:
        return f"it has {size} bytes of UTF-8, and a serial has at most {MAX_BYTES} bytes"
    prev = ""
    for i, ch in enumerate(serial):
        cat = unicodedata.category(ch)
        if cat[0] == "L" or cat == "Nd":
            pass
        elif cat in ("Mn", "Mc"):
            if prev not in ("L", "M"):
                return f"character {i + 1} is an accent that follows no letter"
        elif ch in PUNCTUATION:
            if i == 0:
                return f"it starts with {ch!r}"
        elif ch.isspace():
            return f"character {i + 1} is a space"
        else:
            what = repr(ch) if ch.isprintable() else f"U+{ord(ch):04X}"
            return f"character {i + 1} ({what}) is not a letter, a digit or one of {' '.join(PUNCTUATION)}"
        prev = cat[0] if cat[0] in "LM" else cat
    return ""


def check(serial: str) -> str:
    """The NFC form of ``serial`` if it is in the alphabet, else SerialError (one line)."""
    if not isinstance(serial, str):
        raise SerialError("a serial is text")
    nfc = normalise(serial)
    why = problem(nfc)
    if why:
        raise SerialError(f"invalid serial '{_shown(serial)}': {why}; a serial is {ALPHABET_TEXT}")
    return nfc


_TABLE: dict[str, str] | None = None
_ASCII_FOLDS = (("rn", "m"), ("vv", "w"), ("0", "o"), ("1", "l"))


def _table() -> dict[str, str]:
    global _TABLE
    if _TABLE is None:
        from vsc.protocol._confusables import LOOKALIKES

        _TABLE = {ch: target for target, chars in LOOKALIKES.items() for ch in chars}
    return _TABLE


def skeleton(serial: str) -> str:
    """The form two serials share when they look alike (see the module's docstring)."""
    table = _table()
    text = unicodedata.normalize("NFKD", serial)
    text = "".join(c for c in text if unicodedata.category(c) not in ("Mn", "Mc", "Me")).casefold()
    text = "".join(table.get(c, c) for c in text).casefold()
    for a, b in _ASCII_FOLDS:
        text = text.replace(a, b)
    return text


def confusable_with(serial: str, existing) -> str | None:
    """The first of ``existing`` serials that ``serial`` could be taken for (not itself), or None."""
    mine = skeleton(serial)
    for other in existing:
        if other != serial and skeleton(other) == mine:
            return other
    return None


def refuse_confusable(serial: str, existing) -> None:
    """SerialError when ``serial`` looks like an existing serial."""
    other = confusable_with(serial, existing)
    if other is not None:
        raise SerialError(f"serial '{_shown(serial)}' looks like the existing serial '{_shown(other)}'; "
                          f"choose one that cannot be mistaken for it")
