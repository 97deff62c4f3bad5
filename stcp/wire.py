"""STCP wire format: record header, handshake payloads and frames.

docs/PROTOCOL.md is the normative description; bpf/stcp_wire.h mirrors the
constants the kernel datapath needs (tests/test_constants.py keeps them equal).
Everything here is pure encoding: no keys, no state.
"""
from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import List, Tuple, Union

from .errors import MalformedRecord, ProtocolViolation

DEFAULT_PORT = 7443               # UDP port of `stcp serve` and `stcp-loader attach` unless told otherwise

# --- record layer ----------------------------------------------------------
HEADER_LEN = 24                   # length:u64 | cid:u64 | seq:u64
AEAD_TAG_LEN = 16
MAX_UDP_PAYLOAD = 65507           # largest IPv4 UDP payload
MAX_RECORD_PAYLOAD = MAX_UDP_PAYLOAD - HEADER_LEN
DEFAULT_MAX_DATAGRAM = 1452       # fits a 1500-byte MTU over IPv6 (1500-40-8)

# seq = key_epoch (top 16 bits) | packet number (low 48 bits)
EPOCH_SHIFT = 48
PN_MASK = (1 << EPOCH_SHIFT) - 1
MAX_EPOCH = 0xFFFF
HANDSHAKE_SEQ = 0                 # seq 0 is reserved for handshake records

# cid = worker (top CID_WORKER_BITS bits) | random (the rest), for servers that steer by
# CID (the afxdp datapath, PROTOCOL.md section 3.1); a plain endpoint's CIDs are all random
CID_WORKER_BITS = 8
CID_WORKER_SHIFT = 64 - CID_WORKER_BITS
MAX_CID_WORKERS = 1 << CID_WORKER_BITS

# --- handshake records (plaintext, fixed size, seq 0) ----------------------
HANDSHAKE_PAYLOAD_LEN = 80
HANDSHAKE_RECORD_LEN = HEADER_LEN + HANDSHAKE_PAYLOAD_LEN
PROTOCOL_VERSION = 1

HS_CLIENT_HELLO = 0x01
HS_SERVER_HELLO = 0x02
HS_REJECT = 0x03

SUITE_AES_256_GCM = 0x01
SUITE_CHACHA20_POLY1305 = 0x02
SUITES = {"aes-256-gcm": SUITE_AES_256_GCM, "chacha20-poly1305": SUITE_CHACHA20_POLY1305}

# reject codes, carried in the flags byte of a REJECT
REJECT_VERSION = 0x01
REJECT_SUITE = 0x02
REJECT_KEY = 0x03

PUBLIC_KEY_LEN = 32
CONFIRM_TAG_LEN = 32

# --- frames (inside the encrypted payload) ---------------------------------
FRAME_PADDING = 0x00
FRAME_PING = 0x01
FRAME_ACK = 0x02
FRAME_STREAM = 0x03
FRAME_MAX_DATA = 0x04
FRAME_CLOSE = 0x05
FRAME_KEY_UPDATE = 0x06

STREAM_FLAG_FIN = 0x01
INITIAL_MAX_DATA = 1 << 20        # flow-control credit each side has before any MAX_DATA
MAX_ACK_RANGES = 64
MAX_REASON_LEN = 512
MAX_FRAMES_PER_RECORD = 64        # more in one record is a PROTOCOL_VIOLATION

HEADER_STRUCT = struct.Struct("!QQQ")           # length, cid, seq
_HEADER = HEADER_STRUCT
_HELLO = struct.Struct("!BBBB4xQ32s")          # type, version, suite, flags, pad, cid, pubkey
STREAM_HEADER_STRUCT = struct.Struct("!BBQH")  # type, flags, offset, length
_STREAM_HDR = STREAM_HEADER_STRUCT
_ACK_HDR = struct.Struct("!BQIHQ")             # type, largest, delay_us, range_count, first_range
_ACK_RANGE = struct.Struct("!QQ")              # gap, length
_MAX_DATA = struct.Struct("!BQ")
_CLOSE_HDR = struct.Struct("!BHH")             # type, code, reason_len
_KEY_UPDATE = struct.Struct("!BH")

STREAM_FRAME_OVERHEAD = _STREAM_HDR.size


def expand_datagrams(entries) -> List[bytes]:
    """A batch's entries as datagrams: an entry is a datagram, or a (buffer, segment_size)
    pair standing for datagrams of that size back to back (UDP GRO on receive, a GSO run on
    send; the last may be shorter)."""
    out: List[bytes] = []
    for e in entries:
        if type(e) is tuple:
            buf, size = e
            out.extend(buf[i:i + size] for i in range(0, len(buf), size))
        else:
            out.append(e)
    return out


