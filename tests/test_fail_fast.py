"""Failing fast over real sockets (issue 13 item 4): a client learns at once that nothing
listens (ICMP port unreachable, tests/test_blocking.py and tests/test_cli.py) and, within one
round trip, that a server which crashed and restarted on the same port has lost its state
(the stateless RESET of PROTOCOL.md section 5.7 through the socket datapath)."""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

import stcp
from stcp import identity
from stcp.errors import CloseCode, ConnectionTerminated

# A server with a given identity key (the stateless-reset key derives from it) on a given
# port, run as its own process so it can crash (SIGKILL) without telling anyone.
SERVER = """
import asyncio, sys
import stcp
from stcp.cli.serve import echo_handler
async def main():
    config = stcp.Config(static_key=bytes.fromhex(sys.argv[1]), idle_timeout=60)
    server = await stcp.start_server(echo_handler, "127.0.0.1", int(sys.argv[2]), config=config)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()
asyncio.run(main())
"""


def start_server(key: bytes, port: int = 0) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen([sys.executable, "-c", SERVER, key.hex(), str(port)], stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    assert line.strip().isdigit(), f"server did not start: {line!r}"
    return proc, int(line)


KEY = identity.generate_private_key()      # every server here holds it; the clients pin it
PINNED = identity.public_key(KEY)


@pytest.fixture
def crashing_server():
    """start(port=0) runs a server holding KEY; all killed at the end."""
    key = KEY
    procs: list[subprocess.Popen] = []

    def start(port: int = 0) -> tuple[subprocess.Popen, int]:
        proc, bound = start_server(key, port)
        procs.append(proc)
        return proc, bound

    yield start
    for proc in procs:
        proc.kill()
        proc.wait(10)


def crash(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)       # no CLOSE reaches anyone: the state is just gone
    proc.wait(10)


def test_asyncio_client_learns_within_a_round_trip_that_the_server_restarted(crashing_server):
    first, port = crashing_server()

    async def main() -> float:
        reader, writer = await stcp.open_connection("127.0.0.1", port, server_key=PINNED)
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        crash(first)
        crashing_server(port)                 # same key, same port, no connections
        t0 = time.monotonic()
        writer.write(b"anyone there?")        # a data record the new server cannot place
        with pytest.raises(ConnectionTerminated) as info:
            await asyncio.wait_for(reader.read(100), 10)
        assert info.value.code == CloseCode.STATELESS_RESET
        assert "the server has no state for this connection" in str(info.value)
        return time.monotonic() - t0

    assert asyncio.run(main()) < 1.0, "the client must learn within a round trip, not at its idle timeout"


def test_blocking_client_learns_within_a_round_trip_that_the_server_restarted(crashing_server):
    first, port = crashing_server()
    with stcp.connect(("127.0.0.1", port), server_key=PINNED, timeout=10) as conn:
        conn.sendall(b"hello")
        assert conn.recv(5) == b"hello"
        crash(first)
        crashing_server(port)
        t0 = time.monotonic()
        conn.sendall(b"anyone there?")
        with pytest.raises(ConnectionTerminated, match="STATELESS_RESET"):
            conn.recv(100)
        assert time.monotonic() - t0 < 1.0
