"""Prometheus metrics: the server's counters and the kernel datapath's, read at scrape time.

    metrics = serve_metrics(server, "127.0.0.1:9400", datapath="socket", cipher="aes-256-gcm")
    ...
    metrics.close()

Custom prometheus-client collectors that compute everything when Prometheus
scrapes (no polling thread, nothing sampled in between):

- `ServerMetrics` is a hook object for `stcp.start_server(..., hooks=[...])` (or
  `server.hooks.append`). The hooks run on the event loop and only move a few integers
  under a lock; the totals of ended connections live here, and the live connections'
  `Connection.stats` are summed at scrape time, so every counter is exact and monotonic.
- `XdpCollector` reads the per-CPU verdict counters of the STCP XDP program through the
  same kernel lookups as `stcp-loader status` (interface -> XDP program id -> its maps),
  so the two always agree. `stcp-loader metrics --listen ADDR [IFACE...]` serves it alone.
- With AF_XDP workers (`stcp serve --datapath afxdp --workers N --metrics ADDR`) each worker
  serves a ServerMetrics and a `WorkerCollector` on a unix socket (`serve_worker_metrics`),
  and the supervisor's `WorkerPoolCollector` reads them all at scrape time, labels the
  `stcp_worker_*` series by worker and sums the rest (`serve_pool_metrics`).

Naming follows Prometheus conventions: `stcp_` prefix, base units (seconds, bytes),
counters end in `_total`, labels take values from small fixed sets (never a connection ID
or an address). docs/OPERATIONS.md explains every metric.
"""
from __future__ import annotations

import bisect
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence, Tuple

from prometheus_client import PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from .connection import DISCARD_REASONS
from .errors import CloseCode

log = logging.getLogger("stcp.metrics")

DEFAULT_SERVER_LISTEN = "127.0.0.1:9400"
DEFAULT_LOADER_LISTEN = "127.0.0.1:9401"

# --------------------------------------------------------------------------------------
# fixed label sets
CLOSE_REASONS: Tuple[str, ...] = (
    "normal",               # both directions finished (CLOSE with NO_ERROR after the stream ended)
    "peer_close",           # the peer aborted, or closed before finishing its stream
    "local_abort",          # this side aborted (application abort, server shutdown)
    "idle_timeout",
    "handshake_timeout",
    "protocol_violation",
    "malformed_record",
    "auth_failure",
    "flow_control_error",
    "handshake_failed",
    "state_error",
    "internal_error",
    "key_update_error",
    "worker_died",          # the AF_XDP worker process holding it died (counted by the supervisor)
    "other",                # a close code this version does not know
)
HANDSHAKE_FAIL_REASONS: Tuple[str, ...] = ("rejected",) + tuple(r for r in CLOSE_REASONS if r != "normal")

ENDPOINT_DROP_REASONS: Dict[str, str] = {      # label -> EndpointStats field
    "short": "dropped_short",
    "unknown_cid": "dropped_unknown_cid",
    "bad_hello": "dropped_bad_hello",
    "over_capacity": "dropped_over_capacity",
}

# Connection.stats.discarded reasons, summed over ended + live connections as "discarded:<reason>"
_DISCARD_KEYS: Tuple[str, ...] = tuple("discarded:" + r for r in DISCARD_REASONS)

# Connection.stats fields summed over ended + live connections
_STAT_FIELDS: Tuple[str, ...] = (
    "records_sent", "records_received", "bytes_sent", "bytes_received",
    "stream_bytes_sent", "stream_bytes_received", "retransmitted_records",
    "duplicates_discarded", "auth_failures", "key_updates_sent", "key_updates_received",
)

HANDSHAKE_BUCKETS: Tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                        0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RTT_BUCKETS: Tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                  0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# The AF_XDP worker pool (`stcp serve --datapath afxdp --workers N --metrics ADDR`): every
# series carries `worker` (0..N-1, the worker slot, which keeps its number across restarts).
# The first four come from the worker processes, the last two from the supervisor.
WORKER_METRICS: Dict[str, Tuple[str, Tuple[str, ...], str]] = {
    "stcp_worker_records_received_total": (
        "counter", ("worker", "path"),
        "Datagrams (one STCP record each) a worker received: through its AF_XDP sockets (path=afxdp) or "
        "its UDP socket (path=socket: queues without an AF_XDP socket, XDP fallback)."),
    "stcp_worker_records_sent_total": (
        "counter", ("worker", "path"),
        "Datagrams (one STCP record each) a worker sent: through an AF_XDP TX ring (path=afxdp, "
        "--afxdp-tx afxdp) or its UDP socket (path=socket)."),
    "stcp_worker_connections": (
        "gauge", ("worker",), "Connections in a worker's table now (handshaking or established)."),
    "stcp_worker_connections_accepted_total": (
        "counter", ("worker",), "Connections a worker created (it answered a client hello with a server hello)."),
    "stcp_worker_up": (
        "gauge", ("worker",), "1 if the worker process is running and answered this scrape, 0 while it is "
        "dead, being replaced or not answering (its counters then hold their last values)."),
    "stcp_worker_restarts_total": (
        "counter", ("worker",), "Times the supervisor replaced a worker process that died (its connections "
        "were lost)."),
    "stcp_worker_read_errors_total": (
        "counter", ("worker",), "Scrapes in which a running worker did not answer the supervisor (its "
        "series kept their last values; see the server's log)."),
}
WORKER_PATHS: Tuple[str, ...] = ("afxdp", "socket")


