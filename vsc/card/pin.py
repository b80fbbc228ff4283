"""
The user PIN on the card's local paths — the control socket (the local API,
``vsc card sign/decrypt/...``, the licensing API) and the ssh-agent — over
one CardSession. The PIN state is the card's one record (vsc.protocol.pins:
the same value and retry counter as the PIV PIN over PC/SC); the decisions
are vsc.protocol.pins' (``authorize``), performed here on the session.

How the local paths verify (chosen at enrolment, vsc.wire.pinpolicy):

* ``local=pin``: ``vsc card verify-pin`` opens the local verification; it
  lasts until the card is removed (or ``vsc card verify-pin --forget``).
* ``local=insert`` (the default): the insert password counts as one
  verification of the PIN on the local paths, for as long as the card is in
  use — the control and agent sockets are the owner's alone (0600).

Either way, a slot whose policy is ``always`` needs the PIN with the one
request that uses it (``vsc card sign --pin-file``); the ssh-agent cannot ask
for a PIN, so it refuses such slots (an ordinary agent failure, and a log
line that says why). A blocked PIN refuses every slot that needs the PIN, on
every path. Wrong PINs given here count against the same counter.
"""

from __future__ import annotations

from twisted.logger import Logger

from vsc.protocol import pins
from vsc.protocol.applet import SW_BLOCKED, EffectFailed, Load, Notice, Store, run_async, run_sync
from vsc.protocol.card_lifecycle import CardError
from vsc.wire.pinpolicy import SLOT_REFS
from vsc.wire.protected import ItemKind

_SLOTS = SLOT_REFS  # 9a, 9c, 9d, 9e and the retired 82..95; any other name (pgp-*, f9) has no PIN policy here


def refusal(sw: int, slot: str = "", policy: pins.PinPolicy | None = None) -> str:
    """One line for the owner: why a PIN check refused."""
    if sw == SW_BLOCKED:
        return ("the PIN is blocked (0 tries left): every slot that needs the PIN is refused on every path; "
                "unblock it with the PUK (vsc card unblock-pin)")
    if sw >> 8 == 0x63:
        return f"wrong PIN ({sw & 0x0F} tries left)"
    if sw == 0x6A80:
        return "a new PIN or PUK has 6 to 8 characters"
    if policy is pins.PinPolicy.ALWAYS:
        return f"slot {slot} needs the PIN with every use (PIN policy always): give it with this request (--pin-file)"
    if sw == pins.SW_PIN_NEEDED:
        return f"slot {slot} needs the PIN: run vsc card verify-pin first (PIN policy once), or give --pin-file"
    return f"the PIN check failed ({sw:04X})"


