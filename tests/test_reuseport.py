"""SO_REUSEPORT steering by connection ID (stcp/datapath/reuseport_prog.py, stcp/datapath/reuseport.py).

Worker processes (tests/reuseport_worker.py) each bind a SO_REUSEPORT UDP socket on one
loopback port and join the steering with the fds they inherited, as a socket pool's
workers would. A client sends records whose CID names a worker and client hellos from
many source ports: every record must reach its worker and only it, hellos spread over all
workers, and a dead worker's records go by the kernel's hash to the live ones, counted,
while the others carry on.

Loading needs CAP_BPF and libbpf; the tests skip with the reason otherwise.
"""
from __future__ import annotations

import json
import os
import random
import select
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

from stcp.datapath.reuseport import (
    MAX_WORKERS,
    ReuseportError,
    ReuseportSteering,
    ReuseportVerdict,
    classify,
    socket_cookie,
)
from tests.support.procs import as_nobody, nobody_unavailable

ROOT = Path(__file__).resolve().parent.parent
HOSTS = {4: "127.0.0.1", 6: "::1"}
_load_error: List[str] = []


@pytest.fixture(scope="module")
def steering():
    """One program and map for the module; tests compare
    counters before and after and use their own ports."""
    if _load_error:
        pytest.skip(_load_error[0])
    try:
        s = ReuseportSteering.load()
    except ReuseportError as e:
        _load_error.append(f"reuseport steering unavailable: {e}")
        pytest.skip(_load_error[0])
    yield s
    s.close()


