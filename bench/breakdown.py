"""Where the time goes: the section of RESULTS.md that explains the latency, handshake and
bulk targets a run did not meet (issue 14 asks for the profile that shows what is left and why).

Two parts:

- CPU per operation, from the main runs: the client's own CPU (getrusage, over its test
  loop) and the server process's (/proc, around the client run) divided by the round trips
  or handshakes, or per GB for bulk.  On this bench each round trip runs the two ends one after the other, so
  RTT is close to client CPU + server CPU + the wire; the gap to TLS is a CPU gap.
- A profile pass (full runs, `bench.run --breakdown`): each STCP peer named in
  BREAKDOWN_RUNS runs the test again, once under cProfile (which Python layer of STCP the
  time is in) and once under `perf record` when perf is installed (how much of it is the
  interpreter at all, against the kernel and OpenSSL, and which functions are hottest).
  cProfile inflates Python-level calls more than C calls, so its shares say where in STCP,
  perf's say how much is Python.  Bulk cases send BULK_PROFILE_BYTES, so the transfer,
  not the process's start-up, fills perf's samples.
"""
from __future__ import annotations

import pstats
import shutil
import subprocess
from pathlib import Path

# (STCP peer, its like-for-like TLS peer): the pairs the latency ratios compare
PAIRS = (("stcp_blocking", "tls"), ("stcp", "tls_asyncio"), ("stcp_uvloop", "tls_asyncio_uvloop"))
# (peer, test) pairs the profile pass runs: the request/response cases behind the targets
BREAKDOWN_RUNS = (("stcp_blocking", "rtt"), ("stcp", "rtt"), ("stcp_blocking", "handshake"),
                  ("stcp", "handshake"), ("stcp", "capacity"), ("stcp_blocking", "bulk"), ("stcp", "bulk"),
                  ("stcp_afxdp", "bulk"))
# the kernel datapaths' bulk is compared with the socket datapath's (same client, same veth)
KERNEL_PEERS = ("stcp_xdp", "stcp_afxdp", "stcp_afxdp2")
# the bulk targets compare the asyncio peers (bench.run TARGETS bulk_vs_tls_asyncio)
BULK_PAIRS = (("stcp", "tls_asyncio"),)
BULK_PROFILE_BYTES = 1 << 30   # a bulk case's transfer (or the run's time limit, whichever first)
HOT_SYMBOLS = 6                # hottest functions per process shown from perf
RTT_WARMUP = 50            # bench.common.RTT_WARMUP: the client's CPU covers these round trips too

WAITING, START_UP = "waiting", "start-up"
# Python layers of a profile, by the file a function is in; checked in this order
# (LAYER_LEGEND says the same in words, under the tables)
LAYERS = (
    (WAITING, ("method 'poll' of", "method 'select' of", "method 'control' of", "'acquire' of '_thread",
                                         "run_once' of 'uvloop", "method 'run_forever' of 'uvloop")),
    (START_UP, ("<frozen importlib", "marshal.loads", "_imp.create_dynamic", "_imp.exec_dynamic",
                            "builtins.__build_class__", "builtins.exec")),
    ("socket syscalls", ("_udpio.sendmmsg", "_udpio.recvmmsg", "_udpio.sendmsg",
                                                      "_udpio.recvmsg", "method 'send' of '_socket",
                                                      "method 'recv", "method 'sendto'", "getaddrinfo",
                                                      "function socket.close", "_socket.socket")),
    ("crypto (C)", ("stcp._aead", "cryptography", "_hashlib", "x25519", "ed25519",
                                               "hkdf", "generate_key")),
    ("other STCP C", ("stcp._frames", "stcp._udpio", "stcp._demux", "stcp._siphash")),
    ("driver + API glue",
     ("stcp/api.py", "stcp/blocking.py", "stcp/keeper.py", "stcp/endpoint.py", "stcp/server.py",
      "stcp/eventloop.py", "stcp/datapath/", "thread")),
    ("protocol core (Python)",
     ("stcp/",)),
    ("event loop", ("asyncio/", "selectors.py", "uvloop", "_contextvars")),
    ("bench program", ("bench/",)),
)
OTHER = "builtins, stdlib"
LAYER_LEGEND = (
    "Layers: protocol core (Python) = stcp/connection.py, send.py, receive.py, recovery.py, stream.py, "
    "handshake.py and the rest of the sans-IO core; driver + API glue = stcp/api.py, blocking.py, "
    "keeper.py, endpoint.py, server.py, eventloop.py, stcp/datapath/; event loop = asyncio, selectors, "
    "uvloop; socket syscalls = sendmmsg/recvmmsg and the kernel work under them (UDP, veth, the peer's "
    "wake-up); crypto (C) = stcp._aead (OpenSSL EVP), X25519, HKDF, HMAC; other STCP C = stcp._frames, "
    "_udpio, _demux, _siphash; builtins, stdlib = everything else (list, dict, int methods). "
    "Waiting in poll/epoll or on a thread's lock (cProfile's clock runs while a call blocks) and "
    "interpreter start-up are left out.")


