"""The Python API's keys: a client must say which server key it accepts (a pinned key, or
the visibly named stcp.UNAUTHENTICATED); servers take a private key or key file and an
allow list; both ends see the peer's proven key."""
from __future__ import annotations

import asyncio
import os
import re

import pytest

import stcp
from stcp.identity import encode_key, save_private_key
from tests.support.servers import echo

BOTH = "server_key=.*stcp.UNAUTHENTICATED"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def test_omitting_server_key_is_a_type_error_naming_both_choices():
    async def main():
        with pytest.raises(TypeError, match=BOTH):
            await stcp.open_connection("127.0.0.1", 9)
        with pytest.raises(TypeError, match=BOTH):
            await stcp.open_connection("127.0.0.1", 9, server_key=None)
    run(main())
    with pytest.raises(TypeError, match=BOTH):
        stcp.connect(("127.0.0.1", 9))
    with pytest.raises(TypeError, match=BOTH):
        stcp.BlockingConnection(("127.0.0.1", 9))


def test_unauthenticated_says_what_it_costs():
    assert repr(stcp.UNAUTHENTICATED) == "stcp.UNAUTHENTICATED"
    assert "an active attacker can read and change everything" in " ".join(type(stcp.UNAUTHENTICATED).__doc__.split())
    assert "an active attacker can read and change everything" in " ".join(stcp.open_connection.__doc__.split())


@pytest.mark.parametrize("bad,err", [(b"short", ValueError), ("not base64!", ValueError), (42, TypeError)])
def test_a_malformed_server_key_is_refused_before_anything_is_sent(bad, err):
    async def main():
        await stcp.open_connection("127.0.0.1", 9, server_key=bad)
    with pytest.raises(err):
        run(main())


def test_pinned_key_as_bytes_or_text_and_peer_keys_on_both_sides(tmp_path):
    client_private = stcp.generate_private_key()
    save_private_key(str(tmp_path / "client.key"), client_private)
    seen = []

    async def handler(reader, writer):
        seen.append(writer.get_extra_info("peer_key"))
        await echo(reader, writer)

    async def main():
        server = await stcp.start_server(handler, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        try:
            for server_key, client_key in ((server.public_key, None),
                                           (encode_key(server.public_key), str(tmp_path / "client.key")),
                                           (server.public_key, client_private)):
                r, w = await stcp.open_connection("127.0.0.1", port, server_key=server_key, client_key=client_key)
                assert w.get_extra_info("peer_key") == server.public_key
                w.write(b"x")
                w.write_eof()
                assert await r.read() == b"x"
                await w.wait_closed()
        finally:
            server.close()
    run(main())
    assert seen == [None, stcp.public_key(client_private), stcp.public_key(client_private)]


def test_server_key_from_a_key_file_and_allowed_clients_from_a_file(tmp_path):
    server_private = stcp.generate_private_key()
    save_private_key(str(tmp_path / "server.key"), server_private)
    alice = stcp.generate_private_key()
    (tmp_path / "clients").write_text(f"# allow\n{encode_key(stcp.public_key(alice))} alice\n")

    async def main():
        server = await stcp.start_server(echo, "127.0.0.1", 0, server_key=tmp_path / "server.key",
                                         allowed_clients=str(tmp_path / "clients"))
        port = server.sockets[0].getsockname()[1]
        try:
            assert server.public_key == stcp.public_key(server_private)
            r, w = await stcp.open_connection("127.0.0.1", port, server_key=server.public_key, client_key=alice)
            w.write(b"alice")
            w.write_eof()
            assert await r.read() == b"alice"
            await w.wait_closed()
            r, w = await stcp.open_connection("127.0.0.1", port, server_key=server.public_key)
            with pytest.raises(stcp.ConnectionTerminated, match="ACCESS_DENIED"):
                await r.read()
            with pytest.raises(stcp.ConnectionTerminated, match="ACCESS_DENIED"):
                await w.wait_closed()
        finally:
            server.close()
    run(main())


def test_blocking_client_pins_and_reports_the_peer_key(stcp_server):
    server = stcp_server()
    with stcp.connect(server.address, timeout=10, server_key=encode_key(server.public_key)) as conn:
        assert conn.peer_key() == server.public_key
        conn.sendall(b"hi")
        assert conn.recv(10) == b"hi"
    other = stcp.public_key(stcp.generate_private_key())
    with pytest.raises(stcp.HandshakeFailed, match=re.escape(f"expected server key {stcp.fingerprint(other)}, ")):
        stcp.connect(server.address, timeout=1, server_key=other)


def test_a_client_key_file_others_can_read_is_refused(tmp_path):
    path = tmp_path / "client.key"
    save_private_key(str(path), stcp.generate_private_key())
    path.chmod(0o644)

    async def main():
        await stcp.open_connection("127.0.0.1", 9, server_key=stcp.UNAUTHENTICATED, client_key=path)
    with pytest.raises(stcp.InvalidKey, match="chmod 600"):
        run(main())


def test_client_config_follows_each_calls_arguments():
    """client_config reuses its last Config for repeated arguments, but never answers a
    call with another call's keys or with a config as it was before the caller changed it."""
    from stcp.api import client_config, make_config
    key_a, key_b, mine = os.urandom(32), os.urandom(32), os.urandom(32)
    config = make_config()
    first = client_config(config, None, key_a, None, "connect")
    assert first.server_key == key_a and client_config(config, None, key_a, None, "connect") is first
    assert client_config(config, None, key_b, None, "connect").server_key == key_b
    config.handshake_timeout = 3.0
    changed = client_config(config, None, key_b, None, "connect")
    assert changed.handshake_timeout == 3.0 and changed.server_key == key_b
    with_mine = client_config(config, None, key_b, mine, "connect")
    assert with_mine.static_key == mine
    assert client_config(config, None, key_b, None, "connect").static_key is None
    assert client_config(None, "chacha20-poly1305", key_a, None, "connect").suite != \
        client_config(None, None, key_a, None, "connect").suite
