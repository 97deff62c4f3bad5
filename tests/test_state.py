"""The state machine (docs/PROTOCOL.md §10.1): every (state, event) pair against the table, the
table against the document, and Connection's behaviour at the state boundaries."""
from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest

from stcp import connection as connection_mod, wire
from stcp.connection import Config, Connection, ConnectionClosed, DataReceived, HandshakeCompleted
from stcp.endpoint import ServerEndpoint
from stcp.errors import CloseCode, InvalidTransition, NotEncrypted
from stcp.handshake import reject_record
from stcp.state import TRANSITIONS, Event, State, transition
from tests.support.sim import CLIENT_ADDR, Pair

S, E = State, Event
DOC = Path(__file__).resolve().parent.parent / "docs" / "PROTOCOL.md"

# The table as docs/PROTOCOL.md §10.1 describes it, written out independently of stcp/state.py.
EXPECTED = {
    (S.INIT, E.SEND_HELLO): S.KEY_EXCHANGE,
    (S.INIT, E.RECV_HELLO): S.KEY_EXCHANGE,
    (S.INIT, E.ABORT): S.CLOSED,
    (S.KEY_EXCHANGE, E.KEYS_CONFIRMED): S.ENCRYPTED,
    (S.KEY_EXCHANGE, E.FAILURE): S.ERROR,
    (S.KEY_EXCHANGE, E.TIMEOUT): S.CLOSED,
    (S.KEY_EXCHANGE, E.ABORT): S.CLOSED,
    (S.ENCRYPTED, E.FAILURE): S.ERROR,
    (S.ENCRYPTED, E.FINISHED): S.CLOSED,
    (S.ENCRYPTED, E.TIMEOUT): S.CLOSED,
    (S.ENCRYPTED, E.ABORT): S.CLOSED,
    (S.ERROR, E.TERMINATED): S.CLOSED,
}
ALL_PAIRS = list(itertools.product(State, Event))


def test_states_and_events_are_the_documented_ones():
    assert [s.value for s in State] == ["INIT", "KEY_EXCHANGE", "ENCRYPTED", "ERROR", "CLOSED"]
    assert {e.value for e in Event} == {"send_hello", "recv_hello", "keys_confirmed", "failure", "finished",
                                        "timeout", "abort", "terminated"}


def test_table_is_the_expected_one():
    assert TRANSITIONS == EXPECTED


@pytest.mark.parametrize("state,event", ALL_PAIRS, ids=[f"{s.value}-{e.value}" for s, e in ALL_PAIRS])
def test_every_pair(state, event):
    if (state, event) in EXPECTED:
        assert transition(state, event) is EXPECTED[(state, event)]
    else:
        with pytest.raises(InvalidTransition) as info:
            transition(state, event)
        assert info.value.code == CloseCode.STATE_ERROR
        assert state.value in str(info.value) and event.value in str(info.value)


def test_table_shape():
    assert not any(s is S.CLOSED for s, _ in TRANSITIONS)                       # CLOSED is final
    assert [e for s, e in TRANSITIONS if s is S.ERROR] == [E.TERMINATED]         # ERROR only reports
    assert all(t is S.ERROR for (s, e), t in TRANSITIONS.items() if e is E.FAILURE)
    # every state but CLOSED can reach CLOSED
    for s in State:
        seen, todo = set(), [s]
        while todo:
            cur = todo.pop()
            seen.add(cur)
            todo += [t for (f, _), t in TRANSITIONS.items() if f is cur and t not in seen]
        assert S.CLOSED in seen


def test_document_table_equals_code():
    text = DOC.read_text()
    section = text[text.index("### 10.1"):text.index("### 10.2")]
    rows = re.findall(r"^\| (\w+) +\| (\w+) +\| (\w+) +\|", section, re.M)
    doc = {(State(a), Event(b)): State(c) for a, b, c in rows if a != "State"}
    assert doc == TRANSITIONS


# --- Connection behaviour --------------------------------------------------------------------
@pytest.fixture
def transitions_seen(monkeypatch):
    """Every (state, event) a Connection asks for, so scenarios can be checked against the table."""
    seen = []

    def spy(state, event):
        seen.append((state, event))
        return transition(state, event)

    monkeypatch.setattr(connection_mod, "transition", spy)
    return seen


def established() -> Pair:
    p = Pair()
    p.run(lambda: bool(p.server_conns) and p.server_conn.state == S.ENCRYPTED and p.client.state == S.ENCRYPTED)
    return p


