"""Where the time goes: the section of RESULTS.md that explains the latency targets a run
did not meet (issue 14 asks for the profile that shows what is left and why).

Two parts:

- CPU per operation, from the main runs: the client's own CPU (getrusage, over its test
  loop) and the server process's (/proc, around the client run) divided by the round trips
  or handshakes.  On this bench each round trip runs the two ends one after the other, so
  RTT is close to client CPU + server CPU + the wire; the gap to TLS is a CPU gap.
- A profile pass (full runs, `bench.run --breakdown`): each STCP peer named in
  BREAKDOWN_RUNS runs the test again, once under cProfile (which Python layer of STCP the
  time is in) and once under `perf record` when perf is installed (how much of it is the
  interpreter at all, against the kernel and OpenSSL).  cProfile inflates Python-level
  calls more than C calls, so its shares say where in STCP, perf's say how much is Python.
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
                  ("stcp", "handshake"))
RTT_WARMUP = 50            # bench.common.RTT_WARMUP: the client's CPU covers these round trips too

WAITING, START_UP = "waiting", "start-up"
# Python layers of a profile, by the file a function is in; checked in this order
# (LAYER_LEGEND says the same in words, under the tables)
LAYERS = (
    (WAITING, ("method 'poll' of", "method 'select' of", "method 'control' of",
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
    "_udpio, _demux, _siphash; threading locks count as glue; builtins, stdlib = everything else "
    "(list, dict, int methods). "
    "Waiting in poll/epoll and interpreter start-up are left out.")


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
        out.append(f"**{case['peer']}, {case['test']}** ({case.get('ops', '?')} operations):")
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
    out.append("")
    out.append(LAYER_LEGEND)
    py = [v for case in bd.get("cases", []) for side in ("client", "server")
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
    return out
