"""stcp.wire against docs/PROTOCOL.md §3, §4 and §7: exact bytes, both ways, and the
documented exception for every malformed input (MalformedRecord for records and handshake
payloads, ProtocolViolation for frames)."""
from __future__ import annotations

import struct

import pytest

from stcp import wire
from stcp.errors import CloseCode, MalformedRecord, ProtocolViolation
from stcp.handshake import cookie_record, reject_record

h = bytes.fromhex
PUB = bytes(range(0x20, 0x40))
STATIC = bytes(range(0x60, 0x80))
TAG = bytes(range(0xA0, 0xC0))
COOKIE = bytes(range(0xD0, 0xE0))


# --- constants the document names --------------------------------------------------------
def test_documented_constants():
    assert wire.HEADER_LEN == 24 and wire.AEAD_TAG_LEN == 16
    assert wire.HANDSHAKE_PAYLOAD_LEN == 112 and wire.HANDSHAKE_RECORD_LEN == 136
    assert wire.V1_HANDSHAKE_PAYLOAD_LEN == 80 and wire.V1_HANDSHAKE_RECORD_LEN == 104
    assert wire.RESET_PAYLOAD_LEN == 32 and wire.RESET_RECORD_LEN == 56
    assert wire.DEFAULT_MAX_DATAGRAM == 1452 == 1500 - 40 - 8
    assert wire.MAX_UDP_PAYLOAD == 65507 and wire.MAX_RECORD_PAYLOAD == 65483
    assert (wire.EPOCH_SHIFT, wire.PN_MASK, wire.MAX_EPOCH) == (48, (1 << 48) - 1, 0xFFFF)
    assert wire.PROTOCOL_VERSION == 2 and wire.V1_PROTOCOL_VERSION == 1 and wire.HANDSHAKE_SEQ == 0
    assert (wire.HS_CLIENT_HELLO, wire.HS_SERVER_HELLO, wire.HS_REJECT, wire.HS_COOKIE, wire.HS_RESET) == \
        (1, 2, 3, 4, 5)
    assert (wire.SUITE_AES_256_GCM, wire.SUITE_CHACHA20_POLY1305) == (1, 2)
    assert (wire.REJECT_VERSION, wire.REJECT_SUITE, wire.REJECT_KEY, wire.REJECT_BUSY) == (1, 2, 3, 4)
    assert (wire.COOKIE_LEN, wire.RESET_TOKEN_LEN, wire.PROOF_LEN) == (16, 16, 32)
    assert [wire.FRAME_PADDING, wire.FRAME_PING, wire.FRAME_ACK, wire.FRAME_STREAM, wire.FRAME_MAX_DATA,
            wire.FRAME_CLOSE, wire.FRAME_KEY_UPDATE, wire.FRAME_CLIENT_AUTH, wire.FRAME_RESET_TOKEN] == list(range(9))
    assert (wire.CLIENT_AUTH_FRAME_LEN, wire.RESET_TOKEN_FRAME_LEN) == (65, 17)
    assert wire.STREAM_FLAG_FIN == 1 and wire.STREAM_FRAME_OVERHEAD == 12
    assert wire.INITIAL_MAX_DATA == 1 << 20 and wire.MAX_ACK_RANGES == 64 and wire.MAX_REASON_LEN == 512


def test_close_codes_table():
    assert {c.name: int(c) for c in CloseCode} == {
        "NO_ERROR": 0, "PROTOCOL_VIOLATION": 1, "MALFORMED_RECORD": 2, "AUTH_FAILURE": 3,
        "FLOW_CONTROL_ERROR": 4, "HANDSHAKE_FAILED": 5, "STATE_ERROR": 6, "INTERNAL_ERROR": 7,
        "APPLICATION_ABORT": 8, "KEY_UPDATE_ERROR": 9, "ACCESS_DENIED": 0x0A, "IDLE_TIMEOUT": 0x100,
        "HANDSHAKE_TIMEOUT": 0x101, "STATELESS_RESET": 0x102, "PORT_UNREACHABLE": 0x103}
    assert MalformedRecord.code == CloseCode.MALFORMED_RECORD
    assert ProtocolViolation.code == CloseCode.PROTOCOL_VIOLATION


