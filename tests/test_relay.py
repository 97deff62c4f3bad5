"""Issue 11's attack, end to end on loopback: a relay built from the stcp package (one
handshake with the client, one with the server, rewriting `transfer 100 EUR` on the way)
and relays that rewrite single bytes of the handshake.

A client that accepts any key is fooled (the control, so the refusals mean something).
A client that pinned the server's key (API, `stcp connect --server-key`, `stcp tunnel`) or
recorded it (known-hosts) refuses the relay: one line naming the expected and the
presented fingerprints, a non-zero exit, within the handshake timeout, and not one
protected record sent, so no application byte left. A relay that rewrites the version,
the flags or a reserved byte of either hello breaks key confirmation and is refused too.
"""
from __future__ import annotations

import asyncio
import socket
import subprocess
import time

import pytest

import stcp
from stcp import wire
from stcp.identity import encode_key, fingerprint
from tests.support.faults import Faults, FaultShim
from tests.support.procs import STCP
from tests.support.relay import Relay
from tests.support.servers import ServerThread

TIMEOUT = 1.0                     # the clients' handshake timeout here


class Recorder:
    """An echo handler that remembers what it was sent, and a hook that counts the
    connections that got past the handshake."""

    def __init__(self):
        self.received = bytearray()
        self.established = 0

    async def __call__(self, reader, writer):
        while data := await reader.read(65536):
            self.received += data
            writer.write(data)
        writer.close()

    def connection_established(self, conn, seconds):
        self.established += 1


@pytest.fixture
def bank():
    """The real server (a Recorder behind it) and the relay in front of it, each on its own
    event-loop thread: (server thread, recorder, relay thread, relay)."""
    rec = Recorder()
    server = ServerThread(rec)
    server.server.hooks.append(rec)
    relay = Relay(server.address)
    front = ServerThread(relay.handler)
    yield server, rec, front, relay
    front.close()
    server.close()


def only_handshake_records(log, direction: str = "up") -> bool:
    return all(wire.parse_header(d)[2] == wire.HANDSHAKE_SEQ for dr, d in log if dr == direction)


async def through_shim(port: int, faults: Faults, **kw):
    shim = await FaultShim.start(("127.0.0.1", port), faults)
    try:
        r, w = await stcp.open_connection("127.0.0.1", shim.port, config=stcp.Config(handshake_timeout=TIMEOUT), **kw)
        w.write(b"transfer 100 EUR")
        w.write_eof()
        return await asyncio.wait_for(r.read(), 10)
    finally:
        shim.close()


def test_a_client_accepting_any_key_is_fooled_by_the_relay(bank):
    _server, rec, front, relay = bank
    faults = Faults()
    echoed = asyncio.run(through_shim(front.port, faults, server_key=stcp.UNAUTHENTICATED))
    assert relay.handled == 1 and bytes(relay.seen) == b"transfer 100 EUR"
    assert bytes(rec.received) == b"transfer 999 EUR" and echoed == b"transfer 999 EUR"
    assert not only_handshake_records(faults.log)         # what the refusals below must not do


def test_a_pinned_client_refuses_the_relay_before_sending_a_byte(bank):
    server, rec, front, relay = bank
    faults = Faults()
    t0 = time.monotonic()
    with pytest.raises(stcp.HandshakeFailed) as info:
        asyncio.run(through_shim(front.port, faults, server_key=server.public_key))
    assert time.monotonic() - t0 < TIMEOUT + 2
    assert str(info.value) == (f"handshake failed: expected server key {fingerprint(server.public_key)}, presented "
                               f"{fingerprint(front.public_key)} (no acceptable server hello within {TIMEOUT:g} s)")
    assert faults.counts["up"] >= 1 and only_handshake_records(faults.log)      # hellos only: nothing protected
    assert relay.handled == 0 and rec.established == 0 and not rec.received


def test_a_pinned_client_still_reaches_the_real_server(bank):
    server, rec, _front, _relay = bank
    faults = Faults()
    assert asyncio.run(through_shim(server.port, faults, server_key=encode_key(server.public_key))) == \
        b"transfer 100 EUR"
    assert rec.established == 1


# A relay that leaves the keys alone and rewrites one byte of a hello in transit: the
# client hello's version, flags or a reserved byte, or the server hello's.
def _rewrite(direction: str, offset: int, value: int):
    def mutate(d, index, data):
        if d == direction and len(data) == wire.HANDSHAKE_RECORD_LEN and wire.parse_header(data)[2] == 0:
            b = bytearray(data)
            b[wire.HEADER_LEN + offset] = value
            return bytes(b)
        return data
    return mutate


