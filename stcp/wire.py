"""STCP wire format: record header, handshake payloads and frames.

docs/PROTOCOL.md is the normative description; bpf/stcp_wire.h mirrors the
constants the kernel datapath needs (tests/test_constants.py keeps them equal).
Everything here is pure encoding: no keys, no state.
"""
from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from types import ModuleType
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

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

# --- handshake-class records (plaintext, fixed size, seq 0) ---------------
HANDSHAKE_PAYLOAD_LEN = 112
HANDSHAKE_RECORD_LEN = HEADER_LEN + HANDSHAKE_PAYLOAD_LEN
PROTOCOL_VERSION = 2
# A version 1 client hello (80-byte payload) is recognised only to answer it with a REJECT
# in the layout a v1 client reads (PROTOCOL.md section 4.6).
V1_PROTOCOL_VERSION = 1
V1_HANDSHAKE_PAYLOAD_LEN = 80
V1_HANDSHAKE_RECORD_LEN = HEADER_LEN + V1_HANDSHAKE_PAYLOAD_LEN

HS_CLIENT_HELLO = 0x01
HS_SERVER_HELLO = 0x02
HS_REJECT = 0x03
HS_COOKIE = 0x04
HS_RESET = 0x05

SUITE_AES_256_GCM = 0x01
SUITE_CHACHA20_POLY1305 = 0x02
SUITES = {"aes-256-gcm": SUITE_AES_256_GCM, "chacha20-poly1305": SUITE_CHACHA20_POLY1305}


def suite_number(suite: Union[int, str]) -> int:
    """A cipher suite by its name in SUITES or by its number, as its number; ValueError naming
    the choices for anything else."""
    number = SUITES.get(suite) if isinstance(suite, str) else suite
    if number is None or number not in SUITES.values() or isinstance(number, bool):
        raise ValueError(f"unknown cipher suite {suite!r}; choose one of {', '.join(SUITES)}")
    return number

# reject codes, carried in the flags byte of a REJECT
REJECT_VERSION = 0x01
REJECT_SUITE = 0x02
REJECT_KEY = 0x03
REJECT_BUSY = 0x04

PUBLIC_KEY_LEN = 32
CONFIRM_TAG_LEN = 32
COOKIE_LEN = 16
RESET_TOKEN_LEN = 16
PROOF_LEN = 32
# CLIENT_HELLO payload: the cookie field, zeroed in the transcript (CH')
CLIENT_HELLO_COOKIE_OFFSET = 48
# SERVER_HELLO payload: everything before the confirmation tag enters the transcript
SERVER_HELLO_TAG_OFFSET = 80
# RESET (stateless reset): a shorter layout, header(length 32, cid 0, seq 0) || payload
RESET_PAYLOAD_LEN = 32
RESET_RECORD_LEN = HEADER_LEN + RESET_PAYLOAD_LEN

# --- frames (inside the encrypted payload) ---------------------------------
FRAME_PADDING = 0x00
FRAME_PING = 0x01
FRAME_ACK = 0x02
FRAME_STREAM = 0x03
FRAME_MAX_DATA = 0x04
FRAME_CLOSE = 0x05
FRAME_KEY_UPDATE = 0x06
FRAME_CLIENT_AUTH = 0x07
FRAME_RESET_TOKEN = 0x08

STREAM_FLAG_FIN = 0x01
INITIAL_MAX_DATA = 1 << 20        # flow-control credit each side has before any MAX_DATA
MAX_ACK_RANGES = 64
MAX_REASON_LEN = 512
MAX_FRAMES_PER_RECORD = 64        # more in one record is a PROTOCOL_VIOLATION

HEADER_STRUCT = struct.Struct("!QQQ")           # length, cid, seq
_HEADER = HEADER_STRUCT
_HELLO_HEAD = struct.Struct("!BBBB4xQ")        # type, version, suite, flags, pad, cid
STREAM_HEADER_STRUCT = struct.Struct("!BBQH")  # type, flags, offset, length
_STREAM_HDR = STREAM_HEADER_STRUCT
_ACK_HDR = struct.Struct("!BQIHQ")             # type, largest, delay_us, range_count, first_range
_ACK_RANGE = struct.Struct("!QQ")              # gap, length
_MAX_DATA = struct.Struct("!BQ")
_CLOSE_HDR = struct.Struct("!BHH")             # type, code, reason_len
_KEY_UPDATE = struct.Struct("!BH")
CLIENT_AUTH_FRAME_LEN = 1 + PUBLIC_KEY_LEN + PROOF_LEN
RESET_TOKEN_FRAME_LEN = 1 + RESET_TOKEN_LEN

