"""CPU per GB of the sans-IO protocol core alone: one bulk transfer between a client Connection
and a server endpoint in one process, datagrams passed in memory in batches the way the socket
datapath hands them over (no sockets, no event loop, no kernel).

This is the floor the datapaths build on: what a sender and a receiver cost in Python and C
per byte before any system call. `python -m bench.hotpath [--mb 64] [--profile sender|receiver]`;
`--rr N [--size 64]`: CPU per request/response round trip instead.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time

from stcp.connection import Config, Connection, DataReceived
from stcp.endpoint import ServerEndpoint

ADDR = ("192.0.2.1", 5000)
WRITE = 256 << 10


def transfer(total: int, profile: str = "") -> dict:
    now = 0.0
    server = ServerEndpoint(Config())
    client = Connection.client(Config(server_key=server.public_key), now)
    cpu = {"sender": 0.0, "receiver": 0.0}
    prof = cProfile.Profile() if profile else None
    received = 0
    written = 0
    conn = None

    def timed(side, fn, *a):
        if prof is not None and side == profile:
            prof.enable()
        t = time.process_time()
        r = fn(*a)
        cpu[side] += time.process_time() - t
        if prof is not None and side == profile:
            prof.disable()
        return r

    def up(now):
        out = timed("sender", client.datagram_batches, now)
        batch = []
        for buf, size in out:
            batch.extend((buf[i:i + size], ADDR) for i in range(0, len(buf), size))
        return batch

    # handshake
    touched, _ = server.receive_batch(up(now), now)
    conn = touched[0]
    for d in conn.datagrams_to_send(now):
        client.receive_datagram(d, now)
    while client.next_event() is not None:
        pass
    step = 0
    while received < total:
        step += 1
        now += 0.0005
        if step > 10_000_000:
            raise RuntimeError("transfer did not finish")
        while written < total and client.send_buffered < (4 << 20):
            timed("sender", client.send, bytes(WRITE))
            written += WRITE
        batch = up(now)
        for i in range(0, len(batch), 64):            # recvmmsg batches of 64
            timed("receiver", server.receive_batch, batch[i:i + 64], now)
            while (ev := conn.next_event()) is not None:
                if isinstance(ev, DataReceived):
                    received += len(ev.data)
                    timed("receiver", conn.consume, len(ev.data))
            for d in timed("receiver", conn.datagrams_to_send, now):
                timed("sender", client.receive_datagram, d, now)
        while client.next_event() is not None:
            pass
    gb = total / 1e9
    result = {"bytes": total, "sender_s_per_gb": cpu["sender"] / gb, "receiver_s_per_gb": cpu["receiver"] / gb,
              "records": client.stats.records_sent}
    if prof is not None:
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    return result


def request_response(rounds: int, size: int, profile: str = "") -> dict:
    """`rounds` round trips of a `size`-byte message echoed by the server, one record each way
    (the delayed ACKs ride on the next message and on the echo, as on a live connection): CPU
    per round trip of the protocol core at both ends, get_timer calls included (a datapath
    asks after every datagram in and out)."""
    now = 0.0
    server = ServerEndpoint(Config())
    client = Connection.client(Config(server_key=server.public_key), now)
    touched, _ = server.receive_batch([(d, ADDR) for d in client.datagrams_to_send(now)], now)
    conn = touched[0]
    for d in conn.datagrams_to_send(now):
        client.receive_datagram(d, now)
    while client.next_event() is not None:
        pass
    msg = bytes(size)
    prof = cProfile.Profile() if profile else None
    got = 0
    if prof is not None:
        prof.enable()
    t = time.process_time()
    for _ in range(rounds):
        now += 0.00005
        client.send(msg)
        batch = [(d, ADDR) for d in client.datagrams_to_send(now)]
        client.get_timer()
        server.receive_batch(batch, now)
        while (ev := conn.next_event()) is not None:
            if isinstance(ev, DataReceived):
                conn.consume(len(ev.data))
                conn.send(ev.data)
        out = conn.datagrams_to_send(now)
        conn.get_timer()
        now += 0.00005
        client.receive_datagrams(out, now)
        while (ev := client.next_event()) is not None:
            if isinstance(ev, DataReceived):
                got += len(ev.data)
                client.consume(len(ev.data))
        client.get_timer()
    cpu = time.process_time() - t
    if prof is not None:
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)
    if got != rounds * size:
        raise RuntimeError(f"echoed {got} bytes of {rounds * size}")
    return {"rounds": rounds, "us_per_rtt": cpu / rounds * 1e6, "records": client.stats.records_sent}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.hotpath", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mb", type=int, default=64)
    p.add_argument("--profile", choices=["sender", "receiver", "rr"], default="")
    p.add_argument("--rr", type=int, default=0, metavar="N",
                   help="instead of bulk: N request/response round trips (--size bytes each way)")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--repeat", type=int, default=5, help="--rr runs; the best is reported")
    args = p.parse_args(argv)
    if args.rr:
        runs = [request_response(args.rr, args.size, args.profile) for _ in range(args.repeat)]
        us = sorted(r["us_per_rtt"] for r in runs)
        print(f"{args.rr} round trips of {args.size} B, {runs[0]['records']} client records: "
              f"{us[0]:.1f} µs CPU per round trip, both ends (best of {len(us)}; median {us[len(us) // 2]:.1f})")
        return
    r = transfer(args.mb << 20, args.profile)
    print(f"{args.mb} MiB, {r['records']} records: sender {r['sender_s_per_gb']:.2f} s/GB, "
          f"receiver {r['receiver_s_per_gb']:.2f} s/GB (CPU, protocol core only)")


if __name__ == "__main__":
    main()
