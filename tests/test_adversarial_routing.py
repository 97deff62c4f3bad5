"""Issue 12, finding 1: a connection belongs to its peer (PROTOCOL.md §10.2).

Each attack that ended a live connection with one forged datagram (junk carrying a live CID,
a length-mismatched header, an epoch+2 sequence number, a changed CLIENT_HELLO re-sent under
an established client CID) is made here, from an address that is not the peer's, while a
transfer runs: the transfer completes intact and every forged datagram is counted. From the
peer's own address the terminate rule keeps its force; a record that authenticates from a
new address moves the connection there (NAT rebinding). On the simulated network, then end
to end over loopback sockets.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import os
import socket
import struct

import pytest

import stcp
from stcp import identity, wire
from stcp.cli.serve import echo_handler
from stcp.connection import Config, Connection
from stcp.endpoint import ServerEndpoint
from stcp.errors import CloseCode
from stcp.state import State
from tests.support.servers import echo_transfer
from tests.support.sim import CLIENT_ADDR, Pair

ATTACKER = ("203.0.113.66", 40000)
_HDR = struct.Struct("!QQQ")


def forgeries(p: Pair) -> dict:
    """What an observer who saw one datagram of the connection can send, by the reason the
    server counts it under."""
    server = p.server_conn
    cid = server.local_cid
    seen = p.up.log[-1]                                  # a record of the connection, as observed
    length, _, seq = _HDR.unpack_from(seen)
    epoch, pn = wire.split_seq(seq)
    fresh = wire.make_seq(epoch, pn + (1 << 40))     # far ahead: never a duplicate
    intruder = Connection.client(Config(), p.now).datagrams_to_send(p.now)[0]
    return {
        # 40 bytes of junk naming the live CID
        "junk": (b"\xa5" * 8 + cid.to_bytes(8, "big") + os.urandom(24), "malformed"),
        # the observed record with its length field changed
        "length": (_HDR.pack(length + 7, cid, seq) + seen[24:], "malformed"),
        # a well-formed record two key epochs ahead
        "epoch+2": (_HDR.pack(length, cid, wire.make_seq(epoch + 2, pn + (1 << 40))) + seen[24:], "key_epoch"),
        # a well-formed record of the current epoch with a fresh pn: it cannot authenticate
        "forged": (_HDR.pack(length, cid, fresh) + os.urandom(length), "auth"),
        # packet number 0 is reserved (with epoch 0 this would be seq 0, a handshake record)
        "pn0": (_HDR.pack(length, cid, wire.make_seq(epoch + 1, 0)) + seen[24:], "malformed"),
        # a changed CLIENT_HELLO under the established client's CID
        "hello": (intruder[:32] + p.client.local_cid.to_bytes(8, "big") + intruder[40:], "handshake"),
        # a handshake record addressed to the server connection's CID
        "handshake": (_HDR.pack(80, cid, 0) + os.urandom(80), "handshake"),
    }


def transfer_under_attack(kinds, source, size: int = 3 << 20, copies: int = 5):
    p = Pair()
    p.run(lambda: bool(p.server_conns) and p.server_conn.state == State.ENCRYPTED)
    data = os.urandom(size)
    p.client.send(data[:100_000])
    p.run(lambda: len(p.received["server"]) >= 100_000)
    forged = forgeries(p)
    for i in range(copies):
        for k in kinds:
            # the changed hello can only reach the connection from the client's own address
            addr = CLIENT_ADDR if k == "hello" else source
            p.inject(p.now + 0.01 * (i + 1), forged[k][0], addr)
    p.client.send(data[100_000:])
    p.client.shutdown_write()
    p.run(lambda: (p.finished["server"] or p.server_conn.is_closed) and not p.injected, max_time=200)
    return p, data, forged


@pytest.mark.parametrize("kind", ["junk", "length", "epoch+2", "forged", "pn0", "hello", "handshake"])
def test_forged_datagram_from_another_address_leaves_the_transfer_intact(kind):
    p, data, forged = transfer_under_attack([kind], ATTACKER)
    server = p.server_conn
    assert p.finished["server"] and bytes(p.received["server"]) == data
    assert server.state == State.ENCRYPTED and not p.closed
    reason = forged[kind][1]
    assert server.stats.discarded[reason] == 5
    assert sum(server.stats.discarded.values()) == 5
    assert p.server.peer_addr[server.local_cid] == CLIENT_ADDR


def test_every_forgery_at_once_from_many_addresses():
    kinds = ["junk", "length", "epoch+2", "forged", "pn0", "hello", "handshake"]
    p, data, _ = transfer_under_attack(kinds, ("198.51.100.7", 1234), copies=20)
    assert bytes(p.received["server"]) == data and p.server_conn.state == State.ENCRYPTED
    assert sum(p.server_conn.stats.discarded.values()) == 20 * len(kinds)


@pytest.mark.parametrize("kind,code", [("length", CloseCode.MALFORMED_RECORD),
                                       ("epoch+2", CloseCode.KEY_UPDATE_ERROR),
                                       ("forged", CloseCode.AUTH_FAILURE),
                                       ("pn0", CloseCode.MALFORMED_RECORD)])
def test_from_the_peers_own_address_the_terminate_rule_stands(kind, code):
    """What does not authenticate from the peer's current address still ends the connection
    (an attacker must then spoof that address, and see the traffic, to do it)."""
    p, _data, _ = transfer_under_attack([kind], CLIENT_ADDR, size=1 << 20, copies=1)
    assert p.server_conn.is_closed and p.server_conn.close_info.code == code
    p.run(lambda: "client" in p.closed)
    assert p.closed["client"].code == code and p.closed["client"].by_peer


def test_handshake_records_from_the_peer_are_discarded_too():
    p, data, _ = transfer_under_attack(["hello", "handshake"], CLIENT_ADDR)
    assert bytes(p.received["server"]) == data
    assert p.server_conn.stats.discarded["handshake"] == 10


def test_nat_rebinding_moves_the_connection():
    """The client's address changes mid-transfer: its next authenticated record moves the
    connection; junk from the old address is then a stranger's and is discarded."""
    p = Pair()
    p.run(lambda: bool(p.server_conns) and p.server_conn.state == State.ENCRYPTED)
    data = os.urandom(2 << 20)
    p.client.send(data)
    p.client.shutdown_write()
    p.run(lambda: len(p.received["server"]) >= 500_000)
    new_addr = ("192.0.2.200", 61000)
    p.client_addr = new_addr
    p.run(lambda: p.server.peer_addr[p.server_conn.local_cid] == new_addr)
    assert p.server.stats.migrations == 1
    junk = forgeries(p)["forged"][0]
    p.inject(p.now, junk, CLIENT_ADDR)
    p.run(lambda: p.finished["server"])
    assert bytes(p.received["server"]) == data and p.server_conn.state == State.ENCRYPTED
    assert p.server_conn.stats.discarded["auth"] == 1 and p.server.stats.migrations == 1


