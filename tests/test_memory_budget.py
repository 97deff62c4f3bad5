"""Issue 12, finding 8: a server-wide memory budget (PROTOCOL.md §11, stcp/budget.py).

Eight clients that never read pinned 8 x 16 MiB of an echo server. Here, on a simulated
network with many clients, the same eight cannot pin more than the budget: once it is
reached the server grants no new credit and sheds the connections holding the most without
progress, and an honest client's transfer completes intact alongside.
"""
from __future__ import annotations

import dataclasses
import heapq
import os
from typing import Dict, List, Optional

from stcp import identity
from stcp.budget import MemoryBudget, default_memory_budget
from stcp.connection import Config, Connection, ConnectionClosed, DataReceived, StreamFinished
from stcp.endpoint import ServerEndpoint
from stcp.errors import CloseCode
from stcp.state import State
from tests.support.sim import Peer

DELAY = 0.005
MiB = 1 << 20
SERVER_KEY = identity.generate_private_key()          # the server's; every client pins it
SERVER_PUBLIC = identity.public_key(SERVER_KEY)


class EchoApp:
    """A server application that echoes what it reads, reading only while less than `high`
    bytes of what it wrote are unacknowledged (as `await writer.drain()` does)."""

    def __init__(self, conn: Connection, high: int = MiB):
        self.conn = conn
        self.high = high
        self.unread: List[bytes] = []
        self.finished = False

    def run(self) -> None:
        conn = self.conn
        while (ev := conn.next_event()) is not None:
            if isinstance(ev, DataReceived):
                self.unread.append(ev.data)
            elif isinstance(ev, StreamFinished):
                self.finished = True
        while self.unread and conn.state == State.ENCRYPTED and conn.send_buffered < self.high:
            data = self.unread.pop(0)
            conn.consume(len(data))
            conn.send(data)
        if self.finished and not self.unread and conn.state == State.ENCRYPTED and not conn.write_finished:
            conn.shutdown_write()


class Client:
    def __init__(self, addr, data: bytes, reads: bool, now: float):
        # a stuck client advertises little: it is the server's memory that is at stake
        self.conn = Connection.client(Config(recv_window=MiB if not reads else 16 * MiB, server_key=SERVER_PUBLIC),
                                      now)
        self.addr = addr
        self.data = data
        self.reads = reads
        self.received = bytearray()
        self.closed: Optional[ConnectionClosed] = None
        self.started = False

    def run(self) -> None:
        conn = self.conn
        while (ev := conn.next_event()) is not None:
            if isinstance(ev, DataReceived) and self.reads:
                self.received += ev.data
                conn.consume(len(ev.data))
            elif isinstance(ev, ConnectionClosed):
                self.closed = ev
        if conn.state == State.ENCRYPTED and not self.started:
            self.started = True
            conn.send(self.data)
            conn.shutdown_write()


class Network:
    def __init__(self, server_config: Config, shed_after: float = 1.0):
        self.now = 0.0
        self.endpoint = ServerEndpoint(dataclasses.replace(server_config, static_key=SERVER_KEY), shed_after=shed_after)
        self.clients: Dict[object, Client] = {}
        self.apps: Dict[Connection, EchoApp] = {}
        self.queue: list = []
        self._n = 0
        self.peak = 0

    def add(self, client: Client) -> Client:
        self.clients[client.addr] = client
        return client

    def _send(self, to, data: bytes, src) -> None:
        self._n += 1
        heapq.heappush(self.queue, (self.now + DELAY, self._n, to, data, src))

    def flush(self) -> None:
        for c in self.clients.values():
            c.run()
            for d in c.conn.datagrams_to_send(self.now):
                self._send("server", d, c.addr)
        for conn, app in list(self.apps.items()):
            app.run()
            addr = self.endpoint.peer_addr.get(conn.local_cid)
            for d in conn.datagrams_to_send(self.now):
                if addr is not None:
                    self._send(addr, d, "server")
            if conn.is_closed:
                self.endpoint.remove(conn)
                del self.apps[conn]

    def step(self) -> bool:
        self.flush()
        conns = [c.conn for c in self.clients.values()] + list(self.apps)
        times = [t for t in [c.get_timer() for c in conns] if t is not None]
        if self.queue:
            times.append(self.queue[0][0])
        if not times:
            return False
        self.now = max(self.now, min(times))
        while self.queue and self.queue[0][0] <= self.now:
            _, _, to, data, src = heapq.heappop(self.queue)
            if to == "server":
                conn, new = self.endpoint.receive(data, src, self.now)
                if new:
                    self.apps[conn] = EchoApp(conn)
            elif to in self.clients:
                self.clients[to].conn.receive_datagram(data, self.now)
        for c in conns:
            t = c.get_timer()
            if t is not None and t <= self.now:
                c.handle_timer(self.now)
        self.peak = max(self.peak, self.endpoint.budget.used)
        self.flush()
        return True

    def run(self, until, max_time: float) -> None:
        while not until():
            if not self.step() or self.now > max_time:
                raise AssertionError(f"stalled at t={self.now:.2f}")