def layer(key: tuple) -> str:
    filename, _, func = key
    text = f"{filename}:{func}"
    for name, needles in LAYERS:
        if any(n in text for n in needles):
            return name
    return OTHER


def profile_layers(path: Path) -> dict[str, float]:
    """Seconds of own time (tottime) per layer in one cProfile dump."""
    st = pstats.Stats(str(path))
    out: dict[str, float] = {}
    for key, (_cc, _nc, tt, _ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        name = layer(key)
        out[name] = out.get(name, 0.0) + tt
    return out


def profile_top(path: Path, n: int = HOT_SYMBOLS) -> list[tuple[str, float]]:
    """The n Python-level functions with the most own time in one cProfile dump, as
    ("file:line(function)", share of the CPU time), waiting and start-up left out."""
    st = pstats.Stats(str(path))
    rows, total = [], 0.0
    for key, (_cc, _nc, tt, _ct, _callers) in st.stats.items():  # type: ignore[attr-defined]
        if layer(key) in (WAITING, START_UP):
            continue
        total += tt
        filename, line, func = key
        where = f"{func}" if filename == "~" else f"{filename.split('/stcp/')[-1].split('/')[-1]}:{line}({func})"
        rows.append((where, tt))
    rows.sort(key=lambda r: -r[1])
    return [(w, tt / (total or 1.0)) for w, tt in rows[:n]]


def shares(layers: dict[str, float]) -> dict[str, float]:
    """Each layer's share of the CPU time: everything but waiting and start-up."""
    skip = (WAITING, START_UP)
    cpu = {k: v for k, v in layers.items() if k not in skip}
    total = sum(cpu.values()) or 1.0
    return {k: v / total for k, v in sorted(cpu.items(), key=lambda kv: -kv[1])}


# ------------------------------------------------------------------------------- perf

def perf_available() -> str | None:
    """None when `perf record` can sample here, else why not."""
    if not shutil.which("perf"):
        return "perf is not installed (Debian: linux-perf)"
    return None


DSO_GROUPS = (
    ("Python interpreter", ("libpython", "python3")),
    ("kernel", ("[kernel", "kallsyms")),
    ("OpenSSL", ("libcrypto", "libssl", "_rust.abi3")),
    ("libc", ("libc.so", "libc-")),
    ("STCP C extensions", ("stcp", "_aead", "_udpio", "_frames", "_demux", "_siphash")),
)


def perf_dsos(data: Path) -> dict[str, float] | None:
    """Shares of samples per group of shared objects in one perf.data, None if unreadable."""
    try:
        out = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso",
                              "-g", "none", "--percent-limit", "0"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return dso_groups(out.stdout)


def perf_symbols(data: Path, n: int = HOT_SYMBOLS) -> list[tuple[str, str, float]] | None:
    """The n hottest functions in one perf.data: (symbol, DSO group, share), None if unreadable."""
    try:
        out = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso,sym",
                              "-g", "none", "--percent-limit", "0.5"], capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return hot_symbols(out.stdout, n)


