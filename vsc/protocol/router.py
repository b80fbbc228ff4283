"""
Several card applications on one card and one PC/SC link (a YubiKey carries
PIV and OpenPGP side by side): SELECT by DF name (00 A4 04 xx AID) picks the
application whose AID it names; every other command goes to the application
selected last. Selecting another application deselects the previous one (its
volatile security status is cleared, ISO/IEC 7816-4 7.1.1) once the named
application has accepted the SELECT (9000, 61xx, or a 62xx warning such as
OpenPGP's 6285 "terminated"); a SELECT of an AID no carried application has
(6A82), or one the named application refuses (its own AID test, P2, class),
changes nothing but this: like any command, it ends a command chain or an
answer waiting for GET RESPONSE in the selected application (ISO/IEC 7816-4
5.3.3, 5.3.4), which never sees it.

Each application is a sans-IO applet (vsc.protocol.applet) with
``process(raw)`` (a generator of effects), ``reset()`` and ``interrupted()``, given to the
router with the test of the AIDs it answers to. The router is an applet too,
so the glue (vsc.card.vpcd) drives it like a single one.
"""

from __future__ import annotations

from typing import Any, Callable, Generator, Protocol, Sequence

from vsc.protocol.applet import SW_NOT_FOUND, Effect
from vsc.wire import apdu
from vsc.wire.apdu import ApduError

INS_SELECT = 0xA4
SELECT_BY_NAME = 0x04


class Applet(Protocol):
    def process(self, raw: bytes) -> Generator[Effect, Any, bytes]: ...

    def reset(self) -> None: ...

    def interrupted(self) -> None: ...


class AppletRouter:
    """The card's applications in order, each with its AID test; the first is current until another is selected."""

    def __init__(self, applets: Sequence[tuple[Callable[[bytes], bool], Applet]]):
        if not applets:
            raise ValueError("a card carries at least one application")
        self.matchers = [m for m, _a in applets]
        self.applets = [a for _m, a in applets]
        self.current = self.applets[0]

    def reset(self) -> None:
        for a in self.applets:
            a.reset()
        self.current = self.applets[0]

    def _target(self, raw: bytes) -> Applet | None:
        """The applet a SELECT by DF name names (None: no such application), else the current one."""
        if len(raw) < 4 or raw[1] != INS_SELECT or raw[2] != SELECT_BY_NAME or raw[0] & 0x10:
            return self.current  # not a SELECT by name (what the parsed command would say): no parse needed
        try:
            cmd = apdu.parse_command(raw)
        except ApduError:
            return self.current
        if cmd.ins != INS_SELECT or cmd.p1 != SELECT_BY_NAME or cmd.cla & 0x10:
            return self.current
        for matches, a in zip(self.matchers, self.applets):
            if matches(cmd.data):
                return a
        return None

    def interrupted(self) -> None:
        self.current.interrupted()

    def process(self, raw: bytes) -> Generator[Effect, Any, bytes]:
        target = self._target(raw)
        if target is None:
            yield from ()
            self.current.interrupted()  # a command it did not see ends its chain and pending answer all the same
            return apdu.build_response(b"", SW_NOT_FOUND)
        if target is self.current:
            return (yield from target.process(raw))
        response = yield from target.process(raw)
        if _accepted(response):
            self.current.reset()  # deselected: its security status goes
            self.current = target
        else:
            target.reset()  # refused: the current application stays selected, the other one as it was
            self.current.interrupted()  # ... but its chain and pending answer end, as on any other command
        return response


def _accepted(response: bytes) -> bool:
    """Whether a SELECT's response says the application is now selected: 9000, 61xx (more data), 62xx (a warning)."""
    sw = int.from_bytes(response[-2:], "big")
    return sw == 0x9000 or sw >> 8 in (0x61, 0x62)


def piv_matches(aid: bytes) -> bool:
    """The PIV AID or a prefix of it down to the RID (yubico-piv-tool selects A0 00 00 03 08)."""
    from vsc.protocol import piv

    return piv.MIN_AID_PREFIX <= len(aid) <= len(piv.PIV_AID) and piv.PIV_AID.startswith(aid)
