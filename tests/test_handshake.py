"""The version 2 handshake against docs/PROTOCOL.md sections 4 and 5, in the simulated network:
server authentication against a relay built from the package, no downgrade by rewriting the
hello, replies as hints, forward secrecy with recorded traffic, client authentication,
cookies, REJECT_BUSY, version 1 peers and the stateless reset."""
from __future__ import annotations

import hashlib
import hmac
from typing import Callable, Dict, List, Optional, Tuple

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

from stcp import cid_layout as stcp_cid, crypto, handshake, identity, wire
from stcp.connection import Config, Connection, DataReceived, HandshakeCompleted
from stcp.endpoint import ServerEndpoint
from stcp.errors import AuthenticationFailure, CloseCode, HandshakeFailure
from stcp.handshake import cookie_record, reject_record
from stcp.state import State
from tests.support.sim import CLIENT_ADDR, Link, Pair

SERVER_ADDR = ("198.51.100.1", 7443)
RELAY_ADDR = ("203.0.113.9", 40000)
Addr = Tuple[str, int]


class Net:
    """Sans-IO nodes joined with no delay: every step delivers what each node has to send,
    runs due timers and advances the clock by 5 ms. `tamper(src, dst, datagram)` may rewrite
    or drop (None) a datagram in transit; `log` keeps what was delivered."""

    def __init__(self, tamper: Optional[Callable[[Addr, Addr, bytes], Optional[bytes]]] = None):
        self.now = 0.0
        self.clients: Dict[Addr, Tuple[Connection, Addr]] = {}
        self.servers: Dict[Addr, Tuple[ServerEndpoint, List[Connection]]] = {}
        self.tamper = tamper
        self.log: List[Tuple[Addr, Addr, bytes]] = []
        self.on_step: List[Callable[[], None]] = []

    def client(self, addr: Addr, conn: Connection, server: Addr) -> Connection:
        self.clients[addr] = (conn, server)
        return conn

    def server(self, addr: Addr, endpoint: ServerEndpoint) -> ServerEndpoint:
        self.servers[addr] = (endpoint, [])
        return endpoint

    def conns(self, addr: Addr) -> List[Connection]:
        return self.servers[addr][1]

    def step(self) -> None:
        out = []
        for addr, (conn, dst) in self.clients.items():
            out += [(addr, dst, d) for d in conn.datagrams_to_send(self.now)]
        for addr, (ep, conns) in self.servers.items():
            for c in conns:
                out += [(addr, ep.peer_addr.get(c.local_cid), d) for d in c.datagrams_to_send(self.now)]
            out += [(addr, a, d) for d, a in ep.replies]
            ep.replies.clear()
        for src, dst, sent in out:
            d = sent if self.tamper is None else self.tamper(src, dst, sent)
            if d is None:
                continue
            self.log.append((src, dst, d))
            if dst in self.clients:
                self.clients[dst][0].receive_datagram(d, self.now)
            elif dst in self.servers:
                ep, conns = self.servers[dst]
                conn, new = ep.receive(d, src, self.now)
                if new:
                    conns.append(conn)
        for cb in self.on_step:
            cb()
        self.now += 0.005
        nodes = [c for c, _ in self.clients.values()] + [c for _, cs in self.servers.values() for c in cs]
        for c in nodes:
            t = c.get_timer()
            if t is not None and t <= self.now:
                c.handle_timer(self.now)

    def run(self, until: Callable[[], bool], max_time: float = 30.0) -> None:
        while not until():
            assert self.now < max_time, f"nothing happened by t={self.now:.2f}s"
            self.step()


def events(conn: Connection) -> list:
    out = []
    while (ev := conn.next_event()) is not None:
        out.append(ev)
    return out


def sent_protected(net: Net, src: Addr) -> List[bytes]:
    """Protected records (seq != 0) `src` sent: an application byte needs one."""
    return [d for s, _, d in net.log if s == src and wire.parse_header(d)[2] != 0]


# --- a relay built from the package (issue 11) ---------------------------------------------------
class Relay:
    """An active attacker in the middle, built from stcp itself: a server endpoint with its own
    static key faces the client, a client connection faces the real server, and what the
    client says is read and rewritten on its way through."""

    def __init__(self, net: Net, rewrite: Callable[[bytes], bytes]):
        self.front = net.server(RELAY_ADDR, ServerEndpoint(Config()))
        self.back = net.client(("203.0.113.9", 40001), Connection.client(Config(), net.now), SERVER_ADDR)
        self.net, self.rewrite = net, rewrite
        self.seen = bytearray()
        net.on_step.append(self._pass_on)

    def _pass_on(self) -> None:
        for conn in self.net.conns(RELAY_ADDR):
            for ev in events(conn):
                if isinstance(ev, DataReceived):
                    self.seen += ev.data
                    if self.back.state == State.ENCRYPTED:
                        self.back.send(self.rewrite(ev.data))


def relay_setup(server_key, rewrite=lambda d: d.replace(b"100", b"999")):
    net = Net()
    server = net.server(SERVER_ADDR, ServerEndpoint(Config()))
    relay = Relay(net, rewrite)
    client = net.client(CLIENT_ADDR, Connection.client(Config(server_key=server_key(server)), 0.0), RELAY_ADDR)
    return net, server, relay, client


