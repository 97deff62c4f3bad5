"""What an abusive peer costs the protocol core, against what honest bulk data costs, in one
process and one run (no sockets): the numbers behind docs/PROTOCOL.md's availability rules.

`python -m bench.hostile` prints, for a server connection fed by an authenticated but hostile
client (it has the keys: nothing here is a forgery):

- records: CPU per byte of the worst records a peer can send (many small frames, padding,
  acks, out-of-order one-byte stream frames), each as a ratio to in-order bulk data;
- reassembly: overlapping 1,400-byte stream frames (bytes held against the window) and
  20,000 one-byte out-of-order frames followed by the record that fills the hole (CPU);
- optimistic acks: a client that acknowledges every packet number the server could have
  sent, without receiving: how far the server's congestion window grows, and how it ends.
"""
from __future__ import annotations

import argparse
import time

from stcp import wire
from stcp.connection import Config, Connection
from stcp.endpoint import ServerEndpoint
from stcp.state import State

ADDR = ("192.0.2.1", 5000)


class Hostile:
    """An established client/server pair; the client side seals whatever the test asks for."""

    def __init__(self, server_config: Config | None = None):
        self.now = 0.0
        self.endpoint = ServerEndpoint(server_config or Config())
        self.client = Connection.client(Config(server_key=self.endpoint.public_key), self.now)
        for d in self.client.datagrams_to_send(self.now):
            conn, _ = self.endpoint.receive(d, ADDR, self.now)
        self.server = conn
        for d in self.server.datagrams_to_send(self.now):
            self.client.receive_datagram(d, self.now)
        for d in self.client.datagrams_to_send(self.now):
            self.endpoint.receive(d, ADDR, self.now)
        assert self.server.state == State.ENCRYPTED
        self.server.send(b"s" * 5000)           # records the client can acknowledge
        for d in self.server.datagrams_to_send(self.now):
            self.client.receive_datagram(d, self.now)
        self.pn = self.client._next_pn + 1000

    def seal(self, plaintext: bytes) -> bytes:
        key = self.client._keys.send
        self.pn += 1
        return key.seal(self.server.local_cid, wire.make_seq(key.epoch, self.pn), plaintext)

    def feed(self, record: bytes) -> None:
        self.endpoint.receive(record, ADDR, self.now)

    def drain(self) -> None:
        while self.server.next_event() is not None:
            pass


def cpu(fn, *args) -> float:
    t = time.process_time()
    fn(*args)
    return time.process_time() - t


def per_byte(make_plaintext, n: int, max_datagram: int) -> tuple:
    """ns of server CPU per byte of record, over n records from make_plaintext(i, h)."""
    h = Hostile(Config(max_datagram=max_datagram))
    records = [h.seal(make_plaintext(i, h)) for i in range(n)]
    size = sum(map(len, records))

    def go():
        for r in records:
            h.feed(r)
            h.drain()
    t = cpu(go)
    return t / size * 1e9, h.server.state.value, len(records[0])