def count_datagrams(entries) -> int:
    return sum(-(-len(e[0]) // e[1]) if type(e) is tuple else 1 for e in entries)


def make_seq(epoch: int, pn: int) -> int:
    return (epoch << EPOCH_SHIFT) | pn


def split_seq(seq: int) -> Tuple[int, int]:
    return seq >> EPOCH_SHIFT, seq & PN_MASK


# --- record header ---------------------------------------------------------
def pack_header(length: int, cid: int, seq: int) -> bytes:
    return _HEADER.pack(length, cid, seq)


def parse_header(datagram: bytes) -> Tuple[int, int, int]:
    """Return (length, cid, seq); raise MalformedRecord unless the datagram is one whole record."""
    if len(datagram) < HEADER_LEN:
        raise MalformedRecord(f"datagram of {len(datagram)} bytes is shorter than the {HEADER_LEN}-byte header")
    length, cid, seq = _HEADER.unpack_from(datagram)
    if length != len(datagram) - HEADER_LEN:
        raise MalformedRecord(f"length field {length} != datagram payload {len(datagram) - HEADER_LEN}")
    return length, cid, seq


# --- handshake payloads ----------------------------------------------------
@dataclass(slots=True)
class Hello:
    kind: int          # HS_CLIENT_HELLO, HS_SERVER_HELLO or HS_REJECT
    version: int
    suite: int
    sender_cid: int    # the CID the sender wants to be addressed by
    public_key: bytes
    confirm_tag: bytes = b""   # server hello only
    reject_code: int = 0       # reject only (carried in the flags byte)


def encode_hello(h: Hello) -> bytes:
    body = _HELLO.pack(h.kind, h.version, h.suite, h.reject_code, h.sender_cid, h.public_key) + h.confirm_tag
    return body + bytes(HANDSHAKE_PAYLOAD_LEN - len(body))


def decode_hello(payload: bytes) -> Hello:
    if len(payload) != HANDSHAKE_PAYLOAD_LEN:
        raise MalformedRecord(f"handshake payload is {len(payload)} bytes, expected {HANDSHAKE_PAYLOAD_LEN}")
    kind, version, suite, flags, cid, pub = _HELLO.unpack_from(payload)
    rest = payload[_HELLO.size:]
    if kind == HS_CLIENT_HELLO:
        if any(rest):
            raise MalformedRecord("client hello padding is not zero")
        return Hello(kind, version, suite, cid, pub)
    if kind == HS_SERVER_HELLO:
        tag, pad = rest[:CONFIRM_TAG_LEN], rest[CONFIRM_TAG_LEN:]
        if any(pad):
            raise MalformedRecord("server hello padding is not zero")
        return Hello(kind, version, suite, cid, pub, confirm_tag=tag)
    if kind == HS_REJECT:
        return Hello(kind, version, suite, cid, pub, reject_code=flags)
    raise MalformedRecord(f"unknown handshake type 0x{kind:02x}")


def server_hello_transcript_part(payload: bytes) -> bytes:
    """The part of a server hello covered by the transcript hash: all but the tag and padding."""
    return payload[:_HELLO.size]


# --- frames ----------------------------------------------------------------
@dataclass(slots=True)
class StreamFrame:
    offset: int
    data: bytes
    fin: bool = False


@dataclass(slots=True)
class AckFrame:
    # ranges of packet numbers, highest first, each (low, high) inclusive
    ranges: Tuple[Tuple[int, int], ...]
    delay_us: int = 0


@dataclass(slots=True)
class MaxDataFrame:
    limit: int


@dataclass(slots=True)
class PingFrame:
    pass


@dataclass(slots=True)
class CloseFrame:
    code: int
    reason: str = ""


@dataclass(slots=True)
class KeyUpdateFrame:
    epoch: int


@dataclass(slots=True)
class PaddingFrame:
    length: int


Frame = Union[StreamFrame, AckFrame, MaxDataFrame, PingFrame, CloseFrame, KeyUpdateFrame, PaddingFrame]


def encode_stream(offset: int, data: bytes, fin: bool = False) -> bytes:
    return _STREAM_HDR.pack(FRAME_STREAM, STREAM_FLAG_FIN if fin else 0, offset, len(data)) + data


def encode_ack(ranges, delay_us: int = 0) -> bytes:
    """ranges: (low, high) inclusive, highest first, non-overlapping, not adjacent."""
    ranges = list(ranges)[:MAX_ACK_RANGES]
    low0, high0 = ranges[0]
    out = [_ACK_HDR.pack(FRAME_ACK, high0, min(delay_us, 0xFFFFFFFF), len(ranges) - 1, high0 - low0)]
    prev_low = low0
    for low, high in ranges[1:]:
        out.append(_ACK_RANGE.pack(prev_low - high - 2, high - low))
        prev_low = low
    return b"".join(out)


def encode_frame(f: Frame) -> bytes:
    if isinstance(f, StreamFrame):
        return encode_stream(f.offset, f.data, f.fin)
    if isinstance(f, AckFrame):
        return encode_ack(f.ranges, f.delay_us)
    if isinstance(f, MaxDataFrame):
        return _MAX_DATA.pack(FRAME_MAX_DATA, f.limit)
    if isinstance(f, PingFrame):
        return bytes([FRAME_PING])
    if isinstance(f, CloseFrame):
        reason = f.reason.encode("utf-8", "replace")[:MAX_REASON_LEN]
        return _CLOSE_HDR.pack(FRAME_CLOSE, f.code, len(reason)) + reason
    if isinstance(f, KeyUpdateFrame):
        return _KEY_UPDATE.pack(FRAME_KEY_UPDATE, f.epoch)
    if isinstance(f, PaddingFrame):
        return bytes(f.length)
    raise TypeError(f"not a frame: {f!r}")


def _decode_stream(p, pos: int, end: int):
    _, flags, offset, length = _STREAM_HDR.unpack_from(p, pos)
    pos += _STREAM_HDR.size
    if flags & ~STREAM_FLAG_FIN:
        raise ProtocolViolation(f"unknown stream flags 0x{flags:02x}")
    if pos + length > end:
        raise ProtocolViolation("stream frame runs past the end of the record")
    return StreamFrame(offset, bytes(p[pos:pos + length]), bool(flags & STREAM_FLAG_FIN)), pos + length


def _decode_ack(p, pos: int, end: int):
    _, largest, delay, count, first = _ACK_HDR.unpack_from(p, pos)
    pos += _ACK_HDR.size
    if count >= MAX_ACK_RANGES:
        raise ProtocolViolation(f"ack frame has {count + 1} ranges, at most {MAX_ACK_RANGES} allowed")
    low = largest - first
    if low < 0:
        raise ProtocolViolation("ack range below packet number 0")
    ranges = [(low, largest)]
    for _ in range(count):
        gap, length = _ACK_RANGE.unpack_from(p, pos)
        pos += _ACK_RANGE.size
        high = low - gap - 2
        low = high - length
        if low < 0:
            raise ProtocolViolation("ack range below packet number 0")
        ranges.append((low, high))
    return AckFrame(tuple(ranges), delay), pos


def _decode_max_data(p, pos: int, end: int):
    return MaxDataFrame(_MAX_DATA.unpack_from(p, pos)[1]), pos + _MAX_DATA.size


_PING = PingFrame()


def _decode_ping(p, pos: int, end: int):
    return _PING, pos + 1


def _decode_close(p, pos: int, end: int):
    _, code, rlen = _CLOSE_HDR.unpack_from(p, pos)
    pos += _CLOSE_HDR.size
    if rlen > MAX_REASON_LEN or pos + rlen > end:
        raise ProtocolViolation("close reason runs past the end of the record")
    return CloseFrame(code, bytes(p[pos:pos + rlen]).decode("utf-8", "replace")), pos + rlen


def _decode_key_update(p, pos: int, end: int):
    return KeyUpdateFrame(_KEY_UPDATE.unpack_from(p, pos)[1]), pos + _KEY_UPDATE.size


_NONZERO = re.compile(b"[^\x00]")


def _decode_padding(p, pos: int, end: int):
    """A run of zero bytes as one frame, found by the regex engine, not a byte loop in Python."""
    m = _NONZERO.search(p, pos)
    stop = m.start() if m is not None else end
    return PaddingFrame(stop - pos), stop


# frame type -> decoder(payload, position of the type byte, end) -> (frame, position after it)
FRAME_DECODERS = {
    FRAME_PADDING: _decode_padding,
    FRAME_PING: _decode_ping,
    FRAME_ACK: _decode_ack,
    FRAME_STREAM: _decode_stream,
    FRAME_MAX_DATA: _decode_max_data,
    FRAME_CLOSE: _decode_close,
    FRAME_KEY_UPDATE: _decode_key_update,
}


def decode_frames(plaintext: bytes) -> List[Frame]:
    """Parse every frame of a decrypted payload; raise ProtocolViolation on any malformed frame,
    or when the payload holds more than MAX_FRAMES_PER_RECORD frames (a run of PADDING is one):
    the cap bounds what one record can cost a receiver, whatever frames it packs."""
    frames: List[Frame] = []
    pos, end = 0, len(plaintext)
    decoders = FRAME_DECODERS
    try:
        while pos < end:
            if len(frames) == MAX_FRAMES_PER_RECORD:
                raise ProtocolViolation(f"record holds more than {MAX_FRAMES_PER_RECORD} frames")
            decoder = decoders.get(plaintext[pos])
            if decoder is None:
                raise ProtocolViolation(f"unknown frame type 0x{plaintext[pos]:02x}")
            frame, pos = decoder(plaintext, pos, end)
            frames.append(frame)
    except struct.error:
        raise ProtocolViolation("frame truncated") from None
    return frames
