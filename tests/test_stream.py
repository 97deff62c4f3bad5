"""stcp/stream.py on its own: SendStream (chunking, flow limit, acknowledgement and
retransmission bookkeeping, FIN) and RecvStream (flow control, reassembly, FIN).

Boundary tables put each limit at 0, 1, limit-1, limit, limit+1. The end-to-end behaviour
of both halves together is in tests/test_connection.py and tests/test_properties.py; here
each rule is checked where it lives. The reassembly's cost under an authenticated peer
that sends hostile offsets is at the end.
"""
from __future__ import annotations

import math
import random
import tracemalloc

import pytest

from stcp import stream
from stcp.errors import FlowControlError, ProtocolViolation
from stcp.stream import RecvStream, SendStream
from stcp.wire import INITIAL_MAX_DATA

DATA = bytes(range(256)) * 40          # 10240 distinct-looking bytes


def sender(data: bytes = DATA, *pieces: int, fin: bool = False) -> SendStream:
    """A SendStream holding data, written in pieces of the given sizes (one write if none)."""
    s = SendStream()
    pos = 0
    for n in pieces:
        s.write(data[pos:pos + n])
        pos += n
    if pos < len(data):
        s.write(data[pos:])
    if fin:
        s.finish()
    return s


def send_all(s: SendStream, max_len: int = 1000, flow_limit: int = 1 << 62) -> list:
    out = []
    while (c := s.next_chunk(max_len, flow_limit)) is not None:
        out.append(c)
    return out


# =======================================================================================
# SendStream: writing
def test_new_stream_is_empty():
    s = SendStream()
    assert (s.end, s.unacked_bytes, s.next_offset, s.acked_to) == (0, 0, 0, 0)
    assert not s.pending() and not s.has_new_data() and not s.wants_fin() and not s.all_acked
    assert s.next_chunk(1000, 1 << 20) is None


def test_write_appends_and_empty_write_is_nothing():
    s = SendStream()
    s.write(b"abc")
    s.write(b"")
    s.write(bytearray(b"de"))
    assert s.end == 5 and s.unacked_bytes == 5 and s.has_new_data()
    assert bytes(s.view(0, 5)) == b"abcde"


def test_write_keeps_a_copy_of_a_mutable_buffer():
    buf = bytearray(b"xyz")
    s = SendStream()
    s.write(buf)
    buf[:] = b"!!!"
    assert s.next_chunk(10, 10) == (0, b"xyz", False)


@pytest.mark.parametrize("data", [b"", b"more"])
def test_write_after_finish_is_refused(data):
    s = sender(b"abc", fin=True)
    with pytest.raises(ProtocolViolation, match="write after"):
        s.write(data)
    assert s.end == 3


# ---------------------------------------------------------------------------------------
# next_chunk: sizes and the flow limit
@pytest.mark.parametrize("max_len", [1, 2, 999, 1000, 1001, len(DATA) - 1, len(DATA), len(DATA) + 1])
def test_chunks_cover_the_stream_in_order(max_len):
    s = sender(DATA, 100, 1, 3000)              # chunks cut across the written pieces
    chunks = send_all(s, max_len)
    assert [c[0] for c in chunks] == list(range(0, len(DATA), max_len))
    assert all(len(c[1]) == min(max_len, len(DATA) - c[0]) for c in chunks)
    assert b"".join(c[1] for c in chunks) == DATA
    assert not any(c[2] for c in chunks) and s.next_offset == s.end and not s.pending()


@pytest.mark.parametrize("limit,want", [(0, None), (1, 1), (4095, 4095), (4096, 4096), (4097, 4096),
                                        (1 << 62, 4096)])
def test_flow_limit_caps_new_data(limit, want):
    s = sender(DATA[:4096])
    c = s.next_chunk(1 << 16, limit)
    if want is None:
        assert c is None and s.next_offset == 0 and s.has_new_data()
    else:
        assert c == (0, DATA[:want], False) and s.next_offset == want


def test_flow_limit_below_what_was_sent_sends_nothing_new():
    s = sender(DATA[:100])
    s.next_chunk(60, 1000)
    assert s.next_chunk(1000, 30) is None and s.next_offset == 60


