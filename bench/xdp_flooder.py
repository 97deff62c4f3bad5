"""A flood of invalid STCP datagrams sent as XDP frames, the way a NIC hands frames to a driver.

    python -m bench.xdp_flooder IFACE DST_MAC DST_IP PORT [--seconds S] [--count N]
                                [--kind unknown-cid|bad-length|hello] [--rate PPS]

Run inside the sender's namespace (bench/xdp_flood.py does, with `--flooder xdp`). A tiny
XDP program runs in the kernel's "live frames" test mode (BPF_PROG_TEST_RUN with
BPF_F_TEST_XDP_LIVE_FRAMES) on one crafted Ethernet frame, rewrites its CID with a random
one (unknown-cid) and returns XDP_TX, which sends it out of IFACE with ndo_xdp_xmit: on
veth the frame lands in the peer's receive ring as an XDP frame, no socket buffer on
either side. A server whose program runs in native mode then sees the flood as it would
from a NIC (the program runs on the raw frame, XDP_DROP recycles it), at a few tens of
nanoseconds of the sender's CPU per frame instead of a sendmmsg socket buffer each
(bench/flood.c). Without an XDP program, or in generic mode, the receiving veth builds a
socket buffer per frame for the stack, as a NIC driver would.

Prints one JSON line like bench/flood.c: {"sent": N, "seconds": S, "pps": R, ...}. "sent"
counts frames the program sent; those the receiving ring had no room for are counted by
the sending veth as tx_dropped. Needs root and bcc.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import signal
import struct
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BPF_F_TEST_XDP_LIVE_FRAMES = 1 << 1
# Pacing granularity: each BPF_PROG_TEST_RUN call sets up and tears down its page pool,
# which costs 30-40 ms here (an RCU grace period on a busy machine), so a paced flood goes
# out in bursts of a tenth of a second's frames.
CHUNK_S = 0.1
HEADER_LEN, HELLO_LEN = 24, 80         # a version 1 hello, as bench/flood.c sends


class XdpMd(ctypes.Structure):  # struct xdp_md, the context BPF_PROG_TEST_RUN takes
    _fields_ = [("data", ctypes.c_uint32), ("data_end", ctypes.c_uint32), ("data_meta", ctypes.c_uint32),
                ("ingress_ifindex", ctypes.c_uint32), ("rx_queue_index", ctypes.c_uint32),
                ("egress_ifindex", ctypes.c_uint32)]


def record(kind: str, size: int) -> bytes:
    """The datagram before the program sets its CID (as bench/flood.c builds them)."""
    if kind == "hello":
        return struct.pack("!QQQ", HELLO_LEN, 0, 0) + bytes([1, 1]) + bytes(HELLO_LEN - 2)
    length = size - HEADER_LEN + (1 if kind == "bad-length" else 0)
    return struct.pack("!QQQ", length, 0, 1) + b"\xa5" * (size - HEADER_LEN)


PROGRAM = """
int flood(struct xdp_md *ctx) {
    void *data = (void *)(long)ctx->data, *end = (void *)(long)ctx->data_end;
    __u32 *cid = data + CID_OFFSET;
    if ((void *)(cid + 2) > end)
        return XDP_ABORTED;
#if RANDOM_CID
    cid[0] = bpf_get_prandom_u32();
    cid[1] = bpf_get_prandom_u32();
#endif
    return XDP_TX;
}
"""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.xdp_flooder", description=__doc__.split("\n")[0])
    p.add_argument("iface")
    p.add_argument("dst_mac")
    p.add_argument("dst_ip")
    p.add_argument("port", type=int)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--count", type=int, default=100_000_000)
    p.add_argument("--kind", default="unknown-cid", choices=["unknown-cid", "bad-length", "hello"])
    p.add_argument("--size", type=int, default=56, help="UDP payload bytes (default 56, as bench/flood.c)")
    p.add_argument("--rate", type=float, default=0.0, help="frames/s offered (0: as fast as the CPU allows)")
    p.add_argument("--source", default="10.99.0.9", help="source IPv4 address written in the frames")
    args = p.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from bcc import BPF

    from stcp.datapath import bpf
    from tests.support.packets import udp_frame
    from tests.support.testrun import Opts

    src_mac = Path(f"/sys/class/net/{args.iface}/address").read_text().strip()
    ifindex = int(Path(f"/sys/class/net/{args.iface}/ifindex").read_text())
    payload = record(args.kind, args.size)
    frame = udp_frame(src_mac, args.dst_mac, args.source, args.dst_ip, 40000, args.port, payload)
    cid_offset = len(frame) - len(payload) + 8
    prog = BPF(text=PROGRAM.encode(), cflags=[f"-DCID_OFFSET={cid_offset}",
                                              f"-DRANDOM_CID={int(args.kind == 'unknown-cid')}"])
    fd = prog.load_func(b"flood", BPF.XDP).fd
    lib = bpf.libbpf()
    lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.POINTER(Opts)]
    buf = ctypes.create_string_buffer(frame, len(frame))
    md = XdpMd(0, len(frame), 0, ifindex, 0, 0)

    stop = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.append(1))
    chunk = max(64, int(args.rate * CHUNK_S)) if args.rate else 65536
    sent = errors = 0
    print("flooding", file=sys.stderr, flush=True)       # bench/xdp_flood.py waits for this line
    t0 = time.monotonic()
    deadline = t0 + args.seconds
    while not stop and sent < args.count and time.monotonic() < deadline:
        n = min(chunk, args.count - sent)
        o = Opts(sz=ctypes.sizeof(Opts), data_in=ctypes.addressof(buf), data_size_in=len(frame),
                 ctx_in=ctypes.addressof(md), ctx_size_in=ctypes.sizeof(md), repeat=n,
                 flags=BPF_F_TEST_XDP_LIVE_FRAMES, batch_size=64)
        if lib.bpf_prog_test_run_opts(fd, ctypes.byref(o)) != 0:
            errors += 1
            if errors > 100:
                break
            continue
        sent += n
        if args.rate:
            due = t0 + sent / args.rate
            while not stop and time.monotonic() < min(due, deadline):
                time.sleep(min(0.002, max(0.0, due - time.monotonic())))
    el = time.monotonic() - t0
    prog.cleanup()
    print(json.dumps({"sent": sent, "seconds": round(el, 6), "pps": round(sent / el, 1) if el > 0 else 0.0,
                      "errors": errors, "kind": args.kind, "size": args.size, "rate": args.rate,
                      "via": "xdp-live-frames"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
