"""An in-memory network for sans-IO tests: a client Connection and a ServerEndpoint joined by
a link that can lose, duplicate and reorder datagrams, with a simulated clock."""
from __future__ import annotations

import random
from typing import Callable, List, Optional, Tuple

from stcp.api import with_keys
from stcp.connection import Config, Connection, ConnectionClosed, DataReceived, StreamFinished
from stcp.endpoint import ServerEndpoint

CLIENT_ADDR = ("192.0.2.1", 5000)


class Link:
    """Delivers datagrams after `delay`; `fault` may drop (return []) or duplicate them."""

    def __init__(self, delay: float = 0.005, fault: Optional[Callable[[bytes], List[bytes]]] = None,
                 reorder: float = 0.0, seed: int = 1):
        self.delay = delay
        self.fault = fault
        self.reorder = reorder
        self.rng = random.Random(seed)
        self.queue: List[Tuple[float, int, bytes]] = []
        self._n = 0
        self.log: List[bytes] = []

    def send(self, data: bytes, now: float) -> None:
        self.log.append(data)
        copies = self.fault(data) if self.fault else [data]
        for d in copies:
            jitter = self.rng.uniform(0, self.delay) if self.rng.random() < self.reorder else 0.0
            self._n += 1
            self.queue.append((now + self.delay + jitter, self._n, d))

    def due(self, now: float) -> List[bytes]:
        self.queue.sort()
        ready = [d for t, _, d in self.queue if t <= now]
        self.queue = [q for q in self.queue if q[0] > now]
        return ready

    def next_time(self) -> Optional[float]:
        return min((t for t, _, _ in self.queue), default=None)


class Pair:
    """A client and a server endpoint on two Links; the client pins the server's key unless
    its config names another policy."""
    def __init__(self, client_config: Config | None = None, server_config: Config | None = None,
                 up: Link | None = None, down: Link | None = None):
        self.now = 0.0
        self.server = ServerEndpoint(server_config or Config())
        client_config = client_config or Config()
        if client_config.server_key is None:        # authentication on: the client pins the server's key
            client_config = with_keys(client_config, self.server.public_key, client_config.static_key)
        self.client = Connection.client(client_config, self.now)
        self.up, self.down = up or Link(), down or Link()
        self.server_conns: List[Connection] = []
        self.received = {"client": bytearray(), "server": bytearray()}
        self.finished = {"client": False, "server": False}
        self.closed = {}
        self.events = {"client": [], "server": []}
        self.on_server_data: Optional[Callable[[Connection, bytes], None]] = None

    def _drain(self, who: str, conn: Connection) -> None:
        while (ev := conn.next_event()) is not None:
            self.events[who].append(ev)
            if isinstance(ev, DataReceived):
                self.received[who] += ev.data
                conn.consume(len(ev.data))
                if who == "server" and self.on_server_data:
                    self.on_server_data(conn, ev.data)
            elif isinstance(ev, StreamFinished):
                self.finished[who] = True
            elif isinstance(ev, ConnectionClosed):
                self.closed[who] = ev

    def flush(self) -> None:
        for d in self.client.datagrams_to_send(self.now):
            self.up.send(d, self.now)
        for conn in self.server_conns:
            for d in conn.datagrams_to_send(self.now):
                self.down.send(d, self.now)
        for d, _ in self.server.replies:
            self.down.send(d, self.now)
        self.server.replies.clear()

    def step(self) -> bool:
        """Advance to the next delivery or timer; return False when nothing is left to happen."""
        self.flush()
        times = [t for t in (self.up.next_time(), self.down.next_time(), self.client.get_timer(),
                             *(c.get_timer() for c in self.server_conns)) if t is not None]
        if not times:
            return False
        self.now = max(self.now, min(times))
        for d in self.up.due(self.now):
            conn, new = self.server.receive(d, CLIENT_ADDR, self.now)
            if new:
                self.server_conns.append(conn)
            if conn is not None:
                self._drain("server", conn)
        for d in self.down.due(self.now):
            self.client.receive_datagram(d, self.now)
            self._drain("client", self.client)
        for who, conn in [("client", self.client)] + [("server", c) for c in self.server_conns]:
            t = conn.get_timer()
            if t is not None and t <= self.now:
                conn.handle_timer(self.now)
                self._drain(who, conn)
        self.flush()
        return True

    def run(self, until: Callable[[], bool], max_time: float = 120.0, max_steps: int = 2_000_000) -> None:
        steps = 0
        while not until():
            if not self.step() or self.now > max_time or steps > max_steps:
                raise AssertionError(f"simulation stalled at t={self.now:.3f}s after {steps} steps")
            steps += 1

    @property
    def server_conn(self) -> Connection:
        return self.server_conns[0]
