"""
One line of plain words for the errors of this layer: a protected channel
that closed (ChannelClosedError, with its ALERT code) and a connection that
could not be made (Twisted's ConnectError). The command line and the card
daemon show these lines; neither names a Python class.

``describe`` imports nothing: an error of a module that was never imported
cannot be at hand, so it looks the classes up in ``sys.modules`` (a process
that never loaded Twisted does not load it just to word an error).
"""

from __future__ import annotations

import sys

from vsc.wire.errors import ErrorCode

CHANNEL_HINTS = {
    ErrorCode.SERVER_KEY_MISMATCH: "the server's key is not the one pinned with --server-key (wrong server, or a man "
                                   "in the middle)",
    ErrorCode.NO_COMMON_SUITE: "the server accepts none of the suites offered",
    ErrorCode.INSECURE_SUITE_REFUSED: "the server does not enable des-cbc-md5",
    ErrorCode.FORWARD_SECRECY_REQUIRED: "one end requires forward secrecy (X25519) and the other does not offer it",
    ErrorCode.HANDSHAKE_TIMEOUT: "the handshake timed out",
}

# Twisted's ConnectError subclasses, in plain words (looked up by name: see the module docstring)
CONNECT_WORDS = (
    ("ConnectionRefusedError", "connection refused"),
    ("TCPTimedOutError", "timed out"),
    ("TimeoutError", "timed out"),
    ("DNSLookupError", "the host name was not found"),
    ("UnknownHostError", "unknown host"),
    ("NoRouteError", "no route to the host"),
    ("ConnectingCancelledError", "cancelled"),
)


def describe(e: BaseException) -> str | None:
    """One line for a channel or connection error; None for any other error."""
    channel = sys.modules.get("vsc.net.channel")
    if channel is not None and isinstance(e, channel.ChannelClosedError):
        hint = CHANNEL_HINTS.get(e.code)
        return f"channel closed: {e.code.name}" + (f": {hint}" if hint else f" ({e.reason})" if e.reason else "")
    terror = sys.modules.get("twisted.internet.error")
    if terror is not None and isinstance(e, terror.ConnectError):
        for name, words in CONNECT_WORDS:
            cls = getattr(terror, name, None)
            if cls is not None and isinstance(e, cls):
                return f"cannot connect to the server: {words}"
        os_error = getattr(e, "osError", None)
        if isinstance(os_error, int):  # an errno, its words beside it (a UNIX socket endpoint)
            import os

            detail = (e.args[0] if e.args and isinstance(e.args[0], str) and e.args[0] else "") or os.strerror(os_error)
        else:
            detail = getattr(os_error, "strerror", None) or (str(os_error) if os_error else "") or "connection failed"
        return f"cannot connect to the server: {detail}"
    return None
