"""The benchmark tests written once against asyncio-streams-shaped transports.

A transport adapter provides:

    async start_server(args, handler) -> object      # handler(reader, writer) is a coroutine fn
    async connect(args) -> Conn                       # returns once the handshake is complete
    Conn.stream() -> awaitable (reader, writer)       # the byte stream of that connection
    Conn.drain(writer) -> awaitable                   # backpressure after writes
    Conn.close() -> awaitable                         # start closing (returns promptly)
    Conn.wait_closed() -> awaitable                   # until the close has completed
    Conn.cipher() -> str                              # negotiated AEAD, for the record

asyncio TLS, aioquic and STCP all fit this shape; the server handler and client tests are
then identical across them, so differences come from the transports alone.
"""
from __future__ import annotations

import asyncio
import time
from typing import Protocol

from bench import common as C


class Conn(Protocol):
    async def stream(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]: ...
    async def drain(self, writer) -> None: ...
    async def close(self) -> None: ...
    async def wait_closed(self) -> None: ...


async def handle(reader, writer, drain=None) -> None:
    """Server side of the peer protocol (see bench.common)."""
    drain = drain or (lambda w: w.drain())
    try:
        mode = await reader.read(1)
        if mode == C.MODE_SINK:
            total = 0
            while True:
                n = int.from_bytes(await reader.readexactly(C.FRAME_HDR), "big")
                if n == 0:
                    break
                while n:
                    data = await reader.read(min(n, 1 << 20))
                    if not data:
                        raise ConnectionError("peer closed early")
                    n -= len(data)
                    total += len(data)
            writer.write(total.to_bytes(C.COUNT_LEN, "big"))
            await drain(writer)
            await reader.read(1)  # until the client closes
        elif mode == C.MODE_ECHO:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                writer.write(data)
                await drain(writer)
    except (ConnectionError, asyncio.IncompleteReadError, OSError):
        pass
    except Exception:  # a transport's own error types; the server must keep serving
        pass
    finally:
        try:
            writer.close()
        except Exception:
            pass


def _cipher(conn) -> str | None:
    try:
        return str(conn.cipher())
    except Exception:  # informational only
        return None


def _retransmitted(conn) -> int | None:
    """Records the client sent again (loss, or a late ack taken for loss); None if unknown."""
    try:
        return int(conn.writer.get_extra_info("connection").stats.retransmitted_records)
    except Exception:  # informational only
        return None


def _received(conn) -> int | None:
    """Records the client received in a one-way bulk: the server's acks and credit updates."""
    try:
        return int(conn.writer.get_extra_info("connection").stats.records_received)
    except Exception:  # informational only
        return None


async def _sink(conn, writer, reader, share: int, deadline: float, framed: bytes) -> tuple[int, int]:
    """Send `share` bytes (or until `deadline`) as sink frames after the mode byte; return
    (sent, the server's count)."""
    sent = 0
    while sent < share and time.perf_counter() < deadline:
        n = min(C.BULK_CHUNK, share - sent)
        writer.write(framed if n == C.BULK_CHUNK else C.frame(C.payload(n)))
        await conn.drain(writer)
        sent += n
    writer.write(C.END_FRAME)
    await conn.drain(writer)
    got = int.from_bytes(await reader.readexactly(C.COUNT_LEN), "big")
    return sent, got


async def _open(args, connect, n: int, mode: bytes) -> list:
    """n connections, one after another, each with its mode byte sent: (conn, reader, writer)."""
    conns = []
    for _ in range(n):
        conn = await connect(args)
        reader, writer = await conn.stream()
        writer.write(mode)
        await conn.drain(writer)
        conns.append((conn, reader, writer))
    return conns


