"""End to end on loopback: real UDP sockets, the socket datapath, the asyncio and blocking APIs."""
from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import subprocess
import sys

import pytest

import stcp
from stcp import wire
from stcp.cli.serve import echo_handler
from stcp.errors import CloseCode, ConnectionTerminated, HandshakeTimeout, NotEncrypted
from tests.support.faults import Faults, FaultShim
from tests.support.poll import await_until
from tests.support.procs import announced_key, key_file
from tests.support.servers import echo_transfer


def run(coro, timeout: float = 120.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def serve_subprocess(key: str, *extra: str) -> tuple[subprocess.Popen, int, str]:
    """`stcp serve --key KEY` in its own process (its own CPU), on a free port; with the
    public key it announces."""
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    proc = subprocess.Popen([sys.executable, "-m", "stcp.cli.main", "serve", "--listen", f"127.0.0.1:{port}",
                             "--workers", "1", "--key", key, *extra], stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    assert "serving on" in line, line
    return proc, port, announced_key(line)


@pytest.mark.slow
def test_64_mib_each_way_sha256_intact(tmp_path):
    proc, port, key = serve_subprocess(key_file(tmp_path / "server.key")[0])
    try:
        data = os.urandom(64 << 20)
        echoed = run(echo_transfer("127.0.0.1", port, data, key))
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()
    finally:
        proc.terminate()
        proc.wait(10)


def test_ipv6_loopback_round_trip():
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")

    async def main():
        server = await stcp.start_server(echo_handler, "::1", 0)
        port = server.sockets[0].getsockname()[1]
        data = os.urandom(300_000)
        assert await echo_transfer("::1", port, data, server.public_key) == data
        server.close()

    run(main())


def test_200_concurrent_connections():
    async def main():
        server = await stcp.start_server(echo_handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        payloads = [os.urandom(32_768 + i) for i in range(200)]
        results = await asyncio.gather(*(echo_transfer("127.0.0.1", port, p, server.public_key) for p in payloads))
        assert all(r == p for r, p in zip(results, payloads, strict=True))
        await await_until(lambda: not server.endpoint.connections, 10, "the drain periods to end")
        server.close()

    run(main())


@pytest.mark.slow
@pytest.mark.parametrize("faults", [
    Faults(loss=0.10, seed=3),
    Faults(reorder=0.3, duplicate=0.1, seed=4),
    Faults(burst_at=400, burst_len=50, seed=5),
    Faults(loss=0.10, reorder=0.2, duplicate=0.05, burst_at=300, burst_len=50, seed=6),
], ids=["loss10", "reorder+dup", "burst50", "everything"])
def test_transfer_survives_a_hostile_network(faults):
    async def main():
        server = await stcp.start_server(echo_handler, "127.0.0.1", 0)
        shim = await FaultShim.start(("127.0.0.1", server.sockets[0].getsockname()[1]), faults)
        data = os.urandom(2 << 20)
        echoed = await echo_transfer("127.0.0.1", shim.port, data, server.public_key)
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()
        assert sum(faults.dropped.values()) > 0 or faults.duplicate or faults.reorder
        shim.close()
        server.close()

    run(main(), timeout=150)


def test_forced_key_updates_keep_the_stream_intact():
    config = stcp.Config(key_update_interval=200)

    async def main():
        server = await stcp.start_server(echo_handler, "127.0.0.1", 0, config=config)
        port = server.sockets[0].getsockname()[1]
        reader, writer = await stcp.open_connection("127.0.0.1", port, server_key=server.public_key, config=config)
        data = os.urandom(2 << 20)
        writer.write(data)
        writer.write_eof()
        echoed = await reader.read()
        await writer.wait_closed()
        assert echoed == data
        stats = writer.connection.stats
        assert stats.key_updates_sent >= 3 and stats.key_updates_received >= 3
        assert writer.connection.send_epoch >= 3
        server.close()

    run(main())


def test_bit_flipped_record_ends_only_its_connection():
    """A corrupted record kills the connection it was aimed at; another one carries on."""
    target = {}

    def flip(direction, index, data):
        if direction == "up" and target.get("armed") and len(data) > 200:
            target["armed"] = False
            target["flipped"] = True
            corrupted = bytearray(data)
            corrupted[100] ^= 0x01
            return bytes(corrupted)
        return data

    async def main():
        server = await stcp.start_server(echo_handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        shim = await FaultShim.start(("127.0.0.1", port), Faults(mutate=flip))
        victim_r, victim_w = await stcp.open_connection("127.0.0.1", shim.port, server_key=server.public_key)
        survivor = asyncio.create_task(echo_transfer("127.0.0.1", port, os.urandom(4 << 20), server.public_key))
        target["armed"] = True
        victim_w.write(os.urandom(100_000))
        with pytest.raises(ConnectionTerminated) as info:
            await victim_r.read()
        assert target["flipped"]
        assert info.value.code == CloseCode.AUTH_FAILURE and info.value.by_peer
        assert len(await survivor) == 4 << 20
        shim.close()
        server.close()

    run(main())


def test_no_plaintext_on_the_wire():
    marker = b"STCP-PLAINTEXT-MARKER-7f3a9c"
    faults = Faults()

    async def main():
        server = await stcp.start_server(echo_handler, "127.0.0.1", 0)
        shim = await FaultShim.start(("127.0.0.1", server.sockets[0].getsockname()[1]), faults)
        data = marker * 5000
        assert await echo_transfer("127.0.0.1", shim.port, data, server.public_key) == data
        shim.close()
        server.close()

    run(main())
    assert len(faults.log) > 100
    assert not any(marker[:12] in d for _, d in faults.log)


def test_idle_timeout_frees_the_connection():
    server_config = stcp.Config(idle_timeout=0.5, keepalive=None)
    faults = Faults()

    async def main():
        server = await stcp.start_server(echo_handler, "127.0.0.1", 0, config=server_config)
        shim = await FaultShim.start(("127.0.0.1", server.sockets[0].getsockname()[1]), faults)
        reader, writer = await stcp.open_connection("127.0.0.1", shim.port, server_key=server.public_key)
        writer.write(b"ping")
        assert await reader.readexactly(4) == b"ping"
        assert len(server.endpoint.connections) == 1
        conn = next(iter(server.endpoint.connections.values()))
        faults.loss = 1.0                              # the client vanishes
        for _ in range(40):
            await asyncio.sleep(0.1)
            if not server.endpoint.connections:
                break
        assert not server.endpoint.connections
        assert conn.close_info.code == CloseCode.IDLE_TIMEOUT
        writer.abort()
        shim.close()
        server.close()

    run(main())


def test_hello_retransmitted_after_the_first_is_lost():
    faults = Faults(mutate=lambda direction, index, data: None if (direction, index) == ("up", 0) else data)

    async def main():
        server = await stcp.start_server(echo_handler, "127.0.0.1", 0)
        shim = await FaultShim.start(("127.0.0.1", server.sockets[0].getsockname()[1]), faults)
        reader, writer = await stcp.open_connection("127.0.0.1", shim.port, server_key=server.public_key)
        writer.write(b"hello")
        assert await reader.readexactly(5) == b"hello"
        assert faults.dropped["up"] == 1
        hellos = [d for direction, d in faults.log if direction == "up" and d[16:24] == bytes(8)]
        assert len(hellos) == 2 and hellos[0] == hellos[1]
        assert len(server.endpoint.connections) == 1
        writer.abort()
        shim.close()
        server.close()

    run(main())


def test_handshake_timeout_against_a_silent_server():
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    port = silent.getsockname()[1]

    async def main():
        with pytest.raises(HandshakeTimeout, match=r"handshake timed out after 0.5 s"):
            await stcp.open_connection("127.0.0.1", port, server_key=stcp.UNAUTHENTICATED,
                                       config=stcp.Config(handshake_timeout=0.5))

    try:
        run(main())
        assert len(silent.recv(2048)) == wire.HANDSHAKE_RECORD_LEN     # it did hear a client hello
    finally:
        silent.close()


def test_data_is_refused_outside_encrypted():
    async def main():
        server = await stcp.start_server(echo_handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        _reader, writer = await stcp.open_connection("127.0.0.1", port, server_key=server.public_key)
        writer.abort("done")
        with pytest.raises(NotEncrypted):
            writer.write(b"too late")
        server.close()

    run(main())


def test_blocking_api_round_trip(stcp_server):
    data = os.urandom(500_000)
    server = stcp_server(echo_handler)
    with stcp.connect(server.address, timeout=30, server_key=server.public_key) as conn:
        conn.sendall(data)
        conn.shutdown(socket.SHUT_WR)
        received = bytearray()
        while chunk := conn.recv(65536):
            received += chunk
    assert bytes(received) == data


def test_stray_datagrams_cannot_end_a_client_connection():
    """Garbage from the server's address that names no CID of ours is dropped, not fatal."""
    def inject(direction, index, data):
        if direction == "down" and index == 3:
            return b"\x00" * 10                       # short: names no connection
        if direction == "down" and index == 4:
            return data[:8] + (12345).to_bytes(8, "big") + data[16:]   # another CID
        return data

    async def main():
        server = await stcp.start_server(echo_handler, "127.0.0.1", 0)
        shim = await FaultShim.start(("127.0.0.1", server.sockets[0].getsockname()[1]),
                                     Faults(mutate=inject))
        data = os.urandom(200_000)
        assert await echo_transfer("127.0.0.1", shim.port, data, server.public_key) == data
        shim.close()
        server.close()

    run(main())


def test_blocking_api_surfaces_a_peer_abort(stcp_server):
    """recv() on a connection the peer terminated raises the peer's reason, not a hang."""
    async def abort_at_once(reader, writer):
        await reader.readexactly(5)
        writer.abort("no thanks")

    server = stcp_server(abort_at_once)
    conn = stcp.connect(server.address, timeout=10, server_key=server.public_key)
    conn.sendall(b"hello")
    with pytest.raises(ConnectionTerminated, match="no thanks"):
        conn.recv(100)
    conn.close()


FALLBACK_SCRIPT = r"""
import asyncio, hashlib, os, sys
sys.modules["stcp._udpio"] = None          # as if the batch-I/O extensions were not built
sys.modules["stcp._demux"] = None
import stcp
from stcp import crypto, endpoint
from stcp.cli.serve import echo_handler
from stcp.datapath import socket as sd
assert not crypto.ACCELERATED and sd._udpio is None and endpoint.group_by_cid is endpoint.group_by_cid_ref

async def main():
    server = await stcp.start_server(echo_handler, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    data = os.urandom(3 << 20)
    r, w = await stcp.open_connection("127.0.0.1", port, server_key=server.public_key)
    w.write(data)
    w.write_eof()
    got = await r.read()
    await w.wait_closed()
    server.close()
    print(hashlib.sha256(got).hexdigest() == hashlib.sha256(data).hexdigest(), len(got))

asyncio.run(asyncio.wait_for(main(), 90))
"""


def test_pure_python_fallback_end_to_end():
    """Without the C extensions (no _aead: STCP_PURE_PYTHON=1; no _udpio) the same transfer
    works through the reference paths: per-datagram socket calls, Python grouping and crypto."""
    env = dict(os.environ, STCP_PURE_PYTHON="1")
    r = subprocess.run([sys.executable, "-c", FALLBACK_SCRIPT], env=env, capture_output=True, text=True,
                       timeout=120, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["True", str(3 << 20)]
