"""The server collector: a hook on a server that counts its connections, handshakes,
records and drops, and exports them at scrape time.

`ServerMetrics` is a hook object for `stcp.serve(..., hooks=[...])` (or
`server.hooks.append`). The hooks run on the event loop and only move a few integers under
a lock; the totals of ended connections live here, and the live connections'
`Connection.stats` are summed at scrape time, so every counter is exact and monotonic.
"""
from __future__ import annotations

import bisect
import threading
from typing import TYPE_CHECKING, Any, Callable, Dict, Iterable, Iterator, Optional, Sequence, Tuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from ..errors import CloseCode
from ..receive import DISCARD_REASONS

if TYPE_CHECKING:
    from ..connection import Connection, ConnectionClosed
    from ..endpoint import ServerEndpoint
    from .exporter import MetricsHTTPServer

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
    "access_denied",        # the server's allow list refused the client (or it proved no key)
    "stateless_reset",      # a client: the server had no state for it (never at a server)
    "worker_died",          # the AF_XDP worker process holding it died (counted by the supervisor)
    "other",                # a close code this version does not know
)
HANDSHAKE_FAIL_REASONS: Tuple[str, ...] = ("rejected",) + tuple(r for r in CLOSE_REASONS if r != "normal")

ENDPOINT_DROP_REASONS: Dict[str, str] = {      # label -> EndpointStats field
    "short": "dropped_short",
    "unknown_cid": "dropped_unknown_cid",
    "bad_hello": "dropped_bad_hello",
    "over_capacity": "dropped_over_capacity",
    "cid_table_full": "dropped_cid_table_full",     # the kernel's live-CID table is full (REJECT_BUSY)
}

# Why a handshake was refused: label -> EndpointStats field. The first four are REJECTs
# answering a client hello (no connection made); the last two are connections the allow
# list ended ACCESS_DENIED (a key not on it, or no key proven).
HANDSHAKE_REJECT_REASONS: Dict[str, str] = {
    "version": "rejected_version",
    "suite": "rejected_suite",
    "key": "rejected_key",
    "busy": "rejected_busy",
    "client_not_allowed": "clients_not_allowed",
    "client_key_missing": "clients_without_key",
}

# Single EndpointStats counters: metric name (without _total) -> (field, help)
ENDPOINT_COUNTERS: Dict[str, Tuple[str, str]] = {
    "stcp_handshake_cookies_sent": (
        "cookies_sent", "COOKIE replies: client hellos past the hello budget or the half-open cap without a "
        "valid cookie, answered with one and no state (PROTOCOL.md 4.5)."),
    "stcp_handshake_cookies_admitted": (
        "cookie_admitted", "Client hellos served under load on the strength of a valid cookie."),
    "stcp_stateless_resets_sent": (
        "resets_sent", "Stateless RESETs sent for data records naming no connection (PROTOCOL.md 5.7)."),
    "stcp_stateless_resets_rate_limited": (
        "resets_rate_limited", "RESETs not sent because the RESET budget was spent."),
}

# Connection.stats.discarded reasons, summed over ended + live connections as "discarded:<reason>"
_DISCARD_KEYS: Tuple[str, ...] = tuple("discarded:" + r for r in DISCARD_REASONS)

# Connection.stats fields summed over ended + live connections
_STAT_FIELDS: Tuple[str, ...] = (
    "records_sent", "records_received", "bytes_sent", "bytes_received",
    "stream_bytes_sent", "stream_bytes_received", "retransmitted_records",
    "duplicates_discarded", "auth_failures", "key_updates_sent", "key_updates_received",
    "stale_epoch_discarded", "handshake_hints_ignored", "client_auth_missing",
)

HANDSHAKE_BUCKETS: Tuple[float, ...] = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                                        0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
RTT_BUCKETS: Tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                  0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def close_reason(info: Optional[ConnectionClosed]) -> str:
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
        for bound, n in zip(self.bounds + (float("inf"),), self.counts, strict=True):
            acc += n
            buckets.append((floatToGoString(bound), acc))
        return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=self.sum)


def _counter_by(name: str, doc: str, label: str, keys: Iterable[str],
                count: Callable[[str], float]) -> CounterMetricFamily:
    """A counter family with one sample per key, in the order given: every label value is
    exported, at zero too, so a query never finds a series missing."""
    family = CounterMetricFamily(name, doc, labels=[label])
    for key in keys:
        family.add_metric([key], count(key))
    return family


def _version() -> str:
    try:
        from .. import __version__
        return __version__
    except Exception:
        return "unknown"


