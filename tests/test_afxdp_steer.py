"""Connection-ID steering of the afxdp XDP program (bpf/stcp_xdp.c, steer()).

The program runs under BPF_PROG_TEST_RUN with an xdp_md context that names a real device
and RX queue (ingress_ifindex, rx_queue_index: the kernel checks the queue exists and
gives the program that queue index), so every (workers, arrival queue, CID worker)
combination is checked against the rule in docs/OPERATIONS.md section 6: a client hello
goes to its arrival queue's socket; a data record for a live CID goes there only if the
worker named by the CID's top 8 bits owns the queue (queue % workers), and is dropped and
counted as drop_wrong_worker otherwise; an unknown CID stays drop_unknown_cid whatever
its worker bits say.

Then end to end: `stcp serve --datapath afxdp --workers 2` over a 2-queue veth, many
connections; every connection's CID names the worker that created it and received its
records; and a crafted data record for a live connection of worker 1, transmitted (AF_XDP
on the client side) so that it arrives on queue 0, is counted as drop_wrong_worker and
never reaches either worker.

Needs root, bcc, kernel headers and stcp._xsk; skips with the reason otherwise.
"""
from __future__ import annotations

import ctypes
import os
import re
import socket
import subprocess
import time

import pytest

from stcp import wire
from tests.support.netns import in_ns, veth_pair
from tests.support.packets import data_record, hello, udp_frame
from tests.support.poll import wait_until
from tests.support.procs import AFXDP_PORT, WORKER_RE, client_results, clients, read_all, serve_workers, stop
from tests.support.testrun import XDP_DROP, XDP_REDIRECT, Opts

try:
    from stcp import _xsk
except ImportError:          # every test here is marked afxdp and skips
    _xsk = None

PORT = AFXDP_PORT
pytestmark = [pytest.mark.root, pytest.mark.afxdp]

QUEUES = 4
MAC = "02:00:00:00:00:01"


def cid_of(worker: int, low: int) -> int:
    return (worker << wire.CID_WORKER_SHIFT) | low


class _XdpMd(ctypes.Structure):         # struct xdp_md (UAPI)
    _fields_ = [("data", ctypes.c_uint32), ("data_end", ctypes.c_uint32), ("data_meta", ctypes.c_uint32),
                ("ingress_ifindex", ctypes.c_uint32), ("rx_queue_index", ctypes.c_uint32),
                ("egress_ifindex", ctypes.c_uint32)]


class Prog:
    """The afxdp program variant, loaded (not attached), run on crafted frames."""

    def __init__(self, ns: str, ifname: str):
        from stcp.datapath import bpf, xdp_prog
        from stcp.datapath.xdp import XdpDatapath
        self.xdp = xdp_prog
        self.ns = ns
        self.b, fn = xdp_prog.compile_prog(afxdp=True)
        self.h = xdp_prog.open_prog(bpf.prog_info(fn.fd)["id"])
        self.dp = XdpDatapath("test", 0, "none", self.h, False, None, None)   # for add_cid on these maps
        with in_ns(ns):
            self.ifindex = socket.if_nametoindex(ifname)
            # a socket on every queue, so a delivered record shows as XDP_REDIRECT
            self.xsks = [_xsk.XskSocket(ifname, q, frame_count=64, ring_size=64) for q in range(QUEUES)]
        from stcp.datapath.afxdp import find_xskmap
        mfd = find_xskmap(self.dp)
        try:
            for q, x in enumerate(self.xsks):
                bpf.map_update(mfd, q.to_bytes(4, "little"), x.fileno().to_bytes(4, "little"))
        finally:
            os.close(mfd)
        self.lib = bpf.libbpf()
        self.lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.POINTER(Opts)]
        self.configure(0)

    def configure(self, nworkers: int) -> None:
        x = self.xdp
        x.write_config(self.h, PORT, x.DEFAULT_MAX_RECORD_LEN, 1_000_000, 1_000_000, nworkers)

    def run(self, frame: bytes, queue: int) -> tuple:
        """(XDP action, the verdict whose counter moved) for frame arriving on queue."""
        before = self.xdp.read_counters(self.h)
        buf = ctypes.create_string_buffer(frame, len(frame))
        out = ctypes.create_string_buffer(len(frame) + 256)
        md = _XdpMd(data=0, data_end=len(frame), ingress_ifindex=self.ifindex, rx_queue_index=queue)
        o = Opts(sz=ctypes.sizeof(Opts), data_in=ctypes.addressof(buf), data_size_in=len(frame),
                  data_out=ctypes.addressof(out), data_size_out=len(out), ctx_in=ctypes.addressof(md),
                  ctx_size_in=ctypes.sizeof(md), repeat=1)
        with in_ns(self.ns):              # ingress_ifindex is looked up in the caller's namespace
            rc = self.lib.bpf_prog_test_run_opts(self.h.prog_fd, ctypes.byref(o))
        assert rc == 0, f"BPF_PROG_TEST_RUN failed: {os.strerror(-rc if rc < 0 else ctypes.get_errno())}"
        after = self.xdp.read_counters(self.h)
        moved = [k for k in after if after[k][0] != before[k][0]]
        assert len(moved) == 1, moved
        return o.retval, moved[0]

    def close(self) -> None:
        for x in self.xsks:
            x.close()
        self.dp.close()
        self.xdp.release_bcc(self.b)


