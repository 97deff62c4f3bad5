"""Closing releases descriptors at once: after a client's wait_closed() (a graceful end or an
abort), after a failed open_connection, after a server's close() and a blocking client's
close(), the sockets and eventfds involved are closed without the garbage collector's help,
as an asyncio transport's are once wait_closed() returns. A program that opens many
connections must not run out of descriptors between collections."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket

import pytest

import stcp
from stcp.errors import HandshakeTimeout, PeerUnreachable
from tests.support.servers import echo


def open_files() -> set:
    """What this process's descriptors point at (socket:[inode], anon_inode:[eventfd], ...):
    inodes are not reused while open, unlike descriptor numbers another thread may take."""
    out = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            out.add(os.readlink(f"/proc/self/fd/{fd}"))
    return out


@contextlib.contextmanager
def no_gc():
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_a_clients_socket_is_closed_when_wait_closed_returns():
    async def main():
        server = await stcp.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            for ending in ("graceful", "abort"):
                before = open_files()
                r, w = await stcp.open_connection("127.0.0.1", port, server_key=server.public_key)
                mine = open_files() - before
                assert any(name.startswith("socket:") for name in mine)
                w.write(b"x")
                if ending == "graceful":
                    w.write_eof()
                    assert await r.read() == b"x"
                    w.close()
                    await w.wait_closed()
                else:
                    w.abort("done")
                    with pytest.raises(stcp.ConnectionTerminated, match="APPLICATION_ABORT"):
                        await w.wait_closed()
                assert not mine & open_files(), f"{ending}: still open after wait_closed(): {mine & open_files()}"
        finally:
            server.close()
            await server.wait_closed()
    with no_gc():
        run(main())


def test_a_failed_open_connection_leaves_no_descriptor():
    """Nobody listens on the port: ICMP "port unreachable" ends the handshake at once
    (PeerUnreachable); a silent address ends it at the handshake timeout. Neither leaves
    the client's socket behind."""
    config = stcp.make_config(handshake_timeout=0.5)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]

    async def main():
        before = open_files()
        with pytest.raises(PeerUnreachable):
            await stcp.open_connection("127.0.0.1", closed_port, server_key=stcp.UNAUTHENTICATED, config=config)
        assert open_files() <= before
        loop = asyncio.get_running_loop()
        transport, _ = await loop.create_datagram_endpoint(asyncio.DatagramProtocol, local_addr=("127.0.0.1", 0))
        try:
            before = open_files()
            with pytest.raises(HandshakeTimeout):
                await stcp.open_connection("127.0.0.1", transport.get_extra_info("sockname")[1],
                                           server_key=stcp.UNAUTHENTICATED, config=config)
            assert open_files() <= before
        finally:
            transport.close()
    with no_gc():
        run(main())


def test_a_servers_socket_is_closed_when_close_returns():
    async def main():
        before = open_files()
        server = await stcp.start_server(echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        r, w = await stcp.open_connection("127.0.0.1", port, server_key=server.public_key)
        w.write(b"x")
        assert await r.read(1) == b"x"
        server.close()                     # with a connection open: it is told and forgotten
        await server.wait_closed()
        with pytest.raises(stcp.ConnectionTerminated):
            await w.wait_closed()
        assert open_files() <= before
    with no_gc():
        run(main())


def test_a_blocking_clients_descriptors_are_closed_by_close(stcp_server):
    server = stcp_server()
    with no_gc():
        before = open_files()
        conn = stcp.connect(server.address, timeout=10, server_key=server.public_key)
        mine = open_files() - before
        assert len(mine) == 2              # its socket and its eventfd
        conn.sendall(b"x")
        assert conn.recv(1) == b"x"
        conn.close()
        assert not mine & open_files()