def close_reason(info) -> str:
    """Map a ConnectionClosed (code, by_peer, error) to one of CLOSE_REASONS."""
    if info is None:
        return "other"
    code = info.code
    if code == CloseCode.NO_ERROR:
        return "peer_close" if info.error else "normal"
    if code == CloseCode.APPLICATION_ABORT:
        return "peer_close" if info.by_peer else "local_abort"
    try:
        name = CloseCode(code).name.lower()
    except ValueError:
        return "other"
    return name if name in CLOSE_REASONS else "other"


class _Histogram:
    """Bucket counts, for a HistogramMetricFamily built at scrape time."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def copy(self) -> "_Histogram":
        h = _Histogram(self.bounds)
        h.counts = list(self.counts)
        h.sum = self.sum
        return h

    def family(self, name: str, doc: str) -> HistogramMetricFamily:
        buckets, acc = [], 0
        for bound, n in zip(self.bounds + (float("inf"),), self.counts):
            acc += n
            buckets.append((floatToGoString(bound), acc))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.sum)


def _version() -> str:
    try:
        from . import __version__
        return __version__
    except Exception:
        return "unknown"


# --------------------------------------------------------------------------------------
class ServerMetrics(Collector):
    """Server hook + collector. All hook methods run on the event loop; collect() runs on
    the exporter's HTTP thread and takes a consistent snapshot under one lock.

    Invariants an operator (and the tests) can rely on:
      stcp_connections_opened_total - sum(stcp_connections_closed_total) == stcp_connections_active
      stcp_handshakes_started_total == completed + sum(failed) + stcp_handshakes_in_progress
    """

    def __init__(self, endpoint=None, datapath: str = "socket", cipher: str = "aes-256-gcm",
                 version: Optional[str] = None):
        self.endpoint = endpoint
        self.build = {"version": version or _version(), "datapath": datapath, "cipher": cipher}
        self._lock = threading.Lock()
        self._live: Dict[object, bool] = {}          # Connection -> handshake completed
        self._ended = dict.fromkeys(_STAT_FIELDS + _DISCARD_KEYS, 0)
        self._created = 0
        self._completed = 0
        self._closed = dict.fromkeys(CLOSE_REASONS, 0)
        self._hs_failed = dict.fromkeys(HANDSHAKE_FAIL_REASONS, 0)
        self._hs_hist = _Histogram(HANDSHAKE_BUCKETS)
        self._rtt_hist = _Histogram(RTT_BUCKETS)
        self.http: Optional[MetricsHTTPServer] = None
        self.registry: Optional[CollectorRegistry] = None

    # -- hooks (event loop) ------------------------------------------------------------
    def adopt(self, connections: Iterable) -> None:
        """Count connections that existed before this hook was installed as opened now."""
        with self._lock:
            for conn in connections:
                if conn not in self._live and not conn.is_closed:
                    self._created += 1
                    est = getattr(conn.state, "name", "") == "ENCRYPTED"
                    self._completed += est
                    self._live[conn] = est

    def connection_created(self, conn) -> None:
        with self._lock:
            if conn not in self._live:
                self._created += 1
                self._live[conn] = False

    def connection_established(self, conn, handshake_seconds: float) -> None:
        with self._lock:
            if self._live.get(conn) is True:
                return
            if conn not in self._live:           # created before we were installed
                self._created += 1
            self._live[conn] = True
            self._completed += 1
            self._hs_hist.observe(max(0.0, float(handshake_seconds)))

    def connection_ended(self, conn) -> None:
        with self._lock:
            if conn not in self._live:
                return                            # ended twice, or never seen
            established = self._live.pop(conn)
            st = conn.stats
            for f in _STAT_FIELDS:
                self._ended[f] += getattr(st, f)
            for r, n in st.discarded.items():
                self._ended["discarded:" + r] += n
            for sample in st.rtt_samples:
                self._rtt_hist.observe(sample)
            reason = close_reason(conn.close_info)
            self._closed[reason] += 1
            if not established:
                self._hs_failed[reason if reason in self._hs_failed else "other"] += 1

    # -- scrape (HTTP thread) ----------------------------------------------------------
    def snapshot(self) -> dict:
        """Every value collect() exports, as plain numbers (also handy in tests and logs)."""
        with self._lock:
            live = list(self._live.items())
            sums = dict(self._ended)
            created, completed = self._created, self._completed
            closed, hs_failed = dict(self._closed), dict(self._hs_failed)
            hs_hist, rtt_hist = self._hs_hist.copy(), self._rtt_hist.copy()
        # Live connections are read outside the lock: their counters only grow, and a
        # connection that ends meanwhile adds its final values to the next snapshot's totals.
        in_progress = 0
        for conn, established in live:
            st = conn.stats
            for f in _STAT_FIELDS:
                sums[f] += getattr(st, f)
            for r, n in st.discarded.items():
                sums["discarded:" + r] += n
            in_progress += not established
        drops = dict.fromkeys(ENDPOINT_DROP_REASONS, 0)
        rejected = 0
        memory = {"limit": 0, "used": 0, "shed": 0, "withheld": 0, "migrations": 0}
        ep = self.endpoint
        if ep is not None:
            for label, field in ENDPOINT_DROP_REASONS.items():
                drops[label] = getattr(ep.stats, field, 0)
            rejected = ep.stats.handshakes_rejected
            budget = ep.budget
            memory = {"limit": budget.limit, "used": budget.used, "shed": budget.shed,
                      "withheld": budget.credit_withheld, "migrations": ep.stats.migrations}
        hs_failed["rejected"] = rejected
        return {"stats": sums, "active": len(live), "in_progress": in_progress,
                "opened": created, "closed": closed, "hs_started": created + rejected,
                "hs_completed": completed, "hs_failed": hs_failed, "hs_hist": hs_hist,
                "rtt_hist": rtt_hist, "drops": drops, "memory": memory}

    def collect(self) -> Iterator:
        s = self.snapshot()
        st = s["stats"]

        info = GaugeMetricFamily("stcp_build_info", "STCP build and configuration; the value is always 1.",
                                 labels=["version", "datapath", "cipher"])
        info.add_metric([self.build["version"], self.build["datapath"], self.build["cipher"]], 1)
        yield info

        # handshakes
        yield CounterMetricFamily("stcp_handshakes_started", "Client hellos the server answered: with a server "
                                  "hello (a connection was created) or with a REJECT.", value=s["hs_started"])
        yield CounterMetricFamily("stcp_handshakes_completed", "Handshakes that reached ENCRYPTED (the client's "
                                  "first record authenticated under the new keys).", value=s["hs_completed"])
        f = CounterMetricFamily("stcp_handshakes_failed", "Handshakes that ended before ENCRYPTED, by reason "
                                "(rejected: bad version or cipher suite; otherwise the close reason).",
                                labels=["reason"])
        for r in HANDSHAKE_FAIL_REASONS:
            f.add_metric([r], s["hs_failed"][r])
        yield f
        yield GaugeMetricFamily("stcp_handshakes_in_progress", "Connections created whose handshake has not "
                                "completed yet.", value=s["in_progress"])
        yield s["hs_hist"].family("stcp_handshake_duration_seconds", "Time from the client hello to ENCRYPTED, "
                                  "as seen by the server.")

        # connections
        yield GaugeMetricFamily("stcp_connections_active", "Connections in the server's table (handshaking "
                                "or established).", value=s["active"])
        yield CounterMetricFamily("stcp_connections_opened", "Connections created (a server hello was sent).",
                                  value=s["opened"])
        c = CounterMetricFamily("stcp_connections_closed", "Connections that reached CLOSED, by reason.",
                                labels=["reason"])
        for r in CLOSE_REASONS:
            c.add_metric([r], s["closed"][r])
        yield c

        # records and bytes
        rec = CounterMetricFamily("stcp_records", "Protected records: sealed and sent (tx), received and "
                                  "authenticated (rx).", labels=["direction"])
        rec.add_metric(["tx"], st["records_sent"])
        rec.add_metric(["rx"], st["records_received"])
        yield rec
        rb = CounterMetricFamily("stcp_record_bytes", "Bytes of those records on the wire (UDP payload: "
                                 "header, ciphertext and tag).", labels=["direction"])
        rb.add_metric(["tx"], st["bytes_sent"])
        rb.add_metric(["rx"], st["bytes_received"])
        yield rb
        sb = CounterMetricFamily("stcp_stream_bytes", "Application stream bytes: carried in sealed records (tx; "
                                 "retransmitted bytes count again), delivered in order to the application (rx).", labels=["direction"])
        sb.add_metric(["tx"], st["stream_bytes_sent"])
        sb.add_metric(["rx"], st["stream_bytes_received"])
        yield sb
        yield CounterMetricFamily("stcp_retransmitted_records", "Records that carried retransmitted stream data.",
                                  value=st["retransmitted_records"])
        yield CounterMetricFamily("stcp_replays_discarded", "Duplicate records (already accepted sequence "
                                  "numbers, repeated hellos) discarded without ending the connection.",
                                  value=st["duplicates_discarded"])
        yield CounterMetricFamily("stcp_auth_failures", "Records addressed to a connection that failed "
                                  "authentication or decryption (each ends its connection).",
                                  value=st["auth_failures"])
        ku = CounterMetricFamily("stcp_key_updates", "Key updates: sending key rotated (tx), peer's rotation "
                                 "accepted (rx).", labels=["direction"])
        ku.add_metric(["tx"], st["key_updates_sent"])
        ku.add_metric(["rx"], st["key_updates_received"])
        yield ku
        yield s["rtt_hist"].family("stcp_rtt_seconds", "Round-trip time samples of ended connections (the last "
                                   "1024 of each), observed when the connection ends.")

        dr = CounterMetricFamily("stcp_records_discarded", "Records that reached a connection and were "
                                 "discarded without ending it, by reason: from an address not the peer's, "
                                 "malformed, failing authentication or two key epochs ahead; handshake records "
                                 "at an established connection; longer than max_datagram; opening a "
                                 "reassembly fragment beyond the cap (PROTOCOL.md 10.2).", labels=["reason"])
        for r in DISCARD_REASONS:
            dr.add_metric([r], st["discarded:" + r])
        yield dr

        # endpoint
        d = CounterMetricFamily("stcp_endpoint_dropped_datagrams", "Datagrams the server endpoint dropped "
                                "before any connection saw them, by reason.", labels=["reason"])
        for r in ENDPOINT_DROP_REASONS:
            d.add_metric([r], s["drops"][r])
        yield d
        mem = s["memory"]
        yield CounterMetricFamily("stcp_connections_migrated", "Connections moved to a new peer address by an "
                                  "authenticated record from it (NAT rebinding).", value=mem["migrations"])
        yield GaugeMetricFamily("stcp_memory_budget_bytes", "The server-wide limit on stream buffers.",
                                value=mem["limit"])
        yield GaugeMetricFamily("stcp_memory_used_bytes", "Stream buffers held now: received and not yet read "
                                "by the application, sent and not yet acknowledged.", value=mem["used"])
        yield CounterMetricFamily("stcp_connections_shed", "Connections ended because the memory budget was "
                                  "exhausted (each held the most without progress).", value=mem["shed"])
        yield CounterMetricFamily("stcp_credit_withheld", "Flow-control grants postponed because the memory "
                                  "budget was exhausted.", value=mem["withheld"])

    def close(self) -> None:
        """Stop the HTTP exporter started by serve_metrics (the hook stays harmless)."""
        if self.http is not None:
            self.http.close()

    @property
    def address(self) -> Optional[Tuple[str, int]]:
        return self.http.address if self.http else None


# --------------------------------------------------------------------------------------
# the kernel datapath
def _proc_bpf_stats_enabled() -> bool:
    try:
        with open("/proc/sys/kernel/bpf_stats_enabled") as f:
            return f.read().strip() not in ("", "0")
    except OSError:
        return False


def read_xdp(iface: str, netns: Optional[str] = None) -> dict:
    """One interface's STCP XDP state, found the way `stcp-loader status` finds it.

    {"attached": False} or {"attached": True, "mode", "per_cpu": {verdict: [(packets,
    bytes), ...one per possible CPU]}, "live_cids", "run_time_ns", "run_cnt"}.
    Raises XdpSetupError / OSError when the interface cannot be inspected.
    """
    from .datapath import xdp
    from .datapath.verdicts import Verdict

    with xdp._Netlink(netns) as nl:
        idx = nl.ifindex(iface)
        mode, h, _state = xdp._find_stcp(nl, idx)
    if h is None:
        return {"attached": False}
    try:
        ncpu = xdp.possible_cpus()
        stride = (xdp._COUNTER.size + 7) & ~7
        per_cpu: Dict[str, List[Tuple[int, int]]] = {}
        for v in Verdict:
            raw = xdp._map_lookup(h.maps["counters"], int(v).to_bytes(4, sys.byteorder), stride * ncpu)
            per_cpu[v.key] = ([xdp._COUNTER.unpack_from(raw, cpu * stride) for cpu in range(ncpu)]
                              if raw else [(0, 0)] * ncpu)
        info = xdp.prog_info(h.prog_fd)
        return {"attached": True, "mode": mode, "prog_id": h.prog_id, "per_cpu": per_cpu,
                "live_cids": xdp._count_cids(h), "run_time_ns": info["run_time_ns"], "run_cnt": info["run_cnt"]}
    finally:
        h.close()


def _unquote_pin(name: str) -> str:
    return name.replace("%", ".")                 # xdp.pin_dir() turns '.' into '%'


def discover_targets(netns: Optional[str] = None, pin_root: Optional[str] = None) -> List[Tuple[str, Optional[str]]]:
    """(iface, netns) of every STCP program: pinned under /sys/fs/bpf/stcp/ (including
    .../netns/NS/IFACE) and, by netlink, attached in this (or the given) namespace."""
    from .datapath import xdp
    root = pin_root or xdp.PIN_ROOT
    found: List[Tuple[str, Optional[str]]] = []
    try:
        entries = sorted(os.listdir(root))
    except OSError:
        entries = []
    for name in entries:
        if name == "netns":
            try:
                namespaces = sorted(os.listdir(os.path.join(root, name)))
            except OSError:
                continue
            for ns in namespaces:
                ns_name = _unquote_pin(ns)
                if netns is not None and ns_name != netns:
                    continue
                try:
                    ifaces = sorted(os.listdir(os.path.join(root, name, ns)))
                except OSError:
                    continue
                found.extend((_unquote_pin(i), ns_name) for i in ifaces)
        elif netns is None:
            found.append((_unquote_pin(name), None))
    try:
        with xdp._Netlink(netns) as nl:
            for name, idx in nl.links():
                _mode, h, _state = xdp._find_stcp(nl, idx)
                if h is not None:
                    h.close()
                    found.append((name, netns))
    except Exception as e:  # noqa: BLE001 - discovery is best effort; pins were still found
        log.debug("netlink discovery failed: %s", e)
    out: List[Tuple[str, Optional[str]]] = []
    for t in found:
        if t not in out:
            out.append(t)
    return out


Target = Tuple[str, Optional[str]]


class XdpCollector(Collector):
    """Verdict counters, attach mode and run time of STCP XDP programs, read at scrape time.

    targets: (iface, netns or None) pairs, or plain interface names; with none, every
    STCP program found by discover_targets() at each scrape. `reader` replaces read_xdp
    (tests feed it fixed data).
    """

    def __init__(self, targets: Sequence = (), *, netns: Optional[str] = None,
                 reader: Optional[Callable[[str, Optional[str]], dict]] = None,
                 discover: Optional[Callable[[], List[Target]]] = None):
        self.targets: List[Target] = [(t, netns) if isinstance(t, str) else (t[0], t[1]) for t in targets]
        self.netns = netns
        self._read = reader or read_xdp
        self._discover = discover or (lambda: discover_targets(netns))
        self._errors = 0
        self._warned: set = set()
        self._lock = threading.Lock()

    def read_all(self) -> List[Tuple[Target, dict]]:
        targets = self.targets or self._discover()
        out = []
        for iface, ns in targets:
            try:
                snap = self._read(iface, ns)
            except Exception as e:  # noqa: BLE001 - one broken interface must not hide the others
                with self._lock:
                    self._errors += 1
                    first = (iface, ns, str(e)) not in self._warned
                    self._warned.add((iface, ns, str(e)))
                log.log(logging.WARNING if first else logging.DEBUG, "reading the STCP XDP counters of %s%s "
                        "failed: %s", iface, f" (netns {ns})" if ns else "", e)
                snap = {"attached": False, "error": str(e)}
            out.append(((iface, ns), snap))
        return out

    def collect(self) -> Iterator:
        from .datapath.verdicts import Verdict

        rows = self.read_all()
        bpf_stats = _proc_bpf_stats_enabled()
        base = ["iface", "netns"]
        attached = GaugeMetricFamily("stcp_xdp_attached", "1 if the STCP XDP program is attached to the "
                                     "interface, in the given mode (native, generic, offload); 0 with "
                                     "mode=\"none\" if it is not (stale pins, detached).", labels=base + ["mode"])
        packets = CounterMetricFamily("stcp_xdp_packets", "Frames the STCP XDP program handled, by verdict "
                                      "(pass_* go up the stack, drop_* are dropped in the driver).",
                                      labels=base + ["verdict"])
        nbytes = CounterMetricFamily("stcp_xdp_bytes", "Bytes of those frames (from the Ethernet header), "
                                     "by verdict.", labels=base + ["verdict"])
        cpu_packets = CounterMetricFamily("stcp_xdp_cpu_packets", "Frames by verdict and by the CPU that ran "
                                          "the XDP program (the RX queue's CPU).", labels=base + ["cpu", "verdict"])
        cids = GaugeMetricFamily("stcp_xdp_live_cids", "Entries in the XDP live-connection-ID table.",
                                 labels=base)
        run_s = CounterMetricFamily("stcp_xdp_run_seconds", "Time spent running the XDP program (kernel BPF "
                                    "statistics; only while sysctl kernel.bpf_stats_enabled=1).", labels=base)
        runs = CounterMetricFamily("stcp_xdp_runs", "Runs of the XDP program counted by kernel BPF statistics "
                                   "(only while sysctl kernel.bpf_stats_enabled=1).", labels=base)
        for (iface, ns), snap in rows:
            lb = [iface, ns or ""]
            if not snap.get("attached"):
                attached.add_metric(lb + ["none"], 0)
                continue
            attached.add_metric(lb + [snap["mode"]], 1)
            per_cpu = snap["per_cpu"]
            for v in Verdict:
                vals = per_cpu.get(v.key, [])
                packets.add_metric(lb + [v.key], sum(p for p, _b in vals))
                nbytes.add_metric(lb + [v.key], sum(b for _p, b in vals))
                for cpu, (p, _b) in enumerate(vals):
                    cpu_packets.add_metric(lb + [str(cpu), v.key], p)
            cids.add_metric(lb, snap["live_cids"])
            if bpf_stats or snap.get("run_cnt"):
                run_s.add_metric(lb, snap.get("run_time_ns", 0) / 1e9)
                runs.add_metric(lb, snap.get("run_cnt", 0))
        yield attached
        yield packets
        yield nbytes
        yield cpu_packets
        yield cids
        yield GaugeMetricFamily("stcp_xdp_bpf_stats_enabled", "1 if kernel BPF run-time statistics are on "
                                "(sysctl kernel.bpf_stats_enabled).", value=int(bpf_stats))
        if run_s.samples:
            yield run_s
            yield runs
        with self._lock:
            errors = self._errors
        yield CounterMetricFamily("stcp_xdp_read_errors", "Scrapes in which an interface's XDP state could "
                                  "not be read (see the exporter's log).", value=errors)


# --------------------------------------------------------------------------------------
# the AF_XDP worker pool
#
# Each worker process serves its own registry (ServerMetrics + WorkerCollector) on a unix
# socket in a directory private to the supervisor (0700, removed at exit): connect, read the
# text exposition until EOF. The supervisor's WorkerPoolCollector reads every worker at
# scrape time, adds the `worker` label to the stcp_worker_* series, sums the server-level
# series over the workers, and keeps every counter monotonic across a worker's replacement
# (below). Workers share no state with the supervisor or each other; a worker that does not
# answer is reported as stcp_worker_up 0 and shows its last values.

class WorkerCollector(Collector):
    """The stcp_worker_* series of one worker process, without the `worker` label (the
    supervisor adds it). `driver` is the worker's AfxdpServerDriver, or a callable that
    returns it (None before the server exists)."""

    def __init__(self, driver):
        self._driver = driver if callable(driver) else (lambda: driver)

    def collect(self) -> Iterator:
        d = self._driver()
        get = (lambda name: int(getattr(d, name, 0) or 0)) if d is not None else (lambda name: 0)
        rx = CounterMetricFamily("stcp_worker_records_received", WORKER_METRICS[
            "stcp_worker_records_received_total"][2], labels=["path"])
        rx.add_metric(["afxdp"], get("rx_xsk"))
        rx.add_metric(["socket"], get("rx_socket"))
        yield rx
        tx = CounterMetricFamily("stcp_worker_records_sent", WORKER_METRICS[
            "stcp_worker_records_sent_total"][2], labels=["path"])
        tx.add_metric(["afxdp"], get("tx_xsk"))
        tx.add_metric(["socket"], get("tx_socket"))
        yield tx
        endpoint = getattr(d, "endpoint", None)
        yield GaugeMetricFamily("stcp_worker_connections", WORKER_METRICS["stcp_worker_connections"][2],
                                value=len(endpoint.connections) if endpoint is not None else 0)
        yield CounterMetricFamily("stcp_worker_connections_accepted", WORKER_METRICS[
            "stcp_worker_connections_accepted_total"][2], value=get("connections_accepted"))


class UnixExporter:
    """Serves a registry's text exposition on a unix stream socket: each connection gets
    one generate_latest() and EOF. For a supervisor on the same host (read_unix)."""

    def __init__(self, registry: CollectorRegistry, path: str):
        import socketserver

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                try:
                    self.request.sendall(generate_latest(registry))
                except OSError:
                    pass

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        self.path = path
        self.server = Server(path, Handler)
        os.chmod(path, 0o600)
        self.thread = threading.Thread(target=self.server.serve_forever, name="stcp-worker-metrics", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def read_unix(path: str, timeout: float = 2.0) -> str:
    """What a UnixExporter at `path` serves (OSError / socket.timeout when it does not answer)."""
    import socket as _socket
    with _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        chunks = []
        deadline = time.monotonic() + timeout
        while True:
            b = s.recv(1 << 16)
            if not b:
                break
            chunks.append(b)
            if time.monotonic() > deadline:
                raise TimeoutError(f"{path}: exposition not finished within {timeout} s")
    return b"".join(chunks).decode()


def worker_socket_path(directory: str, worker: int, pid: int) -> str:
    """Where worker `worker` (process `pid`) serves its metrics: one path per process, so a
    replacement is never mistaken for its predecessor."""
    return os.path.join(directory, f"worker-{worker}-{pid}.sock")


def serve_worker_metrics(server, directory: str, worker: int, datapath: str = "afxdp",
                         cipher: str = "aes-256-gcm", *, path: Optional[str] = None) -> ServerMetrics:
    """In a worker process: install a ServerMetrics hook on `server` and serve it plus the
    worker's WorkerCollector at worker_socket_path(directory, worker, os.getpid()) (or
    `path`). close() the result on shutdown."""
    endpoint = getattr(server, "endpoint", None)
    metrics = ServerMetrics(endpoint, datapath=datapath, cipher=cipher)
    if endpoint is not None:
        metrics.adopt(list(endpoint.connections.values()))
    registry = CollectorRegistry()
    registry.register(metrics)
    registry.register(WorkerCollector(lambda: getattr(server, "driver", None)))
    metrics.registry = registry
    metrics.http = UnixExporter(registry, path or worker_socket_path(directory, worker, os.getpid()))  # type: ignore[assignment]
    server.hooks.append(metrics)
    return metrics


class WorkerSlot(NamedTuple):
    worker: int                   # 0..N-1
    pid: Optional[int]            # the current process in this slot (None before the first start)
    alive: bool                   # running (not exited)
    path: Optional[str]           # its UnixExporter socket (None until the process serves)
    restarts: int                 # replacements so far


_SampleKey = Tuple[str, str, Tuple[Tuple[str, str], ...]]    # family, sample name, sorted labels
_MONOTONIC = ("counter", "histogram")


class WorkerPoolCollector(Collector):
    """The supervisor's view of its workers, read at scrape time.

    slots() returns a WorkerSlot per worker. Exported:
      - stcp_worker_up, stcp_worker_restarts_total (from the slots),
      - every stcp_worker_* series of each worker, with `worker` added,
      - every other series (the ServerMetrics families) summed over the workers, except
        stcp_build_info (the supervisor exports its own).

    Counters (and histogram buckets, sums, counts) never go backwards: when a slot's
    process changes, the last values read from the old process are kept as that slot's
    base and the new process's values are added to them. What the old process counted
    after the last scrape before it died is lost (Prometheus could not have seen it
    either). Its last connections_active / handshakes_in_progress are then counted as
    closed / failed with reason worker_died, so the invariants of ServerMetrics still hold
    for the sums. Gauges are summed over the workers that answered.
    """

    def __init__(self, slots: Callable[[], Sequence[WorkerSlot]], timeout: float = 2.0):
        self._slots = slots
        self.timeout = timeout
        self._lock = threading.Lock()
        self._meta: Dict[str, Tuple[str, str]] = {}            # family -> (type, help), in first-seen order
        self._pid: Dict[int, Optional[int]] = {}
        self._last: Dict[int, Dict[_SampleKey, float]] = {}    # monotonic samples of the current process
        self._gauges: Dict[int, Dict[_SampleKey, float]] = {}  # gauges of the current process, last answer
        self._base: Dict[int, Dict[_SampleKey, float]] = {}    # carried from the slot's dead processes
        self._order: Dict[_SampleKey, int] = {}                # exposition order (histogram buckets)
        self.read_errors: Dict[int, int] = {}

    def _read(self, slots: Sequence[WorkerSlot]) -> Dict[int, Optional[str]]:
        out: Dict[int, Optional[str]] = {s.worker: None for s in slots}

        def one(slot: WorkerSlot) -> None:
            try:
                out[slot.worker] = read_unix(slot.path, self.timeout)  # type: ignore[arg-type]
            except (OSError, ValueError) as e:
                log.debug("worker %d metrics: %s", slot.worker, e)

        threads = [threading.Thread(target=one, args=(s,), daemon=True) for s in slots if s.alive and s.path]
        for t in threads:
            t.start()
        for t in threads:
            t.join(self.timeout + 1)
        return out

    def _fold(self, w: int) -> None:
        """The slot's process changed: keep what the old one counted."""
        base = self._base.setdefault(w, {})
        for k, v in self._last.get(w, {}).items():
            base[k] = base.get(k, 0.0) + v
        gauges = self._gauges.get(w, {})
        lost = gauges.get(("stcp_connections_active", "stcp_connections_active", ()), 0.0)
        half = gauges.get(("stcp_handshakes_in_progress", "stcp_handshakes_in_progress", ()), 0.0)
        for fam, value in (("stcp_connections_closed", lost), ("stcp_handshakes_failed", half)):
            if value and fam in self._meta:
                k = (fam, fam + "_total", (("reason", "worker_died"),))
                self._order.setdefault(k, len(self._order))
                base[k] = base.get(k, 0.0) + value
        self._last[w] = {}
        self._gauges[w] = {}

    def _ingest(self, w: int, text: str) -> None:
        from prometheus_client.parser import text_string_to_metric_families
        last: Dict[_SampleKey, float] = {}
        gauges: Dict[_SampleKey, float] = {}
        for fam in text_string_to_metric_families(text):
            if fam.name == "stcp_build_info" or fam.type not in _MONOTONIC + ("gauge",):
                continue
            self._meta.setdefault(fam.name, (fam.type, fam.documentation))
            into = last if fam.type in _MONOTONIC else gauges
            for smp in fam.samples:
                if smp.name.endswith("_created"):
                    continue
                k = (fam.name, smp.name, tuple(sorted(smp.labels.items())))
                self._order.setdefault(k, len(self._order))
                into[k] = smp.value
        self._last[w] = last
        self._gauges[w] = gauges

    def collect(self) -> Iterator:
        slots = list(self._slots())
        texts = self._read(slots)
        with self._lock:
            up: Dict[int, int] = {}
            for s in slots:
                if self._pid.get(s.worker) != s.pid:
                    if self._pid.get(s.worker) is not None:
                        self._fold(s.worker)
                    self._pid[s.worker] = s.pid
                text = texts.get(s.worker)
                ok = False
                if text is not None:
                    try:
                        self._ingest(s.worker, text)
                        ok = True
                    except Exception as e:  # noqa: BLE001 - a garbled answer counts as no answer
                        log.warning("worker %d served unparsable metrics: %s", s.worker, e)
                if not ok:                             # (its last gauges stay for _fold)
                    if s.alive and s.path:             # running and said it serves, but no answer
                        self.read_errors[s.worker] = self.read_errors.get(s.worker, 0) + 1
                up[s.worker] = int(ok)
            workers = sorted(set(self._pid) | {s.worker for s in slots})
            families = {}
            for name, (typ, doc) in self._meta.items():
                families[name] = Metric(name, doc, typ)

            def add(name: str, sample: str, labels: Dict[str, str], value: float) -> None:
                families[name].add_sample(sample, labels, value)

            pooled: Dict[_SampleKey, float] = {}
            for w in workers:
                per: Dict[_SampleKey, float] = dict(self._base.get(w, {}))
                for k, v in self._last.get(w, {}).items():
                    per[k] = per.get(k, 0.0) + v
                if up.get(w):                          # gauges only from workers that answered
                    per.update(self._gauges.get(w, {}))
                for (fam, sample, labels), v in sorted(per.items(), key=lambda kv: self._order[kv[0]]):
                    if fam.startswith("stcp_worker_"):
                        add(fam, sample, {"worker": str(w), **dict(labels)}, v)
                    else:
                        pooled[(fam, sample, labels)] = pooled.get((fam, sample, labels), 0.0) + v
            for (fam, sample, labels), v in pooled.items():
                add(fam, sample, dict(labels), v)
            restarts = {s.worker: s.restarts for s in slots}
            errors = dict(self.read_errors)
        for name in self._meta:
            if name.startswith("stcp_worker_") or families[name].samples:
                yield families[name]
        g = GaugeMetricFamily("stcp_worker_up", WORKER_METRICS["stcp_worker_up"][2], labels=["worker"])
        r = CounterMetricFamily("stcp_worker_restarts", WORKER_METRICS["stcp_worker_restarts_total"][2],
                                labels=["worker"])
        e = CounterMetricFamily("stcp_worker_read_errors", WORKER_METRICS["stcp_worker_read_errors_total"][2],
                                labels=["worker"])
        for w in sorted(restarts):
            g.add_metric([str(w)], up.get(w, 0))
            r.add_metric([str(w)], restarts[w])
            e.add_metric([str(w)], errors.get(w, 0))
        yield g
        yield r
        yield e