def test_flow_limit_does_not_hold_back_retransmissions():
    s = sender(DATA[:100])
    send_all(s, 50)
    s.on_lost(0, 50, False)
    assert s.next_chunk(1000, 0) == (0, DATA[:50], False)


def test_view_is_zero_copy_within_a_written_piece_and_joined_across():
    s = sender(DATA[:300], 100, 100)
    inside = s.view(10, 90)
    assert isinstance(inside, memoryview) and bytes(inside) == DATA[10:90]
    across = s.view(50, 250)
    assert bytes(across) == DATA[50:250]
    assert bytes(s.view(99, 101)) == DATA[99:101]          # the boundary byte on each side
    assert bytes(s.view(100, 200)) == DATA[100:200]          # exactly one piece


# ---------------------------------------------------------------------------------------
# FIN
def test_fin_rides_on_the_last_chunk():
    s = sender(DATA[:2500], fin=True)
    chunks = send_all(s, 1000)
    assert [(o, len(d), f) for o, d, f in chunks] == [(0, 1000, False), (1000, 1000, False), (2000, 500, True)]
    assert s.fin_sent and not s.wants_fin() and not s.pending()


def test_fin_alone_when_finished_after_everything_was_sent():
    s = sender(DATA[:10])
    send_all(s)
    s.finish()
    assert s.wants_fin() and s.pending()
    assert s.next_chunk(1000, 1 << 20) == (10, b"", True)
    assert s.next_chunk(1000, 1 << 20) is None


def test_fin_waits_for_the_flow_limit():
    s = sender(DATA[:100], fin=True)
    assert s.next_chunk(1000, 60) == (0, DATA[:60], False)
    assert not s.wants_fin() and s.next_chunk(1000, 60) is None
    assert s.next_chunk(1000, 100) == (60, DATA[60:100], True)


def test_empty_stream_finished_sends_a_bare_fin():
    s = SendStream()
    s.finish()
    assert s.next_chunk(1000, 0) == (0, b"", True)
    s.on_acked(0, 0, True)
    assert s.all_acked


def test_lost_bare_fin_is_sent_again_until_acknowledged():
    s = sender(DATA[:10])
    send_all(s)
    s.finish()
    s.next_chunk(1000, 1 << 20)
    s.on_lost(10, 10, True)
    assert s.fin_lost and s.wants_fin()
    assert s.next_chunk(1000, 1 << 20) == (10, b"", True)
    assert not s.fin_lost
    s.on_acked(10, 10, True)
    s.on_lost(10, 10, True)                  # a late loss report after the ACK changes nothing
    assert not s.wants_fin() and not s.fin_lost


def test_lost_last_chunk_carries_the_fin_again():
    s = sender(DATA[:2000], fin=True)
    send_all(s, 1000)
    s.on_acked(0, 1000, False)
    s.on_lost(1000, 2000, True)
    assert s.next_chunk(1000, 1 << 20) == (1000, DATA[1000:2000], True)
    assert not s.pending()


def test_fin_is_held_back_while_earlier_bytes_wait_for_retransmission():
    s = sender(DATA[:3000], fin=True)
    send_all(s, 1000)
    s.on_lost(0, 1000, False)
    s.on_lost(2000, 3000, True)
    out = send_all(s, 1000)
    assert [(o, f) for o, _, f in out] == [(0, False), (2000, True)]


def test_all_acked_needs_the_fin_and_every_byte():
    s = sender(DATA[:100], fin=True)
    send_all(s)
    s.on_acked(0, 100, False)
    assert not s.all_acked and s.unacked_bytes == 0
    s.on_acked(100, 100, True)
    assert s.all_acked


# ---------------------------------------------------------------------------------------
# acknowledgements
def test_acks_in_order_advance_acked_to():
    s = sender(DATA[:3000], 1000, 1000)
    send_all(s, 1000)
    for end in (1000, 2000, 3000):
        s.on_acked(end - 1000, end, False)
        assert s.acked_to == end and s.unacked_bytes == 3000 - end
    assert s.acked_above == []


def test_acks_out_of_order_are_held_above_and_merged():
    s = sender(DATA[:5000])
    send_all(s, 1000)
    s.on_acked(3000, 4000, False)
    s.on_acked(1000, 2000, False)
    s.on_acked(2000, 3000, False)            # joins both
    assert s.acked_to == 0 and s.acked_above == [(1000, 4000)]
    s.on_acked(0, 1000, False)               # the gap filled: everything below 4000
    assert s.acked_to == 4000 and s.acked_above == []
    s.on_acked(4000, 5000, False)
    assert s.acked_to == 5000 and s.unacked_bytes == 0