class LocalPin:
    """The local paths' PIN verification of one CardSession (volatile: it ends when the card is removed)."""

    log = Logger()

    def __init__(self, session):
        self.session = session
        self._verified_in: float | None = None  # the insert (session.inserted_at) it was verified in
        self.last_refusal = ""  # the last key operation a local path refused, and why (vsc card status)

    # -- effects of vsc.protocol.pins, performed on the session

    async def _run(self, gen):
        return await run_async(gen, self._perform)

    async def _perform(self, effect):
        if isinstance(effect, Load):
            return self.session.require_usable().read(effect.kind, effect.name, effect.derive)
        if isinstance(effect, Store):
            try:
                await self.session.put_item(effect.kind, effect.name, effect.value)
            except Exception as e:  # noqa: BLE001 - the change was undone by the session; nothing was compared
                raise EffectFailed(f"not stored: {e}") from None
            return None
        if isinstance(effect, Notice):
            self.log.info("PIN {event} {fields}", event=effect.event, fields=effect.fields)
            return None
        raise EffectFailed(f"unknown effect {effect!r}")

    def _load(self, name: str, derive):
        return self.session.require_usable().read(ItemKind.PIN, name, derive)

    # -- state

    def policy(self) -> pins.Policy:
        policy = self._load(pins.POLICY_ITEM, pins.policy_of)
        return pins.LEGACY_POLICY if policy is None else policy

    def verified(self) -> bool:
        """Whether the local verification is open (local=insert: while in use; local=pin: since verify-pin)."""
        if not self.session.usable:
            return False
        if self.policy().local is pins.LocalVerify.INSERT:
            return True
        return self._verified_in is not None and self._verified_in == self.session.inserted_at

    def tries_left(self) -> int:
        tries = self._load(pins.USER_PIN, pins.tries_of)
        return pins.DEFAULT_TRIES if tries is None else tries

    def status(self) -> dict:
        """What ``vsc card status`` shows about the PIN (empty when the card is not in use)."""
        if not self.session.usable:
            return {}
        policy = self.policy()
        return {"pin_policy": policy.text(), "pin_local": policy.local.name.lower(), "pin_tries": self.tries_left(),
                "pin_verified": self.verified(), "pin_refusal": self.last_refusal}

    # -- the decisions

    async def authorize(self, slot: str, fresh: bool = False, path: str = "local API") -> None:
        """
        Before a private-key operation on ``slot``: returns, or raises
        CardError with the reason (and a log line: the owner learns why).
        ``fresh``: the PIN was verified for this one operation.
        """
        ref = _SLOTS.get(slot)
        if ref is None:
            raise CardError(f"no key in slot {slot}")
        self._decided(slot, path, *(await self._run(pins.authorize(ref, self.verified(), fresh))))

    def authorize_now(self, slot: str, fresh: bool = False, path: str = "local API") -> None:
        """
        ``authorize`` at once: the decision only reads the card memory (its
        effects are Loads), so the local API's hot path takes it without a
        coroutine (vsc.card.control).
        """
        ref = _SLOTS.get(slot)
        if ref is None:
            raise CardError(f"no key in slot {slot}")
        self._decided(slot, path, *run_sync(pins.authorize(ref, self.verified(), fresh), self._perform_now))

    def _perform_now(self, effect):
        if isinstance(effect, Load):
            return self.session.require_usable().read(effect.kind, effect.name, effect.derive)
        raise EffectFailed(f"not an effect the PIN check performs at once: {effect!r}")

    def _decided(self, slot: str, path: str, sw: int, policy) -> None:
        if sw != pins.SW_OK:
            why = refusal(sw, slot, policy)
            self.log.warn("{path}: slot {slot} refused: {why}", path=path, slot=slot, why=why)
            self.last_refusal = f"{path}: {why}"
            raise CardError(why)

    async def verify(self, pin: bytes, keep: bool = True) -> None:
        """
        ``vsc card verify-pin``: check the PIN (counted like any VERIFY). With
        ``keep`` a match opens the local verification until remove; without,
        the caller grants one operation (a slot of policy always).
        """
        sw = await self._run(pins.verify_pin(pin))
        if sw != pins.SW_OK:
            self.log.warn("local PIN verification refused: {why}", why=refusal(sw))
            raise CardError(refusal(sw))
        if keep:
            self._verified_in = self.session.inserted_at

    def forget(self) -> None:
        self._verified_in = None

    async def change(self, old: bytes, new: bytes) -> None:
        sw = await self._run(pins.change_secret(pins.USER_PIN, old, new))
        if sw != pins.SW_OK:
            raise CardError(refusal(sw))

    async def change_puk(self, old: bytes, new: bytes) -> None:
        sw = await self._run(pins.change_secret(pins.PUK, old, new))
        if sw != pins.SW_OK:
            raise CardError(refusal(sw).replace("wrong PIN", "wrong PUK").replace("the PIN is blocked", "the PUK is blocked"))

    async def unblock(self, puk: bytes, new: bytes) -> None:
        sw = await self._run(pins.unblock_pin(puk, new))
        if sw != pins.SW_OK:
            text = refusal(sw)
            if sw == SW_BLOCKED:
                text = "the PUK is blocked (0 tries left): the PIN cannot be unblocked any more"
            raise CardError(text.replace("wrong PIN", "wrong PUK"))
        self._verified_in = None


def local_pin(session) -> LocalPin:
    """The session's LocalPin (one per session, made on first use)."""
    gate = getattr(session, "_local_pin", None)
    if gate is None:
        gate = LocalPin(session)
        session._local_pin = gate
    return gate
