"""Failing fast over real sockets (issue 13 item 4): a client learns at once that nothing
listens (ICMP port unreachable, tests/test_blocking.py and tests/test_cli.py; a TCP-only port
here), within one round trip that a server which crashed and restarted on the same port has
lost its state (the stateless RESET of PROTOCOL.md section 5.7 through the socket datapath),
and, at its handshake timeout, that the address answered with datagrams that are not STCP."""
from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

import stcp
from stcp import identity
from stcp.errors import CloseCode, ConnectionTerminated, HandshakeTimeout
from tests.support.procs import STCP

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



def test_an_idle_client_learns_of_the_restart_at_its_next_keepalive(crashing_server):
    """A client that sends nothing learns when its keepalive PING (Config.keepalive, 10 s by
    default; 0.5 s here) meets the new server's stateless RESET: docs/OPERATIONS.md."""
    first, port = crashing_server()

    async def main() -> float:
        config = stcp.Config(keepalive=0.5)
        reader, writer = await stcp.open_connection("127.0.0.1", port, server_key=PINNED, config=config)
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        crash(first)
        crashing_server(port)
        t0 = time.monotonic()
        with pytest.raises(ConnectionTerminated) as info:       # nothing written: only the keepalive
            await asyncio.wait_for(reader.read(100), 10)
        assert info.value.code == CloseCode.STATELESS_RESET
        return time.monotonic() - t0

    assert asyncio.run(main()) < 0.5 + 1.0, "an idle client learns at its next keepalive, not at its idle timeout"

# --- a UDP service of another protocol at the address -------------------------------------------
@contextlib.contextmanager
def stranger(reply):
    """A UDP service on loopback that answers every datagram with reply(datagram); yields
    (port, sent), sent[0] the number of answers so far."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))
    sock.settimeout(0.1)
    sent = [0]
    stop = threading.Event()

    def run() -> None:
        while not stop.is_set():
            try:
                data, addr = sock.recvfrom(65536)
            except socket.timeout:
                continue
            sock.sendto(reply(data), addr)
            sent[0] += 1

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield sock.getsockname()[1], sent
    finally:
        stop.set()
        thread.join(5)
        sock.close()


ECHO = bytes                                       # hands the client its own hello back


def garbage(data: bytes) -> bytes:
    return b"\x00\x01 not a record " + os.urandom(40)


def answered(message: str) -> int:
    """N of 'answered with N datagram(s) that ... not STCP (is this an STCP server?)'."""
    found = re.search(r": 127\.0\.0\.1:\d+ answered with (\d+) datagrams? that (?:is|are) not STCP "
                      r"\(is this an STCP server\?\)$", message)
    assert found, message
    return int(found.group(1))


@pytest.mark.parametrize("reply", [ECHO, garbage], ids=["echo", "garbage"])
def test_asyncio_client_says_the_address_answered_but_not_in_stcp(reply):
    """Unauthenticated replies never end the handshake (anyone can send them), but the timeout
    says what the address answered, counting every answer the service sent."""
    with stranger(reply) as (port, sent):
        async def main() -> None:
            await stcp.open_connection("127.0.0.1", port, server_key=stcp.UNAUTHENTICATED,
                                       config=stcp.Config(handshake_timeout=1))
        t0 = time.monotonic()
        with pytest.raises(HandshakeTimeout) as info:
            asyncio.run(main())
        assert 0.9 < time.monotonic() - t0 < 5, "they must not end the handshake before its timeout"
        assert str(info.value).startswith("handshake timed out after 1 s: ")
        assert sent[0] - 1 <= answered(str(info.value)) <= sent[0] and sent[0] >= 1


@pytest.mark.parametrize("reply", [ECHO, garbage], ids=["echo", "garbage"])
def test_blocking_client_says_the_address_answered_but_not_in_stcp(reply):
    with stranger(reply) as (port, sent):
        with pytest.raises(HandshakeTimeout) as info:
            stcp.connect(("127.0.0.1", port), timeout=1, server_key=stcp.UNAUTHENTICATED)
        assert str(info.value).startswith("handshake timed out after 1 s: ")
        assert sent[0] - 1 <= answered(str(info.value)) <= sent[0] and sent[0] >= 1


def test_connect_to_a_udp_echo_service_says_it_is_not_stcp():
    with stranger(ECHO) as (port, sent):
        r = subprocess.run([*STCP, "connect", "--server-key", identity.encode_key(PINNED), "--handshake-timeout", "1",
                            f"127.0.0.1:{port}"], input=b"", capture_output=True, timeout=30)
    assert r.returncode == 1
    [line] = r.stderr.decode().strip().splitlines()
    assert line.startswith(f"stcp: handshake timed out after 1 s: 127.0.0.1:{port} answered with ")
    assert 1 <= answered(line) <= sent[0]


def test_connect_to_a_tcp_only_port_fails_at_once():
    """Only a TCP listener on the port: the host answers the UDP hello 'port unreachable'."""
    with socket.create_server(("127.0.0.1", 0)) as tcp:
        port = tcp.getsockname()[1]
        t0 = time.monotonic()
        r = subprocess.run([*STCP, "connect", "--server-key", identity.encode_key(PINNED), f"127.0.0.1:{port}"],
                           input=b"", capture_output=True, timeout=30)
    assert r.returncode == 1
    assert r.stderr.decode().strip() == (f"stcp: nothing listens on UDP 127.0.0.1:{port}: the host answered "
                                         f"'port unreachable' (is the STCP server running?)")
    assert time.monotonic() - t0 < 5          # interpreter start-up included; not the 10 s timeout
