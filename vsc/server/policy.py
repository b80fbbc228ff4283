"""
Server policy: which authentication methods a card must pass ([0082]-[0084]),
the lockout schedule, enrolment codes, and the operation deadlines.
Read from the [server] section of DIR/vsc-server.ini (see docs/admin.md).
"""

from __future__ import annotations

import base64
import json

import attrs

from vsc import crypto
from vsc.protocol.lockout import LockoutPolicy
from vsc.protocol.auth import METHOD_LABELS as NAMES
from vsc.protocol.auth import METHOD_NAMES
from vsc.protocol.auth import code_hash  # noqa: F401  (re-exported for the admin commands)
from vsc.protocol.server_ops import OpsPolicy
from vsc.wire.ops import AuthMethod


@attrs.frozen
class Policy:
    #: implementation-auth methods every card must pass, besides the password (always required)
    impl_auth: tuple[AuthMethod, ...] = (AuthMethod.MASTER_KEY,)
    lockout: LockoutPolicy = LockoutPolicy()
    #: implementation authentication must be answered within this many seconds ([0050])
    auth_deadline: float = 30.0
    #: enrolment codes expire after this long
    code_ttl: float = 7 * 86400.0

    @classmethod
    def from_settings(cls, settings: dict) -> "Policy":
        names = [n.strip() for n in settings.get("impl_auth", "master-key").split(",") if n.strip()]
        try:
            methods = tuple(METHOD_NAMES[n] for n in names if n != "password")
        except KeyError as e:
            raise ValueError(f"unknown authentication method {e.args[0]!r}; known: {', '.join(METHOD_NAMES)}") from None
        return cls(
            impl_auth=methods,
            lockout=LockoutPolicy(
                threshold=int(settings.get("lockout_threshold", 5)),
                base=float(settings.get("lockout_base", 30)),
                maximum=float(settings.get("lockout_max", 3600)),
                shared_threshold=int(settings.get("lockout_shared", 20)),
                source_threshold=int(settings.get("lockout_source", 50)),
            ),
            auth_deadline=float(settings.get("auth_deadline", 30)),
            code_ttl=float(settings.get("code_ttl", 7 * 86400)),
        )

    def ops(self) -> OpsPolicy:
        return OpsPolicy(impl_auth=self.impl_auth, auth_deadline=self.auth_deadline, lockout=self.lockout)

    def initial_auth_info(self) -> str:
        """The authorization info stored with a new card: the methods it must pass."""
        methods = ["password"] + [NAMES[m] for m in self.impl_auth]
        return json.dumps({"methods": methods}, sort_keys=True)


def new_enrolment_code(rand: crypto.RandomBytes = crypto.system_random) -> str:
    """A 120-bit one-time code, grouped for reading aloud: XXXXX-XXXXX-XXXXX-XXXXX-XXXXX-XXXXX."""
    text = base64.b32encode(rand(15)).decode("ascii")
    return "-".join(text[i : i + 5] for i in range(0, len(text), 5))