def hot_symbols(report: str, n: int = HOT_SYMBOLS) -> list[tuple[str, str, float]] | None:
    """`perf report --sort dso,sym` text -> its first n rows as (symbol, DSO group, share)."""
    rows = []
    for line in report.splitlines():
        parts = line.split()
        if len(parts) < 4 or not parts[0].endswith("%") or line.lstrip().startswith("#") or parts[2] not in (
                "[.]", "[k]"):
            continue
        try:
            pct = float(parts[0].rstrip("%"))
        except ValueError:
            continue
        group = next((g for g, needles in DSO_GROUPS if any(x in parts[1] for x in needles)), "other")
        rows.append((" ".join(parts[3:]), group, pct / 100))
        if len(rows) == n:
            break
    return rows or None


def dso_groups(report: str) -> dict[str, float] | None:
    """`perf report --sort dso` text -> share of samples per DSO_GROUPS group."""
    groups: dict[str, float] = {}
    for line in report.splitlines():
        parts = line.split()
        if len(parts) < 2 or not parts[0].endswith("%") or line.lstrip().startswith("#"):
            continue
        try:
            pct = float(parts[0].rstrip("%"))
        except ValueError:
            continue
        dso = " ".join(parts[1:])
        name = next((g for g, needles in DSO_GROUPS if any(n in dso for n in needles)), "other")
        groups[name] = groups.get(name, 0.0) + pct / 100
    return groups or None


# ------------------------------------------------------------------------------- figures

def cpu_per_op(peers: dict, name: str, test: str) -> dict | None:
    """Client and server CPU µs per round trip (rtt) or per handshake, from a peer's median run."""
    s = ((peers.get(name) or {}).get("tests", {}).get(test) or {}).get("summary")
    if not s or not s.get("ok") or "server_cpu_s" not in s:
        return None
    n = (s.get("latency") or {}).get("n")
    if not n:
        return None
    ops = n + RTT_WARMUP if test.startswith("rtt") else n
    return {"client_us": s["client_cpu_s"] / ops * 1e6, "server_us": s["server_cpu_s"] / ops * 1e6,
            "p50_us": s["latency"]["p50_us"]}


def cpu_per_gb(peers: dict, name: str, test: str = "bulk") -> dict | None:
    """Client (sender) and server (receiver) CPU seconds per GB of a peer's median bulk or
    bulk8 run, and how busy the sender was (its CPU time over the transfer's time)."""
    s = ((peers.get(name) or {}).get("tests", {}).get(test) or {}).get("summary")
    if not s or not s.get("ok") or "server_cpu_s" not in s or not s.get("bytes_received_by_server"):
        return None
    gb = s["bytes_received_by_server"] / 1e9
    busy = s["client_cpu_s"] / s["seconds"] if s.get("seconds") else None
    return {"client_s": s["client_cpu_s"] / gb, "server_s": s["server_cpu_s"] / gb, "mb_per_s": s["mb_per_s"],
            "busy": busy}


def _bulk_table(peers: dict) -> list[str]:
    out = ["", "One-way bulk: CPU seconds per GB sent, client (the sender) + server (the receiver), from the median "
           "run; sender busy = the sender's CPU time ÷ the transfer's time (1.00: one CPU saturated, the rate is "
           "then 1 ÷ its CPU per GB).", "",
           "| Test | STCP peer | CPU s/GB client + server | sender busy | MB/s | TLS peer | CPU s/GB client + server "
           "| sender busy | MB/s |", "|---|---|---:|---:|---:|---|---:|---:|---:|"]
    rows = 0
    for test, what in (("bulk", "bulk"), ("bulk8", "bulk ×8")):
        for s, t in PAIRS:
            a, b = cpu_per_gb(peers, s, test), cpu_per_gb(peers, t, test)
            if not a or not b:
                continue
            rows += 1
            out.append(f"| {what} | {s} | {a['client_s']:.2f} + {a['server_s']:.2f} | {_busy(a)} | "
                       f"{a['mb_per_s']:,.0f} | {t} | {b['client_s']:.2f} + {b['server_s']:.2f} | {_busy(b)} | "
                       f"{b['mb_per_s']:,.0f} |")
    return out if rows else []


