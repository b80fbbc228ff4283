"""
The PIV key slots by name, for every path (the protected information, ``vsc
card``, the local API, the ssh-agent). Plain Python with no imports: the
``vsc card`` fast path reads it without loading construct or attrs
(tests/test_cli.py); vsc.wire.pinpolicy re-exports it.
"""

from __future__ import annotations

#: the four PIV key slots every card has a key in after enrolment (9A, 9C, 9D, 9E)
SLOTS = (0x9A, 0x9C, 0x9D, 0x9E)
#: the twenty retired key-management slots 82-95 (SP 800-73-4 part 1 3.3.2, table 4b; a YubiKey 5 has all of
#: them): empty until GENERATE or IMPORT puts a key there; a YubiKey's default PIN policy for them is once
RETIRED_SLOTS = tuple(range(0x82, 0x96))
#: every key slot a key can be generated or imported into, in the order lists show them
KEY_SLOTS = SLOTS + RETIRED_SLOTS


def slot_text(ref: int) -> str:
    """A key slot's name on every path (the protected information, vsc card, the ssh-agent): ``9a``, ``82``."""
    return f"{ref:02x}"


#: slot name -> key reference, for every key slot (what ``--slot``, key_cache and the ssh-agent's list accept)
SLOT_REFS = {slot_text(ref): ref for ref in KEY_SLOTS}


def slot_order(name: str) -> int:
    """Sort key of a slot name: 9a, 9c, 9d, 9e, then 82..95, then anything else."""
    ref = SLOT_REFS.get(name)
    return KEY_SLOTS.index(ref) if ref is not None else len(KEY_SLOTS)