@pytest.fixture(scope="module")
def prog(afxdp_toolchain):
    with veth_pair(queues=QUEUES) as (a, _b):
        p = Prog(a.ns, a.ifname)
        try:
            yield p
        finally:
            p.close()


def _frame(payload: bytes, fam: int = 4) -> bytes:
    src, dst = ("10.0.0.2", "10.0.0.1") if fam == 4 else ("fd00::2", "fd00::1")
    return udp_frame(MAC, MAC, src, dst, 40000, PORT, payload)


LIVE = {w: cid_of(w, 0x00A1B2C3D4E5F6 + w) for w in range(4)}


@pytest.mark.root
@pytest.mark.parametrize("nworkers", [1, 2, 3])
def test_data_record_goes_only_to_its_workers_queues(prog, nworkers):
    """Every arrival queue x every CID worker: redirect iff queue % nworkers == worker."""
    prog.configure(nworkers)
    for cid in LIVE.values():
        prog.dp.add_cid(cid)
    try:
        seen = {}
        for q in range(QUEUES):
            for w, cid in LIVE.items():
                got = prog.run(_frame(data_record(cid)), q)
                want = (XDP_REDIRECT, "pass_data") if q % nworkers == w else (XDP_DROP, "drop_wrong_worker")
                assert got == want, f"{nworkers} workers, queue {q}, CID of worker {w}: {got}, expected {want}"
                seen[(q, w)] = got[1]
        # IPv6 takes the same path
        assert prog.run(_frame(data_record(LIVE[1]), 6), 1 % QUEUES)[1] == \
            ("pass_data" if 1 % nworkers == 1 else "drop_wrong_worker")
        print(f"{nworkers} worker(s): {sum(v == 'pass_data' for v in seen.values())} of {len(seen)} "
              f"(queue, CID worker) pairs delivered")
    finally:
        for cid in LIVE.values():
            prog.dp.remove_cid(cid)


@pytest.mark.root
def test_hello_goes_to_its_arrival_queue(prog):
    """A client hello (CID 0) is not steered: every queue's worker takes the hellos it gets."""
    prog.configure(2)
    for q in range(QUEUES):
        assert prog.run(_frame(hello()), q) == (XDP_REDIRECT, "pass_handshake")


@pytest.mark.root
def test_unknown_cid_is_not_wrong_worker(prog):
    """The CID table comes first: a CID nobody owns is unknown_cid, whatever its top bits."""
    prog.configure(2)
    for q in range(QUEUES):
        assert prog.run(_frame(data_record(cid_of(1, 0xDEAD))), q) == (XDP_DROP, "drop_unknown_cid")


@pytest.mark.root
def test_nworkers_zero_does_not_steer(prog):
    """nworkers 0 in stcp_config (not configured): every live CID goes to its arrival queue."""
    prog.configure(0)
    prog.dp.add_cid(LIVE[3])
    try:
        for q in range(QUEUES):
            assert prog.run(_frame(data_record(LIVE[3])), q) == (XDP_REDIRECT, "pass_data")
    finally:
        prog.dp.remove_cid(LIVE[3])


# ---------------------------------------------------------------------------------------
# end to end: `stcp serve --datapath afxdp --workers 2` over a 2-queue veth
def _client_ports(b, server_ip: str) -> list:
    """The source ports of the UDP sockets in b's namespace connected to the server."""
    out = subprocess.run(["ip", "netns", "exec", b.ns, "ss", "-Hun", "dst", f"{server_ip}:{PORT}"],
                         capture_output=True, text=True, check=True).stdout
    return sorted({int(line.split()[-2].rsplit(":", 1)[1]) for line in out.splitlines() if line.strip()})