def _busy(f: dict) -> str:
    return "–" if f.get("busy") is None else f"{f['busy']:.2f}"


def _f(v: float | None) -> str:
    return "–" if v is None else f"{v:,.0f}"


def section(doc: dict) -> list[str]:
    peers = doc["peers"]
    out = ["", "## Where the time goes", ""]
    out.append("CPU per operation from the runs above (client: its own CPU over the test loop; server: "
               "the server process, read from /proc around the client run). A round trip runs the two "
               "ends one after the other, so its latency is close to the sum of both ends' CPU; what "
               "STCP lacks against TLS 1.3 on small messages is CPU on that path.")
    out.append("")
    out.append("| Test | STCP peer | CPU µs client + server | p50 µs | TLS peer | CPU µs client + server | p50 µs | "
               "extra CPU µs per op |")
    out.append("|---|---|---:|---:|---|---:|---:|---:|")
    any_row = False
    for test, what in (("rtt", "RTT 64 B (per round trip)"), ("handshake", "handshake (per connection)")):
        for s, t in PAIRS:
            a, b = cpu_per_op(peers, s, test), cpu_per_op(peers, t, test)
            if not a or not b:
                continue
            any_row = True
            extra = (a["client_us"] + a["server_us"]) - (b["client_us"] + b["server_us"])
            out.append(f"| {what} | {s} | {_f(a['client_us'])} + {_f(a['server_us'])} | {_f(a['p50_us'])} | "
                       f"{t} | {_f(b['client_us'])} + {_f(b['server_us'])} | {_f(b['p50_us'])} | {_f(extra)} |")
    if not any_row:
        out.append("| – | not measured in this run | | | | | | |")
    out += _bulk_table(peers)
    bd = doc.get("breakdown")
    if not bd:
        out.append("")
        out.append("No profile pass in this run (`python -m bench.run --breakdown`, part of a full run).")
        return out
    out.append("")
    out.append("Profile pass: each case run again on the same topology, once under cProfile and once under "
               f"`perf record` ({bd.get('perf') or 'perf: yes'}). Shares of each process's CPU, waiting and "
               "start-up left out. cProfile's own cost per Python call inflates the Python layers; perf "
               "samples the unmodified process.")
    for case in bd.get("cases", []):
        out.append("")
        size = (f"{case['mib']:,.0f} MiB sent" if case.get("mib") is not None
                else f"{case.get('ops', '?')} operations")
        out.append(f"**{case['peer']}, {case['test']}** ({size}):")
        out.append("")
        out.append("| Side | Where (cProfile, by layer) | perf, by shared object |")
        out.append("|---|---|---|")
        for side in ("client", "server"):
            prof = case.get(f"{side}_layers") or {}
            perf = case.get(f"{side}_perf") or {}
            p = "; ".join(f"{k} {100 * v:.0f} %" for k, v in list(prof.items())[:6]) or "–"
            q = "; ".join(f"{k} {100 * v:.0f} %" for k, v in sorted(perf.items(), key=lambda kv: -kv[1])) or "–"
            out.append(f"| {side} | {p} | {q} |")
        if case.get("error"):
            out.append(f"| error | {case['error']} | |")
        for side in ("client", "server"):
            top, hot = case.get(f"{side}_top"), case.get(f"{side}_hot")
            if top:
                out.append("")
                out.append(f"Most own time, {side} (cProfile): " + "; ".join(
                    f"`{where}` {100 * share:.0f} %" for where, share in top) + ".")
            if hot:
                out.append("")
                out.append(f"Hottest functions, {side} (perf): " + "; ".join(
                    f"`{sym}` ({group}) {100 * share:.1f} %" for sym, group, share in hot) + ".")
    out.append("")
    out.append(LAYER_LEGEND)
    small = [c for c in bd.get("cases", []) if c.get("test") != "bulk"]
    py = [v for case in small for side in ("client", "server")
          for k, v in (case.get(f"{side}_perf") or {}).items() if k == "Python interpreter"]
    if py:
        out.append("")
        out.append(f"What is left: perf finds {100 * min(py):.0f}–{100 * max(py):.0f} % of each STCP process's "
                   "CPU on these paths in the Python interpreter, and cProfile puts most of it in the protocol "
                   "core and the driver glue around each record, not in crypto or system calls. A TLS 1.3 peer "
                   "runs its record layer in OpenSSL and its acknowledgements, retransmission and flow control "
                   "in the kernel's TCP, so a small message costs it little Python. Closing the latency gap "
                   "means taking the per-record path of a small message (receive, ack bookkeeping, the "
                   "reply's send, the wake-up of the caller) out of the interpreter, as the bulk path already "
                   "is (stcp._aead seal_stream/open_records, stcp._udpio).")
    out += _capacity_left(doc, [c for c in bd.get("cases", []) if c.get("test") == "capacity"])
    out += _bulk_left(peers, [c for c in bd.get("cases", []) if c.get("test") == "bulk"
                              and c["peer"] not in KERNEL_PEERS])
    out += _kernel_left(peers, [c for c in bd.get("cases", []) if c.get("test") == "bulk"
                                and c["peer"] in KERNEL_PEERS])
    return out


