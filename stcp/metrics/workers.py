"""The worker-pool collector (`stcp serve --workers N --metrics ADDR`, on the socket or the
afxdp datapath).

Each worker process serves its own registry (ServerMetrics + WorkerCollector) on a unix
socket in a directory private to the supervisor (0700, removed at exit): connect, read the
text exposition until EOF (UnixExporter, read_unix). The supervisor's WorkerPoolCollector
reads every worker at scrape time, adds the `worker` label to the stcp_worker_* series,
sums the server-level series over the workers, and keeps every counter monotonic across a
worker's replacement. Workers share no state with the supervisor or each other; a worker
that does not answer is reported as stcp_worker_up 0 and shows its last values.
"""
from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from typing import TYPE_CHECKING, Callable, Dict, Iterator, Optional, Sequence, Tuple

from prometheus_client import generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from ..supervisor import WorkerSlot, worker_socket_path
from .exporter import MetricsHTTPServer, process_collectors
from .server import BuildInfo, ServerMetrics
from .xdp import XdpCollector

if TYPE_CHECKING:
    from ..server import Server

log = logging.getLogger("stcp.metrics")

# A worker pool (`stcp serve [--datapath afxdp] --workers N --metrics ADDR`): every series
# carries `worker` (0..N-1, the worker slot, which keeps its number across restarts); the
# pool's datapath is stcp_build_info's `datapath` label.
# The first four come from the worker processes, the last two from the supervisor.
WORKER_METRICS: Dict[str, Tuple[str, Tuple[str, ...], str]] = {
    "stcp_worker_records_received_total": (
        "counter", ("worker", "path"),
        "Datagrams (one STCP record each) a worker received: through its AF_XDP sockets (path=afxdp) or "
        "its UDP socket (path=socket: every datagram of a socket pool; on AF_XDP, queues without an AF_XDP "
        "socket, XDP fallback)."),
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


class WorkerCollector(Collector):
    """The stcp_worker_* series of one worker process, without the `worker` label (the
    supervisor adds it). `driver` is the worker's AfxdpServerDriver or WorkerServerDriver
    (stcp.datapath.socket_pool), or a callable that returns it (None before the server exists)."""

    def __init__(self, driver: object) -> None:
        self._driver: Callable[[], object] = driver if callable(driver) else (lambda: driver)

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
    one generate_latest() and EOF. For a supervisor on the same host (read_unix).
    start=False binds the socket but serves only from start(): a worker binds in the
    supervisor's private directory while it may, and starts the thread once it has dropped
    its privileges (capabilities are per thread: none may be started before)."""

    def __init__(self, registry: CollectorRegistry, path: str, start: bool = True):
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
        self.thread: Optional[threading.Thread] = None
        if start:
            self.start()

    def start(self) -> None:
        if self.thread is None:
            self.thread = threading.Thread(target=self.server.serve_forever, name="stcp-worker-metrics",
                                           daemon=True)
            self.thread.start()

    def close(self) -> None:
        if self.thread is not None:
            self.server.shutdown()
            self.thread.join(timeout=5)
        self.server.server_close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)


def read_unix(path: str, timeout: float = 2.0) -> str:
    """What a UnixExporter at `path` serves (OSError / socket.timeout when it does not answer)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
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


def serve_worker_metrics(server: Server, directory: str, worker: int, datapath: str = "afxdp",
                         cipher: str = "aes-256-gcm", *, path: Optional[str] = None,
                         start: bool = True) -> ServerMetrics:
    """In a worker process: install a ServerMetrics hook on `server` and serve it plus the
    worker's WorkerCollector at worker_socket_path(directory, worker, os.getpid()) (or
    `path`); start=False: bound, serving from result.http.start(). close() the result on
    shutdown."""
    metrics = ServerMetrics.of(server, datapath, cipher)
    registry = CollectorRegistry()
    registry.register(metrics)
    registry.register(WorkerCollector(lambda: getattr(server, "driver", None)))
    metrics.registry = registry
    metrics.http = UnixExporter(registry, path or worker_socket_path(directory, worker, os.getpid()),  # type: ignore[assignment]
                                start=start)
    server.hooks.append(metrics)
    return metrics


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

        def one(slot: WorkerSlot, path: str) -> None:
            try:
                out[slot.worker] = read_unix(path, self.timeout)
            except (OSError, ValueError) as e:
                log.debug("worker %d metrics: %s", slot.worker, e)

        threads = [threading.Thread(target=one, args=(s, s.path), daemon=True) for s in slots if s.alive and s.path]
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
                    except Exception as e:  # a garbled answer counts as no answer
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
        errs = CounterMetricFamily("stcp_worker_read_errors", WORKER_METRICS["stcp_worker_read_errors_total"][2],
                                   labels=["worker"])
        for w in sorted(restarts):
            g.add_metric([str(w)], up.get(w, 0))
            r.add_metric([str(w)], restarts[w])
            errs.add_metric([str(w)], errors.get(w, 0))
        yield g
        yield r
        yield errs


class PoolMetrics:
    """The supervisor's exporter: build info, the worker pool, the kernel part, the process."""

    def __init__(self, registry: CollectorRegistry, http: "MetricsHTTPServer", pool: WorkerPoolCollector):
        self.registry = registry
        self.http = http
        self.pool = pool

    @property
    def address(self) -> Tuple[str, int]:
        return self.http.address

    def close(self) -> None:
        self.http.close()


def serve_pool_metrics(slots: Callable[[], Sequence[WorkerSlot]], listen: str, datapath: str = "afxdp",
                       cipher: str = "aes-256-gcm", iface: Optional[str] = None, *,
                       netns: Optional[str] = None, kernel: Optional[Collector] = None) -> PoolMetrics:
    """The supervisor's /metrics on LISTEN: stcp_build_info, a WorkerPoolCollector over
    slots(), the kernel part's counters read once, here (`kernel`: the socket pool's
    ReuseportCollector; without it, the XDP program's of `iface`) and the process collectors."""
    registry = CollectorRegistry()
    registry.register(BuildInfo(datapath, cipher))
    pool = WorkerPoolCollector(slots)
    registry.register(pool)
    if kernel is not None:
        registry.register(kernel)
    elif iface:
        registry.register(XdpCollector([(iface, netns)]))
    process_collectors(registry)
    http = MetricsHTTPServer(registry, listen)
    log.info("serving worker pool metrics on %s", http.url)
    return PoolMetrics(registry, http, pool)