@pytest.mark.root
@pytest.mark.slow
def test_workers_own_the_connections_their_cids_name(veth):
    """16 connections, 2 workers: every CID names the worker that created its connection
    (the kernel table's per-worker tags) and that worker received all its records (per-worker
    connection counts, nothing for unknown CIDs, no record of an honest connection dropped as
    wrong_worker over 16 transfers). A crafted data record for a live CID of worker 1, sent
    into queue 0 (worker 0's), is counted as drop_wrong_worker and reaches nobody: worker 1's
    connection lives on, where the same record sent into queue 1 from the victim client's
    address reaches worker 1 and, failing authentication, ends that connection."""
    from stcp.datapath.afxdp import worker_tag
    from stcp.datapath.xdp import XdpDatapath
    n_clients, size, crafted = 16, 256 << 10, 20
    a, b = veth(queues=2)
    server, _pids = serve_workers(a, 2)
    dp = None
    tx = {}
    try:
        procs = clients(b, f"{a.ip4}:{PORT}", n_clients)
        outs, readers = read_all(procs)
        dp = XdpDatapath.open(a.ifname, netns=a.ns)          # the supervisor's program, read-only use
        assert dp.config["nworkers"] == 2, dp.config
        wait_until(lambda: len(dp.cids()) == n_clients, 60, f"{n_clients} live CIDs")
        owner = {}                                          # cid -> worker that added it
        for w in (0, 1):
            for cid in dp.cids_tagged(worker_tag(w)):
                owner[cid] = w
        assert len(owner) == n_clients, owner
        wrong = {hex(c): w for c, w in owner.items() if c >> wire.CID_WORKER_SHIFT != w}
        assert not wrong, f"CIDs whose worker bits are not their owner: {wrong}"
        per_worker = {w: sum(1 for v in owner.values() if v == w) for w in (0, 1)}
        assert all(per_worker.values()), f"one worker got every connection: {per_worker}"

        # a crafted record for one of worker 1's live connections, into queue 0
        victim = next(c for c, w in owner.items() if w == 1)
        rec = data_record(victim, 48, seq=0xFFFF_0000)       # far ahead: not a replay
        frame = udp_frame(b.mac, a.mac, b.ip4, a.ip4, 40999, PORT, rec)
        with in_ns(b.ns):
            tx = {q: _xsk.XskSocket(b.ifname, q, frame_count=1024, ring_size=256) for q in (0, 1)}
        before = dp.counters()
        assert tx[0].send([frame] * crafted) == crafted
        wait_until(lambda: dp.counters()["drop_wrong_worker"][0] - before["drop_wrong_worker"][0] >= crafted, 10,
              "drop_wrong_worker to count the crafted records")
        time.sleep(1.0)
        assert dp.counters()["drop_wrong_worker"][0] - before["drop_wrong_worker"][0] == crafted
        assert dp.has_cid(victim), "the crafted records reached worker 1's connection"
        # the control: the same record into queue 1 reaches worker 1, and from the victim's
        # own client address (PROTOCOL.md 10.2: from any other it is only discarded) kills the
        # connection. Which client is the victim is not known here: the record is sent from
        # every client's address, and only the victim's peer address is fatal.
        before = dp.counters()
        controls = [udp_frame(b.mac, a.mac, b.ip4, a.ip4, port, PORT, rec) for port in _client_ports(b, a.ip4)]
        assert len(controls) == n_clients, controls
        assert tx[1].send(controls) == n_clients
        wait_until(lambda: not dp.has_cid(victim), 10, "the control record to end its connection")
        assert dp.counters()["drop_wrong_worker"][0] == before["drop_wrong_worker"][0]
        wrong_before_transfers = dp.counters()["drop_wrong_worker"][0]

        datas = [os.urandom(size) for _ in range(n_clients)]
        for p, d in zip(procs, datas, strict=True):
            try:
                p.stdin.write(d)
                p.stdin.close()
            except BrokenPipeError:                          # the control's client is gone
                pass
        for t in readers:
            t.join(timeout=120)
        ok, failed = client_results(procs, datas, outs)
        assert (ok, len(failed)) == (n_clients - 1, 1), (ok, failed)
        # no honest record arrived on a queue its CID's worker does not own
        assert dp.counters()["drop_wrong_worker"][0] == wrong_before_transfers
    finally:
        for x in tx.values():
            x.close()
        if dp is not None:
            dp.close()
        err = stop(server)
    assert server.returncode == 0, err
    per = {int(m.group(1)): m.groups()[1:] for m in WORKER_RE.finditer(err)}
    assert set(per) == {0, 1}, err
    conns = {w: int(v[2]) for w, v in per.items()}
    assert conns == per_worker, (conns, per_worker, err)   # each worker: exactly the CIDs it named
    assert all(int(v[1]) == 0 for v in per.values()), err   # nothing through the UDP sockets
    assert all(int(v[3]) <= 16 for v in per.values()), err  # late records after a close only
    qs = {int(m.group(1)): m.group(2) for m in
          re.finditer(r"\[worker (\d+)\] AF_XDP: \d+ datagrams received through AF_XDP \([^;]*; ([^)]*)\)", err)}
    assert qs.get(0, "").startswith("queue 0:") and qs.get(1, "").startswith("queue 1:"), qs
    print(f"connections per worker: {conns}; {crafted} crafted records for worker 1 on queue 0 dropped "
          f"as wrong_worker")
