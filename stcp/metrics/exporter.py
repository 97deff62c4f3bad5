"""The HTTP exporter: a server's /metrics (serve_metrics) and `stcp-loader metrics`
(run_loader_metrics), each on a registry of its own.
"""
from __future__ import annotations

import logging
import signal
import sys
import threading
from typing import TYPE_CHECKING, Optional, Sequence, Tuple

from prometheus_client import PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.registry import CollectorRegistry

from ..address import listen_error
from ..datapath.errors import XdpSetupError
from ..datapath.xdp_prog import require_privileges
from .server import ServerMetrics
from .xdp import XdpCollector, read_held

if TYPE_CHECKING:
    from ..server import Server

log = logging.getLogger("stcp.metrics")

DEFAULT_SERVER_LISTEN = "127.0.0.1:9400"
DEFAULT_LOADER_LISTEN = "127.0.0.1:9401"


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
            raise listen_error(host, port, e, "metrics") from None
        if not started:       # prometheus-client < 0.17 returns nothing
            raise RuntimeError("prometheus-client >= 0.17 is needed (start_http_server must return the server)")
        self.httpd, self.thread = started
        addr = self.httpd.server_address
        self.address: Tuple[str, int] = (str(addr[0]), addr[1])

    @property
    def url(self) -> str:
        host = self.address[0]
        return f"http://{'[' + host + ']' if ':' in host else host}:{self.address[1]}/metrics"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)


def process_collectors(registry: CollectorRegistry) -> None:
    """The process_* and python_info series of this process."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)


def serve_metrics(server: Server, listen: str, datapath: str, cipher: str, iface: Optional[str] = None, *,
                  netns: Optional[str] = None) -> ServerMetrics:
    """Export `server`'s metrics on http://LISTEN/metrics; call on the server's event loop.

    Installs a ServerMetrics hook on server.hooks, registers it (plus an XdpCollector for
    `iface` when given, and the process collectors) on a dedicated CollectorRegistry and
    starts prometheus_client's HTTP exporter. Returns the ServerMetrics; close() it on
    shutdown to stop the exporter. The XDP counters of a server on a kernel datapath are
    read through the descriptors its datapath holds (it may have dropped the privileges
    that opening the program by id takes).
    """
    metrics = ServerMetrics.of(server, datapath, cipher)
    registry = CollectorRegistry()
    registry.register(metrics)
    if iface:
        dp = getattr(server, "datapath", None)
        held = getattr(dp, "xdp", None) or (dp if hasattr(dp, "handles") else None)
        registry.register(XdpCollector([(iface, netns)], reader=(lambda _i, _n: read_held(held)) if held else None))
    process_collectors(registry)
    metrics.registry = registry
    metrics.http = MetricsHTTPServer(registry, listen)
    server.hooks.append(metrics)
    log.info("serving metrics on %s", metrics.http.url)
    return metrics


def loader_registry(ifaces: Sequence[str] = (), netns: Optional[str] = None) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(XdpCollector(list(ifaces), netns=netns))
    process_collectors(registry)
    return registry


def run_loader_metrics(ifaces: Sequence[str], listen: str, netns: Optional[str] = None,
                       once: bool = False) -> int:
    """`stcp-loader metrics`: serve the datapath counters until SIGINT/SIGTERM (or print them
    once, for a node_exporter textfile collector)."""
    try:
        parse_listen(listen)
    except ValueError as e:
        raise XdpSetupError(str(e)) from None
    require_privileges("reading the STCP XDP program's counters")
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="stcp-loader: %(message)s")
    registry = loader_registry(ifaces, netns)
    if once:
        sys.stdout.write(generate_latest(registry).decode())
        sys.stdout.flush()
        return 0
    http = MetricsHTTPServer(registry, listen)
    stop = threading.Event()

    def _stop(signum: int, frame: object) -> None:
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
