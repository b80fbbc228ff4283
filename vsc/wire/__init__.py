"""
vsc.wire: every byte vsc puts on a wire, defined once as a construct schema
with attrs values in and out. Nothing outside this package packs bytes.
"""

from vsc.wire.codec import (
    HEADER_SIZE,
    MAX_FRAME_BODY,
    MAX_HANDSHAKE_BODY,
    PROTOCOL_VERSION,
    CARD_TO_SERVER,
    SERVER_TO_CARD,
    Deframer,
    Message,
    MessageType,
    decode_frame,
    decode_inner,
    encode_frame,
    encode_inner,
    record_aad,
    registry,
    seq_bytes,
)
from vsc.wire.errors import ErrorCode, WireError
from vsc.wire import messages as _messages  # noqa: F401  (registers the channel messages)
from vsc.wire import ops as _ops  # noqa: F401  (registers the operation messages)

__all__ = [
    "HEADER_SIZE",
    "MAX_FRAME_BODY",
    "MAX_HANDSHAKE_BODY",
    "PROTOCOL_VERSION",
    "CARD_TO_SERVER",
    "SERVER_TO_CARD",
    "Deframer",
    "ErrorCode",
    "Message",
    "MessageType",
    "WireError",
    "decode_frame",
    "decode_inner",
    "encode_frame",
    "encode_inner",
    "record_aad",
    "registry",
    "seq_bytes",
]