# --- sequence numbers ----------------------------------------------------------------------
@pytest.mark.parametrize("epoch,pn,seq", [
    (0, 0, 0), (0, 1, 1), (1, 0, 1 << 48), (1, 4, 0x0001000000000004),
    (0xFFFF, (1 << 48) - 1, (1 << 64) - 1), (0x1234, 0x56789ABCDEF0, 0x123456789ABCDEF0)])
def test_seq_layout(epoch, pn, seq):
    assert wire.make_seq(epoch, pn) == seq
    assert wire.split_seq(seq) == (epoch, pn)


# --- record header -------------------------------------------------------------------------
def test_header_exact_bytes():
    hdr = wire.pack_header(5, 0x0102030405060708, wire.make_seq(2, 3))
    assert hdr == h("0000000000000005" "0102030405060708" "0002000000000003")
    assert wire.parse_header(hdr + b"abcde") == (5, 0x0102030405060708, (2 << 48) | 3)
    assert wire.parse_header(wire.pack_header(0, 0, 0)) == (0, 0, 0)
    top = (1 << 64) - 1
    assert wire.parse_header(wire.pack_header(1, top, top) + b"x") == (1, top, top)


@pytest.mark.parametrize("n", range(0, wire.HEADER_LEN))
def test_header_shorter_than_24_bytes_is_malformed(n):
    with pytest.raises(MalformedRecord):
        wire.parse_header(bytes(n))


@pytest.mark.parametrize("length,payload", [
    (1, 0), (0, 1), (5, 4), (5, 6), (80, 79), (80, 81), ((1 << 64) - 1, 10), (1 << 63, 0)])
def test_header_length_must_equal_datagram_minus_24(length, payload):
    with pytest.raises(MalformedRecord):
        wire.parse_header(wire.pack_header(length, 1, 1) + bytes(payload))


# --- handshake payloads ---------------------------------------------------------------------
CLIENT_HELLO = h("01" "02" "02" "00" "00000000" "0123456789abcdef") + PUB + COOKIE + bytes(48)
SERVER_HELLO = h("02" "02" "01" "00" "00000000" "fedcba9876543210") + PUB + STATIC + TAG
REJECT = h("03" "02" "02" "03" "00000000") + bytes(104)
COOKIE_REPLY = h("04" "02" "01" "00" "00000000" "0000000000000000") + COOKIE + bytes(80)


def test_client_hello_exact_bytes():
    hello = wire.Hello(wire.HS_CLIENT_HELLO, 2, wire.SUITE_CHACHA20_POLY1305, 0x0123456789ABCDEF, PUB, cookie=COOKIE)
    assert wire.encode_hello(hello) == CLIENT_HELLO and len(CLIENT_HELLO) == 112
    assert wire.decode_hello(CLIENT_HELLO) == hello


def test_server_hello_exact_bytes():
    hello = wire.Hello(wire.HS_SERVER_HELLO, 2, wire.SUITE_AES_256_GCM, 0xFEDCBA9876543210, PUB,
                       static_key=STATIC, confirm_tag=TAG)
    assert wire.encode_hello(hello) == SERVER_HELLO and len(SERVER_HELLO) == 112
    assert wire.decode_hello(SERVER_HELLO) == hello
    # the transcript covers the record up to (not including) the tag
    record = wire.pack_header(112, 7, 0) + SERVER_HELLO
    assert wire.server_hello_transcript_part(record) == record[:24 + 80]


def test_client_hello_transcript_form_zeroes_only_the_cookie():
    record = wire.pack_header(112, 0, 0) + CLIENT_HELLO
    form = wire.client_hello_transcript_form(record)
    assert form == record[:24 + 48] + bytes(16) + record[24 + 64:]
    assert len(form) == 136 and wire.client_hello_transcript_form(form) == form


def test_reject_exact_bytes():
    hello = wire.Hello(wire.HS_REJECT, 2, wire.SUITE_CHACHA20_POLY1305, reject_code=wire.REJECT_KEY)
    assert wire.encode_hello(hello) == REJECT
    assert wire.decode_hello(REJECT) == hello
    rec = reject_record(0x0123456789ABCDEF, wire.SUITE_CHACHA20_POLY1305, wire.REJECT_KEY)
    assert rec == h("0000000000000070" "0123456789abcdef" "0000000000000000") + REJECT
    assert wire.parse_header(rec) == (112, 0x0123456789ABCDEF, 0)


