"""Prometheus metrics: the server's counters and the kernel datapath's, read at scrape time.

    server = await stcp.serve(handler, host, port, metrics="127.0.0.1:9400")    # or:
    metrics = serve_metrics(server, "127.0.0.1:9400", datapath="socket", cipher="aes-256-gcm")
    ...
    metrics.close()

Custom prometheus-client collectors that compute everything when Prometheus scrapes (no
polling thread, nothing sampled in between), one module each:

- stcp.metrics.server: `ServerMetrics`, the hook a server counts its connections through.
- stcp.metrics.xdp: `XdpCollector`, the STCP XDP program's verdict counters.
- stcp.metrics.workers: a worker pool (socket or AF_XDP): each worker's registry on a unix
  socket, read, relabelled and summed by the supervisor's `WorkerPoolCollector`.
- stcp.metrics.reuseport: `ReuseportCollector`, the socket pool's steering program counters.
- stcp.metrics.exporter: the HTTP exporter (`serve_metrics`) and `stcp-loader metrics`.

Metrics observe: nothing in stcp's datapaths imports them; stcp.server and the CLI start
them when asked. Naming follows Prometheus conventions: `stcp_` prefix, base units
(seconds, bytes), counters end in `_total`, labels take values from small fixed sets
(never a connection ID or an address). docs/OPERATIONS.md explains every metric.
"""
from __future__ import annotations

from .exporter import (
                       DEFAULT_LOADER_LISTEN,
                       DEFAULT_SERVER_LISTEN,
                       MetricsHTTPServer,
                       loader_registry,
                       parse_listen,
                       process_collectors,
                       run_loader_metrics,
                       serve_metrics,
)
from .reuseport import ReuseportCollector
from .server import (
                       CLOSE_REASONS,
                       ENDPOINT_COUNTERS,
                       ENDPOINT_DROP_REASONS,
                       HANDSHAKE_BUCKETS,
                       HANDSHAKE_FAIL_REASONS,
                       HANDSHAKE_REJECT_REASONS,
                       RTT_BUCKETS,
                       BuildInfo,
                       ServerMetrics,
                       build_info,
                       close_reason,
)
from .workers import (
                       WORKER_METRICS,
                       WORKER_PATHS,
                       PoolMetrics,
                       UnixExporter,
                       WorkerCollector,
                       WorkerPoolCollector,
                       read_unix,
                       serve_pool_metrics,
                       serve_worker_metrics,
)
from .xdp import XdpCollector, discover_targets, read_xdp

__all__ = ["CLOSE_REASONS", "ENDPOINT_COUNTERS", "ENDPOINT_DROP_REASONS", "HANDSHAKE_BUCKETS", "HANDSHAKE_FAIL_REASONS",
           "HANDSHAKE_REJECT_REASONS", "RTT_BUCKETS",
           "WORKER_METRICS", "WORKER_PATHS", "DEFAULT_LOADER_LISTEN", "DEFAULT_SERVER_LISTEN", "BuildInfo",
           "MetricsHTTPServer", "PoolMetrics", "ReuseportCollector", "ServerMetrics", "UnixExporter", "WorkerCollector",
           "WorkerPoolCollector", "XdpCollector", "build_info", "close_reason", "discover_targets",
           "loader_registry", "parse_listen", "process_collectors", "read_unix", "read_xdp", "run_loader_metrics",
           "serve_metrics", "serve_pool_metrics", "serve_worker_metrics"]