STREAM_FRAME_OVERHEAD = _STREAM_HDR.size
ACK_HEADER_LEN = _ACK_HDR.size                 # an ACK frame is this plus ACK_RANGE_LEN per range after the first
ACK_RANGE_LEN = _ACK_RANGE.size

# An entry of a datagram batch: one datagram, or (buffer, segment_size) for datagrams of that
# size back to back (UDP GRO on receive, a GSO run on send; the last may be shorter).
DatagramEntry = Union[bytes, Tuple[bytes, int]]


def expand_datagrams(entries: Iterable[DatagramEntry]) -> List[bytes]:
    """A batch's entries as datagrams: an entry is a datagram, or a (buffer, segment_size)
    pair standing for datagrams of that size back to back (UDP GRO on receive, a GSO run on
    send; the last may be shorter)."""
    out: List[bytes] = []
    for e in entries:
        if isinstance(e, tuple):
            buf, size = e
            out.extend(buf[i:i + size] for i in range(0, len(buf), size))
        else:
            out.append(e)
    return out


def count_datagrams(entries: Iterable[DatagramEntry]) -> int:
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


# --- handshake-class payloads ----------------------------------------------
@dataclass(slots=True)
class Hello:
    """A handshake-class payload (PROTOCOL.md section 4). The fields a kind carries:
    CLIENT_HELLO sender_cid (the client's CID), public_key (E), cookie;
    SERVER_HELLO sender_cid (the server's CID), public_key (F), static_key (S), confirm_tag;
    REJECT reject_code (sent in the flags byte); COOKIE cookie. The rest keep their defaults."""
    kind: int
    version: int
    suite: int
    sender_cid: int = 0
    public_key: bytes = bytes(PUBLIC_KEY_LEN)
    cookie: bytes = bytes(COOKIE_LEN)
    static_key: bytes = bytes(PUBLIC_KEY_LEN)
    confirm_tag: bytes = bytes(CONFIRM_TAG_LEN)
    reject_code: int = 0


def encode_hello(h: Hello) -> bytes:
    """The 112-byte payload. reject_code goes into the flags byte whatever the kind (0 but in
    a REJECT); the sender_cid only into the hellos."""
    kind = h.kind
    cid = h.sender_cid if kind in (HS_CLIENT_HELLO, HS_SERVER_HELLO) else 0
    body = _HELLO_HEAD.pack(kind, h.version, h.suite, h.reject_code, cid)
    if kind == HS_CLIENT_HELLO:
        body += h.public_key + h.cookie
    elif kind == HS_SERVER_HELLO:
        body += h.public_key + h.static_key + h.confirm_tag
    elif kind == HS_COOKIE:
        body += h.cookie
    elif kind != HS_REJECT:
        raise ValueError(f"not a handshake payload type: 0x{kind:02x}")
    return body + bytes(HANDSHAKE_PAYLOAD_LEN - len(body))


def decode_hello(payload: bytes) -> Hello:
    """Parse a handshake-class payload of any version-2 kind but RESET (a different length)."""
    if len(payload) != HANDSHAKE_PAYLOAD_LEN:
        raise MalformedRecord(f"handshake payload is {len(payload)} bytes, expected {HANDSHAKE_PAYLOAD_LEN}")
    payload = bytes(payload)
    kind, version, suite, flags, cid = _HELLO_HEAD.unpack_from(payload)
    if kind == HS_CLIENT_HELLO:
        if cid == 0:
            raise MalformedRecord("client hello with client CID 0")
        if any(payload[64:]):
            raise MalformedRecord("client hello padding is not zero")
        return Hello(kind, version, suite, cid, payload[16:48], cookie=payload[48:64])
    if kind == HS_SERVER_HELLO:
        return Hello(kind, version, suite, cid, payload[16:48], static_key=payload[48:80],
                     confirm_tag=payload[80:112])
    if kind == HS_REJECT:
        return Hello(kind, version, suite, reject_code=flags)
    if kind == HS_COOKIE:
        return Hello(kind, version, suite, cookie=payload[16:32])
    raise MalformedRecord(f"unknown handshake type 0x{kind:02x}")


