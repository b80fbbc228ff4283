"""
vsc.wire: every byte vsc puts on a wire, defined once as a construct schema
with attrs values in and out. Nothing outside this package packs bytes.

The package itself is light: the names below load on first use (the frame
codec, with construct and the registration of the channel and operation
messages; the error codes, with enum), so that ``vsc.wire.control`` and
``vsc.wire.ampbox`` (the card's control socket, on the path of every ``vsc
card`` command) can be imported without them.
"""

_ERROR_NAMES = ("ErrorCode", "WireError")
_CODEC_NAMES = (
    "HEADER_SIZE",
    "MAGIC",
    "MAX_FRAME_BODY",
    "MAX_HANDSHAKE_BODY",
    "PROTOCOL_VERSION",
    "CARD_TO_SERVER",
    "SERVER_TO_CARD",
    "Deframer",
    "Message",
    "MessageType",
    "decode_frame",
    "decode_inner",
    "encode_frame",
    "encode_inner",
    "record_aad",
    "registry",
    "seq_bytes",
)

__all__ = [*_ERROR_NAMES, *_CODEC_NAMES]


def __getattr__(name: str):
    if name in _ERROR_NAMES:
        from vsc.wire import errors

        value = getattr(errors, name)
        globals()[name] = value
        return value
    if name in _CODEC_NAMES:
        from vsc.wire import codec
        from vsc.wire import messages as _messages  # noqa: F401  (registers the channel messages)
        from vsc.wire import ops as _ops  # noqa: F401  (registers the operation messages)

        value = getattr(codec, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'vsc.wire' has no attribute {name!r}")
