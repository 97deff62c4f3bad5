"""Server-side demultiplexing, sans-IO: one datagram and its source in, the connection it belongs to out.

Data records are routed by the connection ID in their header; client hellos by (source
address, client CID), so a retransmitted hello reaches the connection it already made and
gets the same server hello back instead of a second connection. A datagram that names no
connection is dropped and counted; one that names a connection is that connection's
business alone, so a bad record can end only the connection it was aimed at, and only when
it comes from that connection's peer address: from anywhere else, what does not
authenticate is discarded and counted, and what does moves the connection there
(PROTOCOL.md §10.2).

The hello path answers without state what it will not serve (PROTOCOL.md section 4): a
REJECT, a COOKIE when past the hello budget or the half-open cap, a v1-layout REJECT for a
version 1 hello; and a data record for an unknown connection gets a stateless RESET. Those
replies wait in `replies` for the datapath to send, each no larger than what caused it.
"""
from __future__ import annotations

import copy
import struct
from dataclasses import dataclass
from typing import Callable, Dict, Hashable, List, Optional, Sequence, Tuple, cast

from . import cid_layout, wire
from .budget import SHED_AFTER, SHED_INTERVAL, MemoryBudget, default_memory_budget
from .connection import Config, Connection
from .cookie import CookieSecrets
from .crypto import reset_token
from .errors import CloseCode, MalformedRecord
from .handshake import Rejected, cookie_record, reject_record
from .identity import StaticKey, generate_private_key
from .keypool import EphemeralKeys
from .ratelimit import TokenBucket
from .state import State

_CID_SEQ = struct.Struct("!8xQQ")


def _data_record_cid(data: bytes) -> int:
    """The cid of a datagram that is a data record by its header, else 0."""
    if len(data) >= wire.HEADER_LEN:
        cid, seq = _CID_SEQ.unpack_from(data)
        if cid and seq:
            return cid
    return 0


def group_by_cid_ref(batch: Sequence[tuple]) -> list:
    """stcp._demux.group_by_cid in Python: its reference, and the fallback without the C extension."""
    groups: list = []

    def add(unit: wire.DatagramEntry, addr: Hashable, cid: int) -> None:
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
    group_by_cid = group_by_cid_ref


@dataclass
class EndpointStats:
    dropped_short: int = 0            # shorter than a header
    dropped_unknown_cid: int = 0
    dropped_bad_hello: int = 0
    dropped_over_capacity: int = 0    # new hellos at max_connections (answered REJECT_BUSY)
    dropped_cid_table_full: int = 0   # new hellos while the kernel's live-CID table is full (REJECT_BUSY)
    handshakes_rejected: int = 0      # REJECTs sent, every code (the four below)
    rejected_version: int = 0         # REJECT_VERSION, version 1 hellos included
    rejected_suite: int = 0
    rejected_key: int = 0
    rejected_busy: int = 0            # REJECT_BUSY: max_connections or the half-open hard cap
    cookies_sent: int = 0             # COOKIE replies: past the hello budget or half-open cap
    cookie_admitted: int = 0          # hellos served under load on the strength of a valid cookie
    clients_not_allowed: int = 0      # connections ended ACCESS_DENIED: a key not on the allow list
    clients_without_key: int = 0      # ... ACCESS_DENIED: no key proven (both counted at remove())
    resets_sent: int = 0              # stateless RESETs for data records naming no connection
    resets_rate_limited: int = 0      # ... not sent: over the RESET budget
    migrations: int = 0               # connections moved to a new peer address (§10.2)


_REJECT_COUNTERS = {wire.REJECT_VERSION: "rejected_version", wire.REJECT_SUITE: "rejected_suite",
                    wire.REJECT_KEY: "rejected_key", wire.REJECT_BUSY: "rejected_busy"}
HALF_OPEN_DEFAULT = 4096