def client_hello_transcript_form(record: bytes) -> bytes:
    """CH': a CLIENT_HELLO record with its cookie field zeroed, the form the transcript hashes
    and a server compares retransmissions by (a hello resent with a cookie is the same hello)."""
    start = HEADER_LEN + CLIENT_HELLO_COOKIE_OFFSET
    return bytes(record[:start]) + bytes(COOKIE_LEN) + bytes(record[start + COOKIE_LEN:])


def server_hello_transcript_part(record: bytes) -> bytes:
    """The part of a SERVER_HELLO record the transcript covers: header and payload up to the tag."""
    return bytes(record[:HEADER_LEN + SERVER_HELLO_TAG_OFFSET])


def encode_reset(token: bytes) -> bytes:
    """A whole RESET record: header(length 32, cid 0, seq 0) || type || version || 14 zero || token."""
    return _HEADER.pack(RESET_PAYLOAD_LEN, 0, HANDSHAKE_SEQ) + bytes([HS_RESET, PROTOCOL_VERSION]) \
        + bytes(RESET_PAYLOAD_LEN - 2 - RESET_TOKEN_LEN) + token


def reset_token_of(record: bytes) -> Optional[bytes]:
    """The token of a datagram laid out as a RESET record, else None."""
    if len(record) != RESET_RECORD_LEN or record[HEADER_LEN] != HS_RESET \
            or record[HEADER_LEN + 1] != PROTOCOL_VERSION:
        return None
    if _HEADER.unpack_from(record) != (RESET_PAYLOAD_LEN, 0, HANDSHAKE_SEQ):
        return None
    return bytes(record[RESET_RECORD_LEN - RESET_TOKEN_LEN:])


def v1_client_hello_cid(datagram: bytes) -> Optional[int]:
    """The client CID of a datagram that is a version-1 CLIENT_HELLO by its layout (104 bytes,
    cid 0, seq 0, type 1, version 1), else None."""
    if len(datagram) != V1_HANDSHAKE_RECORD_LEN or _HEADER.unpack_from(datagram) != (V1_HANDSHAKE_PAYLOAD_LEN, 0, 0):
        return None
    kind, version, _, _, cid = _HELLO_HEAD.unpack_from(datagram, HEADER_LEN)
    return cid if (kind, version) == (HS_CLIENT_HELLO, V1_PROTOCOL_VERSION) else None


def encode_v1_reject(client_cid: int, suite: int) -> bytes:
    """A whole REJECT(REJECT_VERSION) record in the version-1 layout (80-byte payload), which a
    version-1 client decodes and reports as an unsupported protocol version."""
    payload = _HELLO_HEAD.pack(HS_REJECT, PROTOCOL_VERSION, suite, REJECT_VERSION, 0)
    return _HEADER.pack(V1_HANDSHAKE_PAYLOAD_LEN, client_cid, HANDSHAKE_SEQ) + payload \
        + bytes(V1_HANDSHAKE_PAYLOAD_LEN - len(payload))


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


@dataclass(slots=True)
class ClientAuthFrame:
    """The client's static public key and its proof of possession (client to server only)."""
    static_key: bytes
    proof: bytes


@dataclass(slots=True)
class ResetTokenFrame:
    """The stateless-reset token of this connection (server to client only)."""
    token: bytes


Frame = Union[StreamFrame, AckFrame, MaxDataFrame, PingFrame, CloseFrame, KeyUpdateFrame, PaddingFrame,
              ClientAuthFrame, ResetTokenFrame]


def encode_stream(offset: int, data: bytes, fin: bool = False) -> bytes:
    return _STREAM_HDR.pack(FRAME_STREAM, STREAM_FLAG_FIN if fin else 0, offset, len(data)) + data


