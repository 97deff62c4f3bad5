"""Issue 12, finding 9 (the parts in the transport core): reserved values and limits.

Packet number 0 in a protected record is malformed; a sender never uses a packet number
above 2^48 - 1; running out of key epochs is KEY_UPDATE_ERROR, not AUTH_FAILURE; a peer's
CLOSE reason reaches the application with its control characters escaped.
"""
from __future__ import annotations

import pytest

from stcp import wire
from stcp.api import closed_error
from stcp.connection import printable
from stcp.crypto import RecordKey
from stcp.errors import CloseCode, KeyUpdateError
from stcp.state import State
from tests.support.sim import Peer

_HDR = wire.HEADER_STRUCT


def test_packet_number_zero_is_malformed():
    p = Peer()
    key = p.client._keys.send
    record = key.seal(p.server.local_cid, wire.make_seq(key.epoch + 1, 0), b"\x01")   # seq != 0, pn 0
    p.endpoint.receive(record, ("198.51.100.1", 1), p.now)          # from a stranger: discarded
    assert p.server.state == State.ENCRYPTED and p.server.stats.discarded["malformed"] == 1
    p.feed(record)                                                   # from the peer: fatal
    assert p.server.close_info.code == CloseCode.MALFORMED_RECORD
    assert "packet number 0" in p.server.close_info.reason


def test_the_sender_stops_at_the_last_packet_number():
    p = Peer()
    c = p.client
    c._next_pn = wire.PN_MASK - 3
    c._skip_at = wire.PN_MASK + 10            # no skip in the way of the count below
    c._peer_max_data = 1 << 30
    c.send(bytes(100_000))
    out = c.datagrams_to_send(p.now)
    pns = [wire.split_seq(_HDR.unpack_from(d)[2])[1] for d in out]
    assert max(pns) == wire.PN_MASK and len(set(pns)) == len(pns)
    assert pns[-1] == wire.PN_MASK                   # the last number carried the CLOSE ...
    assert c.close_info.code == CloseCode.INTERNAL_ERROR
    assert "packet numbers exhausted" in c.close_info.reason
    for d in out:                                     # ... which the peer understands
        p.feed(d)
    assert p.server.close_info.code == CloseCode.INTERNAL_ERROR and p.server.close_info.by_peer


def test_running_out_of_key_epochs_is_a_key_update_error():
    last = RecordKey(wire.SUITE_AES_256_GCM, bytes(32), wire.MAX_EPOCH)
    with pytest.raises(KeyUpdateError, match="key epochs exhausted"):
        last.next()
    p = Peer()
    c = p.client
    c._keys.send = last
    c._key_update_allowed = True
    c._sealed_under_key = c.config.key_update_interval
    c.send(b"x")
    c.datagrams_to_send(p.now)
    assert c.close_info.code == CloseCode.KEY_UPDATE_ERROR


@pytest.mark.parametrize("reason,shown", [
    ("plain words", "plain words"),
    ("\x1b[2J\x1b[31mred", "\\x1b[2J\\x1b[31mred"),
    ("line\nINFO fake log entry\r", "line\\nINFO fake log entry\\r"),
    ("right-to-left \u202eevil", "right-to-left \\u202eevil"),
    ("nul\x00 and bell\x07", "nul\\x00 and bell\\x07"),
])
def test_a_peers_close_reason_is_escaped(reason, shown):
    assert printable(reason) == shown
    p = Peer()
    p.feed(p.seal(wire.encode_frame(wire.CloseFrame(CloseCode.APPLICATION_ABORT, reason))))
    info = p.server.close_info
    assert info.by_peer and info.reason == shown
    assert shown in str(closed_error(info)) and "\x1b" not in str(closed_error(info))
