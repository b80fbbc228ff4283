"""
The card's PIN policy as it is kept in the protected information (an item
of kind PIN named ``pin-policy``): for each key slot whether its key needs
the user PIN never, once (verified until reset, deselect or remove) or
always (a verification right before each use, consumed by it), and how the
local paths (the control socket, ``vsc card``, the ssh-agent) verify:

    Policy: format 1 | count | count x (slot U8, policy U8) | local U8

``local``: PIN (the owner runs ``vsc card verify-pin``) or INSERT (the
insert password counts as one verification of the PIN on the local paths;
the default). Text form (``vsc card enroll --pin-policy``):
``9a=once,9c=always,...``; enrolment stores YubiKey's defaults unless told
otherwise. A card enrolled before policies existed has no item: LEGACY, the
rule its PIV application always had (9A, 9C, 9D once; 9E never).
"""

from __future__ import annotations

import enum
import functools

import attrs
import construct as c

from vsc.wire.codec import U8, Array, StrictEnum
from vsc.wire.errors import ErrorCode, WireError
from vsc.wire.slots import KEY_SLOTS, RETIRED_SLOTS, SLOT_REFS, SLOTS, slot_order, slot_text  # noqa: F401 (re-exported)

POLICY_ITEM = "pin-policy"


class PinPolicy(enum.IntEnum):
    NEVER = 1
    ONCE = 2
    ALWAYS = 3


class LocalVerify(enum.IntEnum):
    PIN = 1  # vsc card verify-pin opens the local verification (until remove)
    INSERT = 2  # the insert password counts as one verification on the local paths


#: YubiKey's defaults (9A once, 9C always, 9D once, 9E never)
DEFAULT_SLOTS = {0x9A: PinPolicy.ONCE, 0x9C: PinPolicy.ALWAYS, 0x9D: PinPolicy.ONCE, 0x9E: PinPolicy.NEVER}


@attrs.frozen
class Policy:
    slots: dict = attrs.field(factory=lambda: dict(DEFAULT_SLOTS), hash=False)
    local: LocalVerify = LocalVerify.INSERT

    def of(self, slot: int) -> PinPolicy:
        """A slot's policy (a slot the policy does not name: once)."""
        return self.slots.get(slot, PinPolicy.ONCE)

    def with_slot(self, slot: int, policy: PinPolicy) -> "Policy":
        return Policy({**self.slots, slot: policy}, self.local)

    def text(self) -> str:
        """The four main slots always, a retired slot only once a policy was chosen for it (its default: once)."""
        shown = SLOTS + tuple(s for s in RETIRED_SLOTS if s in self.slots)
        return ",".join(f"{s:02x}={self.of(s).name.lower()}" for s in shown)


DEFAULT = Policy()
LEGACY = Policy({0x9A: PinPolicy.ONCE, 0x9C: PinPolicy.ONCE, 0x9D: PinPolicy.ONCE, 0x9E: PinPolicy.NEVER})

_Entry = c.Struct("slot" / U8, "policy" / StrictEnum(U8, PinPolicy))
PolicySchema = c.Struct(
    "format" / c.Const(1, U8),
    "slots" / Array(U8, _Entry, len(KEY_SLOTS), 0, "slot policies"),
    "local" / StrictEnum(U8, LocalVerify),
    c.Terminated,
)


def encode_policy(policy: Policy) -> bytes:
    return PolicySchema.build(dict(slots=[dict(slot=s, policy=p) for s, p in sorted(policy.slots.items())],
                                   local=policy.local))


def decode_policy(data) -> Policy:
    """The policy item's value (cached: every private-key operation on every path reads it)."""
    return _decode(bytes(data))


@functools.lru_cache(maxsize=16)
def _decode(data: bytes) -> Policy:
    try:
        parsed = PolicySchema.parse(data)
    except c.ConstructError as e:
        raise WireError(ErrorCode.MALFORMED, f"PIN policy: {str(e).strip()}") from None
    return Policy({e.slot: e.policy for e in parsed.slots}, parsed.local)


def parse_text(text: str, base: Policy = DEFAULT, local: str | None = None) -> Policy:
    """
    ``"9a=once,9c=always"`` over ``base`` (unnamed slots keep base's
    policy) and ``local`` ("pin" or "insert"; None: base's); ValueError with
    one clear line.
    """
    slots = dict(base.slots)
    if local is not None and local.upper() not in LocalVerify.__members__:
        raise ValueError(f"--local-pin: {local!r} is not pin or insert")
    for part in (p.strip() for p in (text or "").split(",")):
        if not part:
            continue
        name, sep, value = part.partition("=")
        try:
            slot = int(name.strip(), 16)
        except ValueError:
            slot = -1
        if not sep or slot not in KEY_SLOTS:
            raise ValueError(f"--pin-policy: {part!r} is not SLOT=POLICY with a slot of 9a, 9c, 9d, 9e or 82-95")
        try:
            slots[slot] = PinPolicy[value.strip().upper()]
        except KeyError:
            raise ValueError(f"--pin-policy: {value.strip()!r} is not one of never, once, always") from None
    return Policy(slots, LocalVerify[local.upper()] if local is not None else base.local)
