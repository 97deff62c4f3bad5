"""stcp.Config takes the cipher by name, as the README and the CLI's --cipher name it, and
says clearly what it does not take."""
from __future__ import annotations

import dataclasses

import pytest

import stcp
from stcp import wire
from stcp.state import State
from tests.support.sim import Pair


@pytest.mark.parametrize("name", sorted(wire.SUITES))
def test_the_cipher_by_name_is_the_one_the_connection_uses(name):
    p = Pair(client_config=stcp.Config(cipher=name))
    p.run(lambda: p.server_conns and p.server_conn.state == State.ENCRYPTED)
    assert p.client.suite == p.server_conn.suite == wire.SUITES[name]
    assert stcp.Config(cipher=name).suite == wire.SUITES[name]
    # a copy with other settings keeps the cipher (the name is not a stored field)
    assert dataclasses.replace(stcp.Config(cipher=name), idle_timeout=5.0).suite == wire.SUITES[name]


@pytest.mark.parametrize("kwargs, says", [
    ({"suite": "chacha20-poly1305"}, "name the cipher with cipher='chacha20-poly1305'"),
    ({"cipher": "rot13"}, "unknown cipher suite 'rot13'; choose one of aes-256-gcm, chacha20-poly1305"),
    ({"suite": 9}, "unknown cipher suite 9; choose one of"),
    ({"accepted_suites": (1, "des")}, "unknown cipher suite 'des'"),
])
def test_a_cipher_it_does_not_know_is_one_clear_value_error(kwargs, says):
    with pytest.raises(ValueError, match=says.replace("(", r"\(")) as info:
        stcp.Config(**kwargs)
    assert "\n" not in str(info.value)
