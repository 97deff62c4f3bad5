"""Property tests (hypothesis): hostile datagrams never raise out of the core and always end in
the outcome docs/PROTOCOL.md §10.2 documents.

The oracle `expected_outcome` restates §3.1, §4.1, §6.1, §6.3 and §10.2 in a few lines: given a
connection and a datagram, it names the outcome (dropped by the endpoint, silently discarded,
or the connection terminated with one close code). Every property then checks that the core
did exactly that, that the victim told its peer (who ends with the same code), and that a
second connection on the same endpoint carries on.
"""
from __future__ import annotations

import contextlib
import random
import struct
from dataclasses import dataclass, field
from typing import List, Optional, Set, Tuple
from unittest import mock

from hypothesis import HealthCheck, given, settings, strategies as st

from stcp import connection as connection_mod, wire
from stcp.connection import Config, Connection, DataReceived
from stcp.endpoint import ServerEndpoint
from stcp.errors import CloseCode, MalformedRecord, ProtocolViolation
from stcp.state import Event, State, transition
from tests.support.sim import CLIENT_ADDR, Link, Pair

SETTINGS = settings(max_examples=80, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
OTHER_ADDR = ("192.0.2.2", 6000)       # client B's
THIRD_ADDR = ("198.51.100.9", 7000)    # nobody's: an off-path sender that learnt the CIDs
_HDR = struct.Struct("!QQQ")


# --- the oracle -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Outcome:
    kind: str                     # "fail", "discard", "discarded", "stale", "drop_short", "drop_unknown_cid", ...
    code: Optional[int] = None    # close code for "fail"
    reason: str = ""              # Stats.discarded key for "discarded"
    reset: bool = False           # drop_unknown_cid: answered with a stateless RESET


def _unauthenticated(code: int, reason: str, from_peer: bool) -> Outcome:
    """§10.2: input that does not authenticate ends the connection only from its peer's address."""
    return Outcome("fail", code) if from_peer else Outcome("discarded", reason=reason)


def expected_outcome(conn: Connection, data: bytes, seen: "Seen", from_peer: bool = True) -> Outcome:
    """What §10.2 says happens when `data` reaches `conn` (an ENCRYPTED connection), from its
    peer's current address or from another one.

    `seen` is what the test's links delivered to `conn` (its accepted hello and the packet
    numbers it received), recorded outside the core so the oracle does not ask the code under
    test what a duplicate is."""
    if len(data) < wire.HEADER_LEN:
        return _unauthenticated(CloseCode.MALFORMED_RECORD, "malformed", from_peer)
    length, cid, seq = _HDR.unpack_from(data)
    if length != len(data) - wire.HEADER_LEN:
        return _unauthenticated(CloseCode.MALFORMED_RECORD, "malformed", from_peer)
    if seq == 0:                                # never fatal, from any address (§10.2)
        if conn.is_client:
            return Outcome("discard") if data == seen.hello else Outcome("discarded", reason="handshake")
        if len(data) == wire.HANDSHAKE_RECORD_LEN and data[wire.HEADER_LEN] == wire.HS_CLIENT_HELLO and \
                wire.client_hello_transcript_form(data) == wire.client_hello_transcript_form(seen.hello):
            return Outcome("discard")           # the accepted hello, repeated (cookie aside)
        return Outcome("discarded", reason="handshake")
    if cid != conn.local_cid:
        return _unauthenticated(CloseCode.MALFORMED_RECORD, "malformed", from_peer)
    if len(data) > conn.config.max_datagram:
        return Outcome("discarded", reason="oversize")
    if len(data) < wire.HEADER_LEN + wire.AEAD_TAG_LEN:
        return _unauthenticated(CloseCode.MALFORMED_RECORD, "malformed", from_peer)
    epoch, pn = wire.split_seq(seq)
    if pn == 0:
        return _unauthenticated(CloseCode.MALFORMED_RECORD, "malformed", from_peer)
    if pn in seen.pns:
        return Outcome("discard")
    cur = conn.recv_epoch
    usable = {cur, cur + 1} | ({cur - 1} if cur > 0 else set())
    if epoch in usable:
        return _unauthenticated(CloseCode.AUTH_FAILURE, "auth", from_peer)   # forged or damaged
    if epoch < cur:
        return Outcome("stale")                          # a retired key: dropped and counted
    return _unauthenticated(CloseCode.KEY_UPDATE_ERROR, "key_epoch", from_peer)


def expected_at_endpoint(world: "World", data: bytes, addr=CLIENT_ADDR) -> Tuple[Outcome, Optional[Connection]]:
    endpoint = world.endpoint
    if len(data) < wire.HEADER_LEN:
        return Outcome("drop_short"), None
    length, cid, seq = _HDR.unpack_from(data)
    if seq == 0 and cid == 0:
        if len(data) == 104 and length == 80 and data[24:26] == b"\x01\x01":
            return Outcome("reject"), None      # a version 1 hello: REJECT_VERSION in its layout
        if length != len(data) - wire.HEADER_LEN or len(data) != wire.HANDSHAKE_RECORD_LEN:
            return Outcome("drop_bad_hello"), None
        if data[24] == wire.HS_CLIENT_HELLO and data[25] != wire.PROTOCOL_VERSION:
            return Outcome("reject" if any(data[32:40]) else "drop_bad_hello"), None
        try:
            hello = wire.decode_hello(data[wire.HEADER_LEN:])
        except MalformedRecord:
            return Outcome("drop_bad_hello"), None
        if hello.kind != wire.HS_CLIENT_HELLO:
            return Outcome("drop_bad_hello"), None
        for conn, client in ((world.server_a, world.client_a), (world.server_b, world.client_b)):
            if addr == world.addr[conn] and hello.sender_cid == client.local_cid:     # §4.3
                return expected_outcome(conn, data, world.seen[conn]), conn
        return Outcome("hello"), None
    conn = endpoint.connections.get(cid)
    if conn is None:                            # a RESET for a well-formed data record, if larger
        reset = seq != 0 and cid != 0 and length == len(data) - wire.HEADER_LEN and len(data) > 56
        return Outcome("drop_unknown_cid", reset=reset), None
    return expected_outcome(conn, data, world.seen[conn], addr == world.addr[conn]), conn


@contextlib.contextmanager
def transitions():
    """Record every (state, event) the core asks the table for while the block runs."""
    seen: List[tuple] = []

    def spy(state, event):
        seen.append((state, event))
        return transition(state, event)

    with mock.patch.object(connection_mod, "transition", spy):
        yield seen


FAILED = [(State.ENCRYPTED, Event.FAILURE), (State.ERROR, Event.TERMINATED)]


# --- fixtures built on tests/support/sim.py -------------------------------------------------------
@dataclass
class Seen:
    """What a connection was given by the test's lossless links: its accepted hello and the
    packet numbers of the protected records it received."""
    hello: bytes = b""
    pns: Set[int] = field(default_factory=set)

    def add(self, datagrams: List[bytes]) -> "Seen":
        for d in datagrams:
            seq = _HDR.unpack_from(d)[2]
            if seq == 0:
                self.hello = self.hello or d
            else:
                self.pns.add(seq & wire.PN_MASK)
        return self


def pump(client: Connection, endpoint: ServerEndpoint, addr, now: float,
         up: List[bytes], down: List[bytes], rounds: int = 20) -> Optional[Connection]:
    """Lossless exchange between one client and the endpoint until both are quiet; every
    datagram delivered is appended to `up` (to the server) or `down` (to the client)."""
    server = None
    for _ in range(rounds):
        moved = False
        for d in client.datagrams_to_send(now):
            conn, _ = endpoint.receive(d, addr, now)
            up.append(d)
            server = conn or server
            moved = True
        if server is not None:
            for d in server.datagrams_to_send(now):
                client.receive_datagram(d, now)
                down.append(d)
                moved = True
        now += 0.02               # past the delayed-ack timer
        for c in (client, server):
            if c is not None and c.get_timer() is not None and c.get_timer() <= now:
                c.handle_timer(now)
        if not moved:
            break
    return server


class World:
    """A Pair (client A) plus a second client B on the same ServerEndpoint, both ENCRYPTED, after
    data and key updates in both directions (so previous, current and next epochs all exist)."""

    def __init__(self) -> None:
        cfg = dict(key_update_interval=4)
        self.pair = p = Pair(Config(**cfg), Config(**cfg))
        p.run(lambda: bool(p.server_conns) and p.server_conn.state == State.ENCRYPTED)
        p.client.send(b"a" * 20000)
        p.server_conn.send(b"b" * 20000)
        p.run(lambda: len(p.received["server"]) == 20000 and len(p.received["client"]) == 20000)
        for _ in range(100):        # let the last acks cross; stop before keepalive timers fire
            timers = [c.get_timer() for c in (p.client, p.server_conn)]
            if not p.up.queue and not p.down.queue and all(t is None or t > p.now + 1 for t in timers):
                break
            p.step()
        assert not p.up.queue and not p.down.queue          # everything sent was delivered
        self.endpoint = p.server
        self.client_a, self.server_a = p.client, p.server_conn
        assert self.server_a.recv_epoch >= 1 and self.client_a.recv_epoch >= 1
        self.client_b = Connection.client(Config(server_key=self.endpoint.public_key), p.now)
        up, down = [], []
        self.server_b = pump(self.client_b, self.endpoint, OTHER_ADDR, p.now, up, down)
        assert self.client_b.state == self.server_b.state == State.ENCRYPTED
        self.seen = {self.server_a: Seen().add(p.up.log), self.client_a: Seen().add(p.down.log),
                     self.server_b: Seen().add(up), self.client_b: Seen().add(down)}
        self.addr = {self.server_a: CLIENT_ADDR, self.server_b: OTHER_ADDR}

    @property
    def now(self) -> float:
        return self.pair.now + 1.0

    def fresh_client_record(self, size: int) -> bytes:
        """A genuine record from client A that the server has not seen yet."""
        self.client_a.send(bytes(range(256)) * (size // 256 + 1))
        out = self.client_a.datagrams_to_send(self.pair.now)
        return out[0]

    def b_still_works(self) -> None:
        assert self.client_b.state == self.server_b.state == State.ENCRYPTED
        self.client_b.send(b"still here")
        up, down = [], []
        pump(self.client_b, self.endpoint, OTHER_ADDR, self.now, up, down)
        self.seen[self.server_b].add(up)
        self.seen[self.client_b].add(down)
        got = b"".join(e.data for e in self.server_b.events if isinstance(e, DataReceived))
        assert got.endswith(b"still here")

    def check_victim(self, victim: Connection, peer: Connection, outcome: Outcome, before: dict) -> None:
        if outcome.kind == "discard":
            assert victim.state == State.ENCRYPTED
            assert victim.stats.duplicates_discarded == before["dups"] + 1
            return
        if outcome.kind == "discarded":
            assert victim.state == State.ENCRYPTED
            want = dict(before["discarded"])
            want[outcome.reason] += 1
            assert victim.stats.discarded == want
            return
        if outcome.kind == "stale":
            assert victim.state == State.ENCRYPTED
            assert victim.stats.stale_epoch_discarded == before["stale"] + 1
            return
        assert outcome.kind == "fail"
        assert victim.state == State.CLOSED, f"expected close code {outcome.code!r}"
        info = victim.close_info
        assert (info.code, info.error, info.by_peer) == (outcome.code, True, False)
        # the peer is told: the sealed CLOSE ends it with the same code
        with transitions() as moves:
            for d in victim.datagrams_to_send(self.now):
                peer.receive_datagram(d, self.now)
        assert moves == FAILED
        assert peer.state == State.CLOSED
        assert (peer.close_info.code, peer.close_info.by_peer, peer.close_info.error) == (outcome.code, True, True)


def _before(conn: Optional[Connection]) -> dict:
    if conn is None:
        return {}
    return {"dups": conn.stats.duplicates_discarded, "stale": conn.stats.stale_epoch_discarded,
            "discarded": dict(conn.stats.discarded)}


def deliver_to_endpoint(world: World, data: bytes, addr=CLIENT_ADDR) -> None:
    ep = world.endpoint
    outcome, conn = expected_at_endpoint(world, data, addr)
    stats = dict(vars(ep.stats))
    before = _before(conn)
    n_conns = len(ep.connections)
    addrs = dict(ep.peer_addr)
    with transitions() as moves:
        got, new = ep.receive(data, addr, world.now)        # must not raise
    assert all(ep.peer_addr.get(cid, a) == a for cid, a in addrs.items())    # nothing here authenticates
    assert moves == (FAILED if outcome.kind == "fail" else [(State.INIT, Event.RECV_HELLO)] * bool(new))
    after = vars(ep.stats)
    if outcome.kind.startswith("drop_") or outcome.kind == "reject":
        counters = {"drop_short": ["dropped_short"], "drop_unknown_cid": ["dropped_unknown_cid"],
                    "drop_bad_hello": ["dropped_bad_hello"],
                    "reject": ["handshakes_rejected", "rejected_version"]}[outcome.kind]
        counters += ["resets_sent"] if outcome.reset else []
        assert (got, new) == (None, False)
        for counter in counters:
            assert after[counter] == stats[counter] + 1
        assert {k: v for k, v in after.items() if k not in counters} == \
            {k: v for k, v in stats.items() if k not in counters}
        assert len(ep.connections) == n_conns
        assert world.server_a.state == State.ENCRYPTED
        # a stateless answer (REJECT, RESET) only where one is due, never larger than the datagram
        replies = ep.replies[:]
        ep.replies.clear()
        assert len(replies) == (outcome.kind == "reject" or outcome.reset)
        assert all(len(r) <= len(data) for r, _ in replies)
    elif outcome.kind == "hello":      # a well-formed hello: a new connection or a REJECT, nothing else
        assert world.server_a.state == State.ENCRYPTED
        if new:
            assert got.state == State.KEY_EXCHANGE and len(ep.connections) == n_conns + 1
        else:
            assert got is None and after["handshakes_rejected"] == stats["handshakes_rejected"] + 1
    else:
        assert got is conn and not new
        peer = world.client_a if conn is world.server_a else world.client_b
        world.check_victim(conn, peer, outcome, before)
    if conn is not world.server_b:
        world.b_still_works()


# --- strategies ---------------------------------------------------------------------------------
def flips(n_bits: int):
    return st.lists(st.integers(0, n_bits - 1), min_size=1, max_size=3, unique=True)


def flip(data: bytes, bits: List[int]) -> bytes:
    out = bytearray(data)
    for b in bits:
        out[b // 8] ^= 0x80 >> (b % 8)
    return bytes(out)


_hello_payload = st.builds(
    lambda kind, version, suite, flags, cid, pub, tail: wire.encode_hello(
        wire.Hello(kind, version, suite, cid, pub, cookie=tail[:16], static_key=tail, confirm_tag=tail,
                   reject_code=flags)),
    st.integers(1, 4), st.sampled_from([2, 2, 2, 1, 3]), st.integers(0, 3), st.integers(0, 255),
    st.integers(0, (1 << 64) - 1), st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32))
_payloads = st.one_of(st.binary(max_size=120), st.integers(16, 200).flatmap(
    lambda n: st.binary(min_size=n, max_size=n)), _hello_payload,
    st.binary(min_size=16, max_size=16).map(lambda t: wire.encode_reset(t)[wire.HEADER_LEN:]))


def header_shaped():
    """Datagrams with a plausible header: mostly the right length, a live or random CID, a seq
    that may repeat a received packet number or name any epoch, and a random or hello payload."""
    return st.tuples(st.sampled_from(["a", "a", "b", "zero", "random"]), st.integers(0, (1 << 64) - 1),
                     st.sampled_from(["small", "epoch", "any", "zero"]), _payloads,
                     st.sampled_from([0, 0, 0, 0, 0, -1, 1, -2, 2]))


def _seq(seqkind: str, rnd: int) -> int:
    return {"small": rnd % 64, "epoch": wire.make_seq(rnd % 4, rnd % 40), "any": rnd, "zero": 0}[seqkind]


def build_header_shaped(world: World, spec) -> bytes:
    which, rnd, seqkind, payload, skew = spec
    cid = {"a": world.server_a.local_cid, "b": world.server_b.local_cid, "zero": 0, "random": rnd}[which]
    return _HDR.pack(max(0, len(payload) + skew), cid, _seq(seqkind, rnd)) + payload


# --- properties at the endpoint -----------------------------------------------------------------
@SETTINGS
@given(data=st.binary(max_size=200))
def test_arbitrary_datagrams_at_the_endpoint(data):
    deliver_to_endpoint(World(), data)


@SETTINGS
@given(spec=st.data())
def test_header_shaped_datagrams_at_the_endpoint(spec):
    world = World()
    deliver_to_endpoint(world, build_header_shaped(world, spec.draw(header_shaped())))


@SETTINGS
@given(size=st.integers(0, 1300), cut=st.integers(0, 2000))
def test_truncated_records_at_the_endpoint(size, cut):
    world = World()
    record = world.fresh_client_record(size)
    cut = cut % len(record)                      # strictly shorter than the record
    outcome, _ = expected_at_endpoint(world, record[:cut])
    assert outcome == (Outcome("drop_short") if cut < 24 else Outcome("fail", CloseCode.MALFORMED_RECORD))
    deliver_to_endpoint(world, record[:cut])


@SETTINGS
@given(size=st.integers(0, 1300), bits=st.data())
def test_bit_flipped_record_ends_only_its_connection(size, bits):
    world = World()
    record = world.fresh_client_record(size)
    flipped = flip(record, bits.draw(flips(8 * len(record))))
    outcome, _ = expected_at_endpoint(world, flipped)
    assert outcome.kind in ("fail", "discard", "discarded", "stale", "drop_unknown_cid")
    if outcome.kind == "fail":
        assert outcome.code in (CloseCode.MALFORMED_RECORD, CloseCode.AUTH_FAILURE, CloseCode.KEY_UPDATE_ERROR,
                                CloseCode.PROTOCOL_VIOLATION)
    deliver_to_endpoint(world, flipped)


@SETTINGS
@given(bits=st.data())
def test_bit_flipped_payload_or_tag_is_an_auth_failure(bits):
    """Flips confined to the ciphertext and tag: always AUTH_FAILURE, never anything else."""
    world = World()
    record = world.fresh_client_record(100)
    flipped = flip(record, [b + 8 * wire.HEADER_LEN for b in
                            bits.draw(flips(8 * (len(record) - wire.HEADER_LEN)))])
    assert expected_at_endpoint(world, flipped)[0] == Outcome("fail", CloseCode.AUTH_FAILURE)
    deliver_to_endpoint(world, flipped)


@SETTINGS
@given(bits=st.data())
def test_bit_flipped_seq(bits):
    """Flips confined to seq (header bytes 16..23): a received packet number is discarded, a
    usable epoch fails authentication, any other epoch is a KEY_UPDATE_ERROR."""
    world = World()
    record = world.fresh_client_record(60)
    flipped = flip(record, [128 + b for b in bits.draw(flips(64))])
    outcome, _ = expected_at_endpoint(world, flipped)
    assert outcome in (Outcome("discard"), Outcome("stale"), Outcome("fail", CloseCode.AUTH_FAILURE),
                       Outcome("fail", CloseCode.KEY_UPDATE_ERROR), Outcome("fail", CloseCode.MALFORMED_RECORD))
    deliver_to_endpoint(world, flipped)


@SETTINGS
@given(spec=st.data(), kind=st.sampled_from(["shaped", "arbitrary", "cut", "flip"]),
       addr=st.sampled_from([THIRD_ADDR, OTHER_ADDR]))
def test_nothing_unauthenticated_from_another_address_ends_a_connection(spec, kind, addr):
    """§10.2: a datagram naming connection A that comes from any address but A's peer's (a third
    party's, or another client's) is discarded and counted, whatever it holds."""
    world = World()
    if kind == "shaped":
        data = build_header_shaped(world, spec.draw(header_shaped()))
    elif kind == "arbitrary":
        data = world.server_a.local_cid.to_bytes(8, "big").join(
            [spec.draw(st.binary(min_size=8, max_size=8)), spec.draw(st.binary(max_size=200))])
    else:
        record = world.fresh_client_record(spec.draw(st.integers(0, 1300)))
        if kind == "cut":
            data = record[:spec.draw(st.integers(wire.HEADER_LEN, len(record) - 1))]
        else:
            data = flip(record, spec.draw(flips(8 * len(record))))
    outcome, conn = expected_at_endpoint(world, data, addr)
    if conn is world.server_a:
        assert outcome.kind != "fail"
    deliver_to_endpoint(world, data, addr)
    assert world.server_a.state == State.ENCRYPTED


def test_genuine_record_from_a_new_address_moves_the_connection():
    """NAT rebinding: the peer's newest authenticated record, from a new address, moves the
    connection there; a replayed (duplicate) one from elsewhere does not."""
    world = World()
    ep = world.endpoint
    old = world.fresh_client_record(100)
    ep.receive(old, CLIENT_ADDR, world.now)
    ep.receive(old, THIRD_ADDR, world.now)                  # a replay from elsewhere
    assert ep.peer_addr[world.server_a.local_cid] == CLIENT_ADDR and ep.stats.migrations == 0
    fresh = world.fresh_client_record(100)
    got, _ = ep.receive(fresh, THIRD_ADDR, world.now)
    assert got is world.server_a and world.server_a.state == State.ENCRYPTED
    assert ep.peer_addr[world.server_a.local_cid] == THIRD_ADDR and ep.stats.migrations == 1
    # from now on the old address is the stranger: its junk is discarded, not fatal
    junk = flip(world.fresh_client_record(100), [8 * 30])
    deliver_to_endpoint_from(world, junk, CLIENT_ADDR, THIRD_ADDR)
    assert world.server_a.state == State.ENCRYPTED and world.server_a.stats.discarded["auth"] == 1
    world.b_still_works()


def deliver_to_endpoint_from(world: World, data: bytes, addr, peer_addr) -> None:
    world.addr[world.server_a] = peer_addr
    deliver_to_endpoint(world, data, addr)


def test_client_hello_repeated_or_reused_at_the_endpoint():
    """§4.3: the same hello again (with or without a cookie) is discarded once ENCRYPTED;
    another hello from the same address with the same client CID (a changed CLIENT_HELLO
    re-sent under an established client CID) is discarded and counted too: no handshake
    record ends a connection (§10.2)."""
    world = World()
    hello = world.seen[world.server_a].hello
    deliver_to_endpoint(world, hello)
    with_cookie = hello[:72] + b"\x5a" * 16 + hello[88:]
    assert expected_at_endpoint(world, with_cookie)[0] == Outcome("discard")
    deliver_to_endpoint(world, with_cookie)
    assert world.server_a.state == State.ENCRYPTED
    other = Connection.client(world.client_a.config, 0.0).datagrams_to_send(0.0)[0]
    reused = other[:32] + world.client_a.local_cid.to_bytes(8, "big") + other[40:]
    assert expected_at_endpoint(world, reused)[0] == Outcome("discarded", reason="handshake")
    deliver_to_endpoint(world, reused)
    assert world.server_a.state == State.ENCRYPTED


def test_flip_onto_a_received_packet_number_is_discarded():
    world = World()
    record = world.fresh_client_record(60)
    epoch, pn = wire.split_seq(_HDR.unpack_from(record)[2])
    low = pn & -pn                                      # clear the lowest set bit: an older, received pn
    flipped = record[:16] + wire.make_seq(epoch, pn ^ low).to_bytes(8, "big") + record[24:]
    assert expected_at_endpoint(world, flipped)[0] == Outcome("discard")
    deliver_to_endpoint(world, flipped)
    # the genuine record still gets through afterwards: the discard did not mark its pn
    world.endpoint.receive(record, CLIENT_ADDR, world.now)
    assert world.server_a.state == State.ENCRYPTED and world.server_a.stats.auth_failures == 0


@SETTINGS
@given(bits=st.data())
def test_bit_flipped_client_hello_at_the_endpoint(bits):
    """A damaged hello creates at most one connection and never touches the live ones."""
    world = World()
    hello = Connection.client(Config(), 0.0).datagrams_to_send(0.0)[0]
    deliver_to_endpoint(world, flip(hello, bits.draw(flips(8 * len(hello)))))
    assert world.server_a.state == State.ENCRYPTED


def test_genuine_duplicate_is_discarded_and_replay_of_an_old_record_too():
    world = World()
    record = world.fresh_client_record(50)
    world.endpoint.receive(record, CLIENT_ADDR, world.now)
    world.seen[world.server_a].add([record])
    assert expected_outcome(world.server_a, record, world.seen[world.server_a]) == Outcome("discard")
    deliver_to_endpoint(world, record)
    assert world.server_a.state == State.ENCRYPTED


# --- properties at an established client Connection ------------------------------------------------
def deliver_to_client(world: World, data: bytes) -> None:
    client = world.client_a
    outcome = expected_outcome(client, data, world.seen[client])
    before = _before(client)
    with transitions() as moves:
        client.receive_datagram(data, world.now)                   # must not raise
    assert moves == (FAILED if outcome.kind == "fail" else [])
    world.check_victim(client, world.server_a, outcome, before)
    assert world.server_b.state == State.ENCRYPTED


def fresh_server_record(world: World, size: int) -> bytes:
    world.server_a.send(bytes(range(256)) * (size // 256 + 1))
    return world.server_a.datagrams_to_send(world.pair.now)[0]


@SETTINGS
@given(data=st.binary(max_size=200))
def test_arbitrary_datagrams_at_a_client(data):
    deliver_to_client(World(), data)


@SETTINGS
@given(spec=st.data())
def test_header_shaped_datagrams_at_a_client(spec):
    world = World()
    which, rnd, seqkind, payload, skew = spec.draw(header_shaped())
    cid = {"a": world.client_a.local_cid, "b": rnd, "zero": 0, "random": rnd}[which]
    deliver_to_client(world, _HDR.pack(max(0, len(payload) + skew), cid, _seq(seqkind, rnd)) + payload)


@SETTINGS
@given(size=st.integers(0, 1300), cut=st.data(), bits=st.data(), mode=st.sampled_from(["cut", "flip"]))
def test_truncated_or_bit_flipped_records_at_a_client(size, cut, bits, mode):
    world = World()
    record = fresh_server_record(world, size)
    if mode == "cut":
        damaged = record[:cut.draw(st.integers(0, len(record) - 1))]
    else:
        damaged = flip(record, bits.draw(flips(8 * len(record))))
    deliver_to_client(world, damaged)


def test_server_hello_repeated_at_an_established_client_is_discarded():
    world = World()
    deliver_to_client(world, world.seen[world.client_a].hello)
    assert world.client_a.state == State.ENCRYPTED


# --- the version 2 handshake layouts (section 4) ---------------------------------------------------
_key = st.binary(min_size=32, max_size=32)
hello_st = st.one_of(
    st.builds(lambda v, s, cid, e, c: wire.Hello(wire.HS_CLIENT_HELLO, v, s, cid, e, cookie=c),
              st.integers(0, 255), st.integers(0, 255), st.integers(1, (1 << 64) - 1), _key,
              st.binary(min_size=16, max_size=16)),
    st.builds(lambda v, s, cid, f, st_, tag: wire.Hello(wire.HS_SERVER_HELLO, v, s, cid, f, static_key=st_,
                                                        confirm_tag=tag),
              st.integers(0, 255), st.integers(0, 255), st.integers(0, (1 << 64) - 1), _key, _key, _key),
    st.builds(lambda v, s, code: wire.Hello(wire.HS_REJECT, v, s, reject_code=code),
              st.integers(0, 255), st.integers(0, 255), st.integers(0, 255)),
    st.builds(lambda v, s, c: wire.Hello(wire.HS_COOKIE, v, s, cookie=c),
              st.integers(0, 255), st.integers(0, 255), st.binary(min_size=16, max_size=16)),
)


@settings(max_examples=400, deadline=None, derandomize=True)
@given(hello=hello_st)
def test_handshake_payloads_round_trip(hello):
    payload = wire.encode_hello(hello)
    assert len(payload) == wire.HANDSHAKE_PAYLOAD_LEN
    assert wire.decode_hello(payload) == hello
    assert payload[0] == hello.kind and payload[1] == hello.version and payload[2] == hello.suite


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(payload=st.one_of(st.binary(min_size=112, max_size=112), st.binary(max_size=140),
                         hello_st.map(wire.encode_hello)), bits=st.data())
def test_decode_hello_raises_only_malformed_and_keeps_what_it_reads(payload, bits):
    """Any bytes: MalformedRecord or a Hello whose re-encoding differs from the input only in
    the bytes section 4.1 tells receivers to ignore (flags but a REJECT's, reserved, unused)."""
    if payload and bits.draw(st.booleans()):
        payload = flip(payload, bits.draw(flips(8 * len(payload))))
    try:
        hello = wire.decode_hello(payload)
    except MalformedRecord:
        return
    again = wire.encode_hello(hello)
    ignored = {3, 4, 5, 6, 7} if hello.kind != wire.HS_REJECT else {4, 5, 6, 7}
    if hello.kind in (wire.HS_REJECT, wire.HS_COOKIE):
        ignored |= set(range(8, 16)) | set(range(8 if hello.kind == wire.HS_REJECT else 32, 112))
    assert all(a == b for i, (a, b) in enumerate(zip(payload, again, strict=True)) if i not in ignored)
    if hello.kind == wire.HS_CLIENT_HELLO:
        assert hello.sender_cid != 0 and not any(payload[64:])


@settings(max_examples=300, deadline=None, derandomize=True)
@given(hello=hello_st.filter(lambda h: h.kind == wire.HS_CLIENT_HELLO), cookie=st.binary(min_size=16, max_size=16))
def test_the_transcript_form_ignores_the_cookie_and_nothing_else(hello, cookie):
    record = wire.pack_header(112, 0, 0) + wire.encode_hello(hello)
    other = wire.pack_header(112, 0, 0) + wire.encode_hello(wire.Hello(
        hello.kind, hello.version, hello.suite, hello.sender_cid, hello.public_key, cookie=cookie))
    assert wire.client_hello_transcript_form(record) == wire.client_hello_transcript_form(other)
    for i in (24, 25, 26, 27, 40, 71, 88):        # type, version, suite, flags, cid, E, padding
        changed = record[:i] + bytes([record[i] ^ 1]) + record[i + 1:]
        assert wire.client_hello_transcript_form(changed) != wire.client_hello_transcript_form(record)


@settings(max_examples=500, deadline=None, derandomize=True)
@given(token=st.binary(min_size=16, max_size=16), data=st.binary(max_size=120), bits=st.data())
def test_reset_and_v1_recognition(token, data, bits):
    reset = wire.encode_reset(token)
    assert wire.reset_token_of(reset) == token and wire.v1_client_hello_cid(reset) is None
    damaged = flip(reset, bits.draw(flips(8 * 26)))              # header, type or version
    assert wire.reset_token_of(damaged) is None
    got = wire.reset_token_of(data)
    assert got is None or (len(data) == 56 and data[-16:] == got)
    cid = wire.v1_client_hello_cid(data)
    assert cid is None or (len(data) == 104 and data[24:26] == b"\x01\x01")


# --- decode_frames ----------------------------------------------------------------------------------
frame_st = st.one_of(
    st.builds(wire.PaddingFrame, st.integers(1, 20)),
    st.just(wire.PingFrame()),
    st.builds(wire.MaxDataFrame, st.integers(0, (1 << 64) - 1)),
    st.builds(wire.KeyUpdateFrame, st.integers(0, 0xFFFF)),
    st.builds(wire.StreamFrame, st.integers(0, (1 << 64) - 1), st.binary(max_size=60), st.booleans()),
    st.builds(wire.CloseFrame, st.integers(0, 0xFFFF), st.text(max_size=40)),
    st.lists(st.integers(0, 1 << 40), min_size=1, max_size=80, unique=True).map(
        lambda pns: wire.AckFrame(tuple(_ranges(pns)))),
    st.builds(wire.ClientAuthFrame, st.binary(min_size=32, max_size=32), st.binary(min_size=32, max_size=32)),
    st.builds(wire.ResetTokenFrame, st.binary(min_size=16, max_size=16)),
)


def _ranges(pns):
    pns = sorted(pns, reverse=True)
    out = []
    for pn in pns:
        if out and out[-1][0] - 1 == pn:
            out[-1] = (pn, out[-1][1])
        else:
            out.append((pn, pn))
    return out


def _normalise(frames):
    """Adjacent padding runs merge; the encoder keeps only the newest 64 ack ranges."""
    out = []
    for frame in frames:
        f = wire.AckFrame(frame.ranges[:wire.MAX_ACK_RANGES], frame.delay_us) if isinstance(frame, wire.AckFrame) \
            else frame
        if isinstance(f, wire.PaddingFrame) and out and isinstance(out[-1], wire.PaddingFrame):
            out[-1] = wire.PaddingFrame(out[-1].length + f.length)
        else:
            out.append(f)
    return out


@settings(max_examples=300, deadline=None, derandomize=True)
@given(frames=st.lists(frame_st, max_size=8))
def test_frames_round_trip(frames):
    blob = b"".join(wire.encode_frame(f) for f in frames)
    assert wire.decode_frames(blob) == _normalise(frames)


@settings(max_examples=1000, deadline=None, derandomize=True)
@given(data=st.binary(max_size=300))
def test_decode_frames_on_arbitrary_bytes_raises_only_protocol_violation(data):
    try:
        frames = wire.decode_frames(data)
    except ProtocolViolation:
        return
    assert b"".join(wire.encode_frame(f) for f in frames) == data or any(
        isinstance(f, wire.CloseFrame) for f in frames)        # a bad-UTF-8 reason is replaced


@settings(max_examples=500, deadline=None, derandomize=True)
@given(frames=st.lists(frame_st, min_size=1, max_size=6), bits=st.data(), cut=st.data())
def test_decode_frames_on_damaged_frames_raises_only_protocol_violation(frames, bits, cut):
    blob = b"".join(wire.encode_frame(f) for f in frames)
    if not blob:
        return
    damaged = flip(blob, bits.draw(flips(8 * len(blob))))[:cut.draw(st.integers(0, len(blob)))]
    try:
        wire.decode_frames(damaged)
    except ProtocolViolation:
        pass


# --- whole transfers: invariants the document states ---------------------------------------------
def _transfer(interval: int, loss: float, seed: int, size: int = 120_000):
    rng = random.Random(seed)
    fault = (lambda d: [] if rng.random() < loss else [d]) if loss else None
    cfg = dict(key_update_interval=interval)
    p = Pair(Config(**cfg), Config(**cfg), up=Link(fault=fault, seed=seed), down=Link(fault=fault, seed=seed + 1))
    p.run(lambda: bool(p.server_conns) and p.server_conn.state == State.ENCRYPTED or p.client.is_closed)
    data = random.Random(seed).randbytes(size)
    p.client.send(data)
    p.client.shutdown_write()
    p.run(lambda: p.finished["server"] or p.client.is_closed or p.server_conn.is_closed, max_time=300)
    return p, data


def test_no_datagram_exceeds_max_datagram_across_key_updates():
    p, data = _transfer(interval=20, loss=0.0, seed=1)
    assert bytes(p.received["server"]) == data and p.client.stats.key_updates_sent >= 3
    sizes = [len(d) for d in p.up.log + p.down.log]
    assert max(sizes) <= wire.DEFAULT_MAX_DATAGRAM, f"{sum(s > 1452 for s in sizes)} datagrams over 1452"


def test_forced_key_updates_survive_loss():
    for seed in (0, 3, 4, 6):
        p, data = _transfer(interval=4, loss=0.1, seed=seed, size=60_000)
        assert not p.closed, f"seed {seed}: {p.closed}"
        assert bytes(p.received["server"]) == data
