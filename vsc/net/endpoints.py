"""
Twisted endpoint descriptions a person typed (``--server``, ``--listen``,
``--pcsc``, card.ini's ``server``, vsc-server.ini's ``listen``), parsed
where they are read: one that is not an endpoint is an EndpointError whose
message names it in plain words (never a Twisted class name or a
traceback), before anything else is done with it. Parsing builds the
endpoint object only: nothing connects or listens.
"""

from __future__ import annotations


class EndpointError(ValueError):
    """A description that is not a usable endpoint (message for the user, one line)."""


def _detail(e: Exception) -> str:
    if isinstance(e, TypeError):  # the endpoint class's own signature: missing or unexpected parameters
        return "a parameter is missing or not expected"
    if isinstance(e, OSError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return " ".join(str(e).split()) or "it cannot be parsed"


def _parse(parse, reactor, description: str, kind: str, what: str):
    if not description or not description.strip():
        raise EndpointError(f"{what} is empty: it must be a Twisted {kind} endpoint, e.g. tcp:127.0.0.1:7390")
    try:
        endpoint = parse(reactor, description)
    except Exception as e:  # noqa: BLE001 - any parse failure of a description is the description's fault
        raise EndpointError(f"{what} {description!r} is not a Twisted {kind} endpoint: {_detail(e)}") from None
    # Twisted keeps a TCP port as given: one out of range fails only when it connects or listens
    port = getattr(endpoint, "_port", None)
    if isinstance(port, int) and not 0 <= port <= 65535:
        raise EndpointError(f"{what} {description!r} is not a Twisted {kind} endpoint: port {port} is not from 0 "
                            "to 65535")
    return endpoint


def client(reactor, description: str, what: str = "the endpoint"):
    """The client endpoint ``description`` names; EndpointError naming ``what`` if it names none."""
    from twisted.internet.endpoints import clientFromString

    return _parse(clientFromString, reactor, description, "client", what)


def server(reactor, description: str, what: str = "the endpoint"):
    """The server endpoint ``description`` names; EndpointError naming ``what`` if it names none."""
    from twisted.internet.endpoints import serverFromString

    return _parse(serverFromString, reactor, description, "server", what)