class PoolMetrics:
    """The supervisor's exporter: build info, the worker pool, the XDP program, the process."""

    def __init__(self, registry: CollectorRegistry, http: "MetricsHTTPServer", pool: WorkerPoolCollector):
        self.registry = registry
        self.http = http
        self.pool = pool

    @property
    def address(self) -> Tuple[str, int]:
        return self.http.address

    def close(self) -> None:
        self.http.close()


class _BuildInfo(Collector):
    def __init__(self, datapath: str, cipher: str, version: Optional[str] = None):
        self.labels = [version or _version(), datapath, cipher]

    def collect(self) -> Iterator:
        info = GaugeMetricFamily("stcp_build_info", "STCP build and configuration; the value is always 1.",
                                 labels=["version", "datapath", "cipher"])
        info.add_metric(self.labels, 1)
        yield info


def serve_pool_metrics(slots: Callable[[], Sequence[WorkerSlot]], listen: str, datapath: str = "afxdp",
                       cipher: str = "aes-256-gcm", iface: Optional[str] = None, *,
                       netns: Optional[str] = None, xdp: Optional[Collector] = None) -> PoolMetrics:
    """The supervisor's /metrics on LISTEN: stcp_build_info, a WorkerPoolCollector over
    slots(), the XDP program's counters of `iface` (read once, here; `xdp` replaces that
    collector, e.g. in tests) and the process collectors."""
    registry = CollectorRegistry()
    registry.register(_BuildInfo(datapath, cipher))
    pool = WorkerPoolCollector(slots)
    registry.register(pool)
    if xdp is not None:
        registry.register(xdp)
    elif iface:
        registry.register(XdpCollector([(iface, netns)]))
    _process_collectors(registry)
    http = MetricsHTTPServer(registry, listen)
    log.info("serving worker pool metrics on %s", http.url)
    return PoolMetrics(registry, http, pool)


