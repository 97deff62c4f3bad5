"""Server-side demultiplexing, sans-IO: one datagram and its source in, the connection it belongs to out.

Data records are routed by the connection ID in their header; client hellos by (source
address, client CID), so a retransmitted hello reaches the connection it already made and
gets the same server hello back instead of a second connection. A datagram that names no
connection is dropped and counted; one that names a connection is that connection's
business alone, so a bad record can end only the connection it was aimed at, and only when
it comes from that connection's peer address: from anywhere else, what does not
authenticate is discarded and counted, and what does moves the connection there
(PROTOCOL.md §10.2).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Tuple

from . import wire
from .budget import SHED_AFTER, SHED_INTERVAL, MemoryBudget, default_memory_budget
from .connection import Config, Connection
from .errors import MalformedRecord
from .handshake import Rejected, reject_record

_CID_SEQ = struct.Struct("!8xQQ")


def _data_record_cid(data) -> int:
    """The cid of a datagram that is a data record by its header, else 0."""
    if len(data) >= wire.HEADER_LEN:
        cid, seq = _CID_SEQ.unpack_from(data)
        if cid and seq:
            return cid
    return 0


def _group_by_cid(batch) -> list:
    """stcp._demux.group_by_cid in Python: its reference, and the fallback without the C extension."""
    groups: list = []

    def add(unit, addr, cid: int) -> None:
        if cid and groups and groups[-1][0] == cid and groups[-1][1] == addr:
            groups[-1][2].append(unit)
        else:
            groups.append((cid or -1, addr, [unit]))

    for item in batch:
        data, addr = item[0], item[1]
        size = item[2] if len(item) == 3 else 0
        if size <= 0 or size >= len(data):
            add(data, addr, _data_record_cid(data))
            continue
        pieces = [data[i:i + size] for i in range(0, len(data), size)]
        cids = {_data_record_cid(p) for p in pieces}
        if len(cids) == 1 and 0 not in cids:           # one connection's records: kept whole
            add((data, size), addr, cids.pop())
        else:
            for p in pieces:
                add(p, addr, _data_record_cid(p))
    return groups


try:
    from ._demux import group_by_cid
except ImportError:
    group_by_cid = _group_by_cid


@dataclass
class EndpointStats:
    dropped_short: int = 0            # shorter than a header
    dropped_unknown_cid: int = 0
    dropped_bad_hello: int = 0
    dropped_over_capacity: int = 0
    handshakes_rejected: int = 0
    migrations: int = 0               # connections moved to a new peer address (§10.2)


class ServerEndpoint:
    def __init__(self, config: Config, max_connections: int = 100_000, shed_after: float = SHED_AFTER):
        self.config = config
        self.max_connections = max_connections
        self.budget = MemoryBudget(config.memory_budget or default_memory_budget())
        self.budget.shed_hook = self.shed
        self.shed_after = shed_after
        self._next_shed_scan = 0.0
        self.connections: Dict[int, Connection] = {}
        self.peer_addr: Dict[int, Hashable] = {}
        self._by_hello: Dict[Tuple[Hashable, int], Connection] = {}
        self._hello_key: Dict[int, Tuple[Hashable, int]] = {}     # cid -> its _by_hello key
        self.stats = EndpointStats()
        self.rejects: List[Tuple[bytes, Hashable]] = []    # REJECT records waiting to be sent

    def receive(self, data: bytes, addr: Hashable, now: float) -> Tuple[Optional[Connection], bool]:
        """Route one datagram; return (connection or None, whether it is a new connection)."""
        if len(data) < wire.HEADER_LEN:
            self.stats.dropped_short += 1
            return None, False
        cid, seq = _CID_SEQ.unpack_from(data)
        if seq == wire.HANDSHAKE_SEQ and cid == 0:
            return self._receive_hello(data, addr, now)
        conn = self.connections.get(cid)
        if conn is None:
            self.stats.dropped_unknown_cid += 1
            return None, False
        from_peer = addr == self.peer_addr.get(cid)
        if conn.receive_datagram(data, now, from_peer) and not from_peer:
            self._migrate(conn, addr)
        if self.budget.used > self.budget.limit:
            self.shed(now)
        return conn, False

    def receive_batch(self, batch, now: float) -> Tuple[List[Connection], List[Connection]]:
        """Route datagrams [(data, source)] (or, from UDP GRO, [(buffer, source, segment_size)]),
        each connection getting its own from each source address in one receive_datagrams call,
        in arrival order; return (connections that got any, new ones)."""
        pending: Dict[Tuple[Connection, Hashable], List[bytes]] = {}
        touched: Dict[Connection, None] = {}
        new: List[Connection] = []
        connections = self.connections
        for cid, addr, datagrams in group_by_cid(batch):
            if cid > 0:
                conn = connections.get(cid)
                if conn is None:
                    self.stats.dropped_unknown_cid += wire.count_datagrams(datagrams)
                    continue
                records = pending.get((conn, addr))
                if records is None:
                    pending[(conn, addr)] = datagrams
                    touched[conn] = None
                else:
                    records += datagrams
                continue
            # anything but a data record comes alone (hellos, runts): the one-datagram path,
            # after what came before it
            self._deliver(pending, now)
            pending = {}
            conn, is_new = self.receive(datagrams[0], addr, now)
            if conn is not None:
                touched[conn] = None
                if is_new:
                    new.append(conn)
        self._deliver(pending, now)
        if self.budget.used > self.budget.limit:
            touched.update(dict.fromkeys(self.shed(now)))
        return list(touched), new

    def _deliver(self, pending: Dict[Tuple[Connection, Hashable], List[bytes]], now: float) -> None:
        peer_addr = self.peer_addr
        for (conn, addr), records in pending.items():
            from_peer = addr == peer_addr.get(conn.local_cid)
            if conn.receive_datagrams(records, now, from_peer) and not from_peer:
                self._migrate(conn, addr)

    def shed(self, now: float) -> List[Connection]:
        """Over the memory budget: end the connections holding the most that made no progress
        for shed_after seconds, until the rest fit (looking at most every SHED_INTERVAL
        seconds, over every connection). They are returned; receive_batch counts them as
        touched, so the datapath sends their CLOSE at once. Shed from a connection's timer
        (MemoryBudget.shed_hook), their CLOSE leaves when their own timer next fires."""
        budget = self.budget
        if now < self._next_shed_scan or budget.used <= budget.limit:
            return []
        self._next_shed_scan = now + SHED_INTERVAL
        victims = budget.victims(self.connections.values(), now, self.shed_after)
        for conn in victims:
            conn.shed(f"server memory budget exhausted: this connection held {conn.footprint} bytes "
                      f"without progress for {now - conn.progress_time(now):.1f} s", now)
            budget.shed += 1
        return victims

    def _migrate(self, conn: Connection, addr: Hashable) -> None:
        """The peer's newest authenticated record came from `addr` (NAT rebinding, or the
        client moved): send there from now on (PROTOCOL.md §10.2)."""
        if conn.local_cid not in self.connections or conn.is_closed:
            return
        self.peer_addr[conn.local_cid] = addr
        self.stats.migrations += 1

    def _receive_hello(self, data: bytes, addr: Hashable, now: float) -> Tuple[Optional[Connection], bool]:
        try:
            wire.parse_header(data)
            hello = wire.decode_hello(data[wire.HEADER_LEN:])
        except MalformedRecord:
            self.stats.dropped_bad_hello += 1
            return None, False
        if hello.kind != wire.HS_CLIENT_HELLO:
            self.stats.dropped_bad_hello += 1
            return None, False
        key = (addr, hello.sender_cid)
        conn = self._by_hello.get(key)
        if conn is not None:
            conn.receive_datagram(data, now)
            return conn, False
        if len(self.connections) >= self.max_connections:
            self.stats.dropped_over_capacity += 1
            return None, False
        try:
            conn = Connection.server(self.config, data, hello, now)
        except Rejected as exc:
            self.stats.handshakes_rejected += 1
            self.rejects.append((reject_record(hello.sender_cid, hello.suite, exc.reject_code), addr))
            return None, False
        if conn.local_cid in self.connections:    # 64-bit collision: let the client's retransmission retry
            return None, False
        conn.budget = self.budget
        self.connections[conn.local_cid] = conn
        self.peer_addr[conn.local_cid] = addr
        self._by_hello[key] = conn
        self._hello_key[conn.local_cid] = key
        return conn, True

    def remove(self, conn: Connection) -> None:
        self.connections.pop(conn.local_cid, None)
        self.peer_addr.pop(conn.local_cid, None)
        self._by_hello.pop(self._hello_key.pop(conn.local_cid, None), None)
