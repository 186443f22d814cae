"""Addresses a server may listen on: this machine's own, found by trying to bind one.

Every ``host`` a config names for a listener goes through :func:`check_bind_host` when the
config is built, so ``--host 10.9.9.9`` on a machine without that address fails at once with
one line instead of a traceback from deep inside a server's startup. ``0.0.0.0``, ``::``
and loopback addresses are always fine; anything else must resolve to an address a socket of
this machine can bind (port 0: nothing stays bound).
"""

from __future__ import annotations

import ipaddress
import socket

from kvcake.common.errors import InvalidParamsError

_ALWAYS = ("", "localhost")


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only (``localhost``, 127.0.0.0/8, ::1)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _always_local(host: str) -> bool:
    if host in _ALWAYS:
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def check_bind_host(host: str, what: str = "host") -> str:
    """``host``, when a listener of this machine can bind it; else ``InvalidParamsError``
    naming ``what`` (the config field or flag) and why, in one line."""
    if _always_local(host):
        return host
    hint = "use 127.0.0.1, 0.0.0.0 or one of this machine's own addresses"
    try:
        family, _, _, _, address = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as exc:
        raise InvalidParamsError(f"{what} {host!r} is not an address of this machine (it does "
                                 f"not resolve: {getattr(exc, 'strerror', None) or exc}); "
                                 f"{hint}") from None
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        try:
            probe.bind(address)
        except OSError as exc:
            raise InvalidParamsError(f"{what} {host!r} is not an address of this machine "
                                     f"({exc.strerror or exc}); {hint}") from None
    return host
