"""Socket-datapath microbenchmark on loopback, one thread: records/s and MB/s of 1400-byte records.

    python -m bench.udpio_micro [--seconds S] [--family 4|6]

Send side (each round also drains the receiver): socket.send per datagram vs stcp._udpio.sendmmsg vs
one UDP GSO send per batch. Pipeline: seal (C) + send + receive + open (C) in one loop, per-datagram Python
(sendto/recvfrom, RecordCipher.seal/open) vs batched, as the socket datapath does it
(seal_stream + GSO sendmmsg + recvmmsg with or without GRO + open_records). MB/s counts
plaintext bytes. Not a test.
"""
from __future__ import annotations

import argparse
import os
import socket
import time

from stcp import _aead, _udpio, wire

SIZE = 1400
REC = SIZE + 40
CHUNK = SIZE - wire.STREAM_FRAME_OVERHEAD   # stream bytes per record: SIZE plaintext bytes with the frame
GSO_BATCH = 65000 // REC            # records per GSO send (64 KiB per GSO buffer)


def rate(fn, per_call: int, seconds: float) -> float:
    """Records per CPU-second (user + system time of this process; loopback delivery mostly
    runs in it too), so other load on the host counts less."""
    fn()
    n, start, cpu0 = 0, time.perf_counter(), time.process_time()
    while time.perf_counter() - start < seconds:
        for _ in range(4):
            n += fn()
    return n / (time.process_time() - cpu0)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=1.5)
    ap.add_argument("--family", choices=["4", "6"], default="4")
    args = ap.parse_args(argv)
    family, host = (socket.AF_INET, "127.0.0.1") if args.family == "4" else (socket.AF_INET6, "::1")
    tx = socket.socket(family, socket.SOCK_DGRAM)
    rx = socket.socket(family, socket.SOCK_DGRAM)
    tx.bind((host, 0))
    rx.bind((host, 0))
    rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 22)
    dest = rx.getsockname()
    tx.connect(dest)
    cipher = _aead.RecordCipher(1, os.urandom(32), os.urandom(12))
    pts = [os.urandom(SIZE) for _ in range(GSO_BATCH)]
    recs = [cipher.seal(1, i + 1, p) for i, p in enumerate(pts)]
    gso_buf = b"".join(recs)
    data = b"".join(pts)[:GSO_BATCH * CHUNK]
    seq = [1]

    def drain():
        while _udpio.recvmmsg(rx, 1024, 2048):
            pass

    def send_sendto():
        for r in recs:
            tx.send(r)
        return len(recs)

    def send_mmsg():
        return _udpio.sendmmsg(tx, recs)

    def send_gso():
        _udpio.sendmmsg(tx, [gso_buf], segment_size=REC)
        return GSO_BATCH

    results = {}
    # each send round also drains the receiver with recvmmsg (the same for all three)
    for name, fn in [("send: socket.send per datagram", send_sendto),
                     (f"send: _udpio.sendmmsg x{GSO_BATCH}", send_mmsg),
                     (f"send: one GSO sendmmsg of {GSO_BATCH}", send_gso)]:
        results[name] = rate(lambda fn=fn: (drain(), fn())[1], 1, args.seconds)

    rx.setblocking(False)

    def pipe_simple():
        n = 0
        for p in pts:
            seq[0] += 1
            tx.send(cipher.seal(1, seq[0], p))
        while True:
            try:
                data = rx.recv(2048)
            except BlockingIOError:
                break
            cipher.open(data)
            n += 1
        return n

    def opened(items) -> int:
        """Records open_records authenticated: a stretch counts its records, a lone record one."""
        return sum(item[1] if len(item) == 5 else 1 for item in items if type(item) is tuple)

    def pipe_batched(gro):
        seq[0] += GSO_BATCH
        _udpio.sendmmsg(tx, [cipher.seal_stream(1, seq[0], data, 0, CHUNK, False)], segment_size=REC)
        n = 0
        if gro:
            got = _udpio.recvmmsg(rx, 64, 65535, gro=True)
            n += opened(cipher.open_records([(d, seg) for d, _addr, seg in got], 1, 0, -1, 1 << 62))
        else:
            while True:
                got = _udpio.recvmmsg(rx, 64, 2048)
                if not got:
                    break
                n += opened(cipher.open_records([d for d, _ in got], 1, 0, -1, 1 << 62))
        return n

    drain()
    results["pipeline: seal+send+recv+open per datagram"] = rate(pipe_simple, 1, args.seconds)
    drain()
    results["pipeline: seal_stream+GSO+recvmmsg+open_records"] = rate(lambda: pipe_batched(False), 1, args.seconds)
    rx.setsockopt(_udpio.SOL_UDP, _udpio.UDP_GRO, 1)
    drain()
    results["pipeline: seal_stream+GSO+GRO+open_records"] = rate(lambda: pipe_batched(True), 1, args.seconds)

    print(f"loopback IPv{args.family}, {SIZE}-byte plaintexts ({REC}-byte datagrams), one thread, per CPU-second")
    for name, r in results.items():
        print(f"  {name:46s} {r / 1e3:8.0f} k rec/s  {r * SIZE / 1e6:7.0f} MB/s")


if __name__ == "__main__":
    main()
