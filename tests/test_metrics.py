"""Metrics of a real server over HTTP, the dashboards, and a real Prometheus.

Counters are checked for exact movement under known traffic: connections opened and
closed by reason, handshakes, records and bytes (against the server's own Connection
stats, and stream bytes against the payload sizes), replays, authentication failures,
endpoint drops. The dashboard test checks that every metric a dashboard or alert rule
queries is exported. The Prometheus test (Debian's `prometheus`, installed by
scripts/system-deps.sh) scrapes the exporter and evaluates every dashboard query.

The kernel-datapath metrics against a real XDP program are in tests/test_metrics_xdp.py;
the helpers (Scrape, scrape, dashboard_*) are in tests/support/metrics.py.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import time
from pathlib import Path
from typing import List, Set, Tuple

import pytest

import stcp
from stcp import wire
from stcp.connection import Connection, ConnectionClosed
from stcp.datapath.verdicts import Verdict
from stcp.errors import CloseCode, ConnectionTerminated
from stcp.metrics import (
    CLOSE_REASONS,
    ENDPOINT_DROP_REASONS,
    HANDSHAKE_FAIL_REASONS,
    WORKER_METRICS,
    MetricsHTTPServer,
    ReuseportCollector,
    XdpCollector,
    close_reason,
    parse_listen,
    serve_metrics,
)
from tests.support.metrics import (
    ALLOWED_LABELS,
    DASHBOARDS,
    FakeXdp,
    Prometheus,
    Scrape,
    alert_queries,
    ascrape,
    check_invariants,
    dashboard_panels,
    dashboard_queries,
    fake_steering_collector,
    fake_xdp_collector,
    family_of,
    grafana_to_promql,
    load_dashboard,
    metric_names,
    prom_query,
    promtool_check,
    require_prometheus,
    scrape,
    url_of,
)
from tests.support.poll import await_until
from tests.support.servers import echo, quiet, transfer
from tests.support.workers import close_pool, fake_pool_with_traffic


# ---------------------------------------------------------------------------------------
# traffic helpers
class Truth:
    """A second hook: the server's own Connection objects, for ground truth."""

    def __init__(self):
        self.conns: List[Connection] = []
        self.ended: List[Connection] = []

    def connection_created(self, conn):
        self.conns.append(conn)

    def connection_ended(self, conn):
        self.ended.append(conn)

    def total(self, field: str) -> int:
        return sum(getattr(c.stats, field) for c in self.conns)


def delta(a: Scrape, b: Scrape, name: str, **labels: str) -> float:
    return b.sum(name, **labels) - a.sum(name, **labels)


# ---------------------------------------------------------------------------------------
def test_close_reason_mapping_is_a_small_fixed_set():
    cases = [
        (ConnectionClosed(CloseCode.NO_ERROR), "normal"),
        (ConnectionClosed(CloseCode.NO_ERROR, by_peer=True), "normal"),
        (ConnectionClosed(CloseCode.NO_ERROR, by_peer=True, error=True), "peer_close"),
        (ConnectionClosed(CloseCode.APPLICATION_ABORT, by_peer=True, error=True), "peer_close"),
        (ConnectionClosed(CloseCode.APPLICATION_ABORT), "local_abort"),
        (ConnectionClosed(CloseCode.IDLE_TIMEOUT), "idle_timeout"),
        (ConnectionClosed(CloseCode.HANDSHAKE_TIMEOUT), "handshake_timeout"),
        (ConnectionClosed(CloseCode.AUTH_FAILURE, error=True), "auth_failure"),
        (ConnectionClosed(CloseCode.AUTH_FAILURE, by_peer=True, error=True), "auth_failure"),
        (ConnectionClosed(0x4242, by_peer=True, error=True), "other"),
        (None, "other"),
    ]
    for info, want in cases:
        assert close_reason(info) == want, info
    for code in CloseCode:
        assert close_reason(ConnectionClosed(code, error=True)) in CLOSE_REASONS