def test_cookie_exact_bytes():
    hello = wire.Hello(wire.HS_COOKIE, 2, wire.SUITE_AES_256_GCM, cookie=COOKIE)
    assert wire.encode_hello(hello) == COOKIE_REPLY
    assert wire.decode_hello(COOKIE_REPLY) == hello
    rec = cookie_record(0x0123456789ABCDEF, wire.SUITE_AES_256_GCM, COOKIE)
    assert rec == h("0000000000000070" "0123456789abcdef" "0000000000000000") + COOKIE_REPLY


def test_reset_exact_bytes():
    token = bytes(range(0xF0, 0x100))
    rec = wire.encode_reset(token)
    assert rec == h("0000000000000020" "0000000000000000" "0000000000000000" "0502") + bytes(14) + token
    assert len(rec) == wire.RESET_RECORD_LEN == 56
    assert wire.reset_token_of(rec) == token
    for bad in (rec[:-1], rec + b"\0", rec[:24] + b"\x04" + rec[25:], rec[:25] + b"\x01" + rec[26:],
                wire.pack_header(32, 1, 0) + rec[24:], wire.pack_header(32, 0, 1) + rec[24:]):
        assert wire.reset_token_of(bad) is None


def test_v1_hello_is_recognised_and_answered_in_the_v1_layout():
    v1_hello = wire.pack_header(80, 0, 0) + h("01" "01" "01" "00" "00000000" "0123456789abcdef") + PUB + bytes(32)
    assert wire.v1_client_hello_cid(v1_hello) == 0x0123456789ABCDEF
    for other in (v1_hello[:24] + b"\x02" + v1_hello[25:], v1_hello[:25] + b"\x02" + v1_hello[26:],
                  wire.pack_header(80, 5, 0) + v1_hello[24:], v1_hello + b"\0", CLIENT_HELLO):
        assert wire.v1_client_hello_cid(other) is None
    rej = wire.encode_v1_reject(0x0123456789ABCDEF, 1)
    assert rej == h("0000000000000050" "0123456789abcdef" "0000000000000000" "03020101") + bytes(76)


@pytest.mark.parametrize("n", [0, 1, 79, 80, 111, 113, 136, 1400])
def test_handshake_payload_of_wrong_size_is_malformed(n):
    with pytest.raises(MalformedRecord):
        wire.decode_hello(bytes([1]) + bytes(n - 1) if n else b"")


@pytest.mark.parametrize("kind", [0x00, 0x05, 0x06, 0x7F, 0x80, 0xFF])
def test_unknown_handshake_type_is_malformed(kind):
    with pytest.raises(MalformedRecord):
        wire.decode_hello(bytes([kind]) + CLIENT_HELLO[1:])


@pytest.mark.parametrize("pos", range(64, 112))
def test_client_hello_padding_must_be_zero(pos):
    bad = bytearray(CLIENT_HELLO)
    bad[pos] = 0x01
    with pytest.raises(MalformedRecord):
        wire.decode_hello(bytes(bad))


def test_client_hello_with_client_cid_zero_is_malformed():
    with pytest.raises(MalformedRecord):
        wire.decode_hello(CLIENT_HELLO[:8] + bytes(8) + CLIENT_HELLO[16:])


def test_ignored_fields_are_documented_as_ignored():
    """§4.1: flags of hellos and the reserved bytes are not checked (the transcript hash covers
    the hellos' bytes instead); nor are the unused bytes of a REJECT or a COOKIE."""
    for payload in (CLIENT_HELLO, SERVER_HELLO):
        odd = bytearray(payload)
        odd[3] = 0x55
        odd[4:8] = b"\xff\xff\xff\xff"
        assert wire.decode_hello(bytes(odd)) == wire.decode_hello(payload)
    odd = bytearray(REJECT)
    odd[8:112] = bytes(range(104))
    assert wire.decode_hello(bytes(odd)).reject_code == wire.REJECT_KEY
    odd = bytearray(COOKIE_REPLY)
    odd[8:16] = b"\x01" * 8
    odd[32:112] = bytes(range(80))
    assert wire.decode_hello(bytes(odd)).cookie == COOKIE


def test_any_tag_bytes_decode_as_the_server_hello_tag():
    for tag in (bytes(32), b"\xff" * 32):
        assert wire.decode_hello(SERVER_HELLO[:80] + tag).confirm_tag == tag


