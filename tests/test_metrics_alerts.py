"""The shipped alert rules against what the exporters say: promtool's rule tests
(dashboards/stcp-alerts.test.yml), the loader exporter's memory of interfaces it has seen,
and STCPXdpDetached end to end: a real `stcp-loader metrics` scraped by a real Prometheus
evaluating dashboards/stcp-alerts.yml while the program is detached."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from stcp.datapath.errors import XdpSetupError
from stcp.metrics import XdpCollector
from tests.support.metrics import DASHBOARDS, FakeXdp, Prometheus, Scrape, free_port, require_prometheus, scrape
from tests.support.procs import loader

RULES = DASHBOARDS / "stcp-alerts.yml"
PORT = 4565


def promtool_test(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(["promtool", "test", "rules", str(path)], capture_output=True, text=True, timeout=60)


def test_promtool_rule_tests_pass():
    if shutil.which("promtool") is None:
        pytest.skip("promtool is not installed (Debian package 'prometheus'; scripts/system-deps.sh installs it)")
    r = promtool_test(DASHBOARDS / "stcp-alerts.test.yml")
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_discovered_interface_stays_at_zero_after_detach():
    """Without root: an interface found at one scrape and gone from discovery at the next
    (detached, pins removed) is still exported, attached 0 with mode "none"; one whose
    interface or namespace is gone too is the same, and neither counts as a read error."""
    fake = FakeXdp()
    found = [[("eth0", None), ("veth0", "ns1")], [], []]
    state = {"eth0": "attached", "veth0": "attached"}

    def reader(iface, netns):
        if state[iface] == "attached":
            return fake(iface, netns)
        if state[iface] == "gone":
            raise XdpSetupError(f"interface '{iface}' not found")
        return {"attached": False}

    reg = CollectorRegistry()
    reg.register(XdpCollector(discover=lambda: found.pop(0), reader=reader))
    s = Scrape(generate_latest(reg).decode())
    assert s.get("stcp_xdp_attached", iface="eth0", netns="", mode="native") == 1
    assert s.get("stcp_xdp_attached", iface="veth0", netns="ns1", mode="native") == 1
    state.update(eth0="detached", veth0="gone")
    for _ in range(2):
        s = Scrape(generate_latest(reg).decode())
        assert s.get("stcp_xdp_attached", iface="eth0", netns="", mode="none") == 0
        assert s.get("stcp_xdp_attached", iface="veth0", netns="ns1", mode="none") == 0
        assert s.by("stcp_xdp_attached", "mode", iface="eth0") == {"none": 0}
        assert s.get("stcp_xdp_read_errors_total") == 0
        assert s.sum("stcp_xdp_packets_total") == 0


def test_a_detach_racing_a_scrape_is_no_read_error():
    """`stcp-loader detach` between a scrape's discovery and its read of the pins: the
    interface is reported detached, not as a read error. A read that fails while discovery
    still finds the program is one."""
    pins = {"eth0": True}

    def discover():
        return [("eth0", None)] if pins["eth0"] else []

    def reader(iface, netns):
        pins["eth0"] = False                       # detached under the scrape
        raise XdpSetupError(f"no STCP XDP program pinned for '{iface}'")

    reg = CollectorRegistry()
    reg.register(XdpCollector(discover=discover, reader=reader))
    s = Scrape(generate_latest(reg).decode())
    assert s.by("stcp_xdp_attached", "mode", iface="eth0") == {"none": 0}
    assert s.get("stcp_xdp_read_errors_total") == 0

    def broken(iface, netns):
        raise XdpSetupError("reading the counters map failed: Operation not permitted")

    reg = CollectorRegistry()
    reg.register(XdpCollector(discover=lambda: [("eth0", None)], reader=broken))
    s = Scrape(generate_latest(reg).decode())
    assert s.get("stcp_xdp_read_errors_total") == 1


def promtool_case(before: Scrape, after: Scrape, job: str, instance: str) -> dict:
    """A promtool test from two real scrapes: every stcp_xdp_attached series of `before`
    for a minute, then those of `after`; it expects STCPXdpDetached for each of after's
    at 0, 1m after the detach."""
    def series(s: Scrape):
        return [(lb, v) for (n, lb), v in s.values.items() if n == "stcp_xdp_attached"]

    def sel(lb) -> str:
        labels = dict(lb, job=job, instance=instance)
        return "stcp_xdp_attached{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if v) + "}"

    inputs = [{"series": sel(lb), "values": f"{int(v)}x4"} for lb, v in series(before)]
    inputs += [{"series": sel(lb), "values": f"_x4 {int(v)}x20"} for lb, v in series(after)]
    expect = [{"exp_labels": {**{k: v for k, v in dict(lb).items() if v}, "job": job, "instance": instance,
                              "severity": "critical"},
               "exp_annotations": {"summary": f"No STCP XDP program on {dict(lb)['iface']} (stale pins or detached)"}}
              for lb, v in series(after) if v == 0]
    return {"rule_files": [str(RULES)], "evaluation_interval": "15s",
            "tests": [{"interval": "15s", "input_series": inputs,
                       "alert_rule_test": [{"eval_time": "45s", "alertname": "STCPXdpDetached", "exp_alerts": []},
                                           {"eval_time": "2m15s", "alertname": "STCPXdpDetached",
                                            "exp_alerts": expect}]}]}


@pytest.mark.root
@pytest.mark.xdp
def test_detach_fires_the_alert_from_a_real_exporter(xdp_toolchain, netns_pair, tmp_path):
    """The documented deployment: `stcp-loader metrics` (discovering interfaces itself)
    scraped by Prometheus with dashboards/stcp-alerts.yml. After `stcp-loader detach` the
    exporter keeps the interface at 0 and Prometheus has STCPXdpDetached pending for it at
    once; promtool, fed the exporter's own series, shows it firing 1m later."""
    require_prometheus()
    a, _b = netns_pair
    r = loader("--netns", a.ns, "attach", a.ifname, "--port", str(PORT))
    assert r.returncode == 0, r.stderr
    listen = f"127.0.0.1:{free_port()}"
    exporter = subprocess.Popen([sys.executable, "-m", "stcp.cli.loader", "metrics", "--listen", listen],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    prom = None
    try:
        assert "serving datapath metrics" in exporter.stdout.readline()
        url = f"http://{listen}/metrics"
        before = scrape(url)
        assert before.get("stcp_xdp_attached", iface=a.ifname, netns=a.ns, mode="native") == 1
        prom = Prometheus.start(tmp_path, {"stcp-loader": listen}, [RULES])
        sel = f'iface="{a.ifname}",netns="{a.ns}"'
        deadline = time.monotonic() + 20
        while not prom.results(f"stcp_xdp_attached{{{sel},mode=\"native\"}} == 1"):
            assert time.monotonic() < deadline, "Prometheus did not scrape the attached program"
            time.sleep(0.3)
        assert not prom.results(f'ALERTS{{alertname="STCPXdpDetached",{sel}}}')

        r = loader("--netns", a.ns, "detach", a.ifname)
        assert r.returncode == 0, r.stderr
        after = scrape(url)
        assert after.by("stcp_xdp_attached", "mode", iface=a.ifname, netns=a.ns) == {"none": 0}
        assert after.get("stcp_xdp_read_errors_total") == 0
        deadline = time.monotonic() + 20
        while not (alerts := prom.results(f'ALERTS{{alertname="STCPXdpDetached",{sel}}}')):
            assert time.monotonic() < deadline, "STCPXdpDetached is not pending: " + \
                json.dumps(prom.results("stcp_xdp_attached"))
            time.sleep(0.3)
        assert [al["metric"]["alertstate"] for al in alerts] == ["pending"]
        assert alerts[0]["metric"]["severity"] == "critical" and alerts[0]["metric"]["mode"] == "none"

        case = tmp_path / "detach.test.yml"
        case.write_text(json.dumps(promtool_case(before, after, "stcp-loader", listen)))
        r = promtool_test(case)
        assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr
    finally:
        if prom is not None:
            prom.close()
        exporter.terminate()
        exporter.wait(10)
        loader("--netns", a.ns, "detach", a.ifname)
