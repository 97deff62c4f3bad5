"""stcp._frames (stcp/_ext/frames.c) against its pure-Python references in stcp.wire.

decode_ack_stream must give what decode_ack_stream_ref gives on every plaintext: the records
of every frame type, ACK/STREAM records cut short or corrupted anywhere, and random bytes;
where the reference raises ProtocolViolation the C raises it with the same words.
encode_ack_stream must give encode_ack_stream_ref's bytes, or the same ValueError.
"""
from __future__ import annotations

import os
import random
import subprocess
import sys

import pytest

from stcp import wire
from stcp.errors import ProtocolViolation

_frames = pytest.importorskip("stcp._frames", reason="stcp._frames is not built (pip install -e .)")

EVERY_FRAME = [
    wire.StreamFrame(0, b""), wire.StreamFrame(7, b"data", fin=True), wire.StreamFrame((1 << 64) - 1, b"x" * 300),
    wire.AckFrame(((5, 9),)), wire.AckFrame(((40, 50), (20, 30), (0, 3)), delay_us=12345),
    wire.AckFrame(((0, 0),), delay_us=0xFFFFFFFF), wire.MaxDataFrame(1 << 40), wire.PingFrame(),
    wire.CloseFrame(3, "bye"), wire.KeyUpdateFrame(2), wire.PaddingFrame(5),
    wire.ClientAuthFrame(bytes(range(32)), bytes(32)), wire.ResetTokenFrame(bytes(16)),
]


def same(c_call, ref_call):
    """Both return the same value, or both raise the same error class with the same words."""
    try:
        want = ref_call()
    except (ValueError, ProtocolViolation) as exc:
        with pytest.raises(type(exc)) as got:
            c_call()
        assert str(got.value) == str(exc)
        return None
    got = c_call()
    assert got == want
    return got


def test_constants_agree_with_wire():
    assert (_frames.FRAME_ACK, _frames.FRAME_STREAM, _frames.MAX_ACK_RANGES, _frames.STREAM_FRAME_OVERHEAD) == \
        (wire.FRAME_ACK, wire.FRAME_STREAM, wire.MAX_ACK_RANGES, wire.STREAM_FRAME_OVERHEAD)


def test_wire_uses_the_c_codec():
    assert wire.FRAMES_ACCELERATED
    assert wire.decode_ack_stream is _frames.decode_ack_stream


@pytest.mark.parametrize("first", EVERY_FRAME + [None], ids=lambda f: type(f).__name__)
@pytest.mark.parametrize("second", EVERY_FRAME + [None], ids=lambda f: type(f).__name__)
def test_decode_agrees_on_every_pair_of_frame_types(first, second):
    present = [f for f in (first, second) if f is not None]
    plaintext = b"".join(wire.encode_frame(f) for f in present)
    result = same(lambda: _frames.decode_ack_stream(plaintext), lambda: wire.decode_ack_stream_ref(plaintext))
    shapes = {(wire.AckFrame,), (wire.StreamFrame,), (wire.AckFrame, wire.StreamFrame)}
    if tuple(map(type, present)) in shapes:
        ranges, delay, offset, data, fin = result
        frames = wire.decode_frames(plaintext)      # and it says what the general decoder says
        ack = frames[0] if type(frames[0]) is wire.AckFrame else None
        stream = frames[-1] if type(frames[-1]) is wire.StreamFrame else None
        assert (ranges, delay) == ((ack.ranges, ack.delay_us) if ack else (None, 0))
        assert (offset, data, fin) == ((stream.offset, stream.data, stream.fin) if stream else (0, None, False))
    else:
        assert result is None


def _ack(rng: random.Random) -> bytes:
    ranges, high = [], rng.choice([0, 1, 2, 70, 1 << 47, (1 << 64) - 1])
    for _ in range(rng.choice([1, 1, 2, 5, 64, 70])):
        low = max(0, high - rng.choice([0, 0, 1, 3, 100]))
        ranges.append((low, high))
        if low < 2:
            break
        high = low - 2 - rng.choice([0, 0, 1, 9])
        if high < 0:
            break
    return wire.encode_ack(ranges, rng.choice([0, 1, 1 << 40]))