def test_stuck_clients_cannot_pin_more_than_the_budget():
    budget = 24 * MiB
    net = Network(Config(memory_budget=budget))
    stuck = [net.add(Client(("10.0.0.%d" % i, 4000), os.urandom(32 * MiB), False, 0.0)) for i in range(8)]
    net.run(lambda: net.endpoint.budget.exhausted, max_time=5)
    honest = net.add(Client(("10.0.1.1", 5000), os.urandom(6 * MiB), True, net.now))
    net.run(lambda: honest.closed is not None, max_time=60)
    ep = net.endpoint
    assert honest.closed.code == CloseCode.NO_ERROR and bytes(honest.received) == honest.data
    assert ep.budget.shed >= 1
    shed = [c for c in stuck if c.closed is not None and c.closed.code == CloseCode.INTERNAL_ERROR]
    assert len(shed) == ep.budget.shed and all("memory budget" in c.closed.reason for c in shed)
    # what is left fits the budget, and the peak overshot it only by credit granted before it
    # was reached (at most one window per stuck connection)
    assert ep.budget.used <= budget
    assert net.peak <= budget + 8 * 16 * MiB
    live = sum(c.footprint for c in net.apps)
    assert live == ep.budget.used


def test_without_pressure_nobody_is_shed():
    net = Network(Config(memory_budget=64 * MiB))
    clients = [net.add(Client(("10.0.2.%d" % i, 4000), os.urandom(3 * MiB), True, 0.0)) for i in range(4)]
    net.run(lambda: all(c.closed is not None for c in clients) and not net.apps, max_time=120)
    assert all(c.closed.code == CloseCode.NO_ERROR and bytes(c.received) == c.data for c in clients)
    assert net.endpoint.budget.shed == 0 and net.endpoint.budget.used == 0       # all released


def test_credit_is_withheld_at_the_budget_and_granted_again_below_it():
    budget = MemoryBudget(4 * MiB)
    net = Network(Config(memory_budget=4 * MiB))
    net.endpoint.budget = budget
    c = net.add(Client(("10.0.3.1", 4000), os.urandom(8 * MiB), True, 0.0))
    net.run(lambda: bool(net.apps), max_time=5)
    budget.used += 10 * MiB                  # as if others held it all
    net.run(lambda: budget.credit_withheld > 0, max_time=30)
    server = next(iter(net.apps))
    limit = server._recv.max_data
    for _ in range(200):
        net.step()
    assert server._recv.max_data == limit                # nothing new while exhausted
    budget.used -= 10 * MiB
    net.run(lambda: c.closed is not None, max_time=120)
    assert bytes(c.received) == c.data


def test_default_budget_is_an_eighth_of_memory_capped_at_a_gib():
    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    assert default_memory_budget() == max(64 * MiB, min(1 << 30, ram // 8))
    assert ServerEndpoint(Config()).budget.limit == default_memory_budget()
    assert ServerEndpoint(Config(memory_budget=5 * MiB)).budget.limit == 5 * MiB


def test_the_charge_follows_every_write_read_and_ack():
    """send() and consume() charge the budget by what they add or free, receiving by what
    changed: after every call the endpoint's total is exactly what the connection holds."""
    pair = Peer()                            # an established pair, no network between
    now, ep, client, conn = pair.now, pair.endpoint, pair.client, pair.server

    def check():
        assert ep.budget.used == conn.footprint

    for size in (64, 1, 3000, 0, 70_000):
        now += 0.001
        client.send(os.urandom(size))
        conn.receive_datagrams(client.datagrams_to_send(now), now)
        check()
        got = b"".join(ev.data for ev in iter(conn.next_event, None) if isinstance(ev, DataReceived))
        half = len(got) // 2
        conn.consume(half)                   # read in two steps, answering in between
        check()
        conn.send(got[:half])
        check()
        conn.consume(len(got) - half)
        check()
        conn.send(got[half:])
        check()
        for _ in range(50):                  # until every byte of the echo is acknowledged
            out = conn.datagrams_to_send(now)
            if not out and not conn.send_buffered:
                break
            now += 0.001
            client.receive_datagrams(out, now)
            for ev in iter(client.next_event, None):
                if isinstance(ev, DataReceived):
                    client.consume(len(ev.data))
            conn.receive_datagrams(client.datagrams_to_send(now), now)
            check()
        assert conn.send_buffered == 0
    conn.close()
    assert ep.budget.used == 0