def test_relay_reads_and_rewrites_an_unpinned_client():
    """The attack is real: a client that accepts any server key talks to the relay, which
    reads the transfer and changes it (so the pinned-key test below can fail)."""
    net, server, relay, client = relay_setup(lambda s: None)
    net.run(lambda: client.state == State.ENCRYPTED and relay.back.state == State.ENCRYPTED)
    assert client.peer_static_key == relay.front.public_key != server.public_key
    client.send(b"transfer 100 EUR")
    got = bytearray()
    net.run(lambda: any(isinstance(e, DataReceived) and got.extend(e.data) is None and got
                        for c in net.conns(SERVER_ADDR) for e in events(c)))
    assert bytes(relay.seen) == b"transfer 100 EUR" and bytes(got) == b"transfer 999 EUR"


@pytest.mark.parametrize("policy", ["pinned", "known_host"])
def test_pinned_client_refuses_the_relay_before_any_application_byte(policy):
    recorded = {}

    def pin(server):
        if policy == "pinned":
            return server.public_key
        recorded["host"] = server.public_key           # a known-hosts entry from an earlier visit
        return lambda key: hmac.compare_digest(key, recorded["host"])

    net, server, relay, client = relay_setup(pin)
    net.run(lambda: client.is_closed, max_time=15)
    assert client.close_info.code == CloseCode.HANDSHAKE_FAILED
    if policy == "pinned":
        assert client.close_info.reason == (
            f"expected server key {identity.fingerprint(server.public_key)}, presented "
            f"{identity.fingerprint(relay.front.public_key)} (no acceptable server hello within 10 s)")
    else:
        assert identity.fingerprint(relay.front.public_key) in client.close_info.reason
    assert client.stats.handshake_hints_ignored >= 1
    assert sent_protected(net, CLIENT_ADDR) == [] and relay.seen == bytearray()
    assert not any(isinstance(e, HandshakeCompleted) for e in events(client))


def test_pinned_client_reaches_the_genuine_server():
    net = Net()
    server = net.server(SERVER_ADDR, ServerEndpoint(Config()))
    client = net.client(CLIENT_ADDR, Connection.client(Config(server_key=server.public_key), 0.0), SERVER_ADDR)
    net.run(lambda: client.state == State.ENCRYPTED)
    [done] = [e for e in events(client) if isinstance(e, HandshakeCompleted)]
    assert done.peer_key == client.peer_static_key == server.public_key


# --- rewriting the hello in transit: no downgrade -------------------------------------------------
def _ch_rewriter(offset: int, value: int, fix_sh: Optional[Tuple[int, int]] = None):
    """Rewrite one payload byte of the CLIENT_HELLO on its way up (and optionally one byte of
    the SERVER_HELLO on its way down, to undo the echo of the change)."""
    def tamper(src, dst, d):
        _, cid, seq = wire.HEADER_STRUCT.unpack_from(d)
        if seq == 0 and cid == 0 and dst == SERVER_ADDR and len(d) == wire.HANDSHAKE_RECORD_LEN:
            d = d[:24 + offset] + bytes([value]) + d[25 + offset:]
        elif fix_sh and seq == 0 and dst == CLIENT_ADDR and len(d) == wire.HANDSHAKE_RECORD_LEN \
                and d[24] == wire.HS_SERVER_HELLO:
            d = d[:24 + fix_sh[0]] + bytes([fix_sh[1]]) + d[25 + fix_sh[0]:]
        return d
    return tamper


@pytest.mark.parametrize("field,tamper,why", [
    ("version", _ch_rewriter(1, 3), "unsupported protocol version"),
    ("version 1", _ch_rewriter(1, 1), "unsupported protocol version"),
    ("flags", _ch_rewriter(3, 0x01), "key confirmation"),
    ("reserved", _ch_rewriter(5, 0x80), "key confirmation"),
    ("suite", _ch_rewriter(2, wire.SUITE_CHACHA20_POLY1305), "changed the version or cipher suite"),
    ("suite, server hello patched back", _ch_rewriter(2, wire.SUITE_CHACHA20_POLY1305, (2, wire.SUITE_AES_256_GCM)),
     "key confirmation"),
])
def test_rewritten_client_hello_is_refused(field, tamper, why):
    """Every byte of the hello but the cookie is in the transcript: a relay that changes the
    version, flags, reserved bytes or suite gets no connection (section 5.3)."""
    net = Net(tamper)
    server = net.server(SERVER_ADDR, ServerEndpoint(Config()))
    client = net.client(CLIENT_ADDR, Connection.client(Config(server_key=server.public_key), 0.0), SERVER_ADDR)
    net.run(lambda: client.is_closed, max_time=15)
    assert client.close_info.code == CloseCode.HANDSHAKE_FAILED and why in client.close_info.reason
    assert sent_protected(net, CLIENT_ADDR) == []
    assert all(c.state != State.ENCRYPTED for c in net.conns(SERVER_ADDR))


def test_rewritten_cookie_field_changes_nothing():
    """The cookie is the one field outside the transcript (a retransmitted hello may carry one):
    rewriting it cannot change what the handshake means. Without load the server ignores it
    and the client still authenticates the genuine server and gets its keys."""
    net = Net(_ch_rewriter(48, 0x77))
    server = net.server(SERVER_ADDR, ServerEndpoint(Config()))
    client = net.client(CLIENT_ADDR, Connection.client(Config(server_key=server.public_key), 0.0), SERVER_ADDR)
    net.run(lambda: client.state == State.ENCRYPTED and net.conns(SERVER_ADDR)[0].state == State.ENCRYPTED)
    assert client._keys.send.secret == net.conns(SERVER_ADDR)[0]._keys.recv.secret


