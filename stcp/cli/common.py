"""What the `stcp` commands share: addresses, the Config from the common options, usage
errors, and the relay between an STCP stream and a TCP stream."""
from __future__ import annotations

import asyncio
from typing import Any, Optional, Tuple

from ..api import make_config
from ..connection import Config
from ..errors import STCPError

CHUNK = 1 << 16


class UsageError(Exception):
    """The command line is wrong (exit 2); str() says how."""


def parse_hostport(text: str, default_port: Optional[int] = None) -> Tuple[str, int]:
    """'HOST:PORT', '[IPv6]:PORT' or 'HOST' (with a default port)."""
    host, sep, port = text.rpartition(":")
    if text.startswith("[") and "]" in text:
        close = text.index("]")
        host, rest = text[1:close], text[close + 1:]
        port = rest[1:] if rest.startswith(":") else ""
    elif not sep or ":" in host:
        host, port = text, ""
    if not port:
        if default_port is None:
            raise UsageError(f"bad address {text!r}: expected HOST:PORT")
        return host, default_port
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"bad address {text!r}: port must be a number from 0 to 65535")
    if not host:
        raise UsageError(f"bad address {text!r}: missing host")
    return host, int(port)


def config_from_args(args: Any) -> Config:
    overrides = {}
    if getattr(args, "idle_timeout", None) is not None:
        overrides["idle_timeout"] = args.idle_timeout
    if getattr(args, "handshake_timeout", None) is not None:
        overrides["handshake_timeout"] = args.handshake_timeout
    if getattr(args, "max_datagram", None) is not None:
        overrides["max_datagram"] = args.max_datagram
    if getattr(args, "key_update_interval", None) is not None:
        overrides["key_update_interval"] = args.key_update_interval
    try:
        return make_config(args.cipher, **overrides)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


async def _pump(src: Any, dst: Any) -> None:
    """Copy until EOF, then finish dst's sending direction (half-close carries through)."""
    while True:
        data = await src.read(CHUNK)
        if not data:
            break
        dst.write(data)
        await dst.drain()
    if dst.can_write_eof():
        dst.write_eof()


async def splice(stcp_reader: Any, stcp_writer: Any, tcp_reader: Any, tcp_writer: Any) -> Optional[Exception]:
    """Relay both directions between an STCP stream and a TCP stream; the error that ended
    the relay early (None when both sides finished), for the caller to report."""
    error: Optional[Exception] = None
    try:
        await asyncio.gather(_pump(stcp_reader, tcp_writer), _pump(tcp_reader, stcp_writer))
    except (OSError, STCPError) as exc:
        error = exc
        # the error's class only: the peer learns that the relay failed, not where it led
        stcp_writer.abort(f"relay failed: {type(exc).__name__}")
    finally:
        tcp_writer.close()
    try:
        await stcp_writer.wait_closed()
    except STCPError:
        pass
    return error