class ServerEndpoint:
    """worker_gone(w): whether no live process owns worker w's CIDs (a worker pool's
    datapath knows; default: every sibling is presumed alive, so only our own worker byte
    is answered)."""

    def __init__(self, config: Config, max_connections: int = 100_000, now: float = 0.0,
                 shed_after: float = SHED_AFTER, worker_gone: Optional[Callable[[int], bool]] = None):
        if config.static_key is None:     # no identity given: a fresh one for this endpoint
            config = copy.copy(config)
            config.static_key = generate_private_key()
            config.__post_init__()
        assert config.identity is not None and config.reset_key is not None   # derived from static_key
        self.config = config
        self.identity: StaticKey = config.identity
        self._reset_key: bytes = config.reset_key
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
        self.replies: List[Tuple[bytes, Hashable]] = []    # stateless replies waiting to be sent
        soft = config.max_half_open
        self.max_half_open = min(HALF_OPEN_DEFAULT, max_connections) if soft is None else soft
        self._half_open: Dict[Connection, None] = {}        # server connections in KEY_EXCHANGE
        self._hello_budget = TokenBucket(config.hello_rate, config.hello_burst, now)
        self._reset_budget = TokenBucket(config.reset_rate, config.reset_rate, now)
        self.cookies = CookieSecrets(now)
        # server hello keys made ahead of need (the datapath refills the pool when idle)
        self.ephemeral_keys = EphemeralKeys()
        self.worker_gone: Callable[[int], bool] = worker_gone or (lambda worker: False)
        # a kernel datapath's: False while its live-CID table has no room for another
        # connection (new hellos then get REJECT_BUSY)
        self.cid_room: Optional[Callable[[], bool]] = None

    @property
    def public_key(self) -> bytes:
        """The server's static public key: what clients pin."""
        return self.identity.public

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
            self._maybe_reset(data, addr, now)
            return None, False
        from_peer = addr == self.peer_addr.get(cid)
        if conn.receive_datagram(data, now, from_peer) and not from_peer:
            self._migrate(conn, addr)
        self._check_half_open(conn)
        if self.budget.used > self.budget.limit:
            self.shed(now)
        return conn, False

    def receive_batch(self, batch: Sequence[tuple], now: float) -> Tuple[List[Connection], List[Connection]]:
        """Route datagrams [(data, source)] (or, from UDP GRO, [(buffer, source, segment_size)]),
        each connection getting its own from each source address in one receive_datagrams call,
        in arrival order; return (connections that got any, new ones)."""
        groups = group_by_cid(batch)
        connections = self.connections
        if len(groups) == 1 and groups[0][0] > 0:
            # one connection's records from one address (a request, a GSO run): no bookkeeping
            cid, addr, datagrams = groups[0]
            conn = connections.get(cid)
            if conn is not None:
                self._deliver_one(conn, addr, datagrams, now)
                if self.budget.used > self.budget.limit:
                    return list(dict.fromkeys([conn, *self.shed(now)])), []
                return [conn], []
        pending: Dict[Tuple[Connection, Hashable], List[wire.DatagramEntry]] = {}
        touched: Dict[Connection, None] = {}
        new: List[Connection] = []
        for cid, addr, datagrams in groups:
            if cid > 0:
                conn = connections.get(cid)
                if conn is None:
                    self.stats.dropped_unknown_cid += wire.count_datagrams(datagrams)
                    for d in wire.expand_datagrams(datagrams):
                        self._maybe_reset(d, addr, now)
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
            conn, is_new = self.receive(cast(bytes, datagrams[0]), addr, now)    # one datagram
            if conn is not None:
                touched[conn] = None
                if is_new:
                    new.append(conn)
        self._deliver(pending, now)
        if self.budget.used > self.budget.limit:
            touched.update(dict.fromkeys(self.shed(now)))
        return list(touched), new

    def _deliver(self, pending: Dict[Tuple[Connection, Hashable], List[wire.DatagramEntry]], now: float) -> None:
        for (conn, addr), records in pending.items():
            self._deliver_one(conn, addr, records, now)

    def _deliver_one(self, conn: Connection, addr: Hashable, records: List[wire.DatagramEntry], now: float) -> None:
        from_peer = addr == self.peer_addr.get(conn.local_cid)
        if conn.receive_datagrams(records, now, from_peer) and not from_peer:
            self._migrate(conn, addr)
        self._check_half_open(conn)

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

    def _check_half_open(self, conn: Connection) -> None:
        if conn.state != State.KEY_EXCHANGE:
            self._half_open.pop(conn, None)

    def _reply(self, record: bytes, addr: Hashable) -> None:
        self.replies.append((record, addr))

    def _reject(self, client_cid: int, suite: int, code: int, addr: Hashable) -> None:
        self.stats.handshakes_rejected += 1
        counter = _REJECT_COUNTERS[code]
        setattr(self.stats, counter, getattr(self.stats, counter) + 1)
        self._reply(reject_record(client_cid, suite, code), addr)

    def _receive_hello(self, data: bytes, addr: Hashable, now: float) -> Tuple[Optional[Connection], bool]:
        v1_cid = wire.v1_client_hello_cid(data)
        if v1_cid is not None:            # a version 1 client: a REJECT it can read, and it stops
            self.stats.handshakes_rejected += 1
            self.stats.rejected_version += 1
            self._reply(wire.encode_v1_reject(v1_cid, data[wire.HEADER_LEN + 2]), addr)
            return None, False
        try:
            wire.parse_header(data)
            if len(data) != wire.HANDSHAKE_RECORD_LEN:
                raise MalformedRecord("not a client hello")
            payload = data[wire.HEADER_LEN:]
            if payload[0] == wire.HS_CLIENT_HELLO and payload[1] != wire.PROTOCOL_VERSION:
                cid = int.from_bytes(payload[8:16], "big")
                if not cid:
                    raise MalformedRecord("client hello with client CID 0")
                self._reject(cid, payload[2], wire.REJECT_VERSION, addr)
                return None, False
            hello = wire.decode_hello(payload)
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
            self._check_half_open(conn)
            return conn, False
        half_open = len(self._half_open)
        if len(self.connections) >= self.max_connections or half_open >= 2 * self.max_half_open:
            if len(self.connections) >= self.max_connections:
                self.stats.dropped_over_capacity += 1
            self._reject(hello.sender_cid, hello.suite, wire.REJECT_BUSY, addr)
            return None, False
        if half_open >= self.max_half_open or not self._hello_budget.take(now):
            # under load: only a hello that proves its source address reaches X25519
            if not (any(hello.cookie) and self.cookies.verify(hello.cookie, addr, hello.sender_cid,
                                                              hello.public_key, now)):
                self.stats.cookies_sent += 1
                cookie = self.cookies.make(addr, hello.sender_cid, hello.public_key, now)
                self._reply(cookie_record(hello.sender_cid, hello.suite, cookie), addr)
                return None, False
            self.stats.cookie_admitted += 1
        if self.cid_room is not None and not self.cid_room():     # asked only of a hello about to be served
            self.stats.dropped_cid_table_full += 1
            self._reject(hello.sender_cid, hello.suite, wire.REJECT_BUSY, addr)
            return None, False
        try:
            conn = Connection.server(self.config, data, hello, now, self.ephemeral_keys.take)
        except Rejected as exc:
            self._reject(hello.sender_cid, hello.suite, exc.reject_code, addr)
            return None, False
        if conn.local_cid in self.connections:    # 64-bit collision: let the client's retransmission retry
            return None, False
        conn.budget = self.budget
        self.connections[conn.local_cid] = conn
        self.peer_addr[conn.local_cid] = addr
        self._by_hello[key] = conn
        self._hello_key[conn.local_cid] = key
        self._half_open[conn] = None
        return conn, True

    def _may_reset(self, cid: int) -> bool:
        """Whether a RESET for `cid`, which names none of our connections, can end no live one
        (PROTOCOL.md section 5.7): every server sharing our identity key derives the same
        token, so we must not answer for a CID a live process still owns. Ours or our
        predecessor's (our worker byte); another server's (its server id: the balancer sent
        it here, away from that server); a sibling worker's only when that worker is gone."""
        cfg = self.config
        if not cfg.cid_prefix_bits:
            return True                   # fully random CIDs: no siblings, nobody else to ask
        if cfg.server_id_bits and cid_layout.server_id_of(cid, cfg.server_id_bits) != cfg.server_id:
            return True
        worker = cid_layout.worker_of(cid)
        return worker == cfg.cid_prefix >> cfg.server_id_bits or self.worker_gone(worker)

    def _maybe_reset(self, data: bytes, addr: Hashable, now: float) -> None:
        """Answer a data record naming no connection with a stateless RESET (PROTOCOL.md
        section 5.7): only a well-formed data record longer than a RESET, for a CID whose
        owner is gone (_may_reset), within the RESET budget."""
        if len(data) <= wire.RESET_RECORD_LEN:
            return
        length, cid, seq = wire.HEADER_STRUCT.unpack_from(data)
        if not seq or not cid or length != len(data) - wire.HEADER_LEN:
            return
        if not self._may_reset(cid):
            return
        if not self._reset_budget.take(now):
            self.stats.resets_rate_limited += 1
            return
        self.stats.resets_sent += 1
        self._reply(wire.encode_reset(reset_token(self._reset_key, cid)), addr)

    def remove(self, conn: Connection) -> None:
        if self.connections.pop(conn.local_cid, None) is conn and conn.close_info is not None \
                and conn.close_info.code == CloseCode.ACCESS_DENIED and not conn.close_info.by_peer:
            if conn.stats.client_auth_missing:
                self.stats.clients_without_key += 1
            else:
                self.stats.clients_not_allowed += 1
        self._half_open.pop(conn, None)
        self.peer_addr.pop(conn.local_cid, None)
        key = self._hello_key.pop(conn.local_cid, None)
        if key is not None:
            self._by_hello.pop(key, None)