@pytest.mark.parametrize("start,end,acked_to", [(0, 0, 1000), (0, 999, 1000), (0, 1000, 1000), (0, 1001, 1001),
                                                (999, 1001, 1001), (1000, 1001, 1001), (1001, 1002, 1000)])
def test_ack_edges_against_acked_to(start, end, acked_to):
    """A range ending at or below acked_to changes nothing; one that starts at or below it
    and ends above moves it; one starting above it (a gap) is held above."""
    s = sender(DATA[:2000])
    send_all(s)
    s.on_acked(0, 1000, False)
    s.on_acked(start, end, False)
    assert s.acked_to == acked_to
    assert s.acked_above == ([(start, end)] if start > 1000 else [])


def test_duplicate_and_overlapping_acks_are_harmless():
    s = sender(DATA[:3000])
    send_all(s, 1000)
    for _ in range(2):
        s.on_acked(2000, 3000, False)
        s.on_acked(1500, 2500, False)
    assert s.acked_above == [(1500, 3000)]
    s.on_acked(0, 1500, False)
    s.on_acked(0, 1000, False)
    assert s.acked_to == 3000 and s.acked_above == []


def test_acknowledged_bytes_are_released_and_the_rest_stay_readable():
    s = sender(DATA[:3000], 1000, 1000)
    send_all(s, 700)
    s.on_acked(0, 1400, False)
    assert bytes(s.view(1400, 3000)) == DATA[1400:3000]


# ---------------------------------------------------------------------------------------
# losses and retransmission
def test_lost_range_is_sent_again_before_new_data():
    s = sender(DATA[:4000])
    s.next_chunk(1000, 1 << 20)
    s.next_chunk(1000, 1 << 20)
    s.on_lost(0, 1000, False)
    assert s.next_chunk(1000, 1 << 20) == (0, DATA[:1000], False)
    assert s.next_chunk(1000, 1 << 20) == (2000, DATA[2000:3000], False)


@pytest.mark.parametrize("max_len", [1, 299, 300, 301])
def test_retransmission_is_cut_to_max_len(max_len):
    s = sender(DATA[:1000])
    send_all(s)
    s.on_lost(100, 400, False)
    out = send_all(s, max_len)
    assert b"".join(d for _, d, _ in out) == DATA[100:400]
    assert [o for o, _, _ in out] == list(range(100, 400, max_len))


def test_losses_are_retransmitted_lowest_first():
    s = sender(DATA[:5000])
    send_all(s, 1000)
    for start in (3000, 1000, 4000):
        s.on_lost(start, start + 1000, False)
    assert [o for o, _, _ in send_all(s, 1000)] == [1000, 3000, 4000]


@pytest.mark.parametrize("lost,want", [((0, 1000), []), ((0, 1001), [(1000, 1001)]), ((999, 1500), [(1000, 1500)]),
                                       ((1000, 1000), []), ((1000, 1001), [(1000, 1001)])])
def test_loss_below_acked_to_is_not_resent(lost, want):
    s = sender(DATA[:2000])
    send_all(s)
    s.on_acked(0, 1000, False)
    s.on_lost(*lost, False)
    assert s.retransmit == want


def test_loss_whose_start_a_later_ack_covered_resumes_after_it():
    s = sender(DATA[:4000])
    send_all(s, 1000)
    s.on_acked(1000, 2000, False)
    s.on_lost(1500, 3000, False)             # the first half already acknowledged above
    assert s.retransmit == [(2000, 3000)]
    s.on_lost(1000, 2000, False)             # wholly acknowledged
    assert s.retransmit == [(2000, 3000)]


def test_retransmission_acked_meanwhile_is_skipped():
    s = sender(DATA[:3000])
    send_all(s, 1000)
    s.on_lost(0, 1000, False)
    s.on_lost(1000, 2000, False)
    s.on_acked(0, 1500, False)               # a late ACK for the originals
    assert s.next_chunk(1000, 1 << 20) == (1500, DATA[1500:2000], False)
    assert s.next_chunk(1000, 1 << 20) is None


