"""stcp._demux.group_by_cid (C) against stcp.endpoint.group_by_cid_ref (its pure-Python
reference): the same groups for handmade batches, GRO buffers and fuzzed ones; bad
arguments raise TypeError, never crash."""
from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from stcp import endpoint

try:
    from stcp import _demux
except ImportError as exc:  # the package's build makes it; a missing one is a failure, not a skip
    pytest.fail(f"stcp._demux is not built ({exc}); run 'make' or 'pip install -e .'", pytrace=False)


def test_endpoint_uses_the_c_grouping():
    assert endpoint.group_by_cid is _demux.group_by_cid


def _hdr(cid: int, seq: int, body: bytes = b"") -> bytes:
    return (16 + len(body)).to_bytes(8, "big") + cid.to_bytes(8, "big") + seq.to_bytes(8, "big") + body


def test_group_by_cid_groups_consecutive_records_of_one_connection():
    a, b = ("10.0.0.1", 1), ("10.0.0.2", 2)
    batch = [(_hdr(5, 1), a), (_hdr(5, 2), a), (_hdr(5, 3), b),          # same cid, another address
             (_hdr(6, 1), b), (_hdr(0, 0), b), (b"short", b),            # a hello, a runt
             (_hdr(6, 2), b), (_hdr(6, 3), ("10.0.0.2", 2)),              # equal address, new object
             (_hdr(7, 0), a), (_hdr(0, 9), a)]                            # seq 0 / cid 0: alone
    want = [(5, a, [batch[0][0], batch[1][0]]), (5, b, [batch[2][0]]), (6, b, [batch[3][0]]),
            (-1, b, [batch[4][0]]), (-1, b, [b"short"]), (6, b, [batch[6][0], batch[7][0]]),
            (-1, a, [batch[8][0]]), (-1, a, [batch[9][0]])]
    assert _demux.group_by_cid(batch) == want
    assert endpoint.group_by_cid_ref(batch) == want
    assert _demux.group_by_cid([]) == []


def test_group_by_cid_keeps_a_one_connection_gro_buffer_whole():
    """recvmmsg(gro=True) gives (buffer, addr, segment_size): one connection's records stay a
    (buffer, size) pair, uncopied; a buffer that mixes connections or holds a hello is cut."""
    a = ("10.0.0.1", 1)
    recs = [_hdr(5, i, bytes(10)) for i in range(1, 5)]            # 34 bytes each
    whole = b"".join(recs) + _hdr(5, 9)[:30]                       # a shorter last one
    mixed = recs[0] + _hdr(6, 1, bytes(10)) + _hdr(0, 0, bytes(10))
    batch = [(whole, a, 34), (recs[0], a, 34), (mixed, a, 34), (recs[1] + recs[2], a, 99)]
    want = [(5, a, [(whole, 34), recs[0], mixed[:34]]),             # the same connection goes on
            (6, a, [mixed[34:68]]), (-1, a, [mixed[68:]]),
            (5, a, [recs[1] + recs[2]])]                             # segment size >= length: one datagram
    for fn in (_demux.group_by_cid, endpoint.group_by_cid_ref):
        got = fn(batch)
        assert got == want
    assert _demux.group_by_cid(batch)[0][2][0][0] is whole          # not copied


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.one_of(st.binary(max_size=30),
                        st.builds(_hdr, st.integers(0, 3), st.integers(0, 2), st.binary(max_size=4))),
              st.sampled_from([("h", 1), ("h", 2)])),
    st.tuples(st.builds(lambda rs: b"".join(rs),
                        st.lists(st.builds(_hdr, st.integers(0, 2), st.integers(0, 2), st.just(b"xy")),
                                 min_size=1, max_size=4)),
              st.sampled_from([("h", 1), ("h", 2)]), st.sampled_from([26, 13, 100]))), max_size=20))
def test_fuzz_group_by_cid_c_equals_python(batch):
    assert _demux.group_by_cid(batch) == endpoint.group_by_cid_ref(batch)
    for bad in ([1], [(b"x",)], [("text", None)], None):
        with pytest.raises(TypeError):
            _demux.group_by_cid(bad)
