"""Server CPU per handshake of the sans-IO protocol core alone, in one process: no sockets, no
event loop, no kernel. The floor under the capacity bench (bench.run --tests capacity).

Two figures, server-side calls only timed (the clients' work is excluded):
- hello: one client hello in (ServerEndpoint.receive_batch), the server hello out
  (datagrams_to_send, get_timer) - the per-hello work: X25519, key schedule, a Connection;
  with the ephemeral key made in the hello path, and taken from the key pool (stcp.keypool)
  with the CPU of making it ahead of need shown apart.
- cycle: the capacity bench's whole cycle, as the server sees it: the hello, the client's
  first record, a 32-byte echo, both FINs, the draining timer, ServerEndpoint.remove.

    python -m bench.handshake_micro [--n 2000] [--repeat 5] [--profile hello|cycle]
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from typing import List

from stcp.connection import Config, Connection, DataReceived, StreamFinished
from stcp.endpoint import ServerEndpoint

ADDR = ("192.0.2.1", 5000)
# The simulated clock runs faster than any real hello rate: no hello budget here, so every
# hello takes the full path (the cookie path under load is bench.hello_flood's business).
SERVER = dict(hello_rate=1e9, hello_burst=10**9)
MESSAGE = bytes(range(32))


class _Timer:
    def __init__(self, prof: cProfile.Profile | None):
        self.cpu = 0.0
        self.prof = prof

    def __call__(self, fn, *a):
        prof = self.prof
        if prof is not None:
            prof.enable()
        t = time.process_time()
        r = fn(*a)
        self.cpu += time.process_time() - t
        if prof is not None:
            prof.disable()
        return r


def hellos(n: int, profile: bool = False, pool: bool = False) -> dict:
    """n client hellos, made first (untimed), then each handed to the server alone. pool: the
    server's ephemeral key pool (stcp.keypool) refilled before each hello, as the datapath
    does when idle; that refill's CPU is timed apart ("refill_us")."""
    server = ServerEndpoint(Config(**SERVER))
    refill = _Timer(None)
    cfg = Config(server_key=server.public_key)
    clients = [Connection.client(cfg, 0.0) for _ in range(n)]
    batches = [[(d, (ADDR[0], 5000 + i % 60000))] for i, c in enumerate(clients) for d in c.datagrams_to_send(0.0)]
    timed = _Timer(cProfile.Profile() if profile else None)
    made = 0
    for i, batch in enumerate(batches):
        now = i * 1e-5
        if pool:
            refill(server.ephemeral_keys.refill, 1)
        _, new = timed(server.receive_batch, batch, now)
        for conn in new:
            made += 1
            timed(conn.datagrams_to_send, now)
            timed(conn.get_timer)
    if made != n:
        raise RuntimeError(f"{made} connections from {n} hellos")
    if timed.prof is not None:
        pstats.Stats(timed.prof).sort_stats("tottime").print_stats(25)
    if pool and server.ephemeral_keys.misses:
        raise RuntimeError(f"{server.ephemeral_keys.misses} hellos found the key pool empty")
    return {"n": n, "us": timed.cpu / n * 1e6, "refill_us": refill.cpu / n * 1e6}


def cycles(n: int, profile: bool = False, concurrent: int = 32) -> dict:
    """n connections, `concurrent` at a time in lock step: hello, the client's first record with
    the 32-byte message and its FIN, the server's echo and FIN, the acks, the server's
    draining timer, remove. Only the server's calls are timed."""
    server = ServerEndpoint(Config(**SERVER))
    cfg = Config(server_key=server.public_key)
    timed = _Timer(cProfile.Profile() if profile else None)
    now = 0.0
    done = 0
    draining: List[Connection] = []
    while done < n:
        k = min(concurrent, n - done)
        clients = [Connection.client(cfg, now) for _ in range(k)]
        addrs = [(ADDR[0], 5000 + (done + i) % 60000) for i in range(k)]
        up = [(d, a) for c, a in zip(clients, addrs, strict=True) for d in c.datagrams_to_send(now)]
        by_client = {}
        for _ in range(40):
            now += 0.0002
            server_conns: list = []
            if up:
                touched, new = timed(server.receive_batch, up, now)
                for conn in new:
                    by_client[conn.peer_cid] = conn
                server_conns = touched
            for conn in server_conns:
                timed(_echo, conn)
            down = {}
            for conn in server_conns:
                down[conn.peer_cid] = timed(conn.datagrams_to_send, now)
                timed(conn.get_timer)
            up = []
            now += 0.0002
            for c, a in zip(clients, addrs, strict=True):
                got = down.get(c.local_cid)
                if got:
                    c.receive_datagrams(got, now)
                while (ev := c.next_event()) is not None:
                    if type(ev).__name__ == "HandshakeCompleted":
                        c.send(MESSAGE)
                        c.shutdown_write()
                    elif isinstance(ev, DataReceived):
                        c.consume(len(ev.data))
                up += [(d, a) for d in c.datagrams_to_send(now)]
            if not up and all(c.is_closed or c._draining_until is not None for c in clients):
                break
        # the draining period ends on the server connection's timer
        for conn in by_client.values():
            t = conn.get_timer()
            if t is not None:
                timed(conn.handle_timer, max(now, t))
            timed(conn.datagrams_to_send, max(now, t or now))
            if not conn.is_closed:
                raise RuntimeError(f"server connection not closed: {conn.state}")
            timed(server.remove, conn)
            draining.append(conn)
        done += k
    if len(server.connections):
        raise RuntimeError(f"{len(server.connections)} connections left")
    if timed.prof is not None:
        pstats.Stats(timed.prof).sort_stats("tottime").print_stats(30)
    return {"n": n, "us": timed.cpu / n * 1e6}


def _echo(conn: Connection) -> None:
    """The bench server's echo handler: what it reads goes back; at EOF it finishes too."""
    while (ev := conn.next_event()) is not None:
        if isinstance(ev, DataReceived):
            conn.consume(len(ev.data))
            conn.send(ev.data)
        elif isinstance(ev, StreamFinished):
            conn.shutdown_write()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.handshake_micro", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="handshakes per run")
    p.add_argument("--repeat", type=int, default=5, help="runs of each; the best and the median are reported")
    p.add_argument("--profile", choices=["hello", "cycle"], default="")
    args = p.parse_args(argv)
    repeat = 1 if args.profile else args.repeat
    if args.profile in ("", "hello"):
        # the two ways take turns run by run, so a change in the machine's load hits both
        runs = [(hellos(args.n, args.profile == "hello"), hellos(args.n, args.profile == "hello", pool=True))
                for _ in range(repeat)]
        demand = sorted(r[0]["us"] for r in runs)
        ready = sorted(r[1]["us"] for r in runs)
        refill = sorted(r[1]["refill_us"] for r in runs)
        print(f"hello, key made in the hello path: {demand[0]:.1f} µs server CPU (best of {repeat}; "
              f"median {demand[repeat // 2]:.1f})")
        print(f"hello, key from the pool: {ready[0]:.1f} µs (median {ready[repeat // 2]:.1f}), "
              f"plus {refill[0]:.1f} µs (median {refill[repeat // 2]:.1f}) to make the key ahead of need")
    if args.profile in ("", "cycle"):
        us = sorted(cycles(args.n, args.profile == "cycle")["us"] for _ in range(repeat))
        print(f"cycle (hello .. remove, keys made in the path): {us[0]:.1f} µs server CPU per handshake "
              f"(best of {repeat}; median {us[repeat // 2]:.1f})")


if __name__ == "__main__":
    main()
