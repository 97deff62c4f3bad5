"""The kernel-datapath collector: the STCP XDP program's verdict counters, attach mode and
run time, read at scrape time.

`XdpCollector` reads the per-CPU verdict counters of the STCP XDP program through the same
kernel lookups as `stcp-loader status` (interface -> XDP program id -> its maps), so the
two always agree. `stcp-loader metrics --listen ADDR [IFACE...]` serves it alone.
"""
from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Callable, Iterator, List, Optional, Sequence, Tuple

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..datapath import bpf, xdp_prog
from ..datapath.errors import XdpSetupError
from ..datapath.netlink import Netlink
from ..datapath.verdicts import Verdict
from ..datapath.xdp_cookie import cookie_keys_live

if TYPE_CHECKING:
    from ..datapath.xdp import XdpDatapath

log = logging.getLogger("stcp.metrics")


def _proc_bpf_stats_enabled() -> bool:
    try:
        with open("/proc/sys/kernel/bpf_stats_enabled") as f:
            return f.read().strip() not in ("", "0")
    except OSError:
        return False


def read_xdp(iface: str, netns: Optional[str] = None) -> dict:
    """One interface's STCP XDP state, found the way `stcp-loader status` finds it.

    {"attached": False} or {"attached": True, "mode", "per_cpu": {verdict: [(packets,
    bytes), ...one per possible CPU]}, "live_cids", "half_open_cids", "cookie_keys" (1 if
    the program holds unexpired cookie keys), "run_time_ns", "run_cnt"}.
    Raises XdpSetupError / OSError when the interface cannot be inspected.
    """

    with Netlink(netns) as nl:
        idx = nl.ifindex(iface)
        mode, h, _state = xdp_prog.find_stcp(nl, idx)
    if h is None:
        return {"attached": False}
    try:
        return _read(h, mode)
    finally:
        h.close()


def read_held(xdp: XdpDatapath) -> dict:
    """read_xdp() through the descriptors a server's XdpDatapath holds (`xdp`): a server that
    dropped its privileges can no longer open the program by id, but reads what it holds."""
    h = xdp.handles
    if h.prog_fd < 0 or not xdp.is_attached():
        return {"attached": False}
    return _read(h, xdp.mode)


def _read(h: xdp_prog.ProgHandles, mode: Optional[str]) -> dict:
    info = bpf.prog_info(h.prog_fd)
    return {"attached": True, "mode": mode, "prog_id": h.prog_id, "per_cpu": xdp_prog.read_counters_per_cpu(h),
            "live_cids": xdp_prog.count_cids(h), "half_open_cids": xdp_prog.count_cids(h, "half_open"),
            "cookie_keys": int(cookie_keys_live(h.maps["cookie"])),
            "run_time_ns": info["run_time_ns"], "run_cnt": info["run_cnt"]}


def _unquote_pin(name: str) -> str:
    return name.replace("%", ".")                 # xdp.pin_dir() turns '.' into '%'