def test_client_lifecycle_uses_the_table(transitions_seen):
    p = established()
    assert transitions_seen[:1] == [(S.INIT, E.SEND_HELLO)]
    assert (S.INIT, E.RECV_HELLO) in transitions_seen
    assert transitions_seen.count((S.KEY_EXCHANGE, E.KEYS_CONFIRMED)) == 2
    p.client.send(b"x" * 5000)
    p.client.shutdown_write()
    p.run(lambda: p.finished["server"])
    p.server_conn.shutdown_write()
    p.run(lambda: p.client.is_closed and p.server_conn.is_closed)
    assert transitions_seen.count((S.ENCRYPTED, E.FINISHED)) == 2
    assert p.closed["client"].code == CloseCode.NO_ERROR and not p.closed["client"].error
    assert p.closed["server"].code == CloseCode.NO_ERROR and not p.closed["server"].error
    assert all(pair in TRANSITIONS for pair in transitions_seen)


def test_send_raises_not_encrypted_in_key_exchange():
    client = Connection.client(Config(), 0.0)
    assert client.state == S.KEY_EXCHANGE
    with pytest.raises(NotEncrypted):
        client.send(b"early")
    with pytest.raises(NotEncrypted):
        client.shutdown_write()
    endpoint = ServerEndpoint(Config())
    server, new = endpoint.receive(client.datagrams_to_send(0.0)[0], CLIENT_ADDR, 0.0)
    assert new and server.state == S.KEY_EXCHANGE
    with pytest.raises(NotEncrypted):
        server.send(b"early")
    # nothing protected leaves either side before ENCRYPTED: only the server hello
    assert [len(d) for d in server.datagrams_to_send(0.0)] == [wire.HANDSHAKE_RECORD_LEN]
    assert client.datagrams_to_send(0.0) == []


@pytest.mark.parametrize("how", ["abort", "failure", "graceful", "idle", "peer_abort"])
def test_send_raises_not_encrypted_after_closed(how, transitions_seen):
    p = established()
    c = p.client
    if how == "abort":
        c.close(CloseCode.APPLICATION_ABORT, "bye")
        expected = (S.ENCRYPTED, E.ABORT)
    elif how == "failure":
        c.receive_datagram(b"\x00" * 10, p.now)           # malformed: terminates
        expected = (S.ERROR, E.TERMINATED)
    elif how == "graceful":
        c.shutdown_write()
        p.server_conn.shutdown_write()
        p.run(lambda: c.is_closed)
        expected = (S.ENCRYPTED, E.FINISHED)
    elif how == "idle":
        c.handle_timer(p.now + c.config.idle_timeout + 1)
        expected = (S.ENCRYPTED, E.TIMEOUT)
    else:
        p.server_conn.close(CloseCode.APPLICATION_ABORT, "server gave up")
        p.run(lambda: c.is_closed)
        expected = (S.ENCRYPTED, E.FAILURE)
    assert c.state == S.CLOSED
    assert expected in transitions_seen
    with pytest.raises(NotEncrypted):
        c.send(b"late")
    with pytest.raises(NotEncrypted):
        c.shutdown_write()


def test_send_raises_while_closing():
    p = established()
    p.client.shutdown_write()
    p.server_conn.shutdown_write()
    p.run(lambda: p.client._draining_until is not None)
    with pytest.raises(NotEncrypted):
        p.client.send(b"too late")


def test_protected_or_malformed_record_at_client_in_key_exchange_is_ignored(transitions_seen):
    """A client without keys cannot check anything: a protected record or junk is a hint, noted
    and ignored, and the handshake goes on (PROTOCOL.md section 5.5)."""
    donor = established()                           # a genuine protected record from another connection
    donor.client.send(b"data")
    record = donor.client.datagrams_to_send(donor.now)[0]
    _, _, seq = wire.parse_header(record)
    assert seq != 0
    client = Connection.client(Config(), 0.0)
    [hello] = client.datagrams_to_send(0.0)
    for junk in (record, b"\x00" * 10, wire.pack_header(5, client.local_cid, 0) + bytes(4)):
        client.receive_datagram(junk, 0.01)
    assert client.state == S.KEY_EXCHANGE and client.stats.handshake_hints_ignored == 3
    assert not [t for t in transitions_seen if t[1] == E.FAILURE]
    client.handle_timer(client.get_timer())
    assert client.datagrams_to_send(0.2) == [hello]   # still asking


def test_data_record_before_the_handshake_is_dropped_by_the_endpoint():
    donor = established()
    donor.client.send(b"data")
    record = donor.client.datagrams_to_send(donor.now)[0]
    endpoint = ServerEndpoint(Config())
    conn, new = endpoint.receive(record, CLIENT_ADDR, 0.0)
    assert (conn, new) == (None, False)
    assert endpoint.stats.dropped_unknown_cid == 1 and not endpoint.connections
    # also with cid 0 (never a connection's CID) and seq != 0
    forged = wire.pack_header(len(record) - 24, 0, 1) + record[24:]
    assert endpoint.receive(forged, CLIENT_ADDR, 0.0) == (None, False)
    assert endpoint.stats.dropped_unknown_cid == 2