def test_rewritten_server_static_key_is_refused():
    """A server hello with another static key: the tag no longer verifies (S is in the transcript)."""
    other = identity.public_key(identity.generate_private_key())

    def tamper(src, dst, d):
        if dst == CLIENT_ADDR and len(d) == wire.HANDSHAKE_RECORD_LEN and d[24] == wire.HS_SERVER_HELLO:
            d = d[:24 + 48] + other + d[24 + 80:]
        return d
    net = Net(tamper)
    net.server(SERVER_ADDR, ServerEndpoint(Config()))
    client = net.client(CLIENT_ADDR, Connection.client(Config(), 0.0), SERVER_ADDR)
    net.run(lambda: client.is_closed, max_time=15)
    assert "key confirmation" in client.close_info.reason


# --- unauthenticated replies are hints ----------------------------------------------------------------
def test_forged_replies_from_off_path_do_not_end_the_handshake():
    """An attacker who saw the client hello answers first with a REJECT of every code, a COOKIE,
    a server hello of its own and junk; the genuine server hello that arrives after them still
    completes the handshake (tests/sim.py network)."""
    forger_key = identity.StaticKey(identity.generate_private_key())
    forged: List[bytes] = []

    def forge(hello: bytes) -> List[bytes]:
        h = wire.decode_hello(hello[24:])
        cid = h.sender_cid
        out = [reject_record(cid, h.suite, code) for code in (1, 2, 3, 4)]
        out.append(cookie_record(cid, h.suite, b"\x42" * 16))
        fake = handshake.ServerHandshake(forger_key, hello, h, 0x1234, (h.suite,))
        out.append(fake.record)                                           # verifies, wrong key
        out.append(fake.record[:-1] + bytes([fake.record[-1] ^ 1]))       # does not verify
        out.append(wire.pack_header(112, cid, 0) + bytes(112))            # malformed
        out.append(wire.pack_header(40, cid, 7) + bytes(40))              # a "protected" record
        return out

    up = Link(delay=0.005)
    down = Link(delay=0.02)          # the genuine answer is slower than the forger
    server_key = identity.generate_private_key()
    p = Pair(Config(server_key=identity.public_key(server_key)), Config(static_key=server_key), up=up, down=down)
    hello = p.client.datagrams_to_send(0.0)[0]
    for d in forge(hello):
        forged.append(d)
        p.client.receive_datagram(d, 0.001)
    assert p.client.state == State.KEY_EXCHANGE
    assert p.client.stats.handshake_hints_ignored == len(forged)
    # the forged COOKIE made the client send its hello again at once, with that cookie
    [again] = p.client.datagrams_to_send(0.001)
    assert again[24 + 48:24 + 64] == b"\x42" * 16
    assert wire.client_hello_transcript_form(again) == hello
    up.send(hello, 0.0)
    up.send(again, 0.001)
    p.run(lambda: p.client.state == State.ENCRYPTED and p.server_conns and p.server_conn.state == State.ENCRYPTED)
    assert p.client.peer_static_key == p.server.public_key and len(p.server_conns) == 1


def test_cookie_resend_at_most_every_100_ms():
    client = Connection.client(Config(), 0.0)
    client.datagrams_to_send(0.0)
    for i, t in enumerate((0.01, 0.02, 0.05)):
        client.receive_datagram(cookie_record(client.local_cid, client.suite, bytes([i + 1]) * 16), t)
    sent = client.datagrams_to_send(0.05)
    assert len(sent) == 1 and sent[0][72:88] == b"\x01" * 16     # the first at once, then quiet
    client.handle_timer(client.get_timer())                     # the retransmission carries the newest
    [later] = client.datagrams_to_send(0.2)
    assert later[72:88] == b"\x03" * 16


# --- forward secrecy with recorded traffic ------------------------------------------------------------
def test_recorded_traffic_cannot_be_opened_with_both_static_keys():
    """Record a session between a client and a server that both have static keys; reveal both
    static private keys afterwards. Every DH an attacker can compute from them and the public
    values on the wire fails to give a key that opens a recorded record; only ee, which needs
    an ephemeral private key both sides discarded, does (the control)."""
    ephemerals = []
    real = crypto.generate_keypair

    def keep(*a):
        k = real()
        ephemerals.append(k[0])
        return k
    handshake.generate_keypair = keep
    try:
        client_static, server_static = identity.generate_private_key(), identity.generate_private_key()
        p = Pair(Config(static_key=client_static), Config(static_key=server_static))
        p.run(lambda: p.server_conns and p.server_conn.state == State.ENCRYPTED)
        p.client.send(b"the secret plans")
        p.run(lambda: bytes(p.received["server"]) == b"the secret plans")
    finally:
        handshake.generate_keypair = real
    assert p.client._client_hs is None and p.server_conn._server_hs is None    # e and f forgotten
    ch = next(d for d in p.up.log if len(d) == wire.HANDSHAKE_RECORD_LEN)
    sh = next(d for d in p.down.log if len(d) == wire.HANDSHAKE_RECORD_LEN)
    data = [d for d in p.up.log if wire.parse_header(d)[2] != 0]
    E, F, S = ch[40:72], sh[40:72], sh[72:104]
    assert S == identity.public_key(server_static)
    th = crypto.transcript_hash(ch, sh)

    def opens(ikm: bytes) -> bool:
        secrets = crypto.HandshakeSecrets(ikm[:32], ikm[32:], th)
        key = crypto.RecordKey(wire.SUITE_AES_256_GCM, secrets.client_secret)
        for d in data:
            try:
                key.open(d, wire.parse_header(d)[2])
                return True
            except AuthenticationFailure:
                pass
        return False

    def dh(private: bytes, public: bytes) -> bytes:
        return X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))

    s, c = server_static, client_static
    C = identity.public_key(c)
    computable = [dh(s, E), dh(s, F), dh(s, C), dh(c, E), dh(c, F), dh(c, S)]
    es = dh(s, E)
    candidates = [a + b for a in computable for b in computable] + [bytes(32) + es, es + es, E + es, F + es]
    assert not any(opens(ikm) for ikm in candidates)
    # control: with the discarded ephemeral (kept by the test only), the records open
    ee = ephemerals[0].exchange(X25519PublicKey.from_public_bytes(F))
    assert opens(ee + es)


