"""resolve() answers numeric addresses without getaddrinfo, exactly as getaddrinfo would."""
import socket

import pytest

from stcp.datapath import socket as sockdp
from stcp.errors import STCPError


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::1", "::", "2001:db8::1",
                                  "2001:0DB8:0::1", "::ffff:192.0.2.1"])
@pytest.mark.parametrize("port", [0, 7844, 65535])
def test_literal_addresses_match_getaddrinfo(host, port, monkeypatch):
    want = socket.getaddrinfo(host, port, type=socket.SOCK_DGRAM)[0]

    def no_lookup(*a, **k):
        raise AssertionError("getaddrinfo called for a numeric address")
    monkeypatch.setattr(sockdp.socket, "getaddrinfo", no_lookup)
    assert sockdp.resolve(host, port) == (want[0], want[4])


@pytest.mark.parametrize("host", ["localhost", "127.1", "fe80::1%lo"])
def test_other_spellings_still_go_through_getaddrinfo(host, monkeypatch):
    seen = []
    real = socket.getaddrinfo

    def lookup(h, *a, **k):
        seen.append(h)
        return real(h, *a, **k)
    monkeypatch.setattr(sockdp.socket, "getaddrinfo", lookup)
    try:
        sockdp.resolve(host, 1)
    except STCPError:
        pass              # e.g. no lo scope on this host: the error is getaddrinfo's, as before
    assert seen == [host]


def test_unresolvable_name_is_a_one_line_error(monkeypatch):
    def fail(*a, **k):
        raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
    monkeypatch.setattr(sockdp.socket, "getaddrinfo", fail)
    with pytest.raises(STCPError, match="cannot resolve 'server.example'"):
        sockdp.resolve("server.example", 1)