# --------------------------------------------------------------------------------------
# the HTTP exporter
def parse_listen(listen: str) -> Tuple[str, int]:
    """'HOST:PORT', '[v6]:PORT' or ':PORT' (all addresses) -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics address {listen!r} is not HOST:PORT (e.g. 127.0.0.1:9400)")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    return host or "0.0.0.0", int(port)


class MetricsHTTPServer:
    """prometheus_client's threaded HTTP exporter for one registry, closable."""

    def __init__(self, registry: CollectorRegistry, listen: str):
        from prometheus_client import start_http_server

        host, port = parse_listen(listen)
        try:
            started = start_http_server(port, addr=host, registry=registry)
        except OSError as e:
            raise OSError(e.errno, f"cannot serve metrics on {listen}: {e.strerror or e}") from None
        if not started:       # prometheus-client < 0.17 returns nothing
            raise RuntimeError("prometheus-client >= 0.17 is needed (start_http_server must return the server)")
        self.httpd, self.thread = started
        addr = self.httpd.server_address
        self.address: Tuple[str, int] = (addr[0], addr[1])

    @property
    def url(self) -> str:
        host = self.address[0]
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.address[1]}/metrics"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def _process_collectors(registry: CollectorRegistry) -> None:
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)


def serve_metrics(server, listen: str, datapath: str, cipher: str, iface: Optional[str] = None, *,
                  netns: Optional[str] = None) -> ServerMetrics:
    """Export `server`'s metrics on http://LISTEN/metrics; call on the server's event loop.

    Installs a ServerMetrics hook on server.hooks, registers it (plus an XdpCollector for
    `iface` when given, and the process collectors) on a dedicated CollectorRegistry and
    starts prometheus_client's HTTP exporter. Returns the ServerMetrics; close() it on
    shutdown to stop the exporter.
    """
    endpoint = getattr(server, "endpoint", None)
    metrics = ServerMetrics(endpoint, datapath=datapath, cipher=cipher)
    if endpoint is not None:
        metrics.adopt(list(endpoint.connections.values()))
    registry = CollectorRegistry()
    registry.register(metrics)
    if iface:
        registry.register(XdpCollector([(iface, netns)]))
    _process_collectors(registry)
    metrics.registry = registry
    metrics.http = MetricsHTTPServer(registry, listen)
    server.hooks.append(metrics)
    log.info("serving metrics on %s", metrics.http.url)
    return metrics