# --- client authentication ----------------------------------------------------------------------------
def _client_key():
    private = identity.generate_private_key()
    return private, identity.public_key(private)


def test_client_auth_allowed():
    private, public = _client_key()
    p = Pair(Config(static_key=private), Config(allowed_clients=[public]))
    p.run(lambda: p.server_conns and p.server_conn.state == State.ENCRYPTED)
    [done] = [e for e in p.events["server"] if isinstance(e, HandshakeCompleted)]
    assert done.peer_key == p.server_conn.peer_static_key == public
    p.client.send(b"hello")
    p.run(lambda: bytes(p.received["server"]) == b"hello")
    assert p.client._client_auth is None           # acknowledged: no longer sent


def test_client_auth_without_allow_list_exposes_the_key_or_none():
    private, public = _client_key()
    p = Pair(Config(static_key=private), Config())
    p.run(lambda: p.server_conns and p.server_conn.state == State.ENCRYPTED)
    assert p.server_conn.peer_static_key == public
    q = Pair()
    q.run(lambda: q.server_conns and q.server_conn.state == State.ENCRYPTED)
    assert q.server_conn.peer_static_key is None


def test_client_not_allowed_is_closed_access_denied_and_counted():
    private, _ = _client_key()
    _, listed = _client_key()
    p = Pair(Config(static_key=private), Config(allowed_clients=[listed]))
    p.run(lambda: "client" in p.closed and p.server_conns and p.server_conn.is_closed)
    assert p.closed["client"].code == CloseCode.ACCESS_DENIED and p.closed["client"].by_peer
    assert p.server_conn.close_info.code == CloseCode.ACCESS_DENIED
    assert p.received["server"] == bytearray()
    p.server.remove(p.server_conn)
    assert p.server.stats.clients_not_allowed == 1


def test_bad_client_proof_is_handshake_failed():
    private, _public = _client_key()
    client = Connection.client(Config(static_key=private), 0.0)
    ep = ServerEndpoint(Config())
    server, _ = ep.receive(client.datagrams_to_send(0.0)[0], CLIENT_ADDR, 0.0)
    client.receive_datagram(server.datagrams_to_send(0.0)[0], 0.01)
    assert client.state == State.ENCRYPTED
    auth = bytearray(client._client_auth)
    auth[-1] ^= 1                                      # the proof, damaged before it is sealed
    client._client_auth = bytes(auth)
    for d in client.datagrams_to_send(0.01):
        ep.receive(d, CLIENT_ADDR, 0.02)
    assert server.close_info.code == CloseCode.HANDSHAKE_FAILED
    assert "proof does not verify" in server.close_info.reason and server.peer_static_key is None
    for d in server.datagrams_to_send(0.02):           # the sealed CLOSE tells the client
        client.receive_datagram(d, 0.03)
    assert client.close_info.code == CloseCode.HANDSHAKE_FAILED and client.close_info.by_peer


def test_keyless_client_at_an_allow_list_server_is_denied_at_once():
    """The client's first authenticated record has no CLIENT_AUTH: the server ends the
    connection ACCESS_DENIED (counted), delivers nothing, and the client learns why at once
    instead of at its idle timeout."""
    _, listed = _client_key()
    p = Pair(Config(idle_timeout=60), Config(allowed_clients=[listed]))
    p.run(lambda: p.client.state == State.ENCRYPTED)
    p.client.send(b"let me in")
    p.run(lambda: p.client.is_closed, max_time=5)
    server = p.server_conn
    assert server.close_info.code == CloseCode.ACCESS_DENIED and not server.close_info.by_peer
    assert server.stats.client_auth_missing == 1 and server.stats.records_received == 0
    assert p.closed["client"].code == CloseCode.ACCESS_DENIED and p.closed["client"].by_peer
    assert p.now < 1.0                    # one round trip, not a timeout
    assert p.received["server"] == bytearray()
    p.server.remove(server)
    assert p.server.stats.clients_without_key == 1 and p.server.stats.clients_not_allowed == 0


def test_client_auth_survives_loss_of_the_first_records():
    private, public = _client_key()
    dropped = []

    def lose_first_two(d):
        if wire.parse_header(d)[2] != 0 and len(dropped) < 2:
            dropped.append(d)
            return []
        return [d]
    p = Pair(Config(static_key=private), Config(allowed_clients=[public]), up=Link(fault=lose_first_two))
    p.run(lambda: p.client.state == State.ENCRYPTED)
    p.client.send(b"x" * 3000)
    p.run(lambda: bytes(p.received["server"]) == b"x" * 3000)
    assert len(dropped) == 2 and all(wire.parse_header(d)[2] != 0 for d in dropped)
    assert p.server_conn.peer_static_key == public