# --- frames: exact bytes both ways -------------------------------------------------------------
FRAME_BYTES = [
    (wire.PaddingFrame(1), "00"),
    (wire.PaddingFrame(5), "0000000000"),
    (wire.PingFrame(), "01"),
    (wire.AckFrame(((7, 7),)), "02" "0000000000000007" "00000000" "0000" "0000000000000000"),
    (wire.AckFrame(((1, 2),), 250), "02" "0000000000000002" "000000fa" "0000" "0000000000000001"),
    (wire.AckFrame(((9, 12), (5, 6), (1, 2)), 0x01020304),
     "02" "000000000000000c" "01020304" "0002" "0000000000000003"
     "0000000000000001" "0000000000000001"
     "0000000000000001" "0000000000000001"),
    (wire.AckFrame(((100, 100), (0, 0))),
     "02" "0000000000000064" "00000000" "0001" "0000000000000000" "0000000000000062" "0000000000000000"),
    (wire.StreamFrame(0, b"abc"), "03" "00" "0000000000000000" "0003" "616263"),
    (wire.StreamFrame(0x0102030405, b"\x00\xff", fin=True), "03" "01" "0000000102030405" "0002" "00ff"),
    (wire.StreamFrame(17, b"", fin=True), "03" "01" "0000000000000011" "0000"),
    (wire.StreamFrame(0, b""), "03" "00" "0000000000000000" "0000"),
    (wire.MaxDataFrame(1 << 20), "04" "0000000000100000"),
    (wire.MaxDataFrame((1 << 64) - 1), "04" "ffffffffffffffff"),
    (wire.CloseFrame(CloseCode.NO_ERROR, ""), "05" "0000" "0000"),
    (wire.CloseFrame(CloseCode.AUTH_FAILURE, "bad tag"), "05" "0003" "0007" + b"bad tag".hex()),
    (wire.CloseFrame(0xFFFF, "é"), "05" "ffff" "0002" "c3a9"),
    (wire.KeyUpdateFrame(1), "06" "0001"),
    (wire.KeyUpdateFrame(0xFFFF), "06" "ffff"),
    (wire.ClientAuthFrame(STATIC, TAG), "07" + STATIC.hex() + TAG.hex()),
    (wire.ResetTokenFrame(COOKIE), "08" + COOKIE.hex()),
]


@pytest.mark.parametrize("frame,hexstr", FRAME_BYTES, ids=[f"{type(f).__name__}-{i}" for i, (f, _) in
                                                           enumerate(FRAME_BYTES)])
def test_frame_exact_bytes(frame, hexstr):
    assert wire.encode_frame(frame).hex() == hexstr
    assert wire.decode_frames(h(hexstr)) == [frame]


def test_frames_concatenate():
    frames = [f for f, _ in FRAME_BYTES if not isinstance(f, wire.PaddingFrame)]
    blob = b"".join(wire.encode_frame(f) for f in frames)
    assert wire.decode_frames(blob) == frames
    # padding between frames is one run per gap
    blob = wire.encode_frame(wire.PingFrame()) + bytes(3) + wire.encode_frame(wire.KeyUpdateFrame(2)) + bytes(2)
    assert wire.decode_frames(blob) == [wire.PingFrame(), wire.PaddingFrame(3), wire.KeyUpdateFrame(2),
                                        wire.PaddingFrame(2)]
    assert wire.decode_frames(b"") == []


def test_encode_stream_matches_encode_frame():
    assert wire.encode_stream(9, b"xy", True) == wire.encode_frame(wire.StreamFrame(9, b"xy", True))


def test_ack_encoder_limits():
    many = tuple((3 * i, 3 * i) for i in range(100, 0, -1))     # 100 ranges, gap 1 each
    blob = wire.encode_ack(many)
    assert len(blob) == 23 + 16 * 63
    assert wire.decode_frames(blob) == [wire.AckFrame(many[:64])]
    # delay saturates at u32
    assert wire.encode_ack(((1, 1),), delay_us=1 << 40)[9:13] == b"\xff\xff\xff\xff"


@pytest.mark.parametrize("low,high,delay", [(1, 1, 0), (1, 9, 250), (7, (1 << 48) - 2, 1 << 40)])
def test_one_range_ack_encodes_as_the_general_encoder_does(low, high, delay):
    """encode_ack's one-range shortcut (a tuple of one range) against the general loop (a list)."""
    fast = wire.encode_ack(((low, high),), delay)
    assert fast == wire.encode_ack([(low, high)], delay)
    assert wire.decode_frames(fast) == [wire.AckFrame(((low, high),), min(delay, 0xFFFFFFFF))]