def _kernel_left(peers: dict, cases: list[dict]) -> list[str]:
    """The kernel datapaths' bulk against the socket datapath's: the receiving server's CPU
    per GB, and where the profiled one spends it."""
    base = cpu_per_gb(peers, "stcp")
    figures = [(name, cpu_per_gb(peers, name)) for name in KERNEL_PEERS]
    figures = [(name, f) for name, f in figures if f]
    if not base or not figures:
        return []
    each = "; ".join(f"{name} {f['mb_per_s']:,.0f} MB/s, server {f['server_s']:.2f} s/GB" for name, f in figures)
    out = ["", f"Kernel datapaths on bulk: the socket datapath (stcp) moved {base['mb_per_s']:,.0f} MB/s with its "
           f"server at {base['server_s']:.2f} CPU s per GB received; {each} (same client, its own identical veth "
           "pair)."]
    for case in cases:
        layers, perf, top = case.get("server_layers"), case.get("server_perf"), case.get("server_top")
        if not layers:
            continue
        where = "; ".join(f"{k} {100 * v:.0f} %" for k, v in list(layers.items())[:4])
        objs = "; ".join(f"{k} {100 * v:.0f} %" for k, v in sorted((perf or {}).items(), key=lambda kv: -kv[1])[:4])
        own = f"; most own time in `{top[0][0]}`" if top else ""
        out[-1] += (f" The {case['peer']} server's profile (above): {where}" + (f"; perf: {objs}" if objs else "")
                    + own + ". An AF_XDP socket gets one frame per datagram, where the socket datapath's "
                    "server gets GRO's 64 KB buffers from the kernel; the frames of a batch are joined in C "
                    "before Python sees them, so the gap is the per-frame ring, copy and open work GRO saves "
                    "the socket path.")
    return out


CAPACITY_ROW = "STCP server CPU ms per handshake, concurrent clients (asyncio loop)"