def test_client_auth_with_another_key_later_is_a_protocol_violation():
    private, public = _client_key()
    p = Pair(Config(static_key=private), Config())
    p.run(lambda: p.server_conns and p.server_conn.state == State.ENCRYPTED and p.client._client_auth is None)
    other = wire.encode_frame(wire.ClientAuthFrame(identity.public_key(identity.generate_private_key()), bytes(32)))
    same = wire.encode_frame(wire.ClientAuthFrame(public, bytes(32)))     # same key again: ignored
    p.client._client_auth = same
    p.client.send(b"a")
    p.run(lambda: bytes(p.received["server"]) == b"a")
    p.client._client_auth = other
    p.client.send(b"b")
    p.run(lambda: p.server_conn.is_closed)
    assert p.server_conn.close_info.code == CloseCode.PROTOCOL_VIOLATION


def test_wrong_direction_frames_are_protocol_violations():
    p = Pair()
    p.run(lambda: p.server_conns and p.server_conn.state == State.ENCRYPTED)
    record = p.server_conn._seal_frames([wire.encode_frame(wire.ClientAuthFrame(bytes(32), bytes(32)))], [], True)
    p.client.receive_datagram(record, p.now)
    assert p.client.close_info.code == CloseCode.PROTOCOL_VIOLATION
    q = Pair()
    q.run(lambda: q.server_conns and q.server_conn.state == State.ENCRYPTED)
    record = q.client._seal_frames([wire.encode_frame(wire.ResetTokenFrame(bytes(16)))], [], True)
    q.server.receive(record, CLIENT_ADDR, q.now)
    assert q.server_conn.close_info.code == CloseCode.PROTOCOL_VIOLATION


# --- cookies, budgets, REJECT_BUSY ------------------------------------------------------------------
def test_cookie_round_trip_under_a_budget_of_zero():
    p = Pair(server_config=Config(hello_rate=0, hello_burst=0))
    p.run(lambda: p.client.state == State.ENCRYPTED and p.server_conns and p.server_conn.state == State.ENCRYPTED)
    st = p.server.stats
    assert (st.cookies_sent, st.cookie_admitted) == (1, 1)
    hellos = [d for d in p.up.log if len(d) == wire.HANDSHAKE_RECORD_LEN]
    assert len(hellos) == 2 and not any(hellos[0][72:88]) and any(hellos[1][72:88])
    cookie_reply = next(d for d in p.down.log if d[24] == wire.HS_COOKIE)
    assert len(cookie_reply) <= len(hellos[0])                        # amplification <= 1
    assert p.client.stats.handshake_hints_ignored == 1


def test_under_load_a_bad_or_foreign_cookie_gets_a_fresh_cookie_and_no_state():
    ep = ServerEndpoint(Config(hello_rate=0, hello_burst=0))
    client = Connection.client(Config(), 0.0)
    [hello] = client.datagrams_to_send(0.0)
    assert ep.receive(hello, CLIENT_ADDR, 0.0) == (None, False)
    [(reply, to)] = ep.replies
    assert to == CLIENT_ADDR
    cookie = reply[40:56]
    ep.replies.clear()
    with_cookie = hello[:72] + cookie + hello[88:]
    for bad in (hello[:72] + bytes([cookie[0] ^ 1]) + cookie[1:] + hello[88:], with_cookie):
        addr = CLIENT_ADDR if bad != with_cookie else ("192.0.2.77", 5000)   # another source
        assert ep.receive(bad, addr, 0.1) == (None, False)
    assert ep.stats.cookies_sent == 3 and not ep.connections and ep.stats.cookie_admitted == 0
    _conn, new = ep.receive(with_cookie, CLIENT_ADDR, 0.2)
    assert new and ep.stats.cookie_admitted == 1


def test_cookie_secret_rotation():
    ep = ServerEndpoint(Config(hello_rate=0, hello_burst=0))
    cs = ep.cookies
    E, cid = bytes(range(32)), 99
    c0 = cs.make(CLIENT_ADDR, cid, E, 1.0)
    assert cs.verify(c0, CLIENT_ADDR, cid, E, 100.0)
    assert cs.verify(c0, CLIENT_ADDR, cid, E, 1.0 + cs.rotation + 1)            # previous secret
    assert not cs.verify(c0, CLIENT_ADDR, cid, E, 1.0 + 2 * cs.rotation + 1)    # rotated twice
    c1 = cs.make(CLIENT_ADDR, cid, E, 500.0)
    assert not cs.verify(c1, CLIENT_ADDR, cid + 1, E, 500.0)
    assert not cs.verify(c1, ("192.0.2.1", 5001), cid, E, 500.0)
    assert not cs.verify(c1, CLIENT_ADDR, cid, bytes(32), 500.0)


