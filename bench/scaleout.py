"""Scale-out: the socket datapath with 1 and 2 worker processes, and STCP behind a load balancer.

    python -m bench.scaleout [--quick] [--repeat 3] [--out bench/results/scaleout]

Needs root (namespaces; CAP_BPF for the 2-worker pool; nftables for the balancer part).

Pool part: `stcp serve --workers W` (W = 1, 2; the real command, echo handler) in one
namespace of a veth pair, one client process (tests.support.loadclient) in the other, with
8 and 64 concurrent connections: bulk (each connection sends --bulk bytes while reading the
echo) and request/response (each sends 1 KiB messages one at a time, waiting for each echo).
Nothing is pinned: the pool is there to use every CPU, and on this 2-CPU machine the client
competes with the workers for the same two CPUs. Server and client run at nice -10 (as
bench.run's peers do; --nice) so other work on a shared machine disturbs them less. Reported per run: payload throughput
(bytes sent one way; the echo moves as much back), requests/s, and CPU time: the server's
(user + system of the supervisor and every worker, from /proc/PID/stat before and after)
and the client's (its own process time, reported by it), each per GB of payload. The
scaling factor is the 2-worker figure over the 1-worker one of the same test. Kernel time
spent in softirq on behalf of a process is charged to whichever process was running, so
the split between server and client CPU is approximate; their sum is not.

Balancer part: the topology of tests/support/balancer.py (client, an nftables DNAT
balancer, three `stcp serve --workers 1 --server-id k` servers sharing one key). The same
client opens and closes connections, 16 at a time: through the balancer's virtual IP, and
directly to the three servers in turn (routed through the same balancer namespace, where
conntrack follows those flows too, but not DNATed), so the difference is what the DNAT
rule and its hash cost per handshake. Server CPU per handshake: all three servers'
user + system time over the run, divided by the handshakes.

Writes <out>/scaleout.json and <out>/SCALEOUT.md.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator, List

REPO = Path(__file__).resolve().parent.parent
STCP = [sys.executable, "-m", "stcp.cli.main"]
CLIENT = [sys.executable, "-m", "tests.support.loadclient"]
PORT = 7501
NICE: List[str] = []                # ["nice", "-n", "-10"] unless --nice 0
TICK = os.sysconf("SC_CLK_TCK")


def log(*a: object) -> None:
    print(*a, file=sys.stderr, flush=True)


def proc_cpu(pid: int) -> float:
    """user + system seconds of one process so far (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICK


def read_lines_until(proc: subprocess.Popen, needle: str, timeout: float) -> List[str]:
    from tests.support.procs import wait_for_stderr_line
    return wait_for_stderr_line(proc, needle, timeout)


@contextlib.contextmanager
def pool_server(host, workers: int, key_file: Path, extra: List[str] = (), port: int = PORT) -> Iterator[Dict]:
    """`stcp serve --workers W` in host's namespace; yields {"pids": [...], "key": base64}."""
    argv = [*STCP, "serve", "--listen", f"{host.ip4}:{port}", "--workers", str(workers), "--key", str(key_file),
            *extra]
    proc = host.popen([*NICE, *argv], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                      cwd=REPO)
    try:
        needle = f"(socket datapath, {workers} workers)" if workers > 1 else "serving on"
        lines = read_lines_until(proc, needle, 300)
        pids = [proc.pid] + [int(m.group(1)) for m in (re.search(r"worker \d+ started \(pid (\d+)\)", ln)
                                                       for ln in lines) if m]
        key = next(m.group(1) for m in (re.search(r"server key (\S+)", ln) for ln in lines) if m)
        yield {"pids": pids, "key": key, "lines": lines}
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def client_run(host, args: List[str], timeout: float = 600) -> List[dict]:
    p = subprocess.run(host.cmd(*NICE, *CLIENT, *args), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if p.returncode:
        raise RuntimeError(f"client failed: {p.stderr[-2000:]}")
    return [json.loads(ln) for ln in p.stdout.splitlines() if ln.strip()]


def one_load(server: Dict, client_host, target: str, test: str, conns: int, cfg: argparse.Namespace) -> dict:
    if test == "bulk":
        load = ["--bulk", str(cfg.bulk_total // conns)]
    else:
        load = ["--rr", str(max(10, cfg.requests // conns)), "--msg", "1024"]
    cpu0 = sum(proc_cpu(p) for p in server["pids"])
    [res] = client_run(client_host, [target, "--server-key", server["key"], "--connections", str(conns), *load])
    server_cpu = sum(proc_cpu(p) for p in server["pids"]) - cpu0
    if "error" in res or res["payload_bytes"] != res["expected_bytes"]:
        raise RuntimeError(f"{test} x{conns}: {res}")
    gb = res["payload_bytes"] / 1e9
    return {"test": test, "connections": conns, "payload_bytes": res["payload_bytes"], "seconds": res["seconds"],
            "mb_per_s": round(res["payload_bytes"] / res["seconds"] / 1e6, 2),
            "requests_per_s": round(res["requests"] / res["seconds"], 1) if res["requests"] else None,
            "server_cpu_s": round(server_cpu, 3), "client_cpu_s": res["client_cpu_seconds"],
            "server_cpu_s_per_gb": round(server_cpu / gb, 2), "client_cpu_s_per_gb":
            round(res["client_cpu_seconds"] / gb, 2)}


def median_run(runs: List[dict]) -> dict:
    key = "requests_per_s" if runs[0]["test"] == "rr" else "mb_per_s"
    ordered = sorted(runs, key=lambda r: r[key])
    out = dict(ordered[len(ordered) // 2])
    out["all_" + key] = [r[key] for r in runs]
    return out


def pool_part(cfg: argparse.Namespace, key_file: Path) -> List[dict]:
    """Both pools run at once on their own ports and take turns run by run, so that changing
    load from elsewhere on the machine hits them alike."""
    from tests.support.netns import veth_pair
    runs: Dict[tuple, List[dict]] = {}
    with veth_pair(queues=2) as (a, b), contextlib.ExitStack() as stack:
        servers = {w: stack.enter_context(pool_server(a, w, key_file, port=PORT + w)) for w in (1, 2)}
        for w, s in servers.items():
            log(f"pool: {w} worker(s) on port {PORT + w}, pids {s['pids']}")
        for i in range(cfg.repeat):
            for test in ("bulk", "rr"):
                for conns in (8, 64):
                    for w, server in servers.items():
                        r = one_load(server, b, f"{a.ip4}:{PORT + w}", test, conns, cfg)
                        runs.setdefault((w, test, conns), []).append(r)
                        log(f"  run {i + 1}, {w} worker(s), {test} x{conns}: {r['mb_per_s']} MB/s, "
                            f"{r['requests_per_s']} req/s, server {r['server_cpu_s_per_gb']} s/GB, "
                            f"client {r['client_cpu_s_per_gb']} s/GB")
    return [{"workers": w, **median_run(rs)} for (w, _, _), rs in sorted(runs.items())]


def balancer_part(cfg: argparse.Namespace, key_file: Path) -> dict:
    from tests.support.balancer import balanced_hosts
    out: Dict[str, list] = {"balancer": [], "direct": []}
    with balanced_hosts(3, PORT) as net, contextlib.ExitStack() as stack:
        servers = [stack.enter_context(pool_server(h, 1, key_file, ["--server-id", str(k)]))
                   for k, h in net.servers.items()]
        key = servers[0]["key"]
        direct = ",".join(f"{h.ip4}:{PORT}" for h in net.servers.values())
        pids = [p for s in servers for p in s["pids"]]
        for _ in range(cfg.repeat):
            for name, target in (("balancer", f"{net.vip}:{PORT}"), ("direct", direct)):
                cpu0 = sum(proc_cpu(p) for p in pids)
                [res] = client_run(net.client, [target, "--server-key", key, "--handshakes", str(cfg.handshakes),
                                                "--concurrency", "16"])
                if res["errors"]:
                    raise RuntimeError(f"handshakes {name}: {res}")
                res["server_cpu_ms_per_handshake"] = round((sum(proc_cpu(p) for p in pids) - cpu0) * 1e3 /
                                                           res["handshakes"], 3)
                out[name].append(res)
                log(f"handshakes {name}: {res['per_second']}/s, p50 {res['p50_ms']} ms, p99 {res['p99_ms']} ms, "
                    f"server {res['server_cpu_ms_per_handshake']} ms CPU each")
    summary = {}
    for name, runs in out.items():
        rates = sorted(r["per_second"] for r in runs)
        summary[name] = {"per_second_median": rates[len(rates) // 2], "per_second_all": rates,
                         "p50_ms_median": statistics.median(r["p50_ms"] for r in runs),
                         "p99_ms_median": statistics.median(r["p99_ms"] for r in runs),
                         "server_cpu_ms_per_handshake_median":
                         statistics.median(r["server_cpu_ms_per_handshake"] for r in runs),
                         "client_cpu_ms_per_handshake_median":
                         statistics.median(r["client_cpu_seconds"] * 1e3 / r["handshakes"] for r in runs)}
    summary["balancer_vs_direct"] = round(summary["balancer"]["per_second_median"] /
                                          summary["direct"]["per_second_median"], 3)
    return {"handshakes_per_run": cfg.handshakes, "concurrency": 16, "summary": summary, "runs": out}


def scaling(rows: List[dict]) -> List[dict]:
    out = []
    for test in ("bulk", "rr"):
        for conns in (8, 64):
            one, two = ([r for r in rows if r["workers"] == w and r["test"] == test and r["connections"] == conns][0]
                        for w in (1, 2))
            key = "mb_per_s" if test == "bulk" else "requests_per_s"
            out.append({"test": test, "connections": conns, "metric": key, "workers_1": one[key],
                        "workers_2": two[key], "scaling": round(two[key] / one[key], 2)})
    return out


def fmt_load(avg: List[float]) -> str:
    return "/".join(f"{x:.1f}" for x in avg)


def markdown(doc: dict) -> str:
    m = doc["machine"]
    lines = ["# Scale-out: socket pool and load balancer", "",
             f"Run {doc['when']} on {m['cpus']} CPUs, kernel {m['kernel']}, load average at start "
             f"{fmt_load(m['loadavg_at_start'])}, at end {fmt_load(m['loadavg_at_end'])} (other work shares the "
             "machine; "
             f"the bench ran at nice {doc['config'].get('bench_nice', 0)}, server and client at "
             f"{doc['config']['nice']} more). `python -m bench.scaleout` (bench/scaleout.py says how each figure "
             "is measured); medians of "
             f"{doc['config']['repeat']} runs. Server and client share the machine's CPUs, nothing pinned.", "",
             "## Socket pool: 1 and 2 workers", "",
             "| test | conns | workers | MB/s | req/s | server CPU s/GB | client CPU s/GB |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in doc["pool"]:
        lines.append(f"| {r['test']} | {r['connections']} | {r['workers']} | {r['mb_per_s']} | "
                     f"{r['requests_per_s'] or '-'} | {r['server_cpu_s_per_gb']} | {r['client_cpu_s_per_gb']} |")
    lines += ["", "| test | conns | metric | 1 worker | 2 workers | scaling |", "|---|---:|---|---:|---:|---:|"]
    for s in doc["scaling"]:
        lines.append(f"| {s['test']} | {s['connections']} | {s['metric']} | {s['workers_1']} | {s['workers_2']} | "
                     f"{s['scaling']}x |")
    if doc.get("balancer"):
        s = doc["balancer"]["summary"]
        lines += ["", "## Handshakes through an nftables DNAT balancer (3 servers)", "",
                  "| path | handshakes/s | p50 ms | p99 ms | server CPU ms each | client CPU ms each |",
                  "|---|---:|---:|---:|---:|---:|"]
        for name in ("balancer", "direct"):
            lines.append(f"| {name} | {s[name]['per_second_median']} | {s[name]['p50_ms_median']} | "
                         f"{s[name]['p99_ms_median']} | {s[name]['server_cpu_ms_per_handshake_median']:.2f} | "
                         f"{s[name]['client_cpu_ms_per_handshake_median']:.2f} |")
        lines += ["", f"balancer / direct: {s['balancer_vs_direct']}x ({doc['balancer']['handshakes_per_run']} "
                  "handshakes per run, 16 at a time)."]
    return "\n".join(lines) + "\n"


def main(argv: List[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="small transfers, one run each")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--bulk-total", type=int, default=128 << 20, help="bulk bytes over all connections")
    p.add_argument("--requests", type=int, default=6400, help="request/response messages over all connections")
    p.add_argument("--handshakes", type=int, default=600)
    p.add_argument("--skip-balancer", action="store_true")
    p.add_argument("--nice", type=int, default=-10, help="nice value of server and client (0: as they come)")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    cfg = p.parse_args(argv)
    if cfg.quick:
        cfg.repeat, cfg.bulk_total, cfg.requests, cfg.handshakes = 1, 8 << 20, 640, 60
    if os.geteuid() != 0:
        log("bench.scaleout needs root (namespaces, CAP_BPF)")
        return 2
    NICE[:] = ["nice", "-n", str(cfg.nice)] if cfg.nice else []
    doc = {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": {"kernel": platform.release(),
                                                                 "cpus": os.cpu_count(),
                                                                 "loadavg_at_start": os.getloadavg()},
           "config": {"repeat": cfg.repeat, "bulk_total": cfg.bulk_total, "requests": cfg.requests,
                      "handshakes": cfg.handshakes, "nice": cfg.nice, "bench_nice": os.nice(0)}}
    with tempfile.TemporaryDirectory() as tmp:
        key_file = Path(tmp) / "server.key"
        subprocess.run([*STCP, "keygen", "--out", str(key_file)], check=True, capture_output=True, cwd=REPO)
        doc["pool"] = pool_part(cfg, key_file)
        doc["scaling"] = scaling(doc["pool"])
        if not cfg.skip_balancer:
            doc["balancer"] = balancer_part(cfg, key_file)
    doc["machine"]["loadavg_at_end"] = os.getloadavg()
    cfg.out.mkdir(parents=True, exist_ok=True)
    (cfg.out / "scaleout.json").write_text(json.dumps(doc, indent=1) + "\n")
    (cfg.out / "SCALEOUT.md").write_text(markdown(doc))
    print(markdown(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