def discover_targets(netns: Optional[str] = None, pin_root: Optional[str] = None) -> List[Tuple[str, Optional[str]]]:
    """(iface, netns) of every STCP program: pinned under /sys/fs/bpf/stcp/ (including
    .../netns/NS/IFACE) and, by netlink, attached in this (or the given) namespace."""
    root = pin_root or xdp_prog.PIN_ROOT
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
        with Netlink(netns) as nl:
            for name, idx in nl.links():
                _mode, h, _state = xdp_prog.find_stcp(nl, idx)
                if h is not None:
                    h.close()
                    found.append((name, netns))
    except Exception as e:  # discovery is best effort; pins were still found
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
    STCP program found by discover_targets() at each scrape, and every interface found at
    an earlier scrape of this collector: once seen, an interface keeps its
    stcp_xdp_attached series, at 0 with mode "none" after a detach (or once the interface
    or its namespace is gone), so an alert on it can fire. `reader` replaces read_xdp and
    `discover` discover_targets (tests feed them fixed data).
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
        self._seen: List[Target] = []     # discovered at some scrape, in order
        self._lock = threading.Lock()

    def read_all(self) -> List[Tuple[Target, dict]]:
        targets = self.targets
        found: List[Target] = []
        if not targets:
            found = self._discover()
            with self._lock:
                self._seen.extend(t for t in found if t not in self._seen)
                targets = list(self._seen)
        out = []
        for iface, ns in targets:
            try:
                snap = self._read(iface, ns)
            except XdpSetupError as e:
                # seen before and gone now, or found at this scrape and detached while it was
                # read (stcp-loader detach racing a scrape): detached, not a read error
                if not self.targets and ((iface, ns) not in found or (iface, ns) not in self._discover()):
                    snap = {"attached": False, "gone": str(e)}
                else:
                    snap = self._failed(iface, ns, e)
            except Exception as e:  # one broken interface must not hide the others
                snap = self._failed(iface, ns, e)
            out.append(((iface, ns), snap))
        return out

    def _failed(self, iface: str, ns: Optional[str], e: Exception) -> dict:
        with self._lock:
            self._errors += 1
            first = (iface, ns, str(e)) not in self._warned
            self._warned.add((iface, ns, str(e)))
        log.log(logging.WARNING if first else logging.DEBUG, "reading the STCP XDP counters of %s%s "
                "failed: %s", iface, f" (netns {ns})" if ns else "", e)
        return {"attached": False, "error": str(e)}

    def collect(self) -> Iterator:
        rows = self.read_all()
        bpf_stats = _proc_bpf_stats_enabled()
        base = ["iface", "netns"]
        attached = GaugeMetricFamily("stcp_xdp_attached", "1 if the STCP XDP program is attached to the "
                                     "interface, in the given mode (native, generic, offload); 0 with "
                                     "mode=\"none\" if it is not (stale pins, detached).", labels=base + ["mode"])
        packets = CounterMetricFamily("stcp_xdp_packets", "Frames the STCP XDP program handled, by verdict "
                                      "(pass_* go up the stack, drop_* are dropped in the driver, tx_* are "
                                      "answered by the program out of the interface).",
                                      labels=base + ["verdict"])
        nbytes = CounterMetricFamily("stcp_xdp_bytes", "Bytes of those frames (from the Ethernet header), "
                                     "by verdict.", labels=base + ["verdict"])
        cpu_packets = CounterMetricFamily("stcp_xdp_cpu_packets", "Frames by verdict and by the CPU that ran "
                                          "the XDP program (the RX queue's CPU).", labels=base + ["cpu", "verdict"])
        cids = GaugeMetricFamily("stcp_xdp_live_cids", "Entries in the XDP live-connection-ID table.",
                                 labels=base)
        half_open = GaugeMetricFamily("stcp_xdp_half_open_cids", "Entries in the XDP table of half-open "
                                      "connections' IDs (an LRU).", labels=base)
        keys = GaugeMetricFamily("stcp_xdp_cookie_keys", "1 if the XDP program holds the server's cookie keys "
                                 "(unexpired): it checks cookies and answers hellos past its global budget "
                                 "with COOKIEs; 0 if not (no server writes them: hellos past the budget are "
                                 "dropped).", labels=base)
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
            half_open.add_metric(lb, snap.get("half_open_cids", 0))
            keys.add_metric(lb, snap.get("cookie_keys", 0))
            if bpf_stats or snap.get("run_cnt"):
                run_s.add_metric(lb, snap.get("run_time_ns", 0) / 1e9)
                runs.add_metric(lb, snap.get("run_cnt", 0))
        yield attached
        yield packets
        yield nbytes
        yield cpu_packets
        yield cids
        yield half_open
        yield keys
        yield GaugeMetricFamily("stcp_xdp_bpf_stats_enabled", "1 if kernel BPF run-time statistics are on "
                                "(sysctl kernel.bpf_stats_enabled).", value=int(bpf_stats))
        if run_s.samples:
            yield run_s
            yield runs
        with self._lock:
            errors = self._errors
        yield CounterMetricFamily("stcp_xdp_read_errors", "Scrapes in which an interface's XDP state could "
                                  "not be read (see the exporter's log).", value=errors)