async def client(args, connect) -> dict:
    cpu0 = C.cpu_seconds()
    if args.test == "bulk":
        framed = C.frame(C.payload())
        conn = await connect(args)
        reader, writer = await conn.stream()
        t0 = time.perf_counter()
        writer.write(C.MODE_SINK)
        sent, got = await _sink(conn, writer, reader, args.bytes, t0 + args.duration, framed)
        elapsed = time.perf_counter() - t0
        cipher = _cipher(conn)
        retransmitted, acks = _retransmitted(conn), _received(conn)
        await conn.close()
        await conn.wait_closed()
        return C.bulk_result(sent, got, elapsed, C.cpu_seconds() - cpu0, cipher=cipher,
                             retransmitted_records=retransmitted, records_received=acks)
    if args.test == "bulk8":
        # N connections from this one process, each opened (handshake and mode byte) before
        # the clock starts, then all sending their share of --bytes at once until the
        # shared --duration deadline; MB/s = all bytes ÷ time until the last count is back.
        framed = C.frame(C.payload())
        conns = await _open(args, connect, args.connections, C.MODE_SINK)
        t0 = time.perf_counter()
        deadline = t0 + args.duration

        async def one(c, share):
            conn, reader, writer = c
            sent, got = await _sink(conn, writer, reader, share, deadline, framed)
            return sent, got, time.perf_counter() - t0

        per_conn = await asyncio.gather(*(one(c, share) for c, share in
                                          zip(conns, C.shares(args.bytes, args.connections), strict=True)))
        elapsed = time.perf_counter() - t0
        cipher = _cipher(conns[0][0])
        for conn, _, _ in conns:
            await conn.close()
        await asyncio.gather(*(conn.wait_closed() for conn, _, _ in conns), return_exceptions=True)
        return C.bulk8_result(list(per_conn), elapsed, C.cpu_seconds() - cpu0, cipher=cipher)
    if args.test == "handshake":
        # Latency: connect + handshake complete + close started.  Waiting for the close to
        # finish (a close_notify round trip for TLS, the draining period for QUIC) runs in
        # the background, untimed per connection but inside the elapsed time of the loop.
        samples, to_open, errors, closing = [], [], 0, []
        t_start = time.perf_counter()
        for _ in range(args.count):
            t0 = time.perf_counter()
            try:
                conn = await asyncio.wait_for(connect(args), 10)
                t1 = time.perf_counter()
                await asyncio.wait_for(conn.close(), 10)
            except Exception:  # OSError, timeouts, each transport's own handshake errors
                errors += 1
                continue
            samples.append(time.perf_counter() - t0)
            to_open.append(t1 - t0)
            closing.append(asyncio.ensure_future(asyncio.wait_for(conn.wait_closed(), 10)))
            if time.perf_counter() - t_start > args.time_limit:
                break
        for r in await asyncio.gather(*closing, return_exceptions=True):
            if isinstance(r, asyncio.TimeoutError):
                errors += 1
        elapsed = time.perf_counter() - t_start
        return C.handshake_result(samples, elapsed, C.cpu_seconds() - cpu0, errors,
                                  connect_latency=C.latency_summary(to_open))
    if args.test == "capacity":
        return await _capacity(args, connect, cpu0)
    if args.test == "load":
        return await _load(args, connect, cpu0)
    # rtt
    msgs = C.rtt_messages(args.count + C.RTT_WARMUP, args.size)
    samples, bad = [], 0
    conn = await connect(args)
    reader, writer = await conn.stream()
    writer.write(C.MODE_ECHO)
    t_start = time.perf_counter()
    for i, m in enumerate(msgs):
        t0 = time.perf_counter()
        writer.write(m)
        await conn.drain(writer)
        back = await reader.readexactly(len(m))
        dt = time.perf_counter() - t0
        bad += back != m
        if i >= C.RTT_WARMUP:
            samples.append(dt)
        if time.perf_counter() - t_start > args.time_limit:
            break
    await conn.close()
    await conn.wait_closed()
    return C.rtt_result(samples, C.cpu_seconds() - cpu0, bad, args.size)


CAPACITY_MESSAGE = 32         # bytes each capacity connection echoes


async def _capacity(args, connect, cpu0: float) -> dict:
    """--clients tasks, each in a loop until --duration is up: connect (full handshake),
    echo 32 bytes, close and wait for the close to complete.  Latency = one such cycle."""
    samples, errors, bad = [], 0, 0
    t_start = time.perf_counter()
    deadline = t_start + args.duration

    async def one(worker: int) -> None:
        nonlocal errors, bad
        i = 0
        while time.perf_counter() < deadline:
            msg = (worker << 32 | i).to_bytes(8, "big") * (CAPACITY_MESSAGE // 8)
            i += 1
            t0 = time.perf_counter()
            try:
                conn = await asyncio.wait_for(connect(args), 10)
                reader, writer = await conn.stream()
                writer.write(C.MODE_ECHO + msg)
                await conn.drain(writer)
                back = await asyncio.wait_for(reader.readexactly(len(msg)), 10)
                await conn.close()
                await asyncio.wait_for(conn.wait_closed(), 10)
            except Exception:  # OSError, timeouts, each transport's own handshake errors
                errors += 1
                continue
            bad += back != msg
            samples.append(time.perf_counter() - t0)

    await asyncio.gather(*(one(w) for w in range(args.clients)))
    elapsed = time.perf_counter() - t_start
    return C.capacity_result(samples, elapsed, C.cpu_seconds() - cpu0, errors, bad, args.clients,
                             loop=C.loop_name())


async def _load(args, connect, cpu0: float) -> dict:
    """--clients connections, all opened first (untimed), then each in a loop until
    --duration is up: write a --size request, read its echo whole.  Latency = one request."""
    opened = await _open(args, connect, args.clients, C.MODE_ECHO)
    samples, bad = [], 0
    t_start = time.perf_counter()
    deadline = t_start + args.duration

    async def one(worker: int, conn, reader, writer) -> None:
        nonlocal bad
        i = 0
        while time.perf_counter() < deadline:
            msg = (worker << 32 | i).to_bytes(8, "big") * (args.size // 8)
            i += 1
            t0 = time.perf_counter()
            writer.write(msg)
            await conn.drain(writer)
            back = await reader.readexactly(len(msg))
            samples.append(time.perf_counter() - t0)
            bad += back != msg

    await asyncio.gather(*(one(w, *c) for w, c in enumerate(opened)))
    elapsed = time.perf_counter() - t_start
    cpu = C.cpu_seconds() - cpu0
    for conn, _, _ in opened:
        await conn.close()
    await asyncio.gather(*(conn.wait_closed() for conn, _, _ in opened), return_exceptions=True)
    return C.load_result(samples, elapsed, cpu, bad, args.clients, args.size, loop=C.loop_name())


def run_server(start_server, args) -> None:
    async def main():
        _srv, port = await start_server(args, handle)
        C.announce_ready(port)
        await asyncio.Event().wait()  # serve until killed
    C.run_loop(main())


def run_client(connect, args, **extra) -> None:
    res = C.run_loop(client(args, connect))
    res.update(extra)
    C.emit(res)