def records_section(n: int) -> None:
    hdr = wire.STREAM_HEADER_STRUCT
    body = 1452 - 40

    def bulk(i, h):
        return hdr.pack(wire.FRAME_STREAM, 0, i * (body - 12), body - 12) + bytes(body - 12)

    def ack_only(i, h):          # an honest small record: what a receiver sends every other record
        return wire.encode_ack([(1, 1)])

    def pings(count):
        return lambda i, h: b"\x01" * count

    def pings_padding(i, h):
        return b"\x01" * 63 + bytes(body - 63)

    def max_data(i, h):
        return wire.encode_frame(wire.MaxDataFrame(1 << 20)) * 64

    def acks(i, h):
        frame = wire.encode_ack([(1, 1)])
        return frame * (body // len(frame))

    def tiny_stream(i, h):
        # one-byte frames at every other offset far ahead of the delivered point: each opens a hole
        base = (1 << 19) + i * 400
        return b"".join(hdr.pack(wire.FRAME_STREAM, 0, base + 2 * k, 1) + b"x" for k in range(64))

    def big_pings(i, h):
        return b"\x01" * (65000 - 40)

    base, _, _ = per_byte(bulk, n, 1452)
    print(f"in-order bulk (1452-byte records): {base:.1f} ns/byte")
    for name, fn, count in (("honest ACK-only record", ack_only, n),
                            ("PING x1412", pings(1412), n), ("64 KB record of PINGs", big_pings, max(1, n // 40)),
                            ("PING x64", pings(64), n), ("PING x63 + PADDING", pings_padding, n),
                            ("MAX_DATA x64", max_data, n), ("ACK x61", acks, n),
                            ("one-byte STREAM x64 (holes)", tiny_stream, n)):
        ns, state, size = per_byte(fn, count, 1452)
        print(f"{name:30s} {size:6d}-byte records: {ns:8.1f} ns/byte = {ns / base:6.1f} x bulk, "
              f"{ns * size / 1e3:7.1f} us/record (server connection {state})")


def reassembly_section() -> None:
    hdr = wire.STREAM_HEADER_STRUCT
    h = Hostile()
    recv = h.server._recv
    # 40,000 overlapping 1,400-byte frames: offsets 1..40000 (one byte apart), none at 0
    t = cpu(lambda: [h.feed(h.seal(hdr.pack(wire.FRAME_STREAM, 0, 1 + i * 16, 1400) + bytes(1400)))
                     for i in range(40_000)])
    held = getattr(recv, "held", None)
    if held is None:
        held = sum(map(len, recv.pending.values()))
    print(f"40,000 overlapping 1,400-byte frames: server holds {held / 1e6:.1f} MB out of order "
          f"(window {recv.window / 1e6:.1f} MB), {t:.2f} s CPU, connection {h.server.state.value}")
    h = Hostile()
    frames = [h.seal(hdr.pack(wire.FRAME_STREAM, 0, i + 1, 1) + b"y") for i in range(20_000)]
    t1 = cpu(lambda: [h.feed(f) for f in frames])
    fill = h.seal(hdr.pack(wire.FRAME_STREAM, 0, 0, 1) + b"z")      # the one byte missing at offset 0
    t2 = cpu(h.feed, fill)
    print(f"20,000 one-byte frames at offsets 1..20000: {t1:.2f} s CPU; then the 53-byte record filling "
          f"offset 0: {t2 * 1e3:.2f} ms CPU; connection {h.server.state.value}, "
          f"delivered {h.server._recv.delivered_to} bytes")


def optimistic_section(seconds: float) -> None:
    """The client acks [1, largest pn the server could have sent] every 1 ms, receiving nothing."""
    h = Hostile()
    srv = h.server
    srv.send(bytes(256 << 20))
    peak = srv._recovery.cc.cwnd
    sent = 0
    step = 0.001
    t = 0.0
    while t < seconds and srv.state == State.ENCRYPTED:
        t += step
        h.now += step
        out = srv.datagrams_to_send(h.now)
        sent += sum(map(len, out))
        largest = srv._next_pn - 1
        if largest >= 1:
            # ... and grants credit it will never use: only the congestion window holds the server
            h.feed(h.seal(wire.encode_ack([(1, largest)]) + wire.encode_frame(wire.MaxDataFrame(1 << 40))))
        peak = max(peak, srv._recovery.cc.cwnd)
    info = srv.close_info
    print(f"optimistic acks for {t:.2f} s: server sent {sent / 1e6:.1f} MB, congestion window peaked at "
          f"{peak / 1e6:.2f} MB; connection {srv.state.value}"
          + (f" ({info.code!r}: {info.reason})" if info else ""))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.hostile", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=400, help="records per worst-case kind")
    p.add_argument("--seconds", type=float, default=2.0, help="simulated time of the optimistic acker")
    args = p.parse_args(argv)
    records_section(args.records)
    reassembly_section()
    optimistic_section(args.seconds)


if __name__ == "__main__":
    main()
