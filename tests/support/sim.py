"""An in-memory network for sans-IO tests: a client Connection and a ServerEndpoint joined by
a link that can lose, duplicate and reorder datagrams, with a simulated clock (Pair); and an
established pair whose client side seals whatever a test asks for (Peer)."""
from __future__ import annotations

import random
from typing import Callable, List, Optional, Tuple

from stcp import wire
from stcp.api import with_keys
from stcp.connection import Config, Connection, ConnectionClosed, DataReceived, StreamFinished
from stcp.endpoint import ServerEndpoint
from stcp.state import State

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
                 up: Link | None = None, down: Link | None = None, batched: bool = False):
        self.now = 0.0
        # batched: the server endpoint takes everything that arrives at one instant in one
        # receive_batch call before it sends, as a server reading a recvmmsg/GRO batch does
        self.batched = batched
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
        self.client_addr = CLIENT_ADDR      # where the client's datagrams come from (it may move)
        self.injected: List[Tuple[float, bytes, tuple]] = []    # (time, datagram, source) for the server

    def inject(self, when: float, data: bytes, addr) -> None:
        """Deliver `data` to the server at `when`, from `addr` (a third party's datagram)."""
        self.injected.append((when, data, addr))

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
                             *(c.get_timer() for c in self.server_conns), *(x[0] for x in self.injected))
                 if t is not None]
        if not times:
            return False
        self.now = max(self.now, min(times))
        arrivals = [(d, self.client_addr) for d in self.up.due(self.now)]
        arrivals += [(d, addr) for t, d, addr in self.injected if t <= self.now]
        self.injected = [x for x in self.injected if x[0] > self.now]
        if self.batched and arrivals:
            touched, new = self.server.receive_batch(arrivals, self.now)
            self.server_conns.extend(new)
            for conn in touched:
                self._drain("server", conn)
            arrivals = []
        for d, addr in arrivals:
            conn, new = self.server.receive(d, addr, self.now)
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


class Peer:
    """An established client/server pair with no network between them; `seal` makes records
    under the client's keys with packet numbers of the test's choosing (an authenticated
    but hostile peer), `feed` hands one to the server endpoint from the client's address."""

    def __init__(self, server_config: Config | None = None):
        self.now = 0.0
        self.endpoint = ServerEndpoint(server_config or Config())
        self.client = Connection.client(Config(server_key=self.endpoint.public_key), self.now)
        for d in self.client.datagrams_to_send(self.now):
            self.server, _ = self.endpoint.receive(d, CLIENT_ADDR, self.now)
        for d in self.server.datagrams_to_send(self.now):
            self.client.receive_datagram(d, self.now)
        for d in self.client.datagrams_to_send(self.now):
            self.endpoint.receive(d, CLIENT_ADDR, self.now)
        assert self.server.state == State.ENCRYPTED
        self.pn = self.client._next_pn + 10

    def seal(self, plaintext: bytes) -> bytes:
        key = self.client._keys.send
        self.pn += 1
        return key.seal(self.server.local_cid, wire.make_seq(key.epoch, self.pn), plaintext)

    def stream(self, offset: int, data: bytes) -> bytes:
        return self.seal(wire.STREAM_HEADER_STRUCT.pack(wire.FRAME_STREAM, 0, offset, len(data)) + data)

    def feed(self, record: bytes) -> None:
        self.endpoint.receive(record, CLIENT_ADDR, self.now)

    def delivered(self) -> bytes:
        out = b""
        while (ev := self.server.next_event()) is not None:
            if isinstance(ev, DataReceived):
                out += ev.data
        return out