def test_bad_record_at_server_in_key_exchange_terminates_and_tells_the_client(transitions_seen):
    client = Connection.client(Config(), 0.0)
    endpoint = ServerEndpoint(Config())
    server, _ = endpoint.receive(client.datagrams_to_send(0.0)[0], CLIENT_ADDR, 0.0)
    server.datagrams_to_send(0.0)
    forged = wire.pack_header(40, server.local_cid, 1) + bytes(40)
    endpoint.receive(forged, CLIENT_ADDR, 0.01)
    assert server.state == S.CLOSED and server.close_info.code == CloseCode.AUTH_FAILURE
    assert (S.KEY_EXCHANGE, E.FAILURE) in transitions_seen
    [close] = server.datagrams_to_send(0.01)          # sealed CLOSE, the server has keys
    assert wire.parse_header(close)[1:] == (client.local_cid, 1)


def test_reject_is_a_hint_reported_at_the_handshake_timeout(transitions_seen):
    """An unauthenticated REJECT does not end the handshake; the hello keeps going out, and the
    timeout reports the reason the REJECT gave."""
    client = Connection.client(Config(handshake_timeout=2.0), 0.0)
    [hello] = client.datagrams_to_send(0.0)
    client.receive_datagram(reject_record(client.local_cid, client.suite, wire.REJECT_SUITE), 0.01)
    assert client.state == S.KEY_EXCHANGE and client.stats.handshake_hints_ignored == 1
    sent = []
    while not client.is_closed:
        now = client.get_timer()
        client.handle_timer(now)
        sent += client.datagrams_to_send(now)
    assert sent and all(d == hello for d in sent)
    assert client.close_info.code == CloseCode.HANDSHAKE_FAILED and client.close_info.error
    assert client.close_info.reason == ("server rejected the handshake: unsupported cipher suite "
                                        "(aes-256-gcm; the server accepts another) "
                                        "(no acceptable server hello within 2 s)")
    assert (S.KEY_EXCHANGE, E.TIMEOUT) in transitions_seen


def test_server_hello_with_a_bad_tag_is_ignored_and_the_genuine_one_completes():
    client = Connection.client(Config(), 0.0)
    endpoint = ServerEndpoint(Config())
    server, _ = endpoint.receive(client.datagrams_to_send(0.0)[0], CLIENT_ADDR, 0.0)
    sh = server.datagrams_to_send(0.0)[0]
    bad = bytearray(sh)
    bad[-1] ^= 1
    client.receive_datagram(bytes(bad), 0.01)
    assert client.state == S.KEY_EXCHANGE and client.stats.handshake_hints_ignored == 1
    assert "key confirmation" in client._client_hs.failure_reason()
    client.receive_datagram(sh, 0.02)
    assert client.state == S.ENCRYPTED and client.peer_static_key == endpoint.public_key


def test_handshake_timeout_and_hello_retransmission(transitions_seen):
    client = Connection.client(Config(), 0.0)
    [hello] = client.datagrams_to_send(0.0)
    sent_at = []
    now = 0.0
    while not client.is_closed:
        now = client.get_timer()
        client.handle_timer(now)
        for d in client.datagrams_to_send(now):
            assert d == hello                             # the identical record each time
            sent_at.append(round(now, 6))
    assert sent_at[:4] == [0.2, 0.6, 1.4, 3.0]
    assert now == pytest.approx(10.0)
    assert client.close_info.code == CloseCode.HANDSHAKE_TIMEOUT
    assert (S.KEY_EXCHANGE, E.TIMEOUT) in transitions_seen


def test_duplicate_client_hello_gets_the_same_answer_and_no_second_connection():
    client = Connection.client(Config(), 0.0)
    [hello] = client.datagrams_to_send(0.0)
    endpoint = ServerEndpoint(Config())
    server, new = endpoint.receive(hello, CLIENT_ADDR, 0.0)
    [sh] = server.datagrams_to_send(0.0)
    again, new2 = endpoint.receive(hello, CLIENT_ADDR, 0.1)
    assert again is server and new and not new2 and len(endpoint.connections) == 1
    assert server.datagrams_to_send(0.1) == [sh]
    client.receive_datagram(sh, 0.2)
    for d in client.datagrams_to_send(0.2):
        endpoint.receive(d, CLIENT_ADDR, 0.3)
    assert server.state == S.ENCRYPTED
    endpoint.receive(hello, CLIENT_ADDR, 0.4)          # once ENCRYPTED: discarded
    assert server.state == S.ENCRYPTED and server.stats.duplicates_discarded == 1
    assert not [d for d in server.datagrams_to_send(0.4) if len(d) == wire.HANDSHAKE_RECORD_LEN]
    client.receive_datagram(sh, 0.5)                    # duplicate server hello at the client
    assert client.state == S.ENCRYPTED and client.stats.duplicates_discarded == 1


def test_no_application_data_before_encrypted_events():
    p = established()
    for who in ("client", "server"):
        kinds = [type(e) for e in p.events[who]]
        assert kinds[0] is HandshakeCompleted
        assert DataReceived not in kinds and ConnectionClosed not in kinds
