"""Error codes carried on the wire, and the one exception the codec raises."""

from __future__ import annotations

import enum


class ErrorCode(enum.IntEnum):
    """
    Channel error codes (ALERT frames). docs/protocol.md section "Errors" is
    normative. 1-63: channel; 64-127: operations (see ResultCode).
    """

    CLOSE_NOTIFY = 0  # orderly close, not an error
    PROTOCOL_VERSION = 1  # frame header version is not ours
    MALFORMED = 2  # a field failed to parse, trailing bytes, bad magic
    FRAME_TOO_LARGE = 3  # length field above the maximum for this state
    UNKNOWN_TYPE = 4  # message type not in the registry
    UNEXPECTED_MESSAGE = 5  # known type, wrong state or direction
    HANDSHAKE_FAILED = 6  # key transport undecryptable OR wrong r1 (deliberately one code)
    NO_COMMON_SUITE = 7  # the card offered nothing this server accepts
    SUITE_NOT_OFFERED = 8  # server chose a suite the card did not offer
    KEY_CONFIRMATION_FAILED = 9  # finished MAC mismatch (tampering, downgrade, MITM)
    BAD_RECORD = 10  # record tag / MAC mismatch
    REPLAYED_RECORD = 11  # sequence number already seen
    OUT_OF_ORDER_RECORD = 12  # sequence number ahead: a record was dropped or reordered
    HANDSHAKE_TIMEOUT = 13  # handshake not finished within its deadline
    FORWARD_SECRECY_REQUIRED = 14  # one end requires X25519, the other did not offer it
    SERVER_KEY_MISMATCH = 15  # card: server key does not match the pinned fingerprint
    INSECURE_SUITE_REFUSED = 16  # des-cbc-md5 offered/chosen without being enabled
    IDLE_TIMEOUT = 17  # no traffic on an established channel for too long
    INTERNAL_ERROR = 18  # a bug on the sender's side; details only in its log
    SERVER_BUSY = 19  # server: too many handshakes or unauthenticated connections now (from this source); retry later


class WireError(Exception):
    """Bytes that are not a valid vsc frame or message. ``code`` says which kind."""

    def __init__(self, code: ErrorCode, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __str__(self) -> str:
        return f"{self.code.name}: {self.message}"