@pytest.mark.parametrize("seed", range(8))
def test_random_loss_and_ack_deliver_every_byte_once_acknowledged(seed):
    """A sender over a link that loses and reorders, a receiver that acknowledges what it
    got: every byte arrives in order, the stream ends with its FIN, the sender ends all_acked."""
    rng = random.Random(seed)
    data = rng.randbytes(20000)
    s = sender(data, *[rng.randint(1, 3000) for _ in range(6)], fin=True)
    r = RecvStream(INITIAL_MAX_DATA)
    got = bytearray()
    rounds = 0
    while not s.all_acked:
        rounds += 1
        assert rounds < 500, "no progress"
        flight = send_all(s, rng.choice([50, 1400, 5000]))
        rng.shuffle(flight)
        for off, chunk, fin in flight:
            if rng.random() < 0.3:
                s.on_lost(off, off + len(chunk), fin)
                continue
            got += r.receive(off, chunk, fin)
            s.on_acked(off, off + len(chunk), fin)
    assert bytes(got) == data and r.finished and s.unacked_bytes == 0


# =======================================================================================
# RecvStream: flow control
@pytest.mark.parametrize("window,ok", [(0, False), (1, False), (INITIAL_MAX_DATA - 1, False),
                                       (INITIAL_MAX_DATA, True), (INITIAL_MAX_DATA + 1, True)])
def test_window_at_least_the_initial_credit(window, ok):
    if ok:
        assert RecvStream(window).max_data == INITIAL_MAX_DATA
    else:
        with pytest.raises(ValueError, match="at least"):
            RecvStream(window)


M = INITIAL_MAX_DATA


@pytest.mark.parametrize("offset,length,ok", [
    (0, M - 1, True), (0, M, True), (0, M + 1, False),                 # one frame from the start
    (M - 2, 1, True), (M - 1, 1, True), (M, 1, False),                 # one byte out of order
    (M - 1, 2, False), ((1 << 62) - 1, 1, False), ((1 << 64) - 2, 1, False),
])
def test_data_up_to_the_advertised_limit(offset, length, ok):
    r = RecvStream(INITIAL_MAX_DATA)
    end = offset + length
    if ok:
        r.receive(offset, bytes(length), False)
        assert r.highest == end
    else:
        with pytest.raises(FlowControlError, match=f"up to byte {end}, beyond the {M} allowed"):
            r.receive(offset, bytes(length), False)
        assert r.highest == 0 and r.delivered_to == 0


@pytest.mark.parametrize("fin", [False, True])
def test_fin_beyond_the_limit_is_a_flow_control_error(fin):
    r = RecvStream(INITIAL_MAX_DATA)
    with pytest.raises(FlowControlError):
        r.receive(INITIAL_MAX_DATA, b"x", fin)


@pytest.mark.parametrize("window", [INITIAL_MAX_DATA, INITIAL_MAX_DATA + 1, 16 << 20])
def test_initial_limit_advertises_a_larger_window_once(window):
    r = RecvStream(window)
    assert r.credit_due() == (window > INITIAL_MAX_DATA)
    if window > INITIAL_MAX_DATA:
        assert r.grant() == window
    assert r.max_data == max(window, INITIAL_MAX_DATA)
    assert not r.credit_due()


W = 2 * INITIAL_MAX_DATA                     # a window whose half is easy to step around