def test_half_open_cap_asks_for_cookies_then_refuses_busy():
    ep = ServerEndpoint(Config(max_half_open=1))
    hellos = [Connection.client(Config(), 0.0).datagrams_to_send(0.0)[0] for _ in range(4)]
    assert ep.receive(hellos[0], CLIENT_ADDR, 0.0)[1]                  # below the cap: served
    assert ep.receive(hellos[1], CLIENT_ADDR, 0.0) == (None, False)    # at the cap: a COOKIE
    [(reply, _)] = ep.replies
    assert reply[24] == wire.HS_COOKIE
    ep.replies.clear()
    with_cookie = hellos[1][:72] + reply[40:56] + hellos[1][88:]
    assert ep.receive(with_cookie, CLIENT_ADDR, 0.0)[1]                # the cookie gets it in
    assert len(ep._half_open) == 2
    assert ep.receive(hellos[2], CLIENT_ADDR, 0.0) == (None, False)    # hard cap (2x): REJECT_BUSY
    [(reply, _)] = ep.replies
    assert reply[24] == wire.HS_REJECT and reply[27] == wire.REJECT_BUSY
    assert ep.stats.rejected_busy == 1 and ep.stats.dropped_over_capacity == 0


def test_completed_handshakes_leave_the_half_open_count():
    p = Pair(server_config=Config(max_half_open=1))
    p.run(lambda: p.server_conns and p.server_conn.state == State.ENCRYPTED)
    assert not p.server._half_open
    q = Connection.client(Config(), p.now)
    _conn, new = p.server.receive(q.datagrams_to_send(p.now)[0], ("192.0.2.3", 1), p.now)
    assert new                                                          # no cookie needed again


def test_reject_busy_at_max_connections():
    net = Net()
    server = net.server(SERVER_ADDR, ServerEndpoint(Config(), max_connections=1))
    first = net.client(CLIENT_ADDR, Connection.client(Config(), 0.0), SERVER_ADDR)
    net.run(lambda: first.state == State.ENCRYPTED)
    second = net.client(("192.0.2.2", 5000), Connection.client(Config(handshake_timeout=1.0), net.now), SERVER_ADDR)
    net.run(lambda: second.is_closed)
    assert second.close_info.code == CloseCode.HANDSHAKE_FAILED
    assert second.close_info.reason.startswith("server rejected the handshake: server busy: try again later")
    assert server.stats.dropped_over_capacity >= 1 and server.stats.rejected_busy >= 1
    assert first.state == State.ENCRYPTED


# --- version 1 peers ---------------------------------------------------------------------------------
def _v1_client_hello(cid: int) -> bytes:
    """A version 1 CLIENT_HELLO as PROTOCOL.md version 1 laid it out (80-byte payload)."""
    payload = (bytes([1, 1, wire.SUITE_AES_256_GCM, 0]) + bytes(4) + cid.to_bytes(8, "big")
               + bytes(range(32)) + bytes(32))
    return wire.pack_header(80, 0, 0) + payload


def _v1_decode_reply(record: bytes) -> Tuple[int, int]:
    """What a version 1 client does with a handshake record: header, 80-byte payload, type 3 is
    a REJECT with its code in the flags byte (v1 decode_hello). Returns (header cid, code)."""
    length, cid, seq = wire.HEADER_STRUCT.unpack_from(record)
    assert (length, seq, len(record)) == (80, 0, 104)
    kind, _version, _suite, flags = record[24:28]
    assert kind == 3
    return cid, flags


def test_v1_hello_gets_a_reject_version_a_v1_client_reads():
    ep = ServerEndpoint(Config())
    assert ep.receive(_v1_client_hello(0xABCDEF), CLIENT_ADDR, 0.0) == (None, False)
    [(reply, to)] = ep.replies
    assert to == CLIENT_ADDR and len(reply) == 104
    assert _v1_decode_reply(reply) == (0xABCDEF, 1)             # v1 REJECT_VERSION: "unsupported protocol version"
    assert ep.stats.rejected_version == 1 and ep.stats.handshakes_rejected == 1 and not ep.connections


def test_v2_length_hello_of_another_version_gets_reject_version():
    ep = ServerEndpoint(Config())
    hello = bytearray(Connection.client(Config(), 0.0).datagrams_to_send(0.0)[0])
    hello[25] = 3
    assert ep.receive(bytes(hello), CLIENT_ADDR, 0.0) == (None, False)
    [(reply, _)] = ep.replies
    assert len(reply) == 136 and reply[24] == wire.HS_REJECT and reply[27] == wire.REJECT_VERSION
    assert reply[8:16] == hello[32:40]


# --- stateless reset ------------------------------------------------------------------------------
def _restarted(p: Pair) -> ServerEndpoint:
    """The same identity key, no connections: a server that restarted."""
    return ServerEndpoint(Config(static_key=p.server.config.static_key))


def test_stateless_reset_ends_the_client_at_once():
    p = Pair()
    p.run(lambda: p.server_conns and p.server_conn.state == State.ENCRYPTED and p.client._reset_token is not None)
    assert p.client._reset_token == crypto.reset_token(p.server.config.reset_key, p.server_conn.local_cid)
    fresh = _restarted(p)
    p.client.send(b"anyone there?")
    [record] = p.client.datagrams_to_send(p.now)
    assert fresh.receive(record, CLIENT_ADDR, p.now) == (None, False)
    [(reset, to)] = fresh.replies
    assert to == CLIENT_ADDR and len(reset) == wire.RESET_RECORD_LEN < len(record)
    assert fresh.stats.resets_sent == 1
    p.client.receive_datagram(reset, p.now)
    assert p.client.is_closed
    info = p.client.close_info
    assert (info.code, info.by_peer, info.error) == (CloseCode.STATELESS_RESET, True, True)
    assert "no state for this connection" in info.reason
    assert p.client.datagrams_to_send(p.now) == []