def encode_ack(ranges: Iterable[Tuple[int, int]], delay_us: int = 0) -> bytes:
    """ranges: (low, high) inclusive, highest first, non-overlapping, not adjacent."""
    if type(ranges) is tuple and len(ranges) == 1:     # in-order traffic: one range, no list
        low0, high0 = ranges[0]
        return _ACK_HDR.pack(FRAME_ACK, high0, min(delay_us, 0xFFFFFFFF), 0, high0 - low0)
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
    if isinstance(f, ClientAuthFrame):
        if len(f.static_key) != PUBLIC_KEY_LEN or len(f.proof) != PROOF_LEN:
            raise ValueError("CLIENT_AUTH carries a 32-byte key and a 32-byte proof")
        return bytes([FRAME_CLIENT_AUTH]) + f.static_key + f.proof
    if isinstance(f, ResetTokenFrame):
        if len(f.token) != RESET_TOKEN_LEN:
            raise ValueError("RESET_TOKEN carries a 16-byte token")
        return bytes([FRAME_RESET_TOKEN]) + f.token
    raise TypeError(f"not a frame: {f!r}")


def _decode_stream(p: bytes, pos: int, end: int) -> Tuple[StreamFrame, int]:
    _, flags, offset, length = _STREAM_HDR.unpack_from(p, pos)
    pos += _STREAM_HDR.size
    if flags & ~STREAM_FLAG_FIN:
        raise ProtocolViolation(f"unknown stream flags 0x{flags:02x}")
    if pos + length > end:
        raise ProtocolViolation("stream frame runs past the end of the record")
    return StreamFrame(offset, bytes(p[pos:pos + length]), bool(flags & STREAM_FLAG_FIN)), pos + length


def _decode_ack(p: _Buffer, pos: int, end: int) -> Tuple[AckFrame, int]:
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


def decode_ack(p: _Buffer, pos: int = 0) -> Tuple[AckFrame, int]:
    """The ACK frame at p[pos] and the position after it (the receive path's fast path for a
    record that starts with one); ProtocolViolation as decode_frames raises it."""
    try:
        return _decode_ack(p, pos, len(p))
    except struct.error:
        raise ProtocolViolation("frame truncated") from None


_BAD_RANGES = ("ack ranges must be (low, high) pairs in 0..2^64-1, highest first, "
               "neither overlapping nor adjacent")
_U64 = 1 << 64
AckStream = Tuple[Optional[Tuple[Tuple[int, int], ...]], int, int, Optional[bytes], bool]
_Buffer = Union[bytes, bytearray, memoryview]


def encode_ack_stream_ref(ranges: Optional[Sequence[Tuple[int, int]]], delay_us: int, offset: int,
                          data: Optional[_Buffer]) -> bytes:
    """The plaintext of a request/response record: an ACK of `ranges` (none when empty or
    None; the first MAX_ACK_RANGES, as encode_ack keeps them), then a STREAM frame of `data`
    at `offset` without FIN (none when data is None): encode_ack(ranges, delay_us) +
    encode_stream(offset, data). ValueError for values no frame can carry. The reference of
    stcp._frames.encode_ack_stream."""
    out = b""
    if ranges:
        ranges = list(ranges)[:MAX_ACK_RANGES]
        prev_low = None
        for pair in ranges:
            if type(pair) is not tuple or len(pair) != 2:
                raise ValueError(_BAD_RANGES)
            low, high = pair
            if not (0 <= low <= high < _U64) or (prev_low is not None and high > prev_low - 2):
                raise ValueError(_BAD_RANGES)
            prev_low = low
    if delay_us < 0:
        raise ValueError("ack delay must not be negative")
    if ranges:
        out = encode_ack(tuple(ranges), delay_us)
    if data is not None:
        if not 0 <= offset < _U64:
            raise ValueError("stream offset must be in 0..2^64-1")
        if len(data) > 0xFFFF:
            raise ValueError("stream frame data longer than 65535 bytes")
        out += _STREAM_HDR.pack(FRAME_STREAM, 0, offset, len(data)) + bytes(data)
    return out


def decode_ack_stream_ref(plaintext: _Buffer) -> Optional[AckStream]:
    """(ack ranges or None, delay_us, offset, data or None, fin) of a plaintext that is an ACK,
    a STREAM frame filling the rest, or an ACK then such a STREAM frame, the records a small
    message and its echo take; None for any other plaintext (decode_frames takes it).
    ProtocolViolation as decode_frames raises it for a malformed ACK. The reference of
    stcp._frames.decode_ack_stream."""
    pos, end = 0, len(plaintext)
    ranges: Optional[Tuple[Tuple[int, int], ...]] = None
    delay = 0
    if end and plaintext[0] == FRAME_ACK:
        ack, pos = decode_ack(plaintext)
        ranges, delay = ack.ranges, ack.delay_us
        if pos == end:
            return ranges, delay, 0, None, False
    if end - pos < STREAM_FRAME_OVERHEAD or plaintext[pos] != FRAME_STREAM:
        return None
    _, flags, offset, length = _STREAM_HDR.unpack_from(plaintext, pos)
    start = pos + STREAM_FRAME_OVERHEAD
    if flags > STREAM_FLAG_FIN or start + length != end:
        return None
    return ranges, delay, offset, bytes(plaintext[start:]), bool(flags)


