"""Soak: a server under honest churn and a hostile sender at once, for a bounded time;
does anything grow without bound?

    python -m bench.soak [--seconds 180] [--clients 8] [--datapath socket|xdp] [--out bench/results/SOAK.md]

Two namespaces joined by a veth pair (tests.support.netns; nothing leaves them). In one,
`stcp serve` (echo, --metrics, dropping to nobody as it always does). In the other:

- clients: --clients concurrent loops, each opening a connection, echoing 1 KiB..256 KiB
  through it, checking every byte and closing, again and again until the time is up;
- a hostile sender (--hostile-rate ticks a second), each tick: forged records with live
  connection IDs learnt by sniffing the veth (40 bytes of junk, a length that does not
  match, a sequence number two key epochs ahead) from an address that is not the peer's;
  and every --flood-every seconds a burst of --hello-burst real client hellos from 32
  source ports, past the server's hello burst (a hello flood: cookie mode);
  oversized records with live CIDs (a length field of 65,000, and a 3,000-byte datagram
  the IP layer fragments); and from an authenticated connection of its own, overlapping
  1,400-byte STREAM frames and one-byte frames far ahead of the stream (reassembly
  attacks), reconnecting whenever the server ends it.

Every --sample seconds the server's RSS, open file descriptors, threads and CPU time are
read from /proc, and its /metrics. At the end: a least-squares slope of RSS and of fds over
the second half of the run (after warm-up), with a verdict (flat: the slope over the whole
run would add less than 5 % of the mean, or 4 MiB / 8 fds), every error any side saw,
connections completed, what the hostile sender sent. bench/results/SOAK.md and soak.json.
Root is needed for the namespaces.
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import http.client
import json
import os
import random
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Dict, List

ROOT = Path(__file__).resolve().parents[1]
PORT = 4490
METRICS = "127.0.0.1:9499"
STCP = [sys.executable, "-m", "stcp.cli.main"]


# --------------------------------------------------------------------------------------
# honest clients (run in the client namespace)
async def _client_loop(host: str, port: int, server_key: str, deadline: float, stats: dict,
                       rng: random.Random) -> None:
    import stcp
    while time.monotonic() < deadline:
        data = rng.randbytes(rng.randint(1024, 256 * 1024))
        try:
            r, w = await asyncio.wait_for(stcp.open_connection(host, port, server_key=server_key), 30)
            w.write(data)
            w.write_eof()
            got = bytearray()
            while True:
                chunk = await asyncio.wait_for(r.read(1 << 16), 30)
                if not chunk:
                    break
                got += chunk
            w.close()
            await w.wait_closed()
            if bytes(got) != data:
                stats["errors"][f"echo differs ({len(got)} of {len(data)} bytes)"] += 1
            else:
                stats["completed"] += 1
                stats["bytes"] += len(data)
        except Exception as e:
            stats["errors"][f"{type(e).__name__}: {str(e)[:100]}"] += 1
            await asyncio.sleep(0.2)


def run_clients(args) -> None:
    host, port = args.addr.rsplit(":", 1)
    stats = {"completed": 0, "bytes": 0, "errors": collections.Counter()}
    deadline = time.monotonic() + args.seconds

    async def main():
        await asyncio.gather(*(_client_loop(host, int(port), args.server_key, deadline, stats, random.Random(i))
                               for i in range(args.clients)))
    asyncio.run(main())
    print(json.dumps({**stats, "errors": dict(stats["errors"])}), flush=True)


# --------------------------------------------------------------------------------------
# the hostile sender (run in the client namespace)
class Sniffer(threading.Thread):
    """Live connection IDs, from the records that cross the veth (AF_PACKET): what anyone
    who sees the traffic learns."""

    def __init__(self, iface: str, port: int):
        super().__init__(daemon=True)
        # ETH_P_ALL: a protocol-specific packet socket sees only what comes in, not what goes out
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.bind((iface, 0))
        self.port = port
        self.server_cids: collections.deque = collections.deque(maxlen=64)
        self.client_cids: collections.deque = collections.deque(maxlen=64)

    def run(self) -> None:
        while True:
            frame = self.sock.recv(65536)
            if len(frame) < 14 + 20 + 8 + 24 or frame[12:14] != b"\x08\x00" or frame[23] != 17:
                continue
            ihl = (frame[14] & 15) * 4
            udp = 14 + ihl
            sport, dport = struct.unpack_from("!HH", frame, udp)
            _length, cid, seq = struct.unpack_from("!QQQ", frame, udp + 8)
            if cid and seq:
                if dport == self.port and cid not in self.server_cids:
                    self.server_cids.append(cid)
                elif sport == self.port and cid not in self.client_cids:
                    self.client_cids.append(cid)


class AbusivePeer:
    """An authenticated connection of our own that sends what an honest peer never would."""

    def __init__(self, addr, server_key: str):
        from stcp.api import client_config
        from stcp.connection import Connection
        self.addr = addr
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.connect(addr)
        self.sock.settimeout(0.05)
        self.conn = Connection.client(client_config(None, None, server_key, None, "bench.soak"), time.monotonic())
        self.pn = 0
        self.offset = 0

    def _pump(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            for d in self.conn.datagrams_to_send(time.monotonic()):
                self.sock.send(d)
            try:
                self.conn.receive_datagram(self.sock.recv(65536), time.monotonic())
            except (socket.timeout, ConnectionRefusedError):
                pass
            if self.ready() or self.conn.is_closed:
                return

    def ready(self) -> bool:
        return self.conn.state.name == "ENCRYPTED" and not self.conn.is_closed

    def handshake(self) -> bool:
        self._pump(5.0)
        if self.ready():
            self.pn = self.conn._next_pn + 1000
        return self.ready()

    def attack(self, rng: random.Random) -> int:
        """Overlapping full frames inside the window and one-byte frames far ahead."""
        from stcp import wire
        key = self.conn._keys.send
        sent = 0
        for i in range(8):
            if i % 2:
                frame = wire.encode_stream(self.offset + rng.randrange(0, 1 << 20), b"x")
            else:
                frame = wire.encode_stream(self.offset + rng.randrange(0, 64 * 1024), rng.randbytes(1400 - 40))
            self.pn += 1
            self.sock.send(key.seal(self.conn.peer_cid, wire.make_seq(key.epoch, self.pn), frame))
            sent += 1
        self._pump(0.0)
        return sent

    def close(self) -> None:
        self.sock.close()


def run_hostile(args) -> None:
    from stcp import wire
    from stcp.api import client_config
    from stcp.connection import Connection

    host, port = args.addr.rsplit(":", 1)
    addr = (host, int(port))
    rng = random.Random(7)
    sniffer = Sniffer(args.iface, int(port))
    sniffer.start()
    forger = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)          # not any connection's address
    flooders = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(32)]
    for s in flooders:
        s.setblocking(False)
    # real client hellos, made once: each is a new connection from each port it is sent from
    config = client_config(None, None, args.server_key, None, "bench.soak")
    hellos = [Connection.client(config, 0.0).datagrams_to_send(0.0)[0] for _ in range(args.hello_burst)]
    next_flood = time.monotonic() + 1.0
    bursts = 0
    sent = collections.Counter()
    errors = collections.Counter()
    peer = None
    deadline = time.monotonic() + args.seconds
    tick = 1.0 / args.hostile_rate
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        try:
            live = list(sniffer.server_cids)[-8:]
            for cid in live:
                forger.sendto(wire.pack_header(16, cid, wire.make_seq(0, rng.randrange(1, 1 << 40)))
                              + rng.randbytes(16), addr)                                     # 40 bytes of junk
                forger.sendto(wire.pack_header(999, cid, wire.make_seq(0, 5)) + rng.randbytes(64), addr)
                forger.sendto(wire.pack_header(64, cid, wire.make_seq(2, 1)) + rng.randbytes(64), addr)
                forger.sendto(wire.pack_header(65000, cid, wire.make_seq(0, 9)) + rng.randbytes(1376), addr)
                forger.sendto(wire.pack_header(2976, cid, wire.make_seq(0, 9)) + rng.randbytes(2976), addr)
                sent["forged_live_cid"] += 3
                sent["oversized"] += 2
            if t0 >= next_flood:              # a burst past the hello budget's burst: cookie mode
                next_flood = t0 + args.flood_every
                bursts += 1                   # each hello from another port than last time: a new
                for i, hello in enumerate(hellos):    # (address, CID), not a repeat the server ignores
                    try:
                        flooders[(i + bursts) % len(flooders)].sendto(hello, addr)
                        sent["hello"] += 1
                    except BlockingIOError:
                        sent["hello_not_sent"] += 1
            for f in flooders:                # COOKIEs and server hellos: read, never answered
                try:
                    while True:
                        f.recv(2048)
                        sent["hello_replies_read"] += 1
                except BlockingIOError:
                    pass
            if peer is None or not peer.ready():
                if peer is not None:
                    peer.close()
                    sent["abusive_reconnects"] += 1
                peer = AbusivePeer(addr, args.server_key)
                if not peer.handshake():
                    errors["abusive peer: handshake did not complete"] += 1
                    peer.close()
                    peer = None
            if peer is not None:
                sent["reassembly_records"] += peer.attack(rng)
        except OSError as e:
            errors[f"{type(e).__name__}: {e}"] += 1
        time.sleep(max(0.0, tick - (time.monotonic() - t0)))
    print(json.dumps({"sent": dict(sent), "errors": dict(errors),
                      "cids_seen": len(sniffer.server_cids)}), flush=True)


# --------------------------------------------------------------------------------------
# the soak (root, in the default namespace)
def proc_sample(pid: int) -> dict:
    st = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            st[k] = v.strip()
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return {"rss_kib": int(st["VmRSS"].split()[0]), "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(st["Threads"]), "cpu_s": (int(fields[11]) + int(fields[12])) / tick}


def scrape(ns: str) -> Dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    from tests.support.netns import ns_socket
    host, port = METRICS.split(":")
    s = ns_socket(ns, socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(5)
        s.connect((host, int(port)))
        conn = http.client.HTTPConnection(host, int(port), timeout=5)
        conn.sock = s
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        s.close()
    out: Dict[str, float] = collections.defaultdict(float)
    for fam in text_string_to_metric_families(text):
        for smp in fam.samples:
            out[smp.name] += smp.value
    return out


def udp_counters(host) -> Dict[str, int]:
    """The server namespace's UDP counters (/proc/net/snmp): datagrams the kernel dropped
    before the server read them show up as RcvbufErrors / InErrors."""
    lines = [ln.split() for ln in host.run("cat", "/proc/net/snmp").stdout.splitlines() if ln.startswith("Udp:")]
    return dict(zip(lines[0][1:], map(int, lines[1][1:]), strict=True)) if len(lines) >= 2 else {}


def slope(points: List[tuple]) -> float:
    """Least-squares slope of (t, y)."""
    n = len(points)
    if n < 2:
        return 0.0
    mt = sum(t for t, _ in points) / n
    my = sum(y for _, y in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (y - my) for t, y in points) / den if den else 0.0


def verdict(points: List[tuple], seconds: float, floor: float) -> dict:
    half = [p for p in points if p[0] >= points[-1][0] / 2] if points else []
    s = slope(half)
    mean = sum(y for _, y in half) / len(half) if half else 0.0
    growth = s * seconds
    return {"slope_per_min": s * 60, "mean": mean, "growth_over_run": growth,
            "flat": growth < max(0.05 * mean, floor)}


def soak(args) -> dict:
    from stcp.identity import encode_key, generate_private_key, public_key, save_private_key
    from tests.support.netns import veth_pair
    with tempfile.TemporaryDirectory(prefix="stcp-soak-") as keys, veth_pair() as (a, b):
        addr = f"{a.ip4}:{PORT}"
        extra = ["--iface", a.ifname] if args.datapath != "socket" else []
        private = generate_private_key()           # the server's key for this run; the clients pin it
        save_private_key(os.path.join(keys, "server.key"), private)
        # one process (the samples are its RSS and descriptors); -q: no line per connection,
        # which would fill the stderr pipe read only at the end
        server = a.popen([*STCP, "serve", "--listen", addr, "--datapath", args.datapath, *extra, "--workers", "1",
                          "-q", "--key", os.path.join(keys, "server.key"), "--metrics", METRICS],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        line = server.stderr.readline().decode()
        while "serving on" not in line:
            if not line:
                raise SystemExit(f"soak: the server did not start: {server.stderr.read().decode()}")
            line = server.stderr.readline().decode()
        me = [sys.executable, "-m", "bench.soak", "--addr", addr, "--seconds", str(args.seconds),
              "--server-key", encode_key(public_key(private))]
        clients = b.popen([*me, "--role", "clients", "--clients", str(args.clients)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
        hostile = None
        if args.hostile_rate > 0:
            hostile = b.popen([*me, "--role", "hostile", "--iface", b.ifname, "--hostile-rate",
                               str(args.hostile_rate), "--hello-burst", str(args.hello_burst), "--flood-every",
                               str(args.flood_every)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        samples = []
        t0 = time.monotonic()
        while clients.poll() is None or (hostile is not None and hostile.poll() is None):
            smp = {"t": round(time.monotonic() - t0, 1), **proc_sample(server.pid)}
            try:
                m = scrape(a.ns)
                smp.update(active=m.get("stcp_connections_active", 0),
                           memory_used=m.get("stcp_memory_used_bytes", 0),
                           cookies=m.get("stcp_handshake_cookies_sent_total", 0),
                           discarded=m.get("stcp_records_discarded_total", 0),
                           opened=m.get("stcp_connections_opened_total", 0))
            except OSError as e:
                smp["scrape_error"] = str(e)
            samples.append(smp)
            time.sleep(args.sample)
            if time.monotonic() - t0 > args.seconds + 120:
                break
        c_out, c_err = clients.communicate(timeout=60)
        h_out, h_err = hostile.communicate(timeout=60) if hostile is not None else (b"{}", b"")
        final = scrape(a.ns)
        udp = udp_counters(a)
        server.send_signal(signal.SIGTERM)
        _, s_err = server.communicate(timeout=30)
    honest = json.loads(c_out or b"{}") if c_out.strip() else {"errors": {"client process": c_err.decode()[-500:]}}
    bad = json.loads(h_out or b"{}") if h_out.strip() else {"errors": {"hostile process": h_err.decode()[-500:]}}
    rss = [(s["t"], s["rss_kib"]) for s in samples]
    fds = [(s["t"], s["fds"]) for s in samples]
    return {
        "config": {"seconds": args.seconds, "clients": args.clients, "datapath": args.datapath,
                   "hostile_rate": args.hostile_rate, "hello_burst": args.hello_burst,
                   "flood_every": args.flood_every, "sample": args.sample},
        "samples": samples, "honest": honest, "hostile": bad,
        "server": {"exit": server.returncode, "stderr": [ln for ln in s_err.decode(errors="replace").splitlines()
                                                         if ln.strip()],
                   "metrics": {k: v for k, v in final.items() if k.startswith("stcp_") and not k.endswith(
                       ("_bucket", "_created")) and v}},
        "rss": verdict(rss, args.seconds, 4096), "fds": verdict(fds, args.seconds, 8),
        "server_udp": udp,
    }


def markdown(doc: dict) -> str:
    c, h, x = doc["config"], doc["honest"], doc["hostile"]
    rss, fds = doc["rss"], doc["fds"]
    lines = ["# Soak: honest churn and a hostile sender", "",
             f"`python -m bench.soak --seconds {c['seconds']} --clients {c['clients']} --datapath {c['datapath']}` "
             f"(hostile ticks {c['hostile_rate']}/s, bursts of {c['hello_burst']} hellos every {c['flood_every']} s); "
             "two namespaces joined by "
             "veth, 2 vCPUs shared with other work.", "",
             "## Verdict", "",
             f"- Server RSS: slope {rss['slope_per_min']:+.1f} KiB/min over the second half (mean "
             f"{rss['mean'] / 1024:.1f} MiB): **{'flat' if rss['flat'] else 'GROWING'}** "
             f"(would add {rss['growth_over_run'] / 1024:+.2f} MiB over the run).",
             f"- Open files: slope {fds['slope_per_min']:+.2f}/min (mean {fds['mean']:.1f}): "
             f"**{'flat' if fds['flat'] else 'GROWING'}**.",
             f"- Honest connections completed: {h.get('completed', 0)} ({h.get('bytes', 0) / 2**20:.1f} MiB echoed "
             f"and checked); honest errors: {sum(h.get('errors', {}).values())}.",
             f"- Server exit status {doc['server']['exit']}; the server namespace's UDP counters: "
             + ", ".join(f"{k} {v}" for k, v in doc.get("server_udp", {}).items()
                         if k in ("InDatagrams", "InErrors", "RcvbufErrors", "NoPorts")) + ".", "",
             "## What the hostile sender sent", "",
             "| kind | count |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in sorted(x.get("sent", {}).items())]
    lines += ["", f"Live server CIDs learnt by sniffing: {x.get('cids_seen', 0)}.", "", "## Every error seen", ""]
    errs = [("honest client", k, v) for k, v in h.get("errors", {}).items()] + \
           [("hostile sender", k, v) for k, v in x.get("errors", {}).items()]
    if errs:
        lines += ["| who | error | count |", "|---|---|---|"] + [f"| {w} | {k} | {v} |" for w, k, v in errs]
    else:
        lines.append("None on either side.")
    lines += ["", "Server stderr:", "", "```", *doc["server"]["stderr"], "```", "", "## Server samples", "",
              "| t (s) | RSS (MiB) | fds | threads | CPU (s) | active | memory used (KiB) | cookies | discarded |",
              "|---|---|---|---|---|---|---|---|---|"]
    samples = doc["samples"]
    step = max(1, len(samples) // 24)
    for s in samples[::step] + ([samples[-1]] if samples and (len(samples) - 1) % step else []):
        lines.append(f"| {s['t']:.0f} | {s['rss_kib'] / 1024:.1f} | {s['fds']} | {s['threads']} | {s['cpu_s']:.1f} | "
                     f"{s.get('active', 0):.0f} | {s.get('memory_used', 0) / 1024:.0f} | {s.get('cookies', 0):.0f} | "
                     f"{s.get('discarded', 0):.0f} |")
    lines += ["", "## Server counters at the end", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:g} |" for k, v in sorted(doc["server"]["metrics"].items())]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=int, default=180, help="how long (default 180)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent honest client loops (default 8)")
    ap.add_argument("--datapath", choices=["socket", "xdp"], default="socket")
    ap.add_argument("--hostile-rate", type=float, default=20, help="hostile ticks a second (0: none; default 20)")
    ap.add_argument("--hello-burst", type=int, default=3000,
                    help="hellos in each flood burst, from 32 source ports "
                         "(default 3000: six times the server's burst)")
    ap.add_argument("--flood-every", type=float, default=3.0, help="seconds between hello bursts (default 3)")
    ap.add_argument("--sample", type=float, default=2.0, help="seconds between samples (default 2)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "SOAK.md")
    ap.add_argument("--role", choices=["soak", "clients", "hostile"], default="soak", help=argparse.SUPPRESS)
    ap.add_argument("--addr", help=argparse.SUPPRESS)
    ap.add_argument("--server-key", help=argparse.SUPPRESS)
    ap.add_argument("--iface", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.role == "clients":
        run_clients(args)
        return 0
    if args.role == "hostile":
        run_hostile(args)
        return 0
    if os.geteuid() != 0:
        print("soak: needs root for the network namespaces", file=sys.stderr)
        return 2
    doc = soak(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(doc))
    args.out.with_suffix(".json").write_text(json.dumps(doc, indent=1))
    print(f"soak: {args.out}: RSS {'flat' if doc['rss']['flat'] else 'GROWING'}, fds "
          f"{'flat' if doc['fds']['flat'] else 'GROWING'}, {doc['honest'].get('completed', 0)} connections, "
          f"{sum(doc['honest'].get('errors', {}).values())} honest errors")
    return 0


if __name__ == "__main__":
    sys.exit(main())
