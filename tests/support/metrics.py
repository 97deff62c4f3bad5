"""Scraping an exporter and checking what it says: a parsed exposition (Scrape), the
invariants every STCP scrape keeps, promtool's opinion, the dashboards' queries, a fake
kernel-datapath reader for the collector without root, and a real Prometheus server
(Prometheus) for the tests that query one."""
from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Dict, FrozenSet, Iterable, List, Optional, Set, Tuple

import pytest
from prometheus_client.parser import text_string_to_metric_families

from stcp.datapath.verdicts import Verdict
from stcp.metrics import (
    CLOSE_REASONS,
    ENDPOINT_DROP_REASONS,
    HANDSHAKE_FAIL_REASONS,
    HANDSHAKE_REJECT_REASONS,
    XdpCollector,
)

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = ROOT / "dashboards"
Key = Tuple[str, FrozenSet[Tuple[str, str]]]

# Label names the exporters may use: small fixed value sets only (python_info's come from
# prometheus_client's PlatformCollector). Never an address or a connection ID.
ALLOWED_LABELS = {"reason", "direction", "le", "version", "datapath", "cipher", "iface", "netns", "mode",
                  "verdict", "cpu", "implementation", "major", "minor", "patchlevel", "worker", "path", "code",
                  "outcome"}


# ---------------------------------------------------------------------------------------
# scraping
class Scrape:
    """One parsed exposition: families by name and sample values by (name, labels)."""

    def __init__(self, text: str):
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.values: Dict[Key, float] = {}
        for fam in self.families.values():
            for s in fam.samples:
                self.values[(s.name, frozenset(s.labels.items()))] = s.value

    def get(self, name: str, **labels: str) -> float:
        """The sample with exactly these labels; KeyError if it is not exported."""
        return self.values[(name, frozenset(labels.items()))]

    def sum(self, name: str, **labels: str) -> float:
        """Sum of the samples of `name` whose labels include `labels`."""
        want = set(labels.items())
        return sum(v for (n, lb), v in self.values.items() if n == name and want <= lb)

    def by(self, name: str, label: str, **labels: str) -> Dict[str, float]:
        want = set(labels.items())
        return {dict(lb)[label]: v for (n, lb), v in self.values.items() if n == name and want <= lb}

    def family_names(self) -> Set[str]:
        return set(self.families)

    def label_names(self) -> Set[str]:
        return {k for _, lb in self.values for k, _ in lb}


def scrape(url: str, timeout: float = 5.0) -> Scrape:
    with urllib.request.urlopen(url, timeout=timeout) as r:
        assert r.status == 200
        assert r.headers.get("Content-Type", "").startswith("text/plain")
        return Scrape(r.read().decode())


async def ascrape(url: str) -> Scrape:
    return await asyncio.get_running_loop().run_in_executor(None, scrape, url)


def url_of(metrics) -> str:
    host, port = metrics.address
    return f"http://{host}:{port}/metrics"


def promtool_check(text: str) -> None:
    """`promtool check metrics` must find nothing to complain about."""
    if shutil.which("promtool") is None:
        return
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and not r.stdout.strip() and not r.stderr.strip(), \
        f"promtool check metrics: rc={r.returncode}\n{r.stdout}{r.stderr}"


def check_invariants(s: Scrape) -> None:
    assert s.get("stcp_connections_opened_total") - s.sum("stcp_connections_closed_total") == \
        s.get("stcp_connections_active")
    assert s.get("stcp_handshakes_started_total") == s.get("stcp_handshakes_completed_total") + \
        s.sum("stcp_handshakes_failed_total") + s.get("stcp_handshakes_in_progress")
    assert set(s.by("stcp_connections_closed_total", "reason")) == set(CLOSE_REASONS)
    assert set(s.by("stcp_handshakes_failed_total", "reason")) == set(HANDSHAKE_FAIL_REASONS)
    assert set(s.by("stcp_endpoint_dropped_datagrams_total", "reason")) == set(ENDPOINT_DROP_REASONS)
    assert set(s.by("stcp_handshakes_rejected_total", "reason")) == set(HANDSHAKE_REJECT_REASONS)
    # the REJECTs answering a hello; the allow list's refusals are connections (access_denied)
    assert sum(s.get("stcp_handshakes_rejected_total", reason=r) for r in ("version", "suite", "key", "busy")) \
        == s.get("stcp_handshakes_failed_total", reason="rejected")
    assert s.label_names() <= ALLOWED_LABELS, s.label_names() - ALLOWED_LABELS



# ---------------------------------------------------------------------------------------
# dashboards
def load_dashboard(path: Path = DASHBOARDS / "stcp.json") -> dict:
    return json.loads(path.read_text())


def _walk(panels: Iterable[dict]) -> Iterable[dict]:
    for p in panels:
        yield p
        yield from _walk(p.get("panels", []))


def dashboard_panels(dash: dict) -> List[dict]:
    return list(_walk(dash["panels"]))


def dashboard_queries(dash: dict) -> List[str]:
    """Every PromQL expression: panel targets and templating variable queries."""
    out = [t["expr"] for p in dashboard_panels(dash) for t in p.get("targets", [])]
    for v in dash.get("templating", {}).get("list", []):
        if v.get("type") == "query":
            q = v["query"]
            out.append(q["query"] if isinstance(q, dict) else q)
    return out


def alert_queries(path: Path = DASHBOARDS / "stcp-alerts.yml") -> List[str]:
    yaml = pytest.importorskip("yaml")
    rules = yaml.safe_load(path.read_text())
    return [r["expr"] for g in rules["groups"] for r in g["rules"]]