def build_info(version: str, datapath: str, cipher: str) -> GaugeMetricFamily:
    """stcp_build_info: which build serves, on which datapath, with which cipher."""
    info = GaugeMetricFamily("stcp_build_info", "STCP build and configuration; the value is always 1.",
                             labels=["version", "datapath", "cipher"])
    info.add_metric([version, datapath, cipher], 1)
    return info


class BuildInfo(Collector):
    """stcp_build_info alone (the worker pool's supervisor exports it without a server)."""

    def __init__(self, datapath: str, cipher: str, version: Optional[str] = None):
        self.labels = (version or _version(), datapath, cipher)

    def collect(self) -> Iterator[Metric]:
        yield build_info(*self.labels)


# --------------------------------------------------------------------------------------
class ServerMetrics(Collector):
    """Server hook + collector. All hook methods run on the event loop; collect() runs on
    the exporter's HTTP thread and takes a consistent snapshot under one lock.

    Invariants an operator (and the tests) can rely on:
      stcp_connections_opened_total - sum(stcp_connections_closed_total) == stcp_connections_active
      stcp_handshakes_started_total == completed + sum(failed) + stcp_handshakes_in_progress
      sum(stcp_handshakes_rejected_total{reason=~"version|suite|key|busy"})
        == stcp_handshakes_failed_total{reason="rejected"} (the REJECTs; the allow list's
        refusals are connections, closed access_denied)
      stcp_handshake_cookies_sent_total counts COOKIE replies, stcp_handshake_cookies_admitted_total
        the hellos that came back with a valid one and were served: their ratio is how many of
        the clients told to wait were real (a spoofed source never sees its cookie)
    """

    def __init__(self, endpoint: Optional[ServerEndpoint] = None, datapath: str = "socket",
                 cipher: str = "aes-256-gcm", version: Optional[str] = None) -> None:
        self.endpoint = endpoint
        self.build = {"version": version or _version(), "datapath": datapath, "cipher": cipher}
        self._lock = threading.Lock()
        self._live: Dict[Connection, bool] = {}      # -> handshake completed
        self._ended = dict.fromkeys(_STAT_FIELDS + _DISCARD_KEYS, 0)
        self._created = 0
        self._completed = 0
        self._closed = dict.fromkeys(CLOSE_REASONS, 0)
        self._hs_failed = dict.fromkeys(HANDSHAKE_FAIL_REASONS, 0)
        self._hs_hist = _Histogram(HANDSHAKE_BUCKETS)
        self._rtt_hist = _Histogram(RTT_BUCKETS)
        self.http: Optional[MetricsHTTPServer] = None
        self.registry: Optional[CollectorRegistry] = None

    @classmethod
    def of(cls, server: Any, datapath: str, cipher: str) -> "ServerMetrics":
        """A ServerMetrics for `server` that already counts its connections (opened now);
        append it to server.hooks to keep counting."""
        endpoint = getattr(server, "endpoint", None)
        metrics = cls(endpoint, datapath=datapath, cipher=cipher)
        if endpoint is not None:
            metrics.adopt(list(endpoint.connections.values()))
        return metrics

    # -- hooks (event loop) ------------------------------------------------------------
    def adopt(self, connections: Iterable[Connection]) -> None:
        """Count connections that existed before this hook was installed as opened now."""
        with self._lock:
            for conn in connections:
                if conn not in self._live and not conn.is_closed:
                    self._created += 1
                    est = getattr(conn.state, "name", "") == "ENCRYPTED"
                    self._completed += est
                    self._live[conn] = est

    def connection_created(self, conn: Connection) -> None:
        with self._lock:
            if conn not in self._live:
                self._created += 1
                self._live[conn] = False

    def connection_established(self, conn: Connection, handshake_seconds: float) -> None:
        with self._lock:
            if self._live.get(conn) is True:
                return
            if conn not in self._live:           # created before we were installed
                self._created += 1
            self._live[conn] = True
            self._completed += 1
            self._hs_hist.observe(max(0.0, float(handshake_seconds)))

    def connection_ended(self, conn: Connection) -> None:
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
        ep_stats = getattr(self.endpoint, "stats", None)
        drops = {label: getattr(ep_stats, f, 0) for label, f in ENDPOINT_DROP_REASONS.items()}
        rejects = {label: getattr(ep_stats, f, 0) for label, f in HANDSHAKE_REJECT_REASONS.items()}
        counters = {name: getattr(ep_stats, f, 0) for name, (f, _) in ENDPOINT_COUNTERS.items()}
        rejected = getattr(ep_stats, "handshakes_rejected", 0)
        memory = {"limit": 0, "used": 0, "shed": 0, "withheld": 0, "migrations": 0}
        ep = self.endpoint
        if ep is not None:
            budget = ep.budget
            memory = {"limit": budget.limit, "used": budget.used, "shed": budget.shed,
                      "withheld": budget.credit_withheld, "migrations": ep.stats.migrations}
        hs_failed["rejected"] = rejected
        return {"stats": sums, "active": len(live), "in_progress": in_progress,
                "opened": created, "closed": closed, "hs_started": created + rejected,
                "hs_completed": completed, "hs_failed": hs_failed, "hs_hist": hs_hist,
                "rtt_hist": rtt_hist, "drops": drops, "rejects": rejects, "endpoint": counters,
                "memory": memory}

    def collect(self) -> Iterator:
        s = self.snapshot()
        st = s["stats"]

        yield build_info(self.build["version"], self.build["datapath"], self.build["cipher"])

        # handshakes
        yield CounterMetricFamily("stcp_handshakes_started", "Client hellos the server answered: with a server "
                                  "hello (a connection was created) or with a REJECT.", value=s["hs_started"])
        yield CounterMetricFamily("stcp_handshakes_completed", "Handshakes that reached ENCRYPTED (the client's "
                                  "first record authenticated under the new keys).", value=s["hs_completed"])
        yield _counter_by("stcp_handshakes_failed", "Handshakes that ended before ENCRYPTED, by reason "
                          "(rejected: bad version or cipher suite; otherwise the close reason).",
                          "reason", HANDSHAKE_FAIL_REASONS, s["hs_failed"].__getitem__)
        yield GaugeMetricFamily("stcp_handshakes_in_progress", "Connections created whose handshake has not "
                                "completed yet.", value=s["in_progress"])
        yield CounterMetricFamily("stcp_handshake_hints_ignored", "Handshake-time datagrams that could not be "
                                  "verified yet (no keys) and were ignored, not acted on.",
                                  value=st["handshake_hints_ignored"])
        yield CounterMetricFamily("stcp_client_auth_missing", "Records from clients that did not authenticate "
                                  "(CLIENT_AUTH) to a server with an allow list.", value=st["client_auth_missing"])
        yield s["hs_hist"].family("stcp_handshake_duration_seconds", "Time from the client hello to ENCRYPTED, "
                                  "as seen by the server.")
        yield _counter_by("stcp_handshakes_rejected", "Handshakes the server refused, by reason: a REJECT "
                          "answering a client hello (version, suite, key, busy), or a connection its allow "
                          "list ended ACCESS_DENIED (client_not_allowed: a key not on the list; "
                          "client_key_missing: no key proven).", "reason", HANDSHAKE_REJECT_REASONS,
                          s["rejects"].__getitem__)
        for name, (_, doc) in ENDPOINT_COUNTERS.items():
            yield CounterMetricFamily(name, doc, value=s["endpoint"][name])

        # connections
        yield GaugeMetricFamily("stcp_connections_active", "Connections in the server's table (handshaking "
                                "or established).", value=s["active"])
        yield CounterMetricFamily("stcp_connections_opened", "Connections created (a server hello was sent).",
                                  value=s["opened"])
        yield _counter_by("stcp_connections_closed", "Connections that reached CLOSED, by reason.",
                          "reason", CLOSE_REASONS, s["closed"].__getitem__)

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
                                 "retransmitted bytes count again), delivered in order to the application (rx).",
                                 labels=["direction"])
        sb.add_metric(["tx"], st["stream_bytes_sent"])
        sb.add_metric(["rx"], st["stream_bytes_received"])
        yield sb
        yield CounterMetricFamily("stcp_retransmitted_records", "Records that carried retransmitted stream data.",
                                  value=st["retransmitted_records"])
        yield CounterMetricFamily("stcp_replays_discarded", "Duplicate records (already accepted sequence "
                                  "numbers, repeated hellos) discarded without ending the connection.",
                                  value=st["duplicates_discarded"])
        yield CounterMetricFamily("stcp_stale_epoch_discarded", "Records of a key epoch whose keys are gone "
                                  "(late after a key update), discarded without ending the connection.",
                                  value=st["stale_epoch_discarded"])
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

        yield _counter_by("stcp_records_discarded", "Records that reached a connection and were discarded "
                          "without ending it, by reason: from an address not the peer's, malformed, failing "
                          "authentication or two key epochs ahead; handshake-class records that are not a "
                          "repeat of the connection's hello; longer than max_datagram; opening a reassembly "
                          "fragment beyond the cap (PROTOCOL.md 10.2).",
                          "reason", DISCARD_REASONS, lambda r: st["discarded:" + r])

        # endpoint
        yield _counter_by("stcp_endpoint_dropped_datagrams", "Datagrams the server endpoint dropped before "
                          "any connection saw them, by reason.", "reason", ENDPOINT_DROP_REASONS,
                          s["drops"].__getitem__)
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
