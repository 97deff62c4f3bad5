"""Many STCP connections from one process, for the scale-out tests and bench.scaleout.

    python -m tests.support.loadclient HOST:PORT --connections 200 --size 65536 [--phases 2]
    python -m tests.support.loadclient HOST:PORT[,HOST:PORT...] --handshakes 500 --concurrency 16
    python -m tests.support.loadclient HOST:PORT --connections 64 --bulk 1048576
    python -m tests.support.loadclient HOST:PORT --connections 64 --rr 200 --msg 1024

Echo mode: opens --connections connections (each its own UDP socket, so its own source
port and 5-tuple), then in each phase every connection sends --size fresh random bytes to
an echo server and reads them back, SHA-256 checked. Between phases it prints a JSON line
and waits for a line on stdin (the test changes something meanwhile: kills a worker,
removes a server from a balancer). For each connection it reports the server's CID (its
worker byte and server id say where the connection lives), the server's identity key, and
how each phase ended: "ok", or the error with its close code and how many seconds after
the phase started it came.

Handshake mode: opens and closes --handshakes connections, --concurrency at a time (over
the addresses given, in turn), and reports handshakes per second.

Bulk mode: every connection sends --bulk bytes to an echo server while reading the echo,
all at once; request/response mode (--rr): every connection sends --rr messages of --msg
bytes, one at a time, each waiting for its echo. Both report the payload moved, the wall
time from the first byte to the last echo, and this process's CPU time.

Every line it prints is one JSON object.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import sys
import time
from typing import Any, Dict, List, Optional

import stcp
from stcp.errors import ConnectionTerminated


def emit(doc: Dict[str, Any]) -> None:
    print(json.dumps(doc), flush=True)


class Conn:
    def __init__(self, i: int, reader, writer):
        self.i, self.reader, self.writer = i, reader, writer
        c = writer.connection
        self.cid = c.peer_cid                       # the server's CID for this connection
        self.key = (c.peer_static_key or b"").hex()

    async def echo(self, size: int, timeout: float) -> Dict[str, Any]:
        data = os.urandom(size)
        t0 = time.monotonic()
        try:
            self.writer.write(data)
            await asyncio.wait_for(self.writer.drain(), timeout)
            back = await asyncio.wait_for(self.reader.readexactly(size), timeout)
        except ConnectionTerminated as exc:
            return {"result": "terminated", "code": int(exc.code), "reason": str(exc),
                    "after": round(time.monotonic() - t0, 3)}
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, OSError) as exc:
            return {"result": type(exc).__name__, "after": round(time.monotonic() - t0, 3)}
        ok = hashlib.sha256(back).digest() == hashlib.sha256(data).digest()
        return {"result": "ok" if ok else "corrupt", "after": round(time.monotonic() - t0, 3)}

    async def close(self) -> None:
        try:
            self.writer.close()
            await asyncio.wait_for(self.writer.wait_closed(), 10)
        except (ConnectionTerminated, asyncio.TimeoutError, OSError):
            pass


async def open_all(host: str, port: int, n: int, concurrency: int, kw: Dict[str, Any]) -> List[Optional[Conn]]:
    sem = asyncio.Semaphore(concurrency)

    async def one(i: int) -> Optional[Conn]:
        async with sem:
            try:
                r, w = await stcp.open_connection(host, port, **kw)
            except (stcp.STCPError, OSError):
                return None
            return Conn(i, r, w)

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def echo_mode(args: argparse.Namespace, host: str, port: int) -> None:
    t0 = time.monotonic()
    conns = await open_all(host, port, args.connections, args.concurrency, connect_kw(args))
    live = [c for c in conns if c is not None]
    emit({"opened": len(live), "failed": len(conns) - len(live), "seconds": round(time.monotonic() - t0, 3),
          "conns": [{"i": c.i, "cid": c.cid, "key": c.key} for c in live]})
    for phase in range(1, args.phases + 1):
        if phase > 1:
            if not sys.stdin.readline():
                break
        t0 = time.monotonic()
        results = await asyncio.gather(*(c.echo(args.size, args.timeout) for c in live))
        emit({"phase": phase, "seconds": round(time.monotonic() - t0, 3),
              "results": [{"i": c.i, **r} for c, r in zip(live, results, strict=True)]})
        live = [c for c, r in zip(live, results, strict=True) if r["result"] == "ok"]
    await asyncio.gather(*(c.close() for c in live))


async def load_mode(args: argparse.Namespace, host: str, port: int) -> None:
    conns = await open_all(host, port, args.connections, args.concurrency, connect_kw(args))
    live = [c for c in conns if c is not None]
    if len(live) != len(conns):
        emit({"error": f"{len(conns) - len(live)} of {len(conns)} connections failed to open"})
        return
    chunk = os.urandom(1 << 16)
    msg = os.urandom(args.msg)

    async def bulk(c: Conn) -> int:
        async def send() -> None:
            left = args.bulk
            while left:
                n = min(left, len(chunk))
                c.writer.write(chunk[:n])
                await c.writer.drain()
                left -= n
        sender = asyncio.ensure_future(send())
        got = 0
        while got < args.bulk:
            data = await c.reader.read(1 << 20)
            if not data:
                break
            got += len(data)
        await sender
        return got

    async def rr(c: Conn) -> int:
        for _ in range(args.rr):
            c.writer.write(msg)
            await c.writer.drain()
            await c.reader.readexactly(len(msg))
        return args.rr * len(msg)

    cpu0, t0 = time.process_time(), time.perf_counter()
    moved = await asyncio.gather(*((bulk if args.bulk else rr)(c) for c in live))
    wall = time.perf_counter() - t0
    emit({"test": "bulk" if args.bulk else "rr", "connections": len(live), "payload_bytes": sum(moved),
          "expected_bytes": len(live) * (args.bulk or args.rr * args.msg), "requests": 0 if args.bulk else
          len(live) * args.rr, "seconds": round(wall, 4), "client_cpu_seconds": round(time.process_time() - cpu0, 4)})
    await asyncio.gather(*(c.close() for c in live))


async def handshake_mode(args: argparse.Namespace, targets: List[tuple]) -> None:
    sem = asyncio.Semaphore(args.concurrency)
    errors = 0
    latencies: List[float] = []

    kw = connect_kw(args)

    async def one(i: int) -> None:
        nonlocal errors
        host, port = targets[i % len(targets)]
        async with sem:
            t = time.perf_counter()
            try:
                _, w = await stcp.open_connection(host, port, **kw)
            except (stcp.STCPError, OSError):
                errors += 1
                return
            latencies.append(time.perf_counter() - t)
            w.close()

    cpu0, t0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(args.handshakes)))
    wall = time.perf_counter() - t0
    latencies.sort()
    emit({"handshakes": len(latencies), "errors": errors, "seconds": round(wall, 3),
          "per_second": round(len(latencies) / wall, 1), "client_cpu_seconds": round(time.process_time() - cpu0, 3),
          "p50_ms": round(latencies[len(latencies) // 2] * 1e3, 2) if latencies else None,
          "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1e3, 2) if latencies else None})
    await asyncio.sleep(0.3)           # let the CLOSE records leave


def connect_kw(args: argparse.Namespace) -> Dict[str, Any]:
    """A handshake with a server holding another key than --server-key fails."""
    return {"server_key": args.server_key}


def main(argv: Optional[List[str]] = None) -> None:
    p = argparse.ArgumentParser(prog="loadclient", description=__doc__.split("\n\n")[0])
    p.add_argument("address", metavar="HOST:PORT")
    p.add_argument("--connections", type=int, default=0)
    p.add_argument("--size", type=int, default=65536)
    p.add_argument("--phases", type=int, default=1)
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("--handshakes", type=int, default=0)
    p.add_argument("--bulk", type=int, default=0, metavar="BYTES")
    p.add_argument("--rr", type=int, default=0, metavar="N")
    p.add_argument("--msg", type=int, default=1024, metavar="BYTES")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--server-key", metavar="BASE64", required=True, help="the servers' public key, pinned")
    args = p.parse_args(argv)
    targets = []
    for a in args.address.split(","):
        host, _, port = a.rpartition(":")
        targets.append((host.strip("[]"), int(port)))
    if args.handshakes:
        asyncio.run(handshake_mode(args, targets))
    else:
        asyncio.run((load_mode if args.bulk or args.rr else echo_mode)(args, *targets[0]))


if __name__ == "__main__":
    main()