_NAME = re.compile(r"\b(stcp_[a-zA-Z0-9_]+)")
_HIST_SUFFIX = re.compile(r"_(bucket|sum|count)$")


def metric_names(expr: str) -> Set[str]:
    """Metric names an expression refers to (quoted label values are skipped)."""
    return set(_NAME.findall(re.sub(r'"[^"]*"', '""', expr)))


def family_of(name: str, families: Set[str]) -> str:
    """Sample name -> family name as prometheus_client's parser reports it."""
    if name in families:
        return name
    for cand in (re.sub(r"_total$", "", name), _HIST_SUFFIX.sub("", name)):
        if cand in families:
            return cand
    return name


def grafana_to_promql(expr: str, rate_interval: str = "1m") -> str:
    """What Grafana sends with every variable at 'All' (label_values(x, l) -> x)."""
    m = re.fullmatch(r"label_values\((.*),\s*\w+\)", expr.strip(), re.S)
    if m:
        expr = m.group(1)
    expr = expr.replace("$__rate_interval", rate_interval).replace("$__interval", rate_interval)
    return re.sub(r"\$\{?[A-Za-z_][A-Za-z0-9_]*\}?", ".*", expr)


# ---------------------------------------------------------------------------------------
# a fake kernel datapath: the collector's output shape without root (the real one is in
# tests/test_metrics_xdp.py)
class FakeXdp:
    def __init__(self, ncpu: int = 2):
        self.ncpu = ncpu
        self.reads: Dict[Tuple[str, Optional[str]], int] = {}

    def __call__(self, iface: str, netns: Optional[str]) -> dict:
        """Counters grow by a fixed step per read of each interface."""
        n = self.reads[(iface, netns)] = self.reads.get((iface, netns), 0) + 1
        per_cpu = {v.key: [((int(v) + 1) * n * (cpu + 1), (int(v) + 1) * n * (cpu + 1) * 100)
                           for cpu in range(self.ncpu)] for v in Verdict}
        return {"attached": True, "mode": "native", "prog_id": 1, "per_cpu": per_cpu, "live_cids": 3,
                "run_time_ns": 1000 * n, "run_cnt": 10 * n}


def fake_xdp_collector() -> XdpCollector:
    return XdpCollector([("eth0", None)], reader=FakeXdp())


class FakeSteering:
    """A socket pool's reuseport steering as ReuseportCollector reads it: counters grow by a
    fixed step per read (the real one is in tests/test_socket_pool.py)."""

    def __init__(self):
        self.reads = 0

    def counters(self) -> Dict[str, Tuple[int, int]]:
        from stcp.datapath.reuseport import ReuseportVerdict
        self.reads += 1
        return {v.key: ((int(v) + 1) * self.reads, (int(v) + 1) * self.reads * 1200) for v in ReuseportVerdict}


def fake_steering_collector():
    from stcp.metrics import ReuseportCollector
    steering = FakeSteering()
    return ReuseportCollector(lambda: steering)


# ---------------------------------------------------------------------------------------
# a real Prometheus (Debian's `prometheus`)
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prom_query(base: str, expr: str) -> dict:
    q = urllib.parse.urlencode({"query": expr})
    try:
        with urllib.request.urlopen(f"{base}/api/v1/query?{q}", timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:          # 400 with the parse error in the body
        return json.loads(e.read())


def require_prometheus() -> None:
    for tool in ("prometheus", "promtool"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is not installed (Debian package 'prometheus'; scripts/system-deps.sh "
                        "installs it as root)")


class Prometheus:
    """A Prometheus server scraping `targets` ({job: HOST:PORT}) every second, evaluating
    `rule_files` every second, with its data in tmp_dir. start() waits until it is ready."""

    def __init__(self, tmp_dir: Path, targets: Dict[str, str], rule_files: Iterable[Path] = ()):
        self.dir = Path(tmp_dir)
        cfg = self.dir / "prometheus.yml"
        rules = [str(Path(r).resolve()) for r in rule_files]
        cfg.write_text("global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                       + (f"rule_files: {json.dumps(rules)}\n" if rules else "") + "scrape_configs:\n" + "".join(
                           f"  - job_name: {job}\n    static_configs:\n      - targets: ['{t}']\n"
                           for job, t in targets.items()))
        web = f"127.0.0.1:{free_port()}"
        self.base = f"http://{web}"
        self._log = open(self.dir / "prometheus.log", "w")
        self.proc = subprocess.Popen(["prometheus", f"--config.file={cfg}", f"--storage.tsdb.path={self.dir / 'data'}",
                                      f"--web.listen-address={web}", "--storage.tsdb.retention.time=1h"],
                                     stdout=self._log, stderr=subprocess.STDOUT)

    @classmethod
    def start(cls, tmp_dir: Path, targets: Dict[str, str], rule_files: Iterable[Path] = (),
              timeout: float = 20) -> "Prometheus":
        prom = cls(tmp_dir, targets, rule_files)
        deadline = time.monotonic() + timeout
        while not prom.ready():
            if prom.proc.poll() is not None or time.monotonic() > deadline:
                prom.close()
                raise AssertionError("prometheus did not become ready: " + prom.log()[-2000:])
            time.sleep(0.2)
        return prom

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.base}/-/ready", timeout=1) as r:
                return r.status == 200
        except OSError:
            return False

    def query(self, expr: str) -> dict:
        return prom_query(self.base, expr)

    def results(self, expr: str) -> List[dict]:
        r = self.query(expr)
        assert r.get("status") == "success", f"{expr!r} -> {r}"
        return r["data"]["result"]

    def log(self) -> str:
        return (self.dir / "prometheus.log").read_text()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
