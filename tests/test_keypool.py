"""Server ephemeral keys made ahead of need (stcp.keypool): every server hello gets a key
no other has had, a key is handed out once, the pool stays bounded, refills, and a forked
child never uses its parent's keys."""
from __future__ import annotations

import asyncio
import os

import pytest

import stcp
from stcp import wire
from stcp.cli.serve import echo_handler
from stcp.connection import Config, Connection
from stcp.endpoint import ServerEndpoint
from stcp.keypool import EphemeralKeys
from tests.support.poll import await_until
from tests.support.servers import echo_transfer

ADDR = ("192.0.2.7", 4000)


def server_ephemeral(record: bytes) -> bytes:
    """F, the server's ephemeral public key, from a server hello record."""
    hello = wire.decode_hello(record[wire.HEADER_LEN:])
    assert hello.kind == wire.HS_SERVER_HELLO
    return hello.public_key


def pool_publics(pool: EphemeralKeys) -> set:
    return {pub for _, pub in pool._keys}


def test_take_hands_each_key_out_once_and_never_again():
    pool = EphemeralKeys(size=8)
    assert pool.refill(8) == 8
    ready = pool_publics(pool)
    taken = [pool.take()[1] for _ in range(8)]
    assert set(taken) == ready and len(set(taken)) == 8      # the pool's keys, each once
    assert len(pool) == 0 and pool.taken_ready == 8
    assert pool.take() is None and pool.misses == 1           # empty: nothing is handed out twice
    pool.refill(8)
    assert not pool_publics(pool) & set(taken)


def test_pool_is_bounded_and_refills_a_few_at_a_time():
    pool = EphemeralKeys(size=5)
    assert pool.wanted == 5
    assert pool.refill(2) == 2 and len(pool) == 2
    assert pool.refill(1000) == 3 and len(pool) == 5          # never past size
    assert pool.refill(1000) == 0 and pool.wanted == 0
    pool.take()
    assert pool.wanted == 1
    assert pool.refill() == 1 and len(pool) == 5
    assert pool.made_ahead == 6
    with pytest.raises(ValueError):
        EphemeralKeys(size=-1)


def test_every_server_hello_carries_a_distinct_ephemeral_key():
    """Hellos from many clients, the pool refilled between some and drained by others: no two
    server hellos share F, and no F is still in the pool after it was sent."""
    server = ServerEndpoint(Config())
    cfg = Config(server_key=server.public_key)
    pool = server.ephemeral_keys = EphemeralKeys(size=8)     # smaller than the refill interval
    seen = []
    for i in range(60):
        if i % 20 == 0:
            pool.refill(pool.size)
        client = Connection.client(cfg, 0.0)
        conn, new = server.receive(client.datagrams_to_send(0.0)[0], (ADDR[0], ADDR[1] + i), 0.0)
        assert new and conn is not None
        seen.append(server_ephemeral(conn.datagrams_to_send(0.0)[0]))
        assert seen[-1] not in pool_publics(pool)
    assert len(set(seen)) == len(seen) == 60
    assert pool.taken_ready >= 1 and pool.misses >= 1     # both paths were exercised


def test_a_repeated_hello_gets_the_same_answer_without_taking_a_key():
    server = ServerEndpoint(Config())
    server.ephemeral_keys.refill(4)
    client = Connection.client(Config(server_key=server.public_key), 0.0)
    hello = client.datagrams_to_send(0.0)[0]
    conn, _ = server.receive(hello, ADDR, 0.0)
    first = conn.datagrams_to_send(0.0)[0]
    again, new = server.receive(hello, ADDR, 0.1)
    assert again is conn and not new
    assert conn.datagrams_to_send(0.1)[0] == first
    assert len(server.ephemeral_keys) == 3


def test_a_rejected_hello_takes_no_key():
    server = ServerEndpoint(Config(accepted_suites=(wire.SUITE_AES_256_GCM,)))
    server.ephemeral_keys.refill(4)
    client = Connection.client(Config(server_key=server.public_key, cipher="chacha20-poly1305"), 0.0)
    conn, _ = server.receive(client.datagrams_to_send(0.0)[0], ADDR, 0.0)
    assert conn is None and server.stats.rejected_suite == 1
    assert len(server.ephemeral_keys) == 4


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_never_uses_its_parents_keys():
    pool = EphemeralKeys(size=6)
    pool.refill(6)
    parents = pool_publics(pool)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                                   # the child: take two keys, refill, report
        try:
            os.close(r)
            taken = [pool.take() for _ in range(2)]
            assert None in taken                   # the inherited keys are gone
            pool.refill(2)
            taken = [pool.take()[1] for _ in range(2)]
            pool.refill(6)
            out = b"".join(taken) + b"".join(sorted(pool_publics(pool))) + bytes([pool.dropped_at_fork])
            os.write(w, out)
        finally:
            os._exit(0)
    os.close(w)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    os.waitpid(pid, 0)
    assert len(data) == 32 * 8 + 1, data
    child_keys = {data[i:i + 32] for i in range(0, 32 * 8, 32)}
    assert data[-1] == 6                           # the child dropped what it inherited
    assert not child_keys & parents
    assert pool_publics(pool) == parents           # the parent's pool is its own, untouched


def test_a_server_fills_its_pool_when_idle_and_its_handshakes_take_from_it():
    async def main():
        server = await stcp.start_server(echo_handler, "127.0.0.1", 0)
        pool = server.endpoint.ephemeral_keys
        try:
            await await_until(lambda: len(pool) == pool.size, 30, "the key pool to fill")
            port = server.sockets[0].getsockname()[1]
            data = os.urandom(1000)
            assert await echo_transfer("127.0.0.1", port, data, server.public_key) == data
            assert pool.taken_ready == 1 and pool.misses == 0
            await await_until(lambda: len(pool) == pool.size, 30, "the pool to refill")
        finally:
            server.close()
        assert len(pool) == 0                      # closing forgets the keys not used

    asyncio.run(asyncio.wait_for(main(), 120))