def test_stateless_reset_in_a_batch_ends_the_client_after_the_records_before_it():
    """The batched receive path (one C call opens the data records) hands a RESET to the
    connection like any other handshake-class record: the data before it is delivered."""
    p = Pair()
    p.run(lambda: p.server_conns and p.server_conn.state == State.ENCRYPTED and p.client._reset_token is not None)
    p.server_conn.send(b"last words" * 300)
    records = p.server_conn.datagrams_to_send(p.now)
    reset = wire.encode_reset(p.client._reset_token)
    p.client.receive_datagrams(records + [reset], p.now)
    got = b"".join(e.data for e in events(p.client) if isinstance(e, DataReceived))
    assert got == b"last words" * 300
    assert p.client.is_closed and p.client.close_info.code == CloseCode.STATELESS_RESET


def test_reset_with_a_wrong_token_is_ignored():
    p = Pair()
    p.run(lambda: p.server_conns and p.server_conn.state == State.ENCRYPTED and p.client._reset_token is not None)
    token = bytearray(p.client._reset_token)
    token[0] ^= 1
    other_server = ServerEndpoint(Config())                   # another identity: another token
    p.client.send(b"x")
    [record] = p.client.datagrams_to_send(p.now)
    other_server.receive(record, CLIENT_ADDR, p.now)
    for reset in (wire.encode_reset(bytes(token)), other_server.replies[0][0]):
        p.client.receive_datagram(reset, p.now)
    assert p.client.state == State.ENCRYPTED and p.client.stats.discarded["handshake"] == 2
    p.run(lambda: bytes(p.received["server"]) == b"x")


def test_reset_rules_size_rate_and_handshake_records():
    ep = ServerEndpoint(Config(reset_rate=2))
    small = wire.pack_header(32, 0x1234, 1) + bytes(32)           # 56 bytes: no smaller reply exists
    big = wire.pack_header(40, 0x1234, 1) + bytes(40)
    bad_length = wire.pack_header(41, 0x1234, 1) + bytes(40)
    hs_record = wire.pack_header(112, 0x1234, 0) + bytes(112)     # seq 0: never a RESET
    for d in (small, bad_length, hs_record):
        ep.receive(d, CLIENT_ADDR, 0.0)
    assert ep.replies == [] and ep.stats.resets_sent == 0
    for _ in range(5):
        ep.receive(big, CLIENT_ADDR, 0.0)
    assert ep.stats.resets_sent == 2 and ep.stats.resets_rate_limited == 3
    ep.receive(big, CLIENT_ADDR, 1.0)                             # a second later: two more allowed
    assert ep.stats.resets_sent == 3
    assert all(len(r) == 56 for r, _ in ep.replies)


def test_no_reset_for_another_workers_cid():
    ep = ServerEndpoint(Config(cid_prefix_bits=8, cid_prefix=3))
    mine = wire.pack_header(40, (3 << 56) | 5, 1) + bytes(40)
    theirs = wire.pack_header(40, (4 << 56) | 5, 1) + bytes(40)
    ep.receive(theirs, CLIENT_ADDR, 0.0)
    assert ep.replies == []
    ep.receive(mine, CLIENT_ADDR, 0.0)
    assert len(ep.replies) == 1


def test_reset_for_a_dead_siblings_or_another_servers_cid():
    """In a pool sharing one key, a RESET from any worker ends a connection: a worker answers
    a sibling's CID only when no live process holds that sibling's slot, and a CID of another
    server id always (the balancer routed it away from its server)."""
    gone = {5}
    ep = ServerEndpoint(stcp_cid.for_worker(Config(server_id=7, server_id_bits=8), 3),
                        worker_gone=lambda w: w in gone)

    def rec(worker: int, server_id: int) -> bytes:
        return wire.pack_header(40, (worker << 56) | (server_id << 48) | 0x1234, 1) + bytes(40)

    answered = []
    for worker, server_id in ((3, 7), (4, 7), (5, 7), (4, 9), (3, 9)):
        ep.replies.clear()
        ep.receive(rec(worker, server_id), CLIENT_ADDR, 0.0)
        answered.append(len(ep.replies))
    assert answered == [1, 0, 1, 1, 1]
    gone.clear()                                   # worker 5 restarted: its new CIDs are live
    ep.replies.clear()
    ep.receive(rec(5, 7), CLIENT_ADDR, 0.0)
    assert ep.replies == []


def test_reset_token_is_resent_when_lost():
    lost = []

    def lose_server_first(d):
        if wire.parse_header(d)[2] != 0 and not lost:
            lost.append(d)
            return []
        return [d]
    p = Pair(down=Link(fault=lose_server_first))
    p.run(lambda: p.server_conns and p.server_conn.state == State.ENCRYPTED)
    p.server_conn.send(b"pong")
    p.run(lambda: p.client._reset_token is not None and bytes(p.received["client"]) == b"pong")
    [first] = lost                   # it carried the token: the client got it from a later record
    frames = wire.decode_frames(p.client._keys.recv.open(first, wire.parse_header(first)[2]))
    assert wire.ResetTokenFrame(p.client._reset_token) in frames
    assert p.client._reset_token == crypto.reset_token(p.server.config.reset_key, p.server_conn.local_cid)


