"""Addresses as people read and write them: HOST:PORT, with an IPv6 host in brackets
([::1]:7443, as in URLs, RFC 3986), and the one wording of a listen failure."""
from __future__ import annotations

import errno

from .errors import STCPError


class ListenError(STCPError, OSError):
    """A listener could not bind (an OSError with the bind's errno); str() is the one line."""

    def __str__(self) -> str:
        return str(self.strerror)


def hostport(host: str, port: int) -> str:
    """'127.0.0.1:7443', '[::1]:7443': an IPv6 host (it has colons) in brackets, so the
    port cannot be read as part of it."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def listen_error(host: str, port: int, exc: OSError, what: str = "") -> ListenError:
    """The error, with one line, for a failed bind on host:port, worded the same for every listener
    (UDP on every datapath, the tunnel's TCP, the metrics exporter); `what` names a listener
    other than the server's own ('metrics')."""
    where = f"{hostport(host, port)} ({what})" if what else hostport(host, port)
    if exc.errno == errno.EADDRINUSE:
        reason = "address already in use (another process has it; pick another port or stop that process)"
    elif exc.errno == errno.EADDRNOTAVAIL:
        reason = "no local interface has that address"
    else:
        reason = exc.strerror or str(exc)
        reason = reason[:1].lower() + reason[1:]
    return ListenError(exc.errno, f"cannot listen on {where}: {reason}")