def test_the_batched_path_applies_the_same_rules():
    """receive_batch hands a connection its datagrams per source address: junk from a stranger
    amid the peer's records is discarded, and the records around it are taken."""
    p = Pair()
    p.run(lambda: bool(p.server_conns) and p.server_conn.state == State.ENCRYPTED)
    p.client.send(os.urandom(200_000))
    batches = p.client.datagram_batches(p.now)
    records = wire.expand_datagrams(batches)
    server = p.server_conn
    forged = forgeries(p)
    batch = []
    for i, r in enumerate(records):
        batch.append((r, CLIENT_ADDR))
        if i % 10 == 3:
            batch.append((forged["forged"][0], ATTACKER))
            batch.append((forged["epoch+2"][0], ("203.0.113.1", 9)))
    before = server.stats.records_received
    p.server.receive_batch(batch, p.now)
    assert server.state == State.ENCRYPTED
    assert server.stats.records_received - before == len(records)
    n = sum(1 for i in range(len(records)) if i % 10 == 3)
    assert server.stats.discarded["auth"] == n and server.stats.discarded["key_epoch"] == n


# --- a half-open server connection (KEY_EXCHANGE) -------------------------------------------
def _half_open(client_config: Config = None, server_config: Config = None):
    """A client hello accepted by an endpoint: the server connection is in KEY_EXCHANGE and the
    client holds the server hello, not yet delivered."""
    ep = ServerEndpoint(server_config or Config())
    client = Connection.client(dataclasses.replace(client_config or Config(), server_key=ep.public_key), 0.0)
    [hello] = client.datagrams_to_send(0.0)
    server, new = ep.receive(hello, CLIENT_ADDR, 0.0)
    assert new and server.state == State.KEY_EXCHANGE
    [server_hello] = server.datagrams_to_send(0.0)
    return client, ep, server, hello, server_hello


