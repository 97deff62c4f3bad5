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
        await conn.close()
        await conn.wait_closed()
        return C.bulk_result(sent, got, elapsed, C.cpu_seconds() - cpu0, cipher=cipher)
    if args.test == "bulk8":
        # N connections from this one process, each opened (handshake and mode byte) before
        # the clock starts, then all sending their share of --bytes at once until the
        # shared --duration deadline; MB/s = all bytes ÷ time until the last count is back.
        framed = C.frame(C.payload())
        conns = []
        for _ in range(args.connections):
            conn = await connect(args)
            reader, writer = await conn.stream()
            writer.write(C.MODE_SINK)
            await conn.drain(writer)
            conns.append((conn, reader, writer))
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


def run_server(start_server, args) -> None:
    async def main():
        _srv, port = await start_server(args, handle)
        C.announce_ready(port)
        await asyncio.Event().wait()  # serve until killed
    asyncio.run(main())


def run_client(connect, args, **extra) -> None:
    res = asyncio.run(client(args, connect))
    res.update(extra)
    C.emit(res)