def free_port(family: int) -> int:
    with socket.socket(socket.AF_INET6 if family == 6 else socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind((HOSTS[family], 0))
        return s.getsockname()[1]


def record(worker: int, size: int = 40) -> bytes:
    """A data record (seq != 0) whose CID names worker."""
    cid = (worker << 56) | random.getrandbits(56) | 1
    body = os.urandom(size - 24)
    return struct.pack("!QQQ", len(body), cid, random.getrandbits(48) + 1) + body


HELLO = struct.pack("!QQQ", 80, 0, 0) + bytes(80)


def delta(before: Dict[str, tuple], after: Dict[str, tuple]) -> Dict[str, int]:
    return {k: after[k][0] - before[k][0] for k in after}


def counted(steering: ReuseportSteering, before: Dict[str, tuple], n: int) -> Dict[str, int]:
    """The counter deltas once n datagrams have been through the program: loopback usually
    delivers inside sendto, but a busy CPU leaves the rest to ksoftirqd."""
    deadline = time.monotonic() + 10
    while True:
        d = delta(before, steering.counters())
        if sum(d.values()) >= n or time.monotonic() > deadline:
            return d
        time.sleep(0.01)


class Worker:
    """A worker process: joined at key `worker` once started."""

    def __init__(self, steering: ReuseportSteering, worker: int, host: str, port: int, user: List[str] = ()):
        fds = steering.fds()
        self.worker = worker
        self.proc = subprocess.Popen(
            [*user, sys.executable, "-m", "tests.reuseport_worker", *map(str, fds), str(worker), host, str(port)],
            cwd=ROOT, pass_fds=fds, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("ready"):
            self.proc.kill()
            raise AssertionError(f"worker {worker} did not start: {line!r} {self.proc.stderr.read()[-2000:]}")
        self.cookie = int(line.split()[1])

    def finish(self) -> dict:
        """Stop it; what reached it."""
        out, err = self.proc.communicate("", timeout=60)
        assert self.proc.returncode == 0, err[-2000:]
        return json.loads(out.strip().splitlines()[-1])

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


def wait_empty(steering: ReuseportSteering, worker: int) -> None:
    """The kernel empties a closed socket's key when the process's fds are gone."""
    deadline = time.monotonic() + 10
    while steering.cookie(worker) is not None:
        assert time.monotonic() < deadline, f"worker {worker}'s key kept its socket after it died"
        time.sleep(0.01)


def clients(family: int, n: int) -> List[socket.socket]:
    """n client sockets, each its own source port (so its own 4-tuple hash)."""
    af = socket.AF_INET6 if family == 6 else socket.AF_INET
    out = []
    for _ in range(n):
        s = socket.socket(af, socket.SOCK_DGRAM)
        s.bind((HOSTS[family], 0))
        out.append(s)
    return out


def send_all(socks: List[socket.socket], datagrams: List[bytes], dest) -> None:
    for i, d in enumerate(datagrams):
        socks[i % len(socks)].sendto(d, dest)


# ---------------------------------------------------------------------------------------
@pytest.mark.root
@pytest.mark.parametrize("family", [4, 6])
def test_records_reach_their_worker_and_hellos_spread(steering, family):
    n, port = 4, free_port(family)
    host = HOSTS[family]
    workers = [Worker(steering, w, host, port) for w in range(n)]
    try:
        assert steering.workers() == {w.worker: w.cookie for w in workers}
        socks = clients(family, 256)
        recs = [record(random.randrange(n), random.choice((40, 200, 1200))) for _ in range(4000)]
        before = steering.counters()
        send_all(socks, recs, (host, port))
        send_all(socks, [HELLO] * 1024, (host, port))
        d = counted(steering, before, 5024)
        got = [w.finish() for w in workers]
    finally:
        for w in workers:
            w.kill()
    sent = {w: sum(1 for r in recs if r[8] == w) for w in range(n)}
    for w, g in enumerate(got):
        assert g["records"] == {str(w): sent[w]}, f"worker {w} got records of other workers or lost some"
    hellos = [g["hellos"] for g in got]
    assert sum(hellos) == 1024 and min(hellos) > 0, f"hellos over the workers: {hellos}"
    assert d["pass_worker"] == 4000 and d["pass_hello"] == 1024
    assert d["pass_orphan"] == d["drop_wrong_group"] == d["pass_not_stcp"] == 0
    assert steering.counters()["pass_worker"][1] - before["pass_worker"][1] == sum(8 + len(r) for r in recs)


@pytest.mark.root
def test_worker_restart_keeps_the_others(steering):
    port = free_port(4)
    dest = ("127.0.0.1", port)
    workers = {w: Worker(steering, w, dest[0], port) for w in range(3)}
    socks = clients(4, 64)
    reports: List[dict] = []
    try:
        old = workers[1]
        old.kill()                          # worker 1 dies: its socket closes with it
        wait_empty(steering, 1)
        assert set(steering.workers()) == {0, 2}
        before = steering.counters()
        recs = [record(w) for w in (0, 1, 2) for _ in range(300)]
        random.shuffle(recs)
        send_all(socks, recs, dest)
        send_all(socks, [HELLO] * 256, dest)
        d = counted(steering, before, 1156)
        assert d["pass_orphan"] == 300, "records of the dead worker go to the live ones, counted"
        assert d["pass_worker"] == 600 and d["pass_hello"] == 256

        workers[1] = Worker(steering, 1, dest[0], port)       # the supervisor restarts it
        assert workers[1].cookie != old.cookie and steering.cookie(1) == workers[1].cookie
        before = steering.counters()
        recs2 = [record(w) for w in (0, 1, 2) for _ in range(200)]
        send_all(socks, recs2, dest)
        d = counted(steering, before, 600)
        assert d["pass_worker"] == 600 and d["pass_orphan"] == 0
        reports = [workers[w].finish() for w in (0, 1, 2)]
    finally:
        for w in workers.values():
            w.kill()
    orphans = [reports[w]["records"].pop("1", 0) for w in (0, 2)]
    assert sum(orphans) == 300 and min(orphans) > 0, f"the dead worker's records by hash over the others: {orphans}"
    assert reports[0]["records"] == {"0": 500} and reports[2]["records"] == {"2": 500}
    assert reports[1]["records"] == {"1": 200}, "the restarted worker gets its key's records, only those"
    assert reports[0]["hellos"] + reports[2]["hellos"] == 256 and reports[1]["hellos"] == 0


@pytest.mark.root
def test_every_worker_restarts(steering):
    """All workers dead: the group and its program are gone with the last socket. The new
    workers form a new group, and join() attaches the program to it again."""
    port = free_port(4)
    dest = ("127.0.0.1", port)
    for w in [Worker(steering, w, dest[0], port) for w in range(2)]:
        w.kill()
    wait_empty(steering, 0)
    wait_empty(steering, 1)
    workers = [Worker(steering, w, dest[0], port) for w in range(2)]
    try:
        before = steering.counters()
        recs = [record(w) for w in (0, 1) for _ in range(200)]
        send_all(clients(4, 32), recs, dest)
        d = counted(steering, before, 400)
        got = [w.finish() for w in workers]
    finally:
        for w in workers:
            w.kill()
    assert d["pass_worker"] == 400
    assert got[0]["records"] == {"0": 200} and got[1]["records"] == {"1": 200}


@pytest.mark.root
@pytest.mark.parametrize("family", [4, 6])
def test_program_matches_python_reference(steering, family):
    """Each crafted datagram bumps the counter classify() predicts (PASS_WORKER turning
    into PASS_ORPHAN where the key is empty) and reaches the socket it says."""
    port = free_port(family)
    host = HOSTS[family]
    af = socket.AF_INET6 if family == 6 else socket.AF_INET
    live = {0, 1, 2}
    socks = {}
    for w in sorted(live):
        s = socket.socket(af, socket.SOCK_DGRAM)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind((host, port))
        s.setblocking(False)
        steering.join(w, s)
        socks[w] = s
    client = clients(family, 1)[0]
    cases = [b"", b"x", bytes(23), bytes(24), HELLO, struct.pack("!QQQ", 0, 0, 1) + bytes(16),
             struct.pack("!QQQ", 0, 2 << 56, 0), struct.pack("!QQQ", 0, 0xFF << 56, 5), record(7), record(1),
             record(2, 24), record(0, 1400)] + [os.urandom(random.randrange(0, 64)) for _ in range(40)]
    try:
        for payload in cases:
            verdict, w = classify(payload)
            if verdict == ReuseportVerdict.PASS_WORKER and w not in live:
                verdict = ReuseportVerdict.PASS_ORPHAN
            before = steering.counters()
            client.sendto(payload, (host, port))
            d = counted(steering, before, 1)
            assert d == {v.key: int(v == verdict) for v in ReuseportVerdict}, (payload[:24].hex(), verdict)
            if not verdict.is_drop:
                select.select(list(socks.values()), [], [], 5)
            arrived = {}
            for k, s in socks.items():
                try:
                    arrived[k] = s.recv(65536)
                except BlockingIOError:
                    pass
            if verdict.is_drop:
                assert arrived == {}
            elif verdict == ReuseportVerdict.PASS_WORKER:
                assert arrived == {w: payload}
            else:
                assert list(arrived.values()) == [payload]
    finally:
        for s in socks.values():
            s.close()


@pytest.mark.root
def test_socket_of_another_group_is_not_selected(steering):
    port = free_port(4)
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    other = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s, p in ((a, port), (other, 0)):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        s.bind(("127.0.0.1", p))
        s.setblocking(False)
    try:
        steering.join(0, a)
        steering.insert(1, other)           # a mistake: bound to another port
        before = steering.counters()
        clients(4, 1)[0].sendto(record(1), ("127.0.0.1", port))
        assert counted(steering, before, 1)["drop_wrong_group"] == 1
        for s in (a, other):
            with pytest.raises(BlockingIOError):
                s.recv(100)
    finally:
        a.close()
        other.close()


@pytest.mark.root
def test_map_api(steering):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    with pytest.raises(ReuseportError, match="bound UDP socket"):
        steering.join(5, s)                 # not bound yet
    s.bind(("127.0.0.1", 0))
    steering.join(MAX_WORKERS - 1, s)
    assert steering.cookie(MAX_WORKERS - 1) == socket_cookie(s)
    assert steering.remove(MAX_WORKERS - 1) and not steering.remove(MAX_WORKERS - 1)
    assert steering.cookie(MAX_WORKERS - 1) is None
    with pytest.raises(ReuseportError, match="outside 0..255"):
        steering.insert(MAX_WORKERS, s)
    with pytest.raises(ReuseportError, match="not a reuseport steering"):
        ReuseportSteering.from_fds(steering.counters_fd, steering.sockarray_fd, steering.prog_fd)
    s.close()


# ---------------------------------------------------------------------------------------
LOAD = ("from stcp.datapath.reuseport import ReuseportSteering, ReuseportError\n"
        "try:\n    ReuseportSteering.load()\n    print('loaded')\n"
        "except ReuseportError as e:\n    print(e)\n")


@pytest.mark.root
def test_privileges(steering):
    """Loading needs CAP_BPF, nothing else; a worker with the fds needs no capability."""
    why = nobody_unavailable()
    if why:
        pytest.skip(why)
    no_caps = subprocess.run([*as_nobody("-all"), sys.executable, "-c", LOAD], cwd=ROOT, capture_output=True,
                             text=True, timeout=120)
    assert no_caps.stdout.strip().startswith("cannot create the reuseport socket map (Operation not permitted)")
    assert "CAP_BPF" in no_caps.stdout and len(no_caps.stdout.strip().splitlines()) == 1
    cap_bpf = subprocess.run([*as_nobody("-all,+bpf"), sys.executable, "-c", LOAD], cwd=ROOT,
                             capture_output=True, text=True, timeout=300)
    assert cap_bpf.stdout.strip() == "loaded", cap_bpf.stdout + cap_bpf.stderr[-2000:]

    port = free_port(4)
    worker = Worker(steering, 3, "127.0.0.1", port, user=as_nobody("-all"))
    try:
        before = steering.counters()
        clients(4, 1)[0].sendto(record(3), ("127.0.0.1", port))
        assert counted(steering, before, 1)["pass_worker"] == 1
        assert worker.finish()["records"] == {"3": 1}
    finally:
        worker.kill()


def test_classify():
    """The reference decisions, no kernel needed."""
    assert classify(bytes(23)) == (ReuseportVerdict.PASS_NOT_STCP, None)
    assert classify(HELLO) == (ReuseportVerdict.PASS_HELLO, None)
    assert classify(bytes(24)) == (ReuseportVerdict.PASS_HELLO, None)
    assert classify(struct.pack("!QQQ", 0, 0, 1)) == (ReuseportVerdict.PASS_WORKER, 0)
    r = record(0xAB)
    assert r[8] == 0xAB and classify(r) == (ReuseportVerdict.PASS_WORKER, 0xAB)


@pytest.mark.root
def test_bench_measures_what_it_says(steering, tmp_path):
    """bench.reuseport_steer, tiny: each scenario's datagrams went through the path it names."""
    out = tmp_path / "r.json"
    p = subprocess.run([sys.executable, "-m", "bench.reuseport_steer", "--seconds", "0.4", "--rounds", "2",
                        "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    doc = json.loads(out.read_text())
    s, c = doc["summary"], doc["counters"]
    assert s["hash"]["prog_runs"] == 0 and s["empty"]["prog_runs"] == s["empty"]["datagrams"] > 0
    assert c["pass_worker"][0] == s["steer"]["datagrams"] == s["steer"]["prog_runs"] > 0
    assert c["pass_hello"][0] == s["hello"]["datagrams"] == s["hello"]["prog_runs"] > 0
    assert c["pass_orphan"][0] == s["orphan"]["datagrams"] == s["orphan"]["prog_runs"] > 0