def test_half_open_connection_discards_a_changed_hello_and_forgeries():
    """§10.2: no handshake-class record ends a connection in KEY_EXCHANGE either: a changed
    CLIENT_HELLO under the client's CID from its own address is discarded and counted, and
    junk naming the connection from another address is discarded; a repeat of the hello that
    differs only in its cookie field is the same hello and gets the same SERVER_HELLO."""
    client, ep, server, hello, server_hello = _half_open()
    intruder = Connection.client(Config(), 0.0).datagrams_to_send(0.0)[0]
    changed = intruder[:32] + client.local_cid.to_bytes(8, "big") + intruder[40:]
    assert ep.receive(changed, CLIENT_ADDR, 0.01) == (server, False)
    assert server.state == State.KEY_EXCHANGE and server.stats.discarded["handshake"] == 1
    assert server.datagrams_to_send(0.01) == []                       # no answer to it
    junk = _HDR.pack(60, server.local_cid, 1) + os.urandom(60)
    ep.receive(junk, ATTACKER, 0.02)
    assert server.state == State.KEY_EXCHANGE and server.stats.discarded["auth"] == 1
    with_cookie = hello[:72] + b"\x5a" * 16 + hello[88:]
    ep.receive(with_cookie, CLIENT_ADDR, 0.03)
    assert server.datagrams_to_send(0.03) == [server_hello] and len(ep.connections) == 1
    client.receive_datagram(server_hello, 0.04)
    for d in client.datagrams_to_send(0.04):
        ep.receive(d, CLIENT_ADDR, 0.05)
    assert client.state == server.state == State.ENCRYPTED


def test_client_authenticated_from_a_new_address_moves_the_half_open_connection():
    """The client's address changes between its hello and its first protected record (which
    starts with CLIENT_AUTH for an allow-list server): that record authenticates, completes
    the handshake and moves the connection; a forged record from the old address afterwards
    is a stranger's."""
    private = identity.generate_private_key()
    public = identity.public_key(private)
    client, ep, server, _, server_hello = _half_open(Config(static_key=private),
                                                     Config(allowed_clients=[public]))
    client.receive_datagram(server_hello, 0.01)
    moved = ("192.0.2.201", 62000)
    for d in client.datagrams_to_send(0.01):
        ep.receive(d, moved, 0.02)
    assert server.state == State.ENCRYPTED and server.peer_static_key == public
    assert ep.peer_addr[server.local_cid] == moved and ep.stats.migrations == 1
    ep.receive(_HDR.pack(60, server.local_cid, 1 << 20) + os.urandom(60), CLIENT_ADDR, 0.03)
    assert server.state == State.ENCRYPTED and server.stats.discarded["auth"] == 1


