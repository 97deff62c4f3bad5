"""The socket pool's steering collector: the reuseport program's verdict counters
(stcp/datapath/reuseport_prog.py), read by the pool's supervisor at scrape time from the steering it
loaded, once for all workers."""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Iterator, Optional

from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from ..datapath.reuseport import ReuseportError, ReuseportVerdict

if TYPE_CHECKING:
    from ..datapath.reuseport import ReuseportSteering

log = logging.getLogger("stcp.metrics")


class ReuseportCollector(Collector):
    """stcp_reuseport_datagrams_total and stcp_reuseport_bytes_total by verdict; `steering`
    returns the pool's ReuseportSteering (None before it is loaded: every verdict at 0)."""

    def __init__(self, steering: Callable[[], Optional["ReuseportSteering"]]):
        self._steering = steering
        self.errors = 0

    def collect(self) -> Iterator:
        packets = CounterMetricFamily("stcp_reuseport_datagrams", "Datagrams to the socket pool's port, by the "
                                      "steering program's verdict: pass_worker went to the worker named in "
                                      "their connection ID, pass_hello and pass_orphan (a dead worker's) to "
                                      "the kernel's hash over the live workers.", labels=["verdict"])
        nbytes = CounterMetricFamily("stcp_reuseport_bytes", "Bytes of those datagrams (UDP header and payload), "
                                     "by verdict.", labels=["verdict"])
        steering = self._steering()
        counters = {}
        if steering is not None:
            try:
                counters = steering.counters()
            except (OSError, ReuseportError) as e:
                self.errors += 1
                log.warning("reading the reuseport steering counters failed: %s", e)
        for v in ReuseportVerdict:
            p, b = counters.get(v.key, (0, 0))
            packets.add_metric([v.key], p)
            nbytes.add_metric([v.key], b)
        yield packets
        yield nbytes
        yield CounterMetricFamily("stcp_reuseport_read_errors", "Scrapes in which the steering counters could "
                                  "not be read (see the server's log).", value=self.errors)