def _capacity_left(doc: dict, cases: list[dict]) -> list[str]:
    """What the server's profile under concurrent handshakes says, in numbers from this run."""
    s = ((doc["peers"].get("stcp") or {}).get("tests", {}).get("capacity") or {}).get("summary") or {}
    case = next((c for c in cases if c.get("server_layers")), None)
    layers = case and case["server_layers"]
    if not s.get("server_cpu_us_per_op") or not layers:
        return []
    cpu = s["server_cpu_us_per_op"]
    crypto = layers.get("crypto (C)", 0.0)
    row = next((r for r in doc.get("ratios", []) if r.get("ratio") == CAPACITY_ROW), {})
    target = f" (target {row['target'].replace('<= ', '≤ ')} ms)" if row.get("target") else ""
    ossl = (case.get("server_perf") or {}).get("OpenSSL")
    openssl = f" (perf: OpenSSL {100 * ossl:.0f} % of the unprofiled server, {ossl * cpu:,.0f} µs)" if ossl else ""
    python = sum(v for k, v in layers.items() if k not in ("crypto (C)", "socket syscalls", "other STCP C"))
    return ["", f"What is left on handshakes: at capacity the server spends {cpu:,.0f} µs of CPU per handshake"
            f"{target}. Its profile under that load puts {100 * crypto:.0f} % in crypto (C), about "
            f"{crypto * cpu:,.0f} µs{openssl}: an X25519 key generation and two exchanges (a fresh ephemeral key per "
            f"connection stays a must), HKDF expansions and HMACs; and "
            f"{100 * python:.0f} % in Python: the hello's parsing and checks, a Connection with its "
            "recovery, streams and keys per handshake, and the event loop's pass for each of the handshake's "
            "datagrams. Reaching the target needs that per-hello path in C, with only the accepted "
            "connection built in Python."]


def _first_pair(peers: dict, test: str) -> tuple | None:
    """(STCP figures, TLS figures, STCP peer, TLS peer) per GB of the first pair both measured,
    the pair the bulk targets compare first."""
    for s, t in BULK_PAIRS + PAIRS:
        a, b = cpu_per_gb(peers, s, test), cpu_per_gb(peers, t, test)
        if a and b:
            return a, b, s, t
    return None


def _bulk_left(peers: dict, cases: list[dict]) -> list[str]:
    """What the bulk profile says, in numbers from this run."""
    pair = _first_pair(peers, "bulk")
    sender = [(c["peer"], c["client_perf"]) for c in cases if c.get("client_perf")]
    if not pair or not sender:
        return []
    a, b, s, t = pair
    shares = "; ".join(f"{peer}: Python interpreter {100 * perf.get('Python interpreter', 0):.0f} %, "
                       f"OpenSSL {100 * perf.get('OpenSSL', 0):.0f} %, kernel {100 * perf.get('kernel', 0):.0f} %"
                       for peer, perf in sender)
    bound = all(f.get("busy") is not None and f["busy"] >= 0.85 for f in (a, b))
    head = (f"both senders are bound by their CPU (busy {a['busy']:.2f} and {b['busy']:.2f}), so the rate ratio "
            f"is about the inverse ratio of their CPU per GB: {s} {a['client_s']:.2f} s/GB, {t} "
            f"{b['client_s']:.2f}" if bound else
            f"{s}'s sender spends {a['client_s']:.2f} CPU s per GB, {t}'s {b['client_s']:.2f}")
    b8 = _first_pair(peers, "bulk8")
    eight = ""
    if b8:
        p, q, x, y = b8
        eight = (f" With 8 connections from one process, {x}'s sender spends {p['client_s']:.2f} s/GB against "
                 f"{y}'s {q['client_s']:.2f}: eight STCP connections each run their own pacing, ACK processing "
                 "and loss bookkeeping in Python, where eight TCP connections share the kernel's.")
    return ["", f"What is left on bulk: {head}; the receivers spend {a['server_s']:.2f} and {b['server_s']:.2f}. "
            f"perf on the sender: {shares}. STCP's sender still pays two costs TLS 1.3 over TCP does not: it "
            "seals one record per datagram (about 1.4 KB at MTU 1500) where TLS seals 16 KB records, so the "
            "AEAD's per-record set-up (nonce, tag) comes about 11 times as often per byte; and its "
            "acknowledgements, loss detection and congestion control run in Python, where TCP's run in the "
            "kernel. Sealing and opening are one C call per batch (stcp._aead seal_stream/open_records) and "
            "sending one sendmmsg with GSO per 64 KB; the cProfile rows above name the Python functions that "
            f"hold the rest.{eight}"]