# --- the server's identity ----------------------------------------------------------------------------
def test_endpoint_without_a_key_makes_one_and_keeps_the_callers_config():
    cfg = Config()
    a, b = ServerEndpoint(cfg), ServerEndpoint(cfg)
    assert cfg.static_key is None and a.public_key != b.public_key
    key = identity.generate_private_key()
    c = ServerEndpoint(Config(static_key=key))
    assert c.public_key == identity.public_key(key)


def test_connection_server_needs_a_static_key():
    client = Connection.client(Config(), 0.0)
    hello = client.datagrams_to_send(0.0)[0]
    with pytest.raises(ValueError, match="static key"):
        Connection.server(Config(), hello, wire.decode_hello(hello[24:]), 0.0)


@pytest.mark.parametrize("kw", [dict(static_key=bytes(31)), dict(server_key=bytes(33)),
                                dict(allowed_clients=[bytes(32), bytes(5)]), dict(max_half_open=0),
                                dict(hello_rate=-1), dict(max_datagram=135)])
def test_config_refuses_bad_identity_and_budget_values(kw):
    with pytest.raises(ValueError):
        Config(**kw)


def test_config_repr_does_not_show_the_private_key():
    key = identity.generate_private_key()
    assert key.hex() not in repr(Config(static_key=key)) and repr(key) not in repr(Config(static_key=key))


def test_fingerprint_is_sha256_unpadded_base64_as_ssh():
    pub = bytes(range(32))
    import base64
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(pub).digest()).decode().rstrip("=")
    assert identity.fingerprint(pub) == expected and len(expected) == 7 + 43


@pytest.mark.parametrize("point", [bytes(32), (1).to_bytes(32, "little"),
                                   bytes.fromhex("e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800")])
def test_small_order_client_key_gets_reject_key(point):
    """An E of small order gives an all-zero ee and es: REJECT_KEY, no connection (section 5.1)."""
    ep = ServerEndpoint(Config())
    hello = Connection.client(Config(), 0.0).datagrams_to_send(0.0)[0]
    assert ep.receive(hello[:40] + point + hello[72:], CLIENT_ADDR, 0.0) == (None, False)
    [(reply, _)] = ep.replies
    assert reply[24] == wire.HS_REJECT and reply[27] == wire.REJECT_KEY
    assert ep.stats.rejected_key == 1 and not ep.connections


def test_a_failed_handshake_forgets_its_ephemeral_key_too():
    client = Connection.client(Config(handshake_timeout=1.0), 0.0)
    ep = ServerEndpoint(Config(handshake_timeout=1.0))
    server, _ = ep.receive(client.datagrams_to_send(0.0)[0], CLIENT_ADDR, 0.0)
    assert client._client_hs is not None and server._server_hs is not None
    for conn in (client, server):
        conn.handle_timer(1.0)
        assert conn.is_closed
    assert client._client_hs is None and server._server_hs is None


def test_a_finished_handshake_answers_late_records_with_a_handshake_failure():
    """Once the ephemeral key is forgotten (forward secrecy), a second server hello at the
    client is noted and ignored, and a late CLIENT_AUTH at the server is a HandshakeFailure:
    neither reaches X25519 with no key (an AttributeError before)."""
    server_static = identity.StaticKey(identity.generate_private_key())
    client_static = identity.StaticKey(identity.generate_private_key())
    ch = handshake.ClientHandshake(wire.SUITE_AES_256_GCM, 0x77, None, client_static)
    hello = wire.decode_hello(ch.hello_record[wire.HEADER_LEN:])
    sh = handshake.ServerHandshake(server_static, ch.hello_record, hello, 0x1234, (hello.suite,))
    est = ch.on_record(sh.record)
    assert est is not None and est.client_auth is not None
    hints = ch.hints
    assert ch.on_record(sh.record) is None
    assert ch.hints == hints + 1 and "handshake is over" in (ch.failure_reason() or "")
    [auth] = wire.decode_frames(est.client_auth)
    assert isinstance(auth, wire.ClientAuthFrame)
    sh.verify_client_auth(auth)
    sh.finish()
    with pytest.raises(HandshakeFailure, match="handshake is over"):
        sh.verify_client_auth(auth)


# --- ICMP port unreachable ------------------------------------------------------------------------
def test_port_unreachable_ends_a_handshake_that_heard_nothing():
    client = Connection.client(Config(), 0.0)
    client.datagrams_to_send(0.0)
    client.port_unreachable(0.05)
    assert client.is_closed
    info = client.close_info
    assert (info.code, info.by_peer, info.error) == (CloseCode.PORT_UNREACHABLE, False, True)
    assert client.datagrams_to_send(0.1) == []


def test_port_unreachable_is_ignored_once_a_server_answered_or_the_connection_is_up():
    """A reply (even a mere hint such as a REJECT) shows a server listens: a later ICMP error,
    which anyone who can guess the ports may forge, does not end the handshake; nor does it
    end an ENCRYPTED connection; nor a server connection."""
    client = Connection.client(Config(), 0.0)
    hello = client.datagrams_to_send(0.0)[0]
    h = wire.decode_hello(hello[24:])
    client.receive_datagram(reject_record(h.sender_cid, h.suite, 1), 0.01)
    client.port_unreachable(0.02)
    assert client.state == State.KEY_EXCHANGE
    p = Pair()
    p.run(lambda: p.server_conns and p.server_conn.state == State.ENCRYPTED)
    p.client.port_unreachable(p.now)
    p.server_conn.port_unreachable(p.now)
    assert p.client.state == State.ENCRYPTED and p.server_conn.state == State.ENCRYPTED
