"""The blocking client (stcp.connect) against a real asyncio server on loopback: timeouts,
half-close, the connection's end as the application sees it, and large transfers both ways."""
from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import os
import socket
import threading
import time

import pytest

import stcp
from stcp import blocking, keeper as keeper_module, wire
from stcp.cli.serve import echo_handler
from stcp.errors import CloseCode, ConnectionTerminated, HandshakeTimeout, PeerUnreachable, STCPError
from tests.support.faults import Faults, FaultShim

SERVER_KEY = stcp.generate_private_key()        # every server here holds it; every client pins it
PINNED = stcp.public_key(SERVER_KEY)


@contextlib.contextmanager
def serving(handler, **kwargs):
    """An STCP server (key SERVER_KEY) on its own event-loop thread; yields (port, server)."""
    loop = asyncio.new_event_loop()
    server = loop.run_until_complete(stcp.start_server(handler, "127.0.0.1", 0, server_key=SERVER_KEY, **kwargs))
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    try:
        yield server.sockets[0].getsockname()[1], server
    finally:
        loop.call_soon_threadsafe(server.close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


@contextlib.contextmanager
def serving_through(faults: Faults, handler):
    """As serving, with a fault-injecting shim in front of the server; yields the shim's port."""
    with serving(handler) as (port, server):
        loop = server.driver.loop
        shim = asyncio.run_coroutine_threadsafe(FaultShim.start(("127.0.0.1", port), faults), loop).result(5)
        try:
            yield shim.port
        finally:
            loop.call_soon_threadsafe(shim.close)


def test_connect_returns_the_connection_itself_as_a_context_manager():
    with serving(echo_handler) as (port, _):
        conn = stcp.connect(("127.0.0.1", port), server_key=PINNED, timeout=10)
        with conn as entered:
            assert entered is conn and isinstance(conn, stcp.BlockingConnection)
            assert conn.cipher() == "aes-256-gcm"
            assert conn.getpeername() == ("127.0.0.1", port)
            assert conn.send(b"ping") == 4
            buf = bytearray(16)
            assert conn.recv_into(buf) == 4 and buf[:4] == b"ping"
        with pytest.raises(OSError):
            conn.recv(10)                 # as a closed socket
        conn.close()                      # closing twice is harmless


def test_recv_times_out_and_the_connection_stays_usable():
    with serving(echo_handler) as (port, _):
        with stcp.connect(("127.0.0.1", port), server_key=PINNED, timeout=0.3) as conn:
            assert conn.gettimeout() == 0.3
            t0 = time.monotonic()
            with pytest.raises(socket.timeout):
                conn.recv(100)
            assert 0.25 <= time.monotonic() - t0 < 3
            conn.settimeout(10)
            conn.sendall(b"still here")
            assert conn.recv(100) == b"still here"
            conn.settimeout(0)            # only what is already there
            with pytest.raises(socket.timeout):
                conn.recv(100)


def test_sendall_times_out_when_the_peer_stops_reading():
    """Flow control: a server that never reads lets only its window and our write limit in."""
    async def never_read(reader, writer):
        await asyncio.sleep(3600)         # cancelled when the server closes

    window = stcp.make_config().recv_window            # 16 MiB
    written = 40 << 20
    with serving(never_read) as (port, _):
        with stcp.connect(("127.0.0.1", port), server_key=PINNED, timeout=1.0) as conn:
            t0 = time.monotonic()
            with pytest.raises(socket.timeout):
                conn.sendall(os.urandom(written))
            assert time.monotonic() - t0 < 20            # the timeout ends the wait (1 s, with slack for load)

            def accepted() -> int:                        # what the server acknowledged: it holds all of it
                return written - conn.connection.send_buffered
            # Each further wait acts on the server's acks as they arrive: the server's window fills
            # however slowly this machine sends, and not one byte more goes in. (Bytes sent would
            # count retransmissions, which a PTO under load may cause.)
            deadline = time.monotonic() + 60
            while accepted() < window and time.monotonic() < deadline:
                with pytest.raises(socket.timeout):
                    conn.sendall(b"")
            assert accepted() == window
            with pytest.raises(socket.timeout):
                conn.sendall(b"")
            assert accepted() == window


def test_half_close_delivers_everything_then_eof():
    """After shutdown(SHUT_WR) the server reads EOF and can still answer; the client reads
    the answer, then b"" for good; writing after shutdown is refused."""
    async def count_then_answer(reader, writer):
        data = await reader.read()                    # until the client's EOF
        writer.write(b"got %d bytes, digest " % len(data) + hashlib.sha256(data).hexdigest().encode())
        writer.close()

    payload = os.urandom(300_000)
    with serving(count_then_answer) as (port, _):
        with stcp.connect(("127.0.0.1", port), server_key=PINNED, timeout=30) as conn:
            conn.sendall(payload)
            conn.shutdown(socket.SHUT_WR)
            with pytest.raises(STCPError):
                conn.sendall(b"more")
            answer = b""
            while chunk := conn.recv(4096):
                answer += chunk
            assert answer == b"got 300000 bytes, digest " + hashlib.sha256(payload).hexdigest().encode()
            assert conn.recv(10) == b""
            assert conn.recv(10) == b""


def test_close_ends_cleanly_at_both_ends():
    ended: list = []

    async def record_end(reader, writer):
        ended.append(await reader.read())
        writer.close()
        try:
            await writer.wait_closed()
            ended.append("clean")
        except ConnectionTerminated as exc:
            ended.append(exc)

    with serving(record_end) as (port, _):
        conn = stcp.connect(("127.0.0.1", port), server_key=PINNED, timeout=10)
        conn.sendall(b"bye")
        conn.close()
        info = conn.connection.close_info
        assert info.code == CloseCode.NO_ERROR and not info.error
        assert conn.connection.write_acknowledged            # nothing sent was lost
        deadline = time.monotonic() + 5
        while len(ended) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    assert ended == [b"bye", "clean"]


def test_close_does_not_wait_for_a_peer_that_keeps_sending():
    """As a TCP socket's close: the peer's unread data is given up, not waited for, and the
    peer's connection ends cleanly (it has all we sent) rather than by error or idle timeout."""
    ended: list = []

    async def talk_forever(reader, writer):
        try:
            while True:
                writer.write(b"x" * 1000)
                await writer.drain()
                await asyncio.sleep(0.001)
        except STCPError:
            ended.append((await reader.read(), writer.connection.close_info))

    with serving(talk_forever) as (port, _):
        conn = stcp.connect(("127.0.0.1", port), server_key=PINNED, timeout=10)
        conn.sendall(b"hello")
        assert conn.recv(10)
        t0 = time.monotonic()
        conn.close()
        assert time.monotonic() - t0 < 2
        deadline = time.monotonic() + 5
        while not ended and time.monotonic() < deadline:
            time.sleep(0.01)
    assert ended, "the server's writer never noticed the close"
    data, info = ended[0]
    assert data == b"hello"
    assert info.code == CloseCode.NO_ERROR and info.by_peer and not info.error


def test_a_peer_abort_arrives_after_the_data_sent_before_it():
    async def answer_then_abort(reader, writer):
        await reader.readexactly(5)
        writer.write(b"partial answer")
        await writer.drain()
        writer.abort("no thanks")

    with serving(answer_then_abort) as (port, _):
        with stcp.connect(("127.0.0.1", port), server_key=PINNED, timeout=10) as conn:
            conn.sendall(b"hello")
            got = b""
            with pytest.raises(ConnectionTerminated, match="no thanks") as info:
                while True:
                    got += conn.recv(100)
            assert got == b"partial answer"
            assert info.value.by_peer and info.value.code == CloseCode.APPLICATION_ABORT
            with pytest.raises(ConnectionTerminated):
                conn.sendall(b"anyone?")
            with pytest.raises(ConnectionTerminated):
                conn.recv(100)


def test_handshake_timeout_against_a_silent_port():
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        t0 = time.monotonic()
        with pytest.raises(HandshakeTimeout, match="0.5 s"):
            stcp.connect(silent.getsockname(), server_key=PINNED, timeout=0.5)
        assert 0.45 <= time.monotonic() - t0 < 3
        assert len(silent.recv(2048)) == wire.HANDSHAKE_RECORD_LEN     # it did hear a client hello
    finally:
        silent.close()


def test_port_unreachable_ends_the_handshake_at_once():
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()                                       # nothing listens there now
    t0 = time.monotonic()
    with pytest.raises(PeerUnreachable, match=f"nothing listens on UDP 127.0.0.1:{port}: .*'port unreachable'"):
        stcp.connect(("127.0.0.1", port), server_key=PINNED, timeout=10)
    assert time.monotonic() - t0 < 2, "an ICMP port unreachable must not wait for the 10 s handshake timeout"


def test_an_idle_connection_outlives_the_idle_timeout_at_both_ends():
    """The application does not call for three idle timeouts: the keeper's PINGs keep the
    connection open here and at the server, and it echoes afterwards as before."""
    short = stcp.make_config(idle_timeout=0.5, keepalive=0.2)
    with serving(echo_handler, config=short) as (port, _):
        with stcp.connect(("127.0.0.1", port), server_key=PINNED, timeout=10, config=short) as conn:
            conn.sendall(b"x")
            assert conn.recv(10) == b"x"
            pings = conn.connection.stats.records_sent
            time.sleep(1.5)
            assert not conn.connection.is_closed
            assert conn.connection.stats.records_sent >= pings + 3     # keepalives went out meanwhile
            conn.sendall(b"y")
            assert conn.recv(10) == b"y"


def test_a_silent_peer_ends_the_connection_at_the_idle_timeout_without_a_call():
    """No keepalive, so nothing is sent and nothing comes back: the keeper runs the idle
    timer, so the connection has ended by itself and the next call says why, at once."""
    with serving(echo_handler) as (port, _):
        config = stcp.make_config(idle_timeout=0.5, keepalive=None)
        with stcp.connect(("127.0.0.1", port), server_key=PINNED, timeout=10, config=config) as conn:
            conn.sendall(b"x")
            assert conn.recv(10) == b"x"
            time.sleep(0.8)
            assert conn.connection.is_closed
            t0 = time.monotonic()
            with pytest.raises(ConnectionTerminated) as info:
                conn.sendall(b"y")
            assert info.value.code == CloseCode.IDLE_TIMEOUT
            assert time.monotonic() - t0 < 0.1


def test_the_keeper_thread_ends_a_grace_period_after_the_last_connection(monkeypatch):
    monkeypatch.setattr(keeper_module, "GRACE", 2.0)     # generous: a loaded machine's handshake fits in it
    with serving(echo_handler) as (port, _):
        conns = [stcp.connect(("127.0.0.1", port), server_key=PINNED, timeout=10) for _ in range(2)]
        keepers = [t for t in threading.enumerate() if t.name == "stcp-keeper"]
        assert len(keepers) == 1, keepers          # one for the process, not one per connection
        keeper = keepers[0]
        conns[0].close()
        assert keeper.is_alive()
        conns[1].sendall(b"z")
        assert conns[1].recv(10) == b"z"
        conns[1].close()
        # the next connection soon after finds the same thread (none is started per connection)
        with stcp.connect(("127.0.0.1", port), server_key=PINNED, timeout=10) as conn:
            assert [t for t in threading.enumerate() if t.name == "stcp-keeper"] == [keeper]
            conn.sendall(b"y")
            assert conn.recv(10) == b"y"
        keeper.join(10)
        assert not keeper.is_alive()


def test_stray_datagrams_from_the_server_address_are_dropped():
    with serving(echo_handler) as (port, server):
        with stcp.connect(("127.0.0.1", port), server_key=PINNED, timeout=10) as conn:
            conn.sendall(b"one")
            assert conn.recv(10) == b"one"
            here = conn.getsockname()
            srv_sock = server.sockets[0]
            srv_sock.sendto(b"\x00" * 10, here)                           # names no connection
            srv_sock.sendto(b"\x01" * 8 + (12345).to_bytes(8, "big") + b"\x02" * 60, here)   # another CID
            time.sleep(0.05)
            conn.sendall(b"two")
            assert conn.recv(10) == b"two"
            assert conn.dropped == 2


def _sink(total: list):
    async def handler(reader, writer):
        n = 0
        while data := await reader.read(1 << 20):
            n += len(data)
        total.append(n)
        writer.write(n.to_bytes(8, "big"))
        writer.close()
    return handler


def _source(nbytes: int):
    async def handler(reader, writer):
        await reader.readexactly(1)
        block = bytes(range(256)) * 4096                  # 1 MiB
        for _ in range(nbytes // len(block)):
            writer.write(block)
            await writer.drain()
        writer.close()
    return handler


def _recv_all(conn, bufsize: int = 1 << 20) -> bytes:
    chunks = []
    while chunk := conn.recv(bufsize):
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.fixture
def gso_runs(monkeypatch):
    """Counts the sends of the blocking client that went out as UDP GSO buffers."""
    counts = {"gso": 0, "all": 0}
    real = blocking.send_datagrams

    def counting(fd, datagrams, addr, segment_size=0):
        sent = real(fd, datagrams, addr, segment_size)
        counts["all"] += 1
        counts["gso"] += bool(segment_size) and sent > 0
        return sent

    monkeypatch.setattr(blocking, "send_datagrams", counting)
    return counts


def test_64_mib_upload(gso_runs):
    total: list = []
    with serving(_sink(total)) as (port, _):
        with stcp.connect(("127.0.0.1", port), server_key=PINNED, timeout=60) as conn:
            block = os.urandom(1 << 20)
            for _ in range(64):
                conn.sendall(block)
            conn.shutdown(socket.SHUT_WR)
            assert int.from_bytes(_recv_all(conn), "big") == 64 << 20
            stats = conn.connection.stats
    assert total == [64 << 20]
    assert stats.stream_bytes_sent >= 64 << 20
    if blocking.Outbox(lambda *a: 0).gso:              # GSO where the socket datapath uses it
        assert gso_runs["gso"] > 0, gso_runs
        assert gso_runs["all"] < stats.records_sent / 4, (gso_runs, stats.records_sent)


def test_64_mib_download():
    with serving(_source(64 << 20)) as (port, _):
        with stcp.connect(("127.0.0.1", port), server_key=PINNED, timeout=60) as conn:
            conn.sendall(b"go")
            digest = hashlib.sha256()
            n = 0
            while chunk := conn.recv(1 << 20):
                digest.update(chunk)
                n += len(chunk)
    block = bytes(range(256)) * 4096
    expected = hashlib.sha256()
    for _ in range(64):
        expected.update(block)
    assert n == 64 << 20 and digest.digest() == expected.digest()


def test_64_mib_both_ways_at_once_from_two_threads():
    """One thread sends while another receives, as with a socket: an echo of 64 MiB only
    finishes if both directions flow together (each is far over the windows)."""
    payload = os.urandom(64 << 20)
    errors: list = []
    with serving(echo_handler) as (port, _):
        with stcp.connect(("127.0.0.1", port), server_key=PINNED, timeout=60) as conn:
            def upload():
                try:
                    view = memoryview(payload)
                    for i in range(0, len(payload), 1 << 20):
                        conn.sendall(view[i:i + (1 << 20)])
                    conn.shutdown(socket.SHUT_WR)
                except Exception as exc:           # reported by the main thread
                    errors.append(exc)

            sender = threading.Thread(target=upload)
            sender.start()
            echoed = hashlib.sha256()
            n = 0
            while chunk := conn.recv(1 << 20):
                echoed.update(chunk)
                n += len(chunk)
            sender.join(60)
    assert not errors
    assert n == len(payload) and echoed.digest() == hashlib.sha256(payload).digest()


def test_close_from_another_thread_wakes_a_blocked_recv():
    with serving(echo_handler) as (port, _):
        conn = stcp.connect(("127.0.0.1", port), server_key=PINNED, timeout=None)
        outcome: list = []

        def reader():
            try:
                outcome.append(conn.recv(10))
            except OSError as exc:
                outcome.append(exc)

        t = threading.Thread(target=reader)
        t.start()
        time.sleep(0.2)
        conn.close()
        t.join(5)
        assert not t.is_alive()
        # either EOF (the close finished the stream first) or the socket closed under it
        assert outcome and (outcome[0] == b"" or isinstance(outcome[0], OSError)), outcome


def test_a_forgotten_connection_frees_its_descriptors():
    with serving(echo_handler) as (port, _):
        gc.collect()                        # what earlier tests left to the collector goes first
        before = set(os.listdir("/proc/self/fd"))
        conn = stcp.connect(("127.0.0.1", port), server_key=PINNED, timeout=10)
        opened = set(os.listdir("/proc/self/fd")) - before
        assert len(opened) == 2                                     # its socket and eventfd
        with pytest.warns(ResourceWarning):
            del conn
            gc.collect()
        assert not opened & set(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize("faults", [
    Faults(loss=0.10, seed=3),
    Faults(loss=0.05, reorder=0.2, duplicate=0.05, burst_at=200, burst_len=40, seed=6),
], ids=["loss", "mixed"])
def test_a_transfer_completes_through_loss(faults):
    """Retransmissions, the hello's included, happen while a call waits: the timers are driven
    from the caller's thread."""
    data = os.urandom(2 << 20)
    with serving_through(faults, echo_handler) as port:
        with stcp.connect(("127.0.0.1", port), server_key=PINNED, timeout=60) as conn:
            conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
            echoed = _recv_all(conn)
            stats = conn.connection.stats
    assert echoed == data
    assert faults.dropped["up"] and faults.dropped["down"]
    assert stats.retransmitted_records > 0
