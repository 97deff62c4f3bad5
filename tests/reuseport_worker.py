"""A worker process of tests/test_reuseport.py: what a socket-pool worker does with the
steering, and a record of what reached it.

    python -m tests.reuseport_worker SOCKARRAY_FD COUNTERS_FD PROG_FD WORKER HOST PORT

Adopts the steering fds it inherited, binds a SO_REUSEPORT UDP socket to HOST:PORT, joins
the steering at key WORKER and prints "ready COOKIE". Then it reads datagrams until its
stdin closes, drains its socket and prints one JSON line: {"records": {worker byte: n},
"hellos": n, "not_stcp": n, "bytes": n}.
"""
from __future__ import annotations

import collections
import json
import selectors
import socket
import sys

from stcp.datapath.reuseport import ReuseportSteering, ReuseportVerdict, classify, socket_cookie


def main(argv: list[str]) -> None:
    sockarray_fd, counters_fd, prog_fd, worker = map(int, argv[:4])
    host, port = argv[4], int(argv[5])
    steering = ReuseportSteering.from_fds(sockarray_fd, counters_fd, prog_fd)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    sock.bind((host, port))
    sock.setblocking(False)
    steering.join(worker, sock)
    print("ready", socket_cookie(sock), flush=True)

    records: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    nbytes = 0

    def drain() -> None:
        nonlocal nbytes
        while True:
            try:
                data = sock.recv(65536)
            except BlockingIOError:
                return
            nbytes += len(data)
            verdict, w = classify(data)
            if verdict == ReuseportVerdict.PASS_WORKER:
                records[w] += 1
            kinds[verdict] += 1

    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(sys.stdin, selectors.EVENT_READ)
    while True:
        events = sel.select()
        if any(key.fileobj is sys.stdin for key, _ in events) and not sys.stdin.readline():
            break
        drain()
    drain()
    print(json.dumps({"records": records, "hellos": kinds[ReuseportVerdict.PASS_HELLO],
                      "not_stcp": kinds[ReuseportVerdict.PASS_NOT_STCP], "bytes": nbytes}), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