def test_parse_listen():
    assert parse_listen("127.0.0.1:9400") == ("127.0.0.1", 9400)
    assert parse_listen("[::1]:0") == ("::1", 0)
    assert parse_listen(":9401") == ("0.0.0.0", 9401)
    for bad in ("9400", "host:", "h:99999", "h:x"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_traffic_moves_counters_exactly():
    asyncio.run(_traffic_exact())


async def _traffic_exact():
    server = await stcp.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    metrics = serve_metrics(server, "127.0.0.1:0", datapath="socket", cipher="aes-256-gcm")
    truth = Truth()
    server.hooks.append(truth)
    url = url_of(metrics)
    try:
        s0 = await ascrape(url)
        assert s0.get("stcp_build_info", version=stcp.__version__, datapath="socket", cipher="aes-256-gcm") == 1
        assert s0.get("stcp_connections_active") == 0

        # one live connection: its stats are in the scrape before it ends
        r, w = await asyncio.wait_for(stcp.open_connection("127.0.0.1", port, server_key=server.public_key), 10)
        w.write(b"L" * 7000)
        assert await asyncio.wait_for(r.readexactly(7000), 10) == b"L" * 7000
        s1 = await ascrape(url)
        assert s1.get("stcp_connections_active") == 1
        assert delta(s0, s1, "stcp_connections_opened_total") == 1
        assert delta(s0, s1, "stcp_handshakes_started_total") == 1
        assert delta(s0, s1, "stcp_handshakes_completed_total") == 1
        assert delta(s0, s1, "stcp_handshake_duration_seconds_count") == 1
        assert delta(s0, s1, "stcp_stream_bytes_total", direction="rx") == 7000
        assert delta(s0, s1, "stcp_connections_closed_total") == 0
        assert s1.get("stcp_records_total", direction="rx") >= 1
        check_invariants(s1)
        w.write_eof()
        assert await asyncio.wait_for(r.read(), 10) == b""
        await asyncio.wait_for(w.wait_closed(), 10)

        sizes = [1, 5000, 300_000]
        for n in sizes:
            await transfer(port, os.urandom(n), server.public_key)
        await quiet(server)
        s2 = await ascrape(url)
        total = 7000 + sum(sizes)
        conns = 1 + len(sizes)
        assert len(truth.conns) == len(truth.ended) == conns
        assert delta(s0, s2, "stcp_connections_opened_total") == conns
        assert delta(s0, s2, "stcp_connections_closed_total", reason="normal") == conns
        assert delta(s0, s2, "stcp_connections_closed_total") == conns
        assert s2.get("stcp_connections_active") == 0 and s2.get("stcp_handshakes_in_progress") == 0
        assert delta(s0, s2, "stcp_handshakes_completed_total") == conns
        assert delta(s0, s2, "stcp_handshakes_failed_total") == 0
        assert delta(s0, s2, "stcp_handshake_duration_seconds_count") == conns
        # the live connection's bytes were counted once, not again when it ended
        assert delta(s0, s2, "stcp_stream_bytes_total", direction="rx") == total
        assert delta(s0, s2, "stcp_stream_bytes_total", direction="tx") == truth.total("stream_bytes_sent")
        if truth.total("retransmitted_records") == 0:
            assert truth.total("stream_bytes_sent") == total
        for name, direction, field in (("stcp_records_total", "tx", "records_sent"),
                                       ("stcp_records_total", "rx", "records_received"),
                                       ("stcp_record_bytes_total", "tx", "bytes_sent"),
                                       ("stcp_record_bytes_total", "rx", "bytes_received"),
                                       ("stcp_key_updates_total", "tx", "key_updates_sent"),
                                       ("stcp_key_updates_total", "rx", "key_updates_received")):
            assert delta(s0, s2, name, direction=direction) == truth.total(field), (name, direction)
        assert delta(s0, s2, "stcp_record_bytes_total", direction="rx") > total      # headers and tags
        assert delta(s0, s2, "stcp_retransmitted_records_total") == truth.total("retransmitted_records")
        assert delta(s0, s2, "stcp_replays_discarded_total") == truth.total("duplicates_discarded")
        assert delta(s0, s2, "stcp_auth_failures_total") == 0
        rtt = sum(len(c.stats.rtt_samples) for c in truth.conns)
        assert rtt > 0 and delta(s0, s2, "stcp_rtt_seconds_count") == rtt
        assert delta(s0, s2, "stcp_rtt_seconds_sum") == pytest.approx(
            sum(sum(c.stats.rtt_samples) for c in truth.conns))
        assert s2.get("stcp_rtt_seconds_bucket", le="+Inf") == s2.get("stcp_rtt_seconds_count")
        check_invariants(s2)
        promtool_check(s2.text)

        # scraping again changes nothing: counters are read, not reset or re-added (except
        # that a client's last datagrams may still arrive for a connection the server forgot)
        s3 = await ascrape(url)
        straggler = ("stcp_endpoint_dropped_datagrams_total", frozenset({("reason", "unknown_cid")}))
        for key, v in s2.values.items():
            if key == straggler:
                assert s3.values[key] >= v
            elif key[0].startswith("stcp_"):
                assert s3.values[key] == v, key
    finally:
        metrics.close()
        server.close()
        await server.wait_closed()


# ---------------------------------------------------------------------------------------
class RawClient:
    """A sans-IO client Connection driven by hand over a UDP socket, so the test decides
    exactly which datagrams the server gets (duplicates, then silence)."""

    def __init__(self, port: int, server_key: bytes):
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.setblocking(False)
        self.sock.connect(("127.0.0.1", port))
        self.conn = Connection.client(stcp.make_config(keepalive=None, server_key=server_key), time.monotonic())
        self.sent: List[bytes] = []

    def flush(self) -> List[bytes]:
        out = self.conn.datagrams_to_send(time.monotonic())
        for d in out:
            self.sock.send(d)
        self.sent += out
        return out

    async def recv(self, timeout: float = 5.0) -> bytes:
        loop = asyncio.get_running_loop()
        data = await asyncio.wait_for(loop.sock_recv(self.sock, 65536), timeout)
        self.conn.receive_datagram(data, time.monotonic())
        return data

    def close(self):
        self.sock.close()


def udp_sender() -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    return s


def hello_record(version: int = wire.PROTOCOL_VERSION) -> bytes:
    h = wire.Hello(wire.HS_CLIENT_HELLO, version, wire.SUITE_AES_256_GCM, 0x1234, os.urandom(32))
    return wire.pack_header(wire.HANDSHAKE_PAYLOAD_LEN, 0, wire.HANDSHAKE_SEQ) + wire.encode_hello(h)


def test_close_reasons_errors_and_drops_are_exact():
    asyncio.run(_errors_exact())


async def _errors_exact():
    async def handler(reader, writer):
        if await reader.read(5) == b"abort":
            writer.abort("told to")

    cfg = stcp.make_config(idle_timeout=0.5, handshake_timeout=0.5, keepalive=None)
    server = await stcp.start_server(handler, "127.0.0.1", 0, config=cfg)
    port = server.sockets[0].getsockname()[1]
    addr = ("127.0.0.1", port)
    metrics = serve_metrics(server, "127.0.0.1:0", datapath="socket", cipher="aes-256-gcm")
    url = url_of(metrics)
    raw = udp_sender()
    try:
        s0 = await ascrape(url)

        # the client aborts: peer_close
        _r, w = await asyncio.wait_for(stcp.open_connection(*addr, server_key=server.public_key), 10)
        w.abort("bye")
        # the server's handler aborts: local_abort
        r, w = await asyncio.wait_for(stcp.open_connection(*addr, server_key=server.public_key), 10)
        w.write(b"abort")
        with pytest.raises(ConnectionTerminated):
            await asyncio.wait_for(r.read(), 10)
        # a forged record with the server's CID from the client's own address: auth_failure,
        # and the auth failure counter (from any other address it is only discarded, below)
        r, w = await asyncio.wait_for(stcp.open_connection(*addr, server_key=server.public_key), 10)
        server_cid = w.connection.peer_cid
        forged = wire.pack_header(32, server_cid, wire.make_seq(0, 1000)) + os.urandom(32)
        raw.sendto(forged, addr)
        await asyncio.sleep(0.05)
        w._handle.driver.sock.send(forged)
        with pytest.raises(ConnectionTerminated):
            await asyncio.wait_for(r.read(), 10)
        # a hand-driven client: handshake, one record sent twice, the hello again, then
        # silence: two replays discarded, then idle_timeout
        rc = RawClient(port, server.public_key)
        rc.flush()
        await rc.recv()
        assert rc.conn.state.name == "ENCRYPTED"
        first = rc.flush()
        assert first
        rc.sock.send(first[0])
        rc.sock.send(rc.sent[0])            # the client hello
        # a hello that is never followed up: handshake_timeout
        half = udp_sender()
        half.sendto(hello_record(), addr)
        # a hello with an unknown protocol version: rejected (no connection is created)
        raw.sendto(hello_record(version=99), addr)
        await quiet(server)

        async def all_counted():    # five connections closed, two handshakes failed
            s = await ascrape(url)
            done = delta(s0, s, "stcp_connections_closed_total") >= 5 and \
                delta(s0, s, "stcp_handshakes_failed_total") >= 2
            return s if done else None
        s1 = await await_until(all_counted, 5, "the closes and failed handshakes to be counted")
        rc.close()
        half.close()

        closed = {k: delta(s0, s1, "stcp_connections_closed_total", reason=k) for k in CLOSE_REASONS}
        assert {k: v for k, v in closed.items() if v} == {
            "peer_close": 1, "local_abort": 1, "auth_failure": 1, "idle_timeout": 1, "handshake_timeout": 1}
        failed = {k: delta(s0, s1, "stcp_handshakes_failed_total", reason=k) for k in HANDSHAKE_FAIL_REASONS}
        assert {k: v for k, v in failed.items() if v} == {"handshake_timeout": 1, "rejected": 1}
        assert delta(s0, s1, "stcp_connections_opened_total") == 5
        assert delta(s0, s1, "stcp_handshakes_started_total") == 6
        assert delta(s0, s1, "stcp_handshakes_completed_total") == 4
        assert delta(s0, s1, "stcp_auth_failures_total") == 1
        assert delta(s0, s1, "stcp_replays_discarded_total") == 2
        assert delta(s0, s1, "stcp_handshakes_rejected_total", reason="version") == 1
        assert s1.get("stcp_connections_active") == 0
        check_invariants(s1)

        # endpoint drops, with no connection left to send stragglers
        before = await ascrape(url)
        for _ in range(3):
            raw.sendto(b"\x00" * 10, addr)                                         # short
        for cid in (0xDEAD, 0xBEEF):       # unknown CID, longer than a RESET: answered with one
            raw.sendto(wire.pack_header(64, cid, wire.make_seq(0, 1)) + bytes(64), addr)
        bad = bytearray(hello_record())
        bad[wire.HEADER_LEN] = wire.HS_SERVER_HELLO                                # not a client hello
        raw.sendto(bytes(bad), addr)
        want = {"short": 3, "unknown_cid": 2, "bad_hello": 1, "over_capacity": 0, "cid_table_full": 0}
        ep = server.endpoint.stats
        base = {k: getattr(ep, f) for k, f in ENDPOINT_DROP_REASONS.items()}
        await await_until(lambda: all(getattr(ep, f) - base[k] >= want[k] for k, f in ENDPOINT_DROP_REASONS.items()),
                       5, "the endpoint to count the drops")
        after = await ascrape(url)
        got = {k: delta(before, after, "stcp_endpoint_dropped_datagrams_total", reason=k) for k in want}
        assert got == want
        # the two records for unknown CIDs were answered with stateless RESETs (or over budget)
        assert delta(before, after, "stcp_stateless_resets_sent_total") + \
            delta(before, after, "stcp_stateless_resets_rate_limited_total") == 2
        assert delta(before, after, "stcp_connections_opened_total") == 0
        promtool_check(after.text)
    finally:
        raw.close()
        metrics.close()
        server.close()
        await server.wait_closed()


def test_cookie_mode_is_counted():
    """Past its hello budget the server answers with COOKIEs; the clients come back with
    them and are served: both counted exactly (the cookie-mode alert and panel read these)."""
    asyncio.run(_cookie_mode())


async def _cookie_mode():
    cfg = stcp.make_config(hello_rate=0.001, hello_burst=1)
    server = await stcp.start_server(echo, "127.0.0.1", 0, config=cfg)
    port = server.sockets[0].getsockname()[1]
    metrics = serve_metrics(server, "127.0.0.1:0", datapath="socket", cipher="aes-256-gcm")
    try:
        s0 = await ascrape(url_of(metrics))
        for n in range(3):                       # the budget lets the first through
            await transfer(port, os.urandom(100 + n), server.public_key)
        await quiet(server)
        s1 = await ascrape(url_of(metrics))
        assert delta(s0, s1, "stcp_handshake_cookies_sent_total") == 2
        assert delta(s0, s1, "stcp_handshake_cookies_admitted_total") == 2
        assert delta(s0, s1, "stcp_handshakes_completed_total") == 3
        check_invariants(s1)
        promtool_check(s1.text)
    finally:
        metrics.close()
        server.close()
        await server.wait_closed()


def test_refusals_cookies_and_resets_are_exact():
    asyncio.run(_refusals_exact())


async def _refusals_exact():
    """An allow-list server with no hello budget (every hello is answered with a COOKIE
    first): a listed client gets in, an unlisted one and a keyless one are refused, each
    counted once by reason; a version-1 hello is a REJECT; a long record for an unknown
    connection gets a stateless RESET."""
    listed, stranger = stcp.generate_private_key(), stcp.generate_private_key()
    cfg = stcp.make_config(hello_rate=0, hello_burst=0)
    server = await stcp.start_server(echo, "127.0.0.1", 0, config=cfg, allowed_clients=[stcp.public_key(listed)])
    port = server.sockets[0].getsockname()[1]
    metrics = serve_metrics(server, "127.0.0.1:0", datapath="socket", cipher="aes-256-gcm")
    url = url_of(metrics)
    raw = udp_sender()
    try:
        s0 = await ascrape(url)
        conn = await transfer(port, b"in", server.public_key, client_key=listed)
        assert conn.peer_static_key == server.public_key
        for key in (stranger, None):
            r, _w = await asyncio.wait_for(stcp.open_connection("127.0.0.1", port, server_key=server.public_key,
                                                                client_key=key), 10)
            with pytest.raises(ConnectionTerminated) as info:
                await asyncio.wait_for(r.read(), 10)
            assert info.value.code == CloseCode.ACCESS_DENIED and info.value.by_peer
        raw.sendto(wire.pack_header(80, 0, 0) + bytes([wire.HS_CLIENT_HELLO, 1]) + bytes(78), ("127.0.0.1", port))
        raw.sendto(wire.pack_header(100, 0xFEED, wire.make_seq(0, 7)) + bytes(100), ("127.0.0.1", port))
        await quiet(server)

        async def counted():
            s = await ascrape(url)
            done = delta(s0, s, "stcp_handshakes_failed_total", reason="access_denied") == 2 and \
                delta(s0, s, "stcp_stateless_resets_sent_total") == 1
            return s if done else None
        s1 = await await_until(counted, 5, "the refusals and the reset to be counted")
        rejected = {k: delta(s0, s1, "stcp_handshakes_rejected_total", reason=k) for k in
                    ("version", "suite", "key", "busy", "client_not_allowed", "client_key_missing")}
        assert rejected == {"version": 1, "suite": 0, "key": 0, "busy": 0, "client_not_allowed": 1,
                            "client_key_missing": 1}
        assert delta(s0, s1, "stcp_handshakes_failed_total", reason="rejected") == 1
        assert delta(s0, s1, "stcp_connections_closed_total", reason="access_denied") == 2
        assert delta(s0, s1, "stcp_handshakes_completed_total") == 1
        # no hello budget: each of the three connections was answered with a COOKIE first
        assert delta(s0, s1, "stcp_handshake_cookies_sent_total") == 3
        assert delta(s0, s1, "stcp_handshake_cookies_admitted_total") == 3
        assert delta(s0, s1, "stcp_stateless_resets_rate_limited_total") == 0
        check_invariants(s1)
        promtool_check(s1.text)
    finally:
        raw.close()
        metrics.close()
        server.close()
        await server.wait_closed()


def test_server_shutdown_counts_local_abort_and_exporter_stops():
    asyncio.run(_shutdown())


async def _shutdown():
    server = await stcp.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    metrics = serve_metrics(server, "127.0.0.1:0", datapath="socket", cipher="chacha20-poly1305")
    url = url_of(metrics)
    try:
        r, w = await asyncio.wait_for(stcp.open_connection("127.0.0.1", port, server_key=server.public_key), 10)
        w.write(b"x")
        assert await asyncio.wait_for(r.readexactly(1), 10) == b"x"
        assert (await ascrape(url)).get("stcp_connections_active") == 1
        server.close()
        await server.wait_closed()
        s = await ascrape(url)
        assert s.get("stcp_connections_active") == 0
        assert s.get("stcp_connections_closed_total", reason="local_abort") == 1
        assert s.get("stcp_build_info", version=stcp.__version__, datapath="socket", cipher="chacha20-poly1305") == 1
    finally:
        metrics.close()
        server.close()
    with pytest.raises(OSError):
        scrape(url, timeout=1)


def test_fake_xdp_collector_shape():
    """Without root: the collector's families and labels from a fake reader (sums of the
    per-CPU values, one series per verdict, attached mode, run time)."""
    from prometheus_client import CollectorRegistry, generate_latest
    reg = CollectorRegistry()
    fake = FakeXdp(ncpu=3)
    reg.register(XdpCollector([("eth0", None), ("veth0", "ns1")], reader=fake))
    s = Scrape(generate_latest(reg).decode())
    assert fake.reads == {("eth0", None): 1, ("veth0", "ns1"): 1}
    n = 1
    for v in Verdict:
        assert s.get("stcp_xdp_packets_total", iface="eth0", netns="", verdict=v.key) == (int(v) + 1) * n * 6
        assert s.get("stcp_xdp_bytes_total", iface="veth0", netns="ns1", verdict=v.key) == (int(v) + 1) * n * 600
        assert s.get("stcp_xdp_cpu_packets_total", iface="eth0", netns="", cpu="2", verdict=v.key) == \
            (int(v) + 1) * n * 3
    assert s.get("stcp_xdp_attached", iface="eth0", netns="", mode="native") == 1
    assert s.get("stcp_xdp_live_cids", iface="veth0", netns="ns1") == 3
    assert s.get("stcp_xdp_runs_total", iface="eth0", netns="") == 10 * n
    assert s.label_names() <= ALLOWED_LABELS

    def broken(iface, netns):
        raise OSError(19, "No such device")
    reg = CollectorRegistry()
    reg.register(XdpCollector(["gone0"], reader=broken))
    s = Scrape(generate_latest(reg).decode())
    assert s.get("stcp_xdp_attached", iface="gone0", netns="", mode="none") == 0
    assert s.get("stcp_xdp_read_errors_total") == 1
    assert s.sum("stcp_xdp_packets_total") == 0
    promtool_check(s.text)


# ---------------------------------------------------------------------------------------
# dashboards, provisioning, Prometheus config
async def _exporter_families() -> Tuple[Set[str], str]:
    """Family names of a server exporter (with traffic) plus a fake datapath collector and the
    socket pool's steering collector, and of an AF_XDP worker pool's supervisor
    (tests/test_metrics_workers.py's in-process pool)."""
    import tempfile
    server = await stcp.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    metrics = serve_metrics(server, "127.0.0.1:0", datapath="socket", cipher="aes-256-gcm")
    metrics.registry.register(fake_xdp_collector())
    metrics.registry.register(ReuseportCollector(lambda: None))     # a socket pool's supervisor, before loading
    try:
        await transfer(port, b"hello", server.public_key)
        await quiet(server)
        s = await ascrape(url_of(metrics))
        with tempfile.TemporaryDirectory() as d:
            exporter, pool = await fake_pool_with_traffic(d)
            try:
                p = await ascrape(exporter.http.url)
            finally:
                close_pool(exporter, pool)
        return s.family_names() | p.family_names(), s.text + p.text
    finally:
        metrics.close()
        server.close()
        await server.wait_closed()


def test_dashboard_json_is_valid_and_every_metric_exists():
    dash = load_dashboard()
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    panels = dashboard_panels(dash)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = {v["name"] for v in dash["templating"]["list"]}
    assert {"datasource", "instance", "iface"} <= variables
    titles = " ".join(p["title"].lower() for p in panels)
    for topic in ("throughput", "handshake", "connections", "errors", "verdicts", "drop", "cpu", "worker",
                  "restarts"):
        assert topic in titles, f"no panel about {topic}"
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["type"] in {"timeseries", "stat", "table", "gauge", "bargauge", "heatmap"}, p["type"]
        assert p["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        refs = [t["refId"] for t in p["targets"]]
        assert p["targets"] and len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].count("(") == t["expr"].count(")"), t["expr"]
            for var in re.findall(r"\$\{?([A-Za-z_]\w*)", t["expr"]):
                assert var in variables or var.startswith("__"), f"undefined variable ${var} in {t['expr']}"

    families, _ = asyncio.run(_exporter_families())
    queries = dashboard_queries(dash) + alert_queries()
    used = set().union(*(metric_names(q) for q in queries))
    assert used, "no stcp_ metric found in the dashboard"
    missing = {n for n in used if family_of(n, families) not in families}
    assert not missing, f"queried but not exported: {sorted(missing)}"
    assert {n for n in used if n.startswith("stcp_worker_")} <= set(WORKER_METRICS)
    assert {n for n in used if n.startswith("stcp_worker_")} >= set(WORKER_METRICS) - {"stcp_worker_read_errors_total"}
    # and the other way round: the main families all appear somewhere on the dashboard
    shown = {family_of(n, families) for n in used}
    for fam in ("stcp_connections_closed", "stcp_handshake_duration_seconds", "stcp_xdp_packets",
                "stcp_xdp_cpu_packets", "stcp_endpoint_dropped_datagrams", "stcp_auth_failures",
                "stcp_replays_discarded", "stcp_rtt_seconds", "stcp_build_info", "stcp_xdp_attached",
                "stcp_handshake_cookies_sent", "stcp_handshake_cookies_admitted", "stcp_handshakes_rejected",
                "stcp_stateless_resets_sent", "stcp_stateless_resets_rate_limited",
                "stcp_connections_shed", "stcp_memory_used_bytes", "stcp_memory_budget_bytes",
                "stcp_records_discarded"):
        assert fam in shown, f"{fam} is on no dashboard panel"


def test_provisioning_and_scrape_config():
    yaml = pytest.importorskip("yaml")
    prov = yaml.safe_load((DASHBOARDS / "provisioning/dashboards/stcp.yaml").read_text())
    assert prov["apiVersion"] == 1 and prov["providers"][0]["type"] == "file"
    assert prov["providers"][0]["options"]["path"]
    ds = yaml.safe_load((DASHBOARDS / "provisioning/datasources/prometheus.yaml").read_text())
    assert ds["apiVersion"] == 1 and ds["datasources"][0]["type"] == "prometheus"
    prom = yaml.safe_load((DASHBOARDS / "prometheus.yml").read_text())
    targets = {t for job in prom["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]}
    assert targets == {"127.0.0.1:9400", "127.0.0.1:9401"}
    if shutil.which("promtool"):
        for args in (["check", "config", str(DASHBOARDS / "prometheus.yml")],
                     ["check", "rules", str(DASHBOARDS / "stcp-alerts.yml")],
                     ["test", "rules", str(DASHBOARDS / "stcp-alerts.test.yml")]):   # the alerts fire when they should
            r = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=30)
            assert r.returncode == 0, r.stdout + r.stderr


# ---------------------------------------------------------------------------------------
# a real Prometheus
def test_real_prometheus_scrapes_and_dashboard_queries_evaluate(tmp_path):
    require_prometheus()
    asyncio.run(_with_prometheus(tmp_path))


async def _with_prometheus(tmp_path: Path):
    loop = asyncio.get_running_loop()
    server = await stcp.start_server(echo, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    metrics = serve_metrics(server, "127.0.0.1:0", datapath="socket", cipher="aes-256-gcm")
    # the loader's role is played by a datapath exporter with a fake reader (the real one
    # needs root and is tested in test_metrics_xdp.py)
    from prometheus_client import CollectorRegistry
    reg = CollectorRegistry()
    reg.register(fake_xdp_collector())
    loader = MetricsHTTPServer(reg, "127.0.0.1:0")
    # an AF_XDP worker pool's supervisor, with in-process workers
    (tmp_path / "workers").mkdir()
    workers, pool = await fake_pool_with_traffic(str(tmp_path / "workers"))
    workers.registry.register(fake_steering_collector())    # as a socket pool's supervisor exports it
    prom = None
    try:
        for n in (10, 20000):
            await transfer(port, os.urandom(n), server.public_key)
        await quiet(server)
        text = (await ascrape(url_of(metrics))).text
        promtool_check(text)
        promtool_check((await ascrape(workers.http.url)).text)

        targets = {"stcp-server": f"127.0.0.1:{metrics.address[1]}", "stcp-loader": f"127.0.0.1:{loader.address[1]}",
                   "stcp-workers": f"127.0.0.1:{workers.address[1]}"}
        prom = await loop.run_in_executor(None, Prometheus.start, tmp_path, targets)
        base = prom.base

        def have(expr: str, count: int = 1) -> bool:
            r = prom_query(base, expr)
            return r.get("status") == "success" and len(r["data"]["result"]) >= count

        deadline = time.monotonic() + 20
        # at least 3 scrapes of both targets, so rate() over 10s has points
        want = 'count_over_time(up{job=~"stcp-.*"}[1m]) >= 3'
        while not (await loop.run_in_executor(None, have, want, 3)):
            assert time.monotonic() < deadline, "prometheus did not scrape every target 3 times: " + \
                json.dumps(prom_query(base, 'up'))
            await asyncio.sleep(0.2)

        r = await loop.run_in_executor(None, prom_query, base, 'stcp_connections_opened_total{job="stcp-server"}')
        assert r["status"] == "success"
        [series] = r["data"]["result"]
        assert series["metric"]["job"] == "stcp-server" and float(series["value"][1]) == 2
        r = await loop.run_in_executor(None, prom_query, base, '{__name__=~"stcp_.*"}')
        names = {s["metric"]["__name__"] for s in r["data"]["result"]}
        assert {"stcp_build_info", "stcp_stream_bytes_total", "stcp_xdp_packets_total"} <= names

        dash = load_dashboard()
        for expr in dashboard_queries(dash):
            promql = grafana_to_promql(expr, "10s")
            r = await loop.run_in_executor(None, prom_query, base, promql)
            assert r.get("status") == "success", f"{expr!r} -> {r}"
            if "> 0" in promql:
                continue                           # filtered-out zeros
            assert r["data"]["result"], f"dashboard query returns no data: {promql}"
            if "stcp_worker_" in promql:           # every worker's series, from the pool's exporter
                assert {s["metric"].get("worker") for s in r["data"]["result"]} == {"0", "1"}, promql
        for expr in alert_queries():               # the alert rules parse and evaluate
            r = await loop.run_in_executor(None, prom_query, base, expr)
            assert r.get("status") == "success", f"{expr!r} -> {r}"
        # the worker panels show what the workers did
        r = await loop.run_in_executor(None, prom_query, base,
                                       'sum(stcp_worker_connections_accepted_total{job="stcp-workers"})')
        assert float(r["data"]["result"][0]["value"][1]) == 2
        r = await loop.run_in_executor(None, prom_query, base, 'min(stcp_worker_up{job="stcp-workers"})')
        assert float(r["data"]["result"][0]["value"][1]) == 1
    finally:
        if prom is not None:
            prom.close()
        loader.close()
        close_pool(workers, pool)
        metrics.close()
        server.close()
        await server.wait_closed()