@pytest.mark.parametrize("consumed,update", [(0, False), (1, False), (W // 2 - 1, False), (W // 2, True),
                                             (W // 2 + 1, True), (W, True)])
def test_window_update_after_half_the_window_is_read(consumed, update):
    r = RecvStream(W)
    assert r.credit_due() and r.grant() == W
    r.receive(0, bytes(W), False)
    r.on_consumed(consumed)
    if update:
        assert r.credit_due() and r.grant() == consumed + W == r.max_data
    else:
        assert not r.credit_due() and r.max_data == W


def test_window_updates_accumulate_over_small_reads():
    r = RecvStream(W)
    r.grant()
    r.receive(0, bytes(W), False)
    updates = [r.grant() for _ in range(W // 4096) if r.on_consumed(4096) or r.credit_due()]
    assert updates == [W + W // 2, 2 * W]
    assert r.consumed == W


def test_no_window_update_once_the_stream_has_ended():
    r = RecvStream(W)
    r.grant()
    r.receive(0, bytes(W), True)
    r.on_consumed(W)
    assert not r.credit_due() and r.max_data == W


# ---------------------------------------------------------------------------------------
# reassembly
def test_in_order_data_is_delivered_as_it_comes():
    r = RecvStream(INITIAL_MAX_DATA)
    assert r.receive(0, DATA[:10], False) == DATA[:10]
    assert r.receive(10, DATA[10:20], False) == DATA[10:20]
    assert r.receive(20, b"", False) == b""
    assert (r.delivered_to, r.highest) == (20, 20)


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("size", [1, 7, 1000])
def test_any_arrival_order_delivers_the_bytes_in_order(seed, size):
    rng = random.Random(seed)
    data = DATA[:size * 300]
    pieces = [(o, data[o:o + size]) for o in range(0, len(data), size)]
    rng.shuffle(pieces)
    r = RecvStream(INITIAL_MAX_DATA)
    got = bytearray()
    for off, chunk in pieces:
        got += r.receive(off, chunk, False)
        assert len(got) == r.delivered_to
    assert bytes(got) == data and r.fragments == r.held == 0


def test_gap_holds_data_until_it_is_filled():
    r = RecvStream(INITIAL_MAX_DATA)
    assert r.receive(10, DATA[10:20], False) == b""
    assert r.receive(30, DATA[30:40], False) == b""
    assert r.delivered_to == 0 and r.highest == 40
    assert r.receive(0, DATA[:10], False) == DATA[:20]
    assert r.receive(20, DATA[20:30], False) == DATA[20:40]
    assert r.delivered_to == 40 and r.fragments == r.held == 0


@pytest.mark.parametrize("offset,length,new", [(0, 10, b""), (0, 9, b""), (5, 5, b""), (9, 1, b""),
                                               (9, 2, DATA[10:11]), (10, 1, DATA[10:11]), (0, 11, DATA[10:11])])
def test_duplicates_and_overlaps_deliver_only_new_bytes(offset, length, new):
    r = RecvStream(INITIAL_MAX_DATA)
    r.receive(0, DATA[:10], False)
    assert r.receive(offset, DATA[offset:offset + length], False) == new
    assert r.delivered_to == max(10, offset + length)


def test_buffered_pieces_that_overlap_deliver_each_byte_once():
    r = RecvStream(INITIAL_MAX_DATA)
    r.receive(10, DATA[10:30], False)
    r.receive(20, DATA[20:50], False)
    r.receive(25, DATA[25:35], False)        # inside what is buffered
    assert r.receive(0, DATA[:15], False) == DATA[:50]
    assert r.delivered_to == 50 and r.fragments == r.held == 0


def test_a_longer_copy_at_the_same_offset_replaces_a_shorter_one():
    r = RecvStream(INITIAL_MAX_DATA)
    r.receive(10, DATA[10:15], False)
    r.receive(10, DATA[10:30], False)
    r.receive(10, DATA[10:12], False)        # shorter: ignored
    assert r.receive(0, DATA[:10], False) == DATA[:30]


# ---------------------------------------------------------------------------------------
# FIN
def test_fin_in_order_finishes_the_stream():
    r = RecvStream(INITIAL_MAX_DATA)
    assert r.receive(0, DATA[:10], True) == DATA[:10]
    assert r.finished and r.fin_offset == 10


def test_bare_fin_after_the_data():
    r = RecvStream(INITIAL_MAX_DATA)
    r.receive(0, DATA[:10], False)
    assert not r.finished
    assert r.receive(10, b"", True) == b""
    assert r.finished


def test_fin_before_the_data_finishes_when_the_gap_fills():
    r = RecvStream(INITIAL_MAX_DATA)
    assert r.receive(10, DATA[10:20], True) == b""
    assert not r.finished and r.fin_offset == 20
    assert r.receive(0, DATA[:10], False) == DATA[:20]
    assert r.finished


def test_empty_stream_fin_at_zero():
    r = RecvStream(INITIAL_MAX_DATA)
    assert r.receive(0, b"", True) == b"" and r.finished


@pytest.mark.parametrize("offset,length,fin,error", [
    (0, 20, True, None),                                  # the same FIN again
    (15, 5, True, None),
    (20, 0, True, None),
    (0, 19, True, "stream end moved"),                    # end - 1
    (0, 21, True, "stream end moved"),                    # end + 1
    (20, 1, False, "data beyond the end of the stream"),
    (19, 2, False, "data beyond the end of the stream"),
    (19, 1, False, None),                                 # up to the end exactly
])
def test_fin_fixes_the_end(offset, length, fin, error):
    r = RecvStream(INITIAL_MAX_DATA)
    r.receive(0, DATA[:20], True)
    call = lambda: r.receive(offset, DATA[offset:offset + length], fin)  # noqa: E731
    if error is None:
        assert call() == b"" and r.finished
    else:
        with pytest.raises(ProtocolViolation, match=error):
            call()


@pytest.mark.parametrize("fin_at,error", [(29, True), (30, False), (31, False)])
def test_fin_below_data_already_received_is_refused(fin_at, error):
    r = RecvStream(INITIAL_MAX_DATA)
    r.receive(20, DATA[20:30], False)        # highest = 30, not yet delivered
    call = lambda: r.receive(fin_at, b"", True)  # noqa: E731
    if error:
        with pytest.raises(ProtocolViolation, match="below data already received"):
            call()
    else:
        call()
        assert r.fin_offset == fin_at


# ---------------------------------------------------------------------------------------
# an authenticated but hostile peer: reassembly must cost a bounded multiple of the window
# and of the honest bytes (docs/PROTOCOL.md: flow control bounds what a receiver buffers)
def retained_bytes(feed) -> int:
    """Bytes still allocated, by this file or stream.py, after feed() ran and dropped its own
    references (other threads' allocations meanwhile do not count)."""
    tracemalloc.start()
    try:
        feed()
        snap = tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(True, __file__), tracemalloc.Filter(True, stream.__file__)])
        return sum(t.size for t in snap.traces)
    finally:
        tracemalloc.stop()


def test_honest_out_of_order_data_is_held_within_the_window():
    r = RecvStream(INITIAL_MAX_DATA)

    def feed():
        for off in range(1400, INITIAL_MAX_DATA - 1400, 1400):
            r.receive(off, bytes(1400), False)   # each frame a new object, held only by r
    held = retained_bytes(feed)
    assert INITIAL_MAX_DATA * 0.9 < held < INITIAL_MAX_DATA * 1.2, held


def test_overlapping_frames_are_held_within_the_window():
    r = RecvStream(INITIAL_MAX_DATA)

    def feed():
        for off in range(1, 49):                 # 48 x 64 KiB = 3 MiB covering under 1 MiB of stream
            r.receive(off, bytes(65535), False)
    held = retained_bytes(feed)
    assert held < INITIAL_MAX_DATA + (64 << 10), f"{held} bytes held for a {INITIAL_MAX_DATA}-byte window"


def test_empty_frames_ahead_are_not_held():
    r = RecvStream(INITIAL_MAX_DATA)

    def feed():
        for off in range(1000, 21000):
            r.receive(off, b"", False)
    held = retained_bytes(feed)
    assert held < 64 << 10, f"{held} bytes held for 20000 empty frames"


def _counted(op):
    def compare(self, other):
        CountingOffset.compares += 1
        return op(int(self), int(other))
    return compare


class CountingOffset(int):
    """An offset that counts the ordering comparisons made with it (one shared counter)."""
    compares = 0
    __lt__ = _counted(int.__lt__)
    __le__ = _counted(int.__le__)
    __gt__ = _counted(int.__gt__)
    __ge__ = _counted(int.__ge__)


def test_draining_buffered_pieces_is_not_quadratic():
    """P one-byte pieces arrive in reverse order, then the first byte: buffering and
    delivering them may cost O(P log P) offset comparisons, not O(P^2). (Counted, not timed:
    a heap or a sorted structure passes.)"""
    p = 1000
    r = RecvStream(INITIAL_MAX_DATA)
    CountingOffset.compares = 0
    for off in range(p, 0, -1):
        r.receive(CountingOffset(off), DATA[off:off + 1], False)
    assert r.receive(0, DATA[:1], False) == DATA[:p + 1]
    bound = 8 * p * math.log2(p)
    assert CountingOffset.compares <= bound, f"{CountingOffset.compares} comparisons to buffer and deliver {p} pieces"
