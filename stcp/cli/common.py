"""What the `stcp` commands share: addresses, the Config from the common options, usage
errors, and the relay between an STCP stream and a TCP stream."""
from __future__ import annotations

import asyncio
import os
import socket
import struct
from typing import Any, Optional, Tuple

from ..api import make_config
from ..cid_layout import DEFAULT_SERVER_ID_BITS
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
    if getattr(args, "server_id", None) is not None or getattr(args, "server_id_bits", None) is not None:
        overrides["server_id"] = args.server_id or 0
        overrides["server_id_bits"] = DEFAULT_SERVER_ID_BITS if args.server_id_bits is None else args.server_id_bits
    try:
        return make_config(args.cipher, **overrides)
    except ValueError as exc:
        # Config names its fields; a person at the command line knows the flags
        raise UsageError(str(exc).replace("server_id_bits", "--server-id-bits").replace("server_id", "--server-id")) \
            from None


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


def describe(exc: OSError) -> str:
    """What went wrong with a TCP connection, without its address (asyncio's connect errors
    quote it): the relay's STCP peer learns what failed, never where."""
    return os.strerror(exc.errno) if exc.errno else type(exc).__name__


def reset_tcp(tcp_writer: asyncio.StreamWriter) -> None:
    """Close a TCP connection with a reset (SO_LINGER 0), not a FIN: its peer must not take a
    stream that was cut short for one that ended."""
    sock = tcp_writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    tcp_writer.transport.abort()


async def splice(stcp_reader: Any, stcp_writer: Any, tcp_reader: Any, tcp_writer: Any) -> Optional[Exception]:
    """Relay both directions between an STCP stream and a TCP stream, and carry how each ended
    to the other: a finish (FIN, or the STCP stream's end) as a finish, an abort of the STCP
    connection as a TCP reset, a failed TCP connection as an STCP abort. Cancelled (the
    command is stopping), it aborts both. Returns the error that ended the relay, if any."""
    tasks = (asyncio.ensure_future(_pump(stcp_reader, tcp_writer)),
             asyncio.ensure_future(_pump(tcp_reader, stcp_writer)))
    error: Optional[Exception] = None
    try:
        await asyncio.gather(*tasks)
    except STCPError as exc:              # first: ConnectionTerminated is an OSError too
        error = exc
        reset_tcp(tcp_writer)
    except OSError as exc:                # the TCP side failed (reset by its peer, ...)
        error = exc
        stcp_writer.abort(f"relay failed: {describe(exc)}")
    except asyncio.CancelledError:
        stcp_writer.abort("relay stopped: the command was interrupted")
        reset_tcp(tcp_writer)
        raise
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        tcp_writer.close()
    try:
        await stcp_writer.wait_closed()
    except STCPError:
        pass
    return error