def _decode_max_data(p: bytes, pos: int, end: int) -> Tuple[MaxDataFrame, int]:
    return MaxDataFrame(_MAX_DATA.unpack_from(p, pos)[1]), pos + _MAX_DATA.size


_PING = PingFrame()


def _decode_ping(p: bytes, pos: int, end: int) -> Tuple[PingFrame, int]:
    return _PING, pos + 1


def _decode_close(p: bytes, pos: int, end: int) -> Tuple[CloseFrame, int]:
    _, code, rlen = _CLOSE_HDR.unpack_from(p, pos)
    pos += _CLOSE_HDR.size
    if rlen > MAX_REASON_LEN or pos + rlen > end:
        raise ProtocolViolation("close reason runs past the end of the record")
    return CloseFrame(code, bytes(p[pos:pos + rlen]).decode("utf-8", "replace")), pos + rlen


def _decode_key_update(p: bytes, pos: int, end: int) -> Tuple[KeyUpdateFrame, int]:
    return KeyUpdateFrame(_KEY_UPDATE.unpack_from(p, pos)[1]), pos + _KEY_UPDATE.size


_NONZERO = re.compile(b"[^\x00]")


def _decode_padding(p: bytes, pos: int, end: int) -> Tuple[PaddingFrame, int]:
    """A run of zero bytes as one frame, found by the regex engine, not a byte loop in Python."""
    m = _NONZERO.search(p, pos)
    stop = m.start() if m is not None else end
    return PaddingFrame(stop - pos), stop


def _decode_client_auth(p: bytes, pos: int, end: int) -> Tuple[ClientAuthFrame, int]:
    if pos + CLIENT_AUTH_FRAME_LEN > end:
        raise ProtocolViolation("frame truncated")
    key_end = pos + 1 + PUBLIC_KEY_LEN
    return ClientAuthFrame(bytes(p[pos + 1:key_end]), bytes(p[key_end:pos + CLIENT_AUTH_FRAME_LEN])), \
        pos + CLIENT_AUTH_FRAME_LEN


def _decode_reset_token(p: bytes, pos: int, end: int) -> Tuple[ResetTokenFrame, int]:
    if pos + RESET_TOKEN_FRAME_LEN > end:
        raise ProtocolViolation("frame truncated")
    return ResetTokenFrame(bytes(p[pos + 1:pos + RESET_TOKEN_FRAME_LEN])), pos + RESET_TOKEN_FRAME_LEN


# frame type -> decoder(payload, position of the type byte, end) -> (frame, position after it)
FRAME_DECODERS: Dict[int, Callable[[bytes, int, int], Tuple[Frame, int]]] = {
    FRAME_PADDING: _decode_padding,
    FRAME_PING: _decode_ping,
    FRAME_ACK: _decode_ack,
    FRAME_STREAM: _decode_stream,
    FRAME_MAX_DATA: _decode_max_data,
    FRAME_CLOSE: _decode_close,
    FRAME_KEY_UPDATE: _decode_key_update,
    FRAME_CLIENT_AUTH: _decode_client_auth,
    FRAME_RESET_TOKEN: _decode_reset_token,
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


# stcp._frames (stcp/_ext/frames.c); STCP_PURE_PYTHON=1 keeps the references, as in stcp.crypto.
_c: Optional[ModuleType] = None
if os.environ.get("STCP_PURE_PYTHON", "") in ("", "0"):
    try:
        from . import _frames as _c
    except ImportError:
        _c = None
FRAMES_ACCELERATED = _c is not None
encode_ack_stream: Callable[[Optional[Sequence[Tuple[int, int]]], int, int, Optional[_Buffer]], bytes] = \
    _c.encode_ack_stream if _c is not None else encode_ack_stream_ref
decode_ack_stream: Callable[[_Buffer], Optional[AckStream]] = \
    _c.decode_ack_stream if _c is not None else decode_ack_stream_ref