def loader_registry(ifaces: Sequence[str] = (), netns: Optional[str] = None) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(XdpCollector(list(ifaces), netns=netns))
    _process_collectors(registry)
    return registry


def run_loader_metrics(ifaces: Sequence[str], listen: str, netns: Optional[str] = None,
                       once: bool = False) -> int:
    """`stcp-loader metrics`: serve the datapath counters until SIGINT/SIGTERM (or print them
    once, for a node_exporter textfile collector)."""
    from .datapath import xdp
    try:
        parse_listen(listen)
    except ValueError as e:
        raise xdp.XdpSetupError(str(e)) from None
    xdp.require_root()
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="stcp-loader: %(message)s")
    registry = loader_registry(ifaces, netns)
    if once:
        sys.stdout.write(generate_latest(registry).decode())
        sys.stdout.flush()
        return 0
    http = MetricsHTTPServer(registry, listen)
    stop = threading.Event()

    def _stop(signum, frame):
        stop.set()

    old = {s: signal.signal(s, _stop) for s in (signal.SIGINT, signal.SIGTERM)}
    what = ", ".join(ifaces) if ifaces else "every STCP XDP interface"
    print(f"serving datapath metrics of {what} on {http.url}", flush=True)
    try:
        while not stop.wait(3600):
            pass
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        http.close()
    return 0
