"""What SO_REUSEPORT steering by CID (stcp/datapath/reuseport_prog.py) costs per datagram, on loopback.

    .venv/bin/python -m bench.reuseport_steer [--seconds 6] [--workers 4] [--size 1200] [--family 4|6]
                                              [--out bench/results/reuseport_steer.json]

Needs CAP_BPF (root). Two measures:

* the program alone: the kernel's own run-time accounting (BPF_ENABLE_STATS, the fd form of
  kernel.bpf_stats_enabled, on only while this runs), run_time_ns / run_cnt per path,
  read with bpftool. BPF_PROG_TEST_RUN would time it in isolation, but the kernel has no
  test_run for SK_REUSEPORT programs; the script probes and reports that.
* the whole receive path: N SO_REUSEPORT sockets on one port in this process, one thread
  sending batches of datagrams with sendmmsg from 64 source ports and draining every
  socket with recvmmsg. On loopback the kernel delivers inside the sender's system call,
  so CPU time per datagram (user + system of this process) covers send, UDP lookup (with
  the program or the kernel's hash) and receive. Scenarios take turns in short rounds
  (medians reported) so that load from elsewhere on the host hits them alike:
    hash    no program: the kernel's hash picks the socket
    empty   a program that only returns SK_PASS (the kernel's hash picks): the floor of
            running any SK_REUSEPORT program, run-time accounting included
    steer   the program sends records to their CID's worker (pass_worker)
    hello   the program passes client hellos to the kernel's hash (pass_hello)
    orphan  records of an empty key (a dead worker's): the program finds no socket and
            leaves them to the kernel's hash (pass_orphan)
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import random
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

from stcp import _udpio
from stcp.datapath.bpf import libbpf, prog_load
from stcp.datapath.reuseport import (
    BPF_PROG_TYPE_SK_REUSEPORT,
    SO_ATTACH_REUSEPORT_EBPF,
    ReuseportError,
    ReuseportSteering,
)

BATCH = 256
SOURCES = 64
BPF_STATS_RUN_TIME = 0
SO_RCVBUFFORCE = 33          # asm-generic/socket.h; Python does not name it


def probe_test_run(prog_id: int) -> str:
    """BPF_PROG_TEST_RUN on the program, through bpftool: its answer, or how long a run took."""
    with tempfile.NamedTemporaryFile() as data:
        data.write(bytes(64))
        data.flush()
        p = subprocess.run(["bpftool", "--json", "prog", "run", "id", str(prog_id), "data_in", data.name,
                            "repeat", "100"], capture_output=True, text=True)
    doc = json.loads(p.stdout or "{}")
    if "error" in doc or p.returncode:
        err = doc.get("error", p.stderr.strip())
        return f"not supported on this kernel ({err}{'; 524 is ENOTSUPP' if '524' in err else ''})"
    return f"supported: {doc.get('duration')} ns per run"


def run_stats(prog_id: int) -> tuple:
    out = subprocess.run(["bpftool", "prog", "show", "id", str(prog_id), "--json"], capture_output=True,
                         text=True, check=True).stdout
    doc = json.loads(out)
    return doc.get("run_cnt", 0), doc.get("run_time_ns", 0)


EMPTY = struct.pack("=BBhiBBhi", 0xB7, 0, 0, 1, 0x95, 0, 0, 0)     # r0 = SK_PASS; exit


def empty_program() -> int:
    """fd of an SK_REUSEPORT program that selects nothing."""
    return prog_load(BPF_PROG_TYPE_SK_REUSEPORT, "stcp_rp_empty", EMPTY)


def prog_id(fd: int) -> int:
    return ReuseportSteering(-1, -1, fd).prog_id


def record(worker: int, size: int) -> bytes:
    cid = (worker << 56) | random.getrandbits(56) | 1
    return struct.pack("!QQQ", size - 24, cid, 7) + bytes(size - 24)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="per scenario, over all rounds")
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--size", type=int, default=1200, help="UDP payload bytes of a record")
    ap.add_argument("--family", choices=["4", "6"], default="4")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    af, host = (socket.AF_INET, "127.0.0.1") if args.family == "4" else (socket.AF_INET6, "::1")

    try:
        steering = ReuseportSteering.load()
    except ReuseportError as e:
        print(f"reuseport_steer: {e}", file=sys.stderr)
        return 1
    lib = libbpf()
    lib.bpf_enable_stats.argtypes, lib.bpf_enable_stats.restype = [ctypes.c_int], ctypes.c_int
    stats_fd = lib.bpf_enable_stats(BPF_STATS_RUN_TIME)
    if stats_fd < 0:
        print(f"reuseport_steer: BPF_ENABLE_STATS failed (errno {-stats_fd})", file=sys.stderr)
        return 1

    empty_fd = empty_program()

    def group(program: str) -> tuple:
        socks = []
        port = 0
        for w in range(args.workers):
            s = socket.socket(af, socket.SOCK_DGRAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            s.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
            s.bind((host, port))
            port = s.getsockname()[1]
            if program == "steer":
                steering.join(w, s)
            elif program == "empty":
                s.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, struct.pack("=i", empty_fd))
            socks.append(s)
        return socks, (host, port)

    senders = []
    for _ in range(SOURCES):
        s = socket.socket(af, socket.SOCK_DGRAM)
        s.bind((host, 0))
        senders.append(s)
    plain, plain_dest = group("none")
    empty, empty_dest = group("empty")
    steered, steered_dest = group("steer")
    empty_key = args.workers                     # no socket there
    recs = [record(random.randrange(args.workers), args.size) for _ in range(BATCH)]
    hellos = [struct.pack("!QQQ", 80, 0, 0) + bytes(80)] * BATCH
    dead = [record(empty_key, args.size) for _ in range(BATCH)]
    steer_id, empty_id = steering.prog_id, prog_id(empty_fd)
    scenarios = {"hash": (recs, plain, plain_dest, None), "empty": (recs, empty, empty_dest, empty_id),
                 "steer": (recs, steered, steered_dest, steer_id),
                 "hello": (hellos, steered, steered_dest, steer_id), "orphan": (dead, steered, steered_dest, steer_id)}

    def one_round(name: str, seconds: float) -> Dict[str, float]:
        datagrams, socks, dest, pid = scenarios[name]
        n, i = 0, 0
        cnt0, ns0 = run_stats(pid) if pid else (0, 0)
        start, cpu0 = time.perf_counter(), time.process_time()
        while time.perf_counter() - start < seconds:
            for _ in range(8):
                sent = _udpio.sendmmsg(senders[i % SOURCES], datagrams, dest)
                i += 1
                n += sent
                for s in socks:
                    while _udpio.recvmmsg(s, 64, 2048):
                        pass
        wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
        cnt1, ns1 = run_stats(pid) if pid else (0, 0)
        runs = cnt1 - cnt0
        return {"datagrams": n, "cpu_ns": cpu * 1e9 / n, "wall_ns": wall * 1e9 / n,
                "prog_runs": runs, "prog_ns": (ns1 - ns0) / runs if runs else None}

    per: Dict[str, List[dict]] = {k: [] for k in scenarios}
    one_round("hash", 0.2)                                 # warm up
    for _ in range(args.rounds):
        for name in scenarios:
            per[name].append(one_round(name, args.seconds / args.rounds))
    counters = steering.counters()
    os.close(stats_fd)

    def med(name: str, key: str):
        vals = [r[key] for r in per[name] if r[key] is not None]
        return round(statistics.median(vals), 1) if vals else None

    summary = {name: {"cpu_ns_per_datagram": med(name, "cpu_ns"), "wall_ns_per_datagram": med(name, "wall_ns"),
                      "prog_ns_per_run": med(name, "prog_ns"), "datagrams": sum(r["datagrams"] for r in per[name]),
                      "prog_runs": sum(r["prog_runs"] for r in per[name])} for name in scenarios}
    doc = {
        "machine": {"kernel": platform.release(), "cpus": os.cpu_count(),
                    "loadavg_at_end": os.getloadavg()},
        "setup": {"family": f"IPv{args.family}", "workers": args.workers, "record_bytes": args.size,
                  "hello_bytes": 104, "batch": BATCH, "sources": SOURCES, "rounds": args.rounds,
                  "seconds_per_scenario": args.seconds},
        "bpf_prog_test_run": probe_test_run(steer_id),
        "summary": summary,
        "steer_vs_hash_cpu": round(summary["steer"]["cpu_ns_per_datagram"] / summary["hash"]["cpu_ns_per_datagram"], 3),
        "counters": counters,
        "rounds": per,
    }
    steering.close()
    os.close(empty_fd)
    print(f"loopback IPv{args.family}, {args.workers} SO_REUSEPORT sockets, {args.size}-byte records, "
          f"batches of {BATCH}; medians of {args.rounds} rounds")
    print(f"BPF_PROG_TEST_RUN: {doc['bpf_prog_test_run']}")
    print(f"{'scenario':8} {'CPU ns/dgram':>13} {'wall ns/dgram':>14} {'program ns/run':>15} {'datagrams':>10}")
    for name, s in summary.items():
        prog = "-" if s["prog_ns_per_run"] is None else f"{s['prog_ns_per_run']:.1f}"
        print(f"{name:8} {s['cpu_ns_per_datagram']:13.1f} {s['wall_ns_per_datagram']:14.1f} {prog:>15} "
              f"{s['datagrams']:10d}")
    print(f"steer / hash CPU per datagram: {doc['steer_vs_hash_cpu']}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