def test_decode_agrees_on_cut_corrupted_and_random_plaintexts():
    rng = random.Random(14)
    for i in range(3000):
        parts = [_ack(rng) if rng.random() < 0.8 else b"",
                 wire.encode_stream(rng.choice([0, 5, (1 << 64) - 1]), rng.randbytes(rng.choice([0, 1, 64, 1300])),
                                    rng.random() < 0.2) if rng.random() < 0.8 else b""]
        p = bytearray(b"".join(parts))
        kind = i % 4
        if kind == 1 and p:                     # cut short anywhere
            del p[rng.randrange(len(p)):]
        elif kind == 2 and p:                   # a byte changed anywhere
            p[rng.randrange(len(p))] = rng.randrange(256)
        elif kind == 3:                         # noise, often behind a plausible type byte
            p = bytearray(rng.choice([b"", b"\x02", b"\x03"]) + rng.randbytes(rng.randrange(80)))
        for plaintext in (bytes(p), memoryview(bytes(p))):
            same(lambda pt=plaintext: _frames.decode_ack_stream(pt),
                 lambda pt=plaintext: wire.decode_ack_stream_ref(pt))


def test_decode_refuses_what_decode_frames_refuses_in_the_same_words():
    too_many = bytes([wire.FRAME_ACK]) + (100).to_bytes(8, "big") + bytes(4) + (64).to_bytes(2, "big") + bytes(8)
    below_zero = bytes([wire.FRAME_ACK]) + (3).to_bytes(8, "big") + bytes(4) + bytes(2) + (4).to_bytes(8, "big")
    for plaintext in (b"\x02", too_many, below_zero, wire.encode_ack([(10, 20), (0, 5)])[:-1]):
        with pytest.raises(ProtocolViolation) as want:
            wire.decode_frames(plaintext)
        with pytest.raises(ProtocolViolation) as got:
            _frames.decode_ack_stream(plaintext)
        assert str(got.value) == str(want.value)


U64 = (1 << 64) - 1


@pytest.mark.parametrize("ranges", [
    None, (), ((5, 9),), ((40, 50), (20, 30), (0, 3)), [(U64, U64)], ((0, U64),),
    tuple((1000 - 4 * i, 1001 - 4 * i) for i in range(80)),           # more than MAX_ACK_RANGES: the first 64
    ((5, 4),), ((10, 20), (9, 9)), ((10, 20), (8, 9)), ((10, 20), (0, 8)), ((-1, 3),), ((0, U64 + 1),),
    ((1, 2, 3),), ([1, 2],), ((1, 3), (0, 0)),
])
@pytest.mark.parametrize("delay", [0, 7, 0xFFFFFFFF, 1 << 70, -1])
@pytest.mark.parametrize("offset,data", [(0, None), (0, b""), (U64, b"abc"), (U64 + 1, b"a"), (-1, b"a"),
                                         (3, bytes(0xFFFF)), (3, bytes(0x10000)), (9, bytearray(b"xy"))])
def test_encode_agrees(ranges, delay, offset, data):
    out = same(lambda: _frames.encode_ack_stream(ranges, delay, offset, data),
               lambda: wire.encode_ack_stream_ref(ranges, delay, offset, data))
    if out is not None and out:
        decoded = wire.decode_frames(out)     # what it encodes is what the general decoder reads back
        if ranges:
            assert decoded[0] == wire.AckFrame(tuple(ranges)[:wire.MAX_ACK_RANGES], min(delay, 0xFFFFFFFF))
        if data is not None:
            assert decoded[-1] == wire.StreamFrame(offset, bytes(data))


def test_encode_takes_a_memoryview_of_the_send_buffer():
    buf = bytearray(b"0123456789")
    assert _frames.encode_ack_stream(((1, 4),), 0, 2, memoryview(buf)[2:6]) == \
        wire.encode_ack([(1, 4)]) + wire.encode_stream(2, b"2345")


def test_the_c_codec_is_the_default_unless_pure_python_is_asked():
    code = "from stcp import wire; print(wire.FRAMES_ACCELERATED, wire.decode_ack_stream.__module__)"
    env = dict(os.environ, STCP_PURE_PYTHON="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split() == ["False", "stcp.wire"], out.stderr
    env.pop("STCP_PURE_PYTHON")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.stdout.split()[0] == "True", out.stderr