@pytest.mark.parametrize("direction,offset,value,why", [
    ("up", 1, 1, "server rejected the handshake: unsupported protocol version"),       # version 2 -> 1
    ("up", 1, 3, "server rejected the handshake: unsupported protocol version"),
    ("up", 3, 0x80, "a server hello failed verification"),                            # flags
    ("up", 5, 0x01, "a server hello failed verification"),                            # reserved
    ("down", 1, 1, "a server hello failed verification"),                             # server hello version
    ("down", 3, 0x01, "a server hello failed verification"),                          # server hello flags
], ids=["ch-version-1", "ch-version-3", "ch-flags", "ch-reserved", "sh-version", "sh-flags"])
def test_a_relay_rewriting_the_handshake_is_refused(bank, direction, offset, value, why):
    server, rec, _front, _relay = bank
    faults = Faults(mutate=_rewrite(direction, offset, value))
    with pytest.raises(stcp.HandshakeFailed, match=why):
        asyncio.run(through_shim(server.port, faults, server_key=server.public_key))
    assert only_handshake_records(faults.log)
    assert rec.established == 0 and not rec.received


# --- the command line --------------------------------------------------------------------
def stcp_cmd(*args: str, stdin: bytes = b"", env=None, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*STCP, *args], input=stdin, capture_output=True, timeout=timeout, env=env)


def one_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.decode().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


def test_connect_with_the_pinned_key_refuses_the_relay(bank):
    server, rec, front, relay = bank
    t0 = time.monotonic()
    r = stcp_cmd("connect", "--server-key", encode_key(server.public_key), "--handshake-timeout", str(TIMEOUT),
                 f"127.0.0.1:{front.port}", stdin=b"transfer 100 EUR")
    assert time.monotonic() - t0 < TIMEOUT + 10
    assert r.returncode == 1 and r.stdout == b""
    assert one_line(r) == (f"stcp: handshake failed: expected server key {fingerprint(server.public_key)} "
                           f"(--server-key), presented {fingerprint(front.public_key)} (no acceptable server hello "
                           f"within {TIMEOUT:g} s)")
    assert relay.handled == 0 and rec.established == 0


def test_known_hosts_refuses_a_relay_that_took_the_servers_address(tmp_path):
    """First contact records the server's key; then a relay takes over its address and
    forwards to the server, which moved. The client refuses the relay and says how to
    accept a deliberate change."""
    kh = tmp_path / "known_hosts"
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    rec = Recorder()
    first = ServerThread(rec, port=port)
    key = first.public_key
    try:
        r = stcp_cmd("connect", "--known-hosts", str(kh), f"127.0.0.1:{port}", stdin=b"hello")
        assert r.returncode == 0 and r.stdout == b"hello", r.stderr
        assert f"trusting its server key {fingerprint(key)}" in one_line(r)
        assert kh.read_text() == f"127.0.0.1:{port} {encode_key(key)}\n"
        r = stcp_cmd("connect", "--known-hosts", str(kh), f"127.0.0.1:{port}", stdin=b"again")
        assert r.returncode == 0 and r.stdout == b"again" and r.stderr == b""      # said once
    finally:
        first.close()
    moved = ServerThread(rec, server_key=first.server.endpoint.config.static_key)   # same server, new port
    relay = Relay(moved.address)
    front = ServerThread(relay.handler, port=port)
    try:
        before = rec.established
        r = stcp_cmd("connect", "--known-hosts", str(kh), "--handshake-timeout", str(TIMEOUT), f"127.0.0.1:{port}",
                     stdin=b"transfer 100 EUR")
        assert r.returncode == 1 and r.stdout == b""
        line = one_line(r)
        assert f"the server key of 127.0.0.1:{port} has changed: expected {fingerprint(key)}" in line
        assert f"presented {fingerprint(front.public_key)}" in line
        assert f"stcp known-hosts remove 127.0.0.1:{port}" in line
        assert relay.handled == 0 and rec.established == before
        assert kh.read_text() == f"127.0.0.1:{port} {encode_key(key)}\n"          # unchanged
    finally:
        front.close()
        moved.close()


def test_tunnel_with_the_pinned_key_refuses_the_relay_and_exits(bank):
    server, rec, front, relay = bank
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    tcp_port = tcp.getsockname()[1]
    tcp.close()
    tunnel = subprocess.Popen([*STCP, "tunnel", "--listen", f"127.0.0.1:{tcp_port}", "--to", f"127.0.0.1:{front.port}",
                               "--server-key", encode_key(server.public_key), "--handshake-timeout", str(TIMEOUT)],
                              stderr=subprocess.PIPE, text=True)
    try:
        assert "tunnel from" in tunnel.stderr.readline()
        with socket.create_connection(("127.0.0.1", tcp_port), timeout=20) as c:
            c.sendall(b"transfer 100 EUR")
            with pytest.raises(ConnectionResetError):   # reset with nothing relayed: never a clean end
                c.recv(100)
        assert tunnel.wait(20) == 1
        rest = [ln for ln in tunnel.stderr.read().splitlines() if ln.strip()]
        assert len(rest) == 1 and f"expected server key {fingerprint(server.public_key)}" in rest[0], rest
        assert f"presented {fingerprint(front.public_key)}" in rest[0]
        assert relay.handled == 0 and rec.established == 0
    finally:
        if tunnel.poll() is None:
            tunnel.kill()
        tunnel.wait(10)