def test_close_reason_is_cut_at_512_bytes():
    blob = wire.encode_frame(wire.CloseFrame(1, "x" * 600))
    assert struct.unpack_from("!BHH", blob) == (5, 1, 512) and len(blob) == 5 + 512
    assert wire.decode_frames(blob) == [wire.CloseFrame(1, "x" * 512)]


def test_invalid_utf8_reason_is_replaced_not_an_error():
    blob = h("05" "0001" "0002" "ff41")
    assert wire.decode_frames(blob) == [wire.CloseFrame(1, "\ufffdA")]


def test_encode_frame_rejects_non_frames():
    with pytest.raises(TypeError):
        wire.encode_frame(object())
    with pytest.raises(ValueError):
        wire.encode_frame(wire.ClientAuthFrame(STATIC, TAG[:31]))
    with pytest.raises(ValueError):
        wire.encode_frame(wire.ResetTokenFrame(COOKIE + b"x"))


# --- malformed frames raise ProtocolViolation ------------------------------------------------
@pytest.mark.parametrize("ftype", range(9, 256))
def test_unknown_frame_type(ftype):
    with pytest.raises(ProtocolViolation):
        wire.decode_frames(bytes([ftype]) + bytes(30))


@pytest.mark.parametrize("frame,hexstr", [fh for fh in FRAME_BYTES if not isinstance(fh[0], (wire.PaddingFrame,
                                                                                              wire.PingFrame))])
def test_every_truncation_is_a_violation(frame, hexstr):
    blob = h(hexstr)
    for cut in range(1, len(blob)):
        with pytest.raises(ProtocolViolation):
            wire.decode_frames(blob[:cut])


def test_truncated_frame_after_a_good_one():
    with pytest.raises(ProtocolViolation):
        wire.decode_frames(b"\x01" + h("0600"))


@pytest.mark.parametrize("flags", [0x02, 0x03, 0x80, 0xFF])
def test_stream_unknown_flags(flags):
    with pytest.raises(ProtocolViolation):
        wire.decode_frames(bytes([3, flags]) + bytes(8) + h("0000"))


def test_stream_length_past_the_end():
    with pytest.raises(ProtocolViolation):
        wire.decode_frames(h("03" "00" "0000000000000000" "0004") + b"abc")


def test_ack_with_too_many_ranges():
    ranges = b"".join(struct.pack("!QQ", 0, 0) for _ in range(64))
    blob = struct.pack("!BQIHQ", 2, 1000, 0, 64, 0) + ranges
    with pytest.raises(ProtocolViolation):
        wire.decode_frames(blob)
    ok = struct.pack("!BQIHQ", 2, 1000, 0, 63, 0) + ranges[:63 * 16]
    assert len(wire.decode_frames(ok)[0].ranges) == 64


@pytest.mark.parametrize("blob", [
    struct.pack("!BQIHQ", 2, 5, 0, 0, 6),                                   # first range below 0
    struct.pack("!BQIHQ", 2, 5, 0, 1, 2) + struct.pack("!QQ", 2, 0),       # gap leads to -1
    struct.pack("!BQIHQ", 2, 5, 0, 1, 2) + struct.pack("!QQ", 0, 2),       # length leads to -1
    struct.pack("!BQIHQ", 2, 5, 0, 1, 0) + struct.pack("!QQ", (1 << 64) - 1, 0),
])
def test_ack_ranges_below_zero(blob):
    with pytest.raises(ProtocolViolation):
        wire.decode_frames(blob)


def test_ack_range_reaching_exactly_zero_is_fine():
    blob = struct.pack("!BQIHQ", 2, 5, 0, 1, 2) + struct.pack("!QQ", 0, 1)
    assert wire.decode_frames(blob) == [wire.AckFrame(((3, 5), (0, 1)))]


def test_close_reason_too_long_or_past_the_end():
    with pytest.raises(ProtocolViolation):
        wire.decode_frames(struct.pack("!BHH", 5, 0, 513) + bytes(513))
    with pytest.raises(ProtocolViolation):
        wire.decode_frames(struct.pack("!BHH", 5, 0, 10) + b"short")
    assert wire.decode_frames(struct.pack("!BHH", 5, 0, 512) + b"r" * 512) == [wire.CloseFrame(0, "r" * 512)]