# --- end to end over loopback ---------------------------------------------------------------
def _run(coro, timeout: float = 120.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


def test_an_unrelated_socket_cannot_end_a_transfer_end_to_end():
    """While a 16 MiB echo transfer runs, an unrelated UDP socket sprays every forgery at the
    server, naming the live connection's CID: the transfer completes intact."""
    async def main():
        server = await stcp.start_server(echo_handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        attacker.setblocking(False)
        data = os.urandom(16 << 20)
        sent = 0
        seen = []

        async def spray():
            nonlocal sent
            # the attacker sees the connection start: it polls, as an observer on the path would
            while not server.endpoint.connections:  # noqa: ASYNC110
                await asyncio.sleep(0.001)
            conn = next(iter(server.endpoint.connections.values()))
            seen.append(conn)
            cid = conn.local_cid
            while True:
                epoch = conn.recv_epoch
                for d in (b"\xa5" * 8 + cid.to_bytes(8, "big") + os.urandom(24),
                          _HDR.pack(1000, cid, wire.make_seq(epoch, 1 << 40)) + os.urandom(1000),
                          _HDR.pack(1000, cid, wire.make_seq(epoch + 2, 1 << 40)) + os.urandom(1000),
                          _HDR.pack(80, cid, 0) + os.urandom(80)) * 5:
                    try:
                        attacker.sendto(d, ("127.0.0.1", port))
                        sent += 1
                    except BlockingIOError:
                        pass
                await asyncio.sleep(0.001)

        spraying = asyncio.create_task(spray())
        echoed = await echo_transfer("127.0.0.1", port, data, server.public_key)
        spraying.cancel()
        attacker.close()
        server.close()
        assert hashlib.sha256(echoed).digest() == hashlib.sha256(data).digest()
        assert sent > 100
        return seen[0].stats.discarded

    discarded = _run(main())
    assert discarded["malformed"] > 0 and discarded["auth"] > 0 and discarded["key_epoch"] > 0
    assert discarded["handshake"] > 0


class _RebindingRelay(asyncio.DatagramProtocol):
    """Relays a client to a server through an upstream socket it replaces mid-transfer (a NAT
    that gave the flow a new port)."""

    def __init__(self, target):
        self.target = target
        self.client = None
        self.transport = None
        self.upstreams: list = []

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data, addr) -> None:
        self.client = addr
        self.upstreams[-1].sendto(data)

    async def open_upstream(self) -> None:
        loop = asyncio.get_running_loop()
        relay = self

        class Up(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                relay.transport.sendto(data, relay.client)

        transport, _ = await loop.create_datagram_endpoint(Up, remote_addr=self.target)
        self.upstreams.append(transport)


def test_nat_rebinding_end_to_end():
    async def main():
        server = await stcp.start_server(echo_handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        relay = _RebindingRelay(("127.0.0.1", port))
        await loop.create_datagram_endpoint(lambda: relay, local_addr=("127.0.0.1", 0))
        await relay.open_upstream()
        reader, writer = await stcp.open_connection("127.0.0.1", relay.transport.get_extra_info("sockname")[1],
                                                    server_key=server.public_key)
        conn = next(iter(server.endpoint.connections.values()))
        first = server.endpoint.peer_addr[conn.local_cid]
        data = os.urandom(4 << 20)
        writer.write(data[:1 << 20])
        got = await reader.readexactly(1 << 20)
        await relay.open_upstream()                  # the NAT rebinds: a new source port from here ...
        relay.upstreams[0].close()                   # ... and forgets the old one
        writer.write(data[1 << 20:])
        writer.write_eof()
        got += await reader.read()
        await writer.wait_closed()
        relay.upstreams[-1].close()
        relay.transport.close()
        server.close()
        return got, data, first, relay.upstreams[-1].get_extra_info("sockname"), server.endpoint.stats.migrations

    got, data, first, new_addr, migrations = _run(main())
    assert got == data
    assert migrations == 1 and first != new_addr
