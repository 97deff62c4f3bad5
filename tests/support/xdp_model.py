"""The XDP program's rules as a pure-Python function: frame + config + map state -> verdict.

The rules are those of docs/OPERATIONS.md section 6 ("What it checks"), which
bpf/stcp_xdp.c implements. tests/test_xdp_fuzz.py runs random and mutated frames through
the loaded program (BPF_PROG_TEST_RUN) and through verdict() here, and fails on any frame
where the two disagree; tests/test_constants.py checks the parse limits below against the C.

Map state: the CID tables (sets of CIDs, as parsed from the wire), the cookie keys, and
the token buckets, which depend on time, so the model asks them: State.prefix_ok(key)
says whether the hello bucket of source prefix `key` (hello_key()) has a token,
State.reply_ok(key) the same of its COOKIE-reply bucket, State.global_ok() the global
hello budget's and State.unknown_ok() the unknown-CID budget's. Tests pick bucket
settings whose answer does not depend on time.

A frame the program answers itself (TX_COOKIE) leaves it rewritten into the COOKIE reply:
run() gives the verdict and the frame as the program leaves it, built here independently
of bpf/stcp_cookie.h (the cookie from stcp.siphash's reference, checksums from scratch).
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Optional, Set, Tuple

from stcp import wire
from stcp.datapath.verdicts import Verdict
from stcp.siphash import siphash128_ref

VLAN_MAX_DEPTH = 2          # VLAN_MAX_DEPTH in bpf/stcp_xdp.c
IPV6_EXT_MAX = 6            # IPV6_EXT_MAX in bpf/stcp_xdp.c
BATCH_MAX = 64              # STCP_BATCH_MAX in bpf/stcp_xdp.c

ETH_P_IP, ETH_P_IPV6 = 0x0800, 0x86DD
VLAN_TPIDS = (0x8100, 0x88A8)
UDP = 17
FRAGMENT = 44
WALKED = (0, 43, 44, 60)    # hop-by-hop, routing, fragment, destination options


@dataclass
class Config:
    """The verdict-relevant fields of struct stcp_config."""
    port: int = 4433
    max_record_len: int = 1428
    hs_prefix4: int = 32
    hs_prefix6: int = 64


@dataclass
class State:
    live_cids: Set[int] = field(default_factory=set)
    half_open: Set[int] = field(default_factory=set)
    # the cookie keys the server wrote and that have not expired: (current, previous or None)
    cookie_keys: Optional[Tuple[bytes, Optional[bytes]]] = None
    # whether a bucket has a token: hellos of a source prefix (key: hello_key()), the global
    # hello budget, COOKIE replies toward a source prefix, unknown-CID records
    prefix_ok: Callable[[bytes], bool] = lambda key: True
    global_ok: Callable[[], bool] = lambda: True
    reply_ok: Callable[[bytes], bool] = lambda key: True
    unknown_ok: Callable[[], bool] = lambda: False


def hello_key(src: bytes, v4: bool, cfg: Config) -> bytes:
    """The per-source bucket key: the 16-byte source (IPv4 as ::ffff:a.b.c.d) masked to
    /hs_prefix4 (counted within the IPv4 address) or /hs_prefix6."""
    bits = 96 + cfg.hs_prefix4 if v4 else cfg.hs_prefix6
    bits = max(0, min(128, bits))
    mask = ((1 << 128) - 1) ^ ((1 << (128 - bits)) - 1)
    return (int.from_bytes(src, "big") & mask).to_bytes(16, "big")


@dataclass
class _Udp:
    """An L3 walk that reached a UDP header (which may lie past the frame's end)."""
    offset: int
    first_fragment: bool
    src: bytes
    v4: bool
    l3: int                  # where the IP header starts
    simple: bool             # IPv4 without options, IPv6 without extension headers


_NOT_UDP, _LATER_FRAGMENT, _UNPARSED = "not_udp", "later_fragment", "unparsed"


def _be16(b: bytes, off: int) -> int:
    return struct.unpack_from("!H", b, off)[0]


def _ethertype(frame: bytes):
    """(EtherType, offset of L3) past at most VLAN_MAX_DEPTH tags; None if the frame is too
    short or has more tags."""
    if len(frame) < 14:
        return None
    proto, off = _be16(frame, 12), 14
    tags = 0
    while proto in VLAN_TPIDS:
        if tags == VLAN_MAX_DEPTH or len(frame) < off + 4:
            return None
        proto, off, tags = _be16(frame, off + 2), off + 4, tags + 1
    return proto, off


def _ipv4(frame: bytes, off: int):
    if len(frame) < off + 20:
        return _UNPARSED
    version, hlen = frame[off] >> 4, (frame[off] & 0xF) * 4
    if version != 4 or hlen < 20 or len(frame) < off + hlen:
        return _UNPARSED
    if frame[off + 9] != UDP:
        return _NOT_UDP
    flags = _be16(frame, off + 6)
    if flags & 0x1FFF:                       # a later fragment: no UDP header in it
        return _LATER_FRAGMENT
    src = bytes(10) + b"\xff\xff" + frame[off + 12:off + 16]
    return _Udp(off + hlen, bool(flags & 0x2000), src, True, off, hlen == 20)


def _ipv6(frame: bytes, off: int):
    if len(frame) < off + 40 or frame[off] >> 4 != 6:
        return _UNPARSED
    nexthdr, src, pos = frame[off + 6], frame[off + 8:off + 24], off + 40
    first_fragment = False
    walked = 0
    while nexthdr in WALKED:
        if walked == IPV6_EXT_MAX:
            return _UNPARSED                 # the chain goes on past what the program walks
        walked += 1
        if nexthdr == FRAGMENT:
            if len(frame) < pos + 8:
                return _UNPARSED
            nexthdr, offset = frame[pos], _be16(frame, pos + 2) >> 3
            pos += 8
            if offset:
                # the upper layer is in the first fragment; UDP, or a header that may lead
                # to it, could be STCP
                return _LATER_FRAGMENT if nexthdr == UDP or nexthdr in WALKED else _NOT_UDP
            first_fragment = True
        else:
            if len(frame) < pos + 2:
                return _UNPARSED
            nexthdr, pos = frame[pos], pos + (frame[pos + 1] + 1) * 8
            if pos > len(frame):
                return _UNPARSED
    if nexthdr != UDP:
        return _NOT_UDP
    return _Udp(pos, first_fragment, src, False, off, walked == 0)


def _batch(payload: bytes, length: int, cid: int) -> bool:
    """A datagram longer than its first record (length) that is a GSO/GRO batch: at most
    BATCH_MAX back-to-back data records of the first one's size (the last may be shorter),
    each with a length field that fits its place, the first record's CID and a nonzero seq."""
    seg = length + wire.HEADER_LEN
    if seg >= len(payload):
        return False
    count = -(-len(payload) // seg)
    if count > BATCH_MAX:
        return False
    for off in range(seg, len(payload), seg):
        rest = min(seg, len(payload) - off)
        if rest < wire.HEADER_LEN + wire.AEAD_TAG_LEN:
            return False
        n, c, s = struct.unpack_from("!QQQ", payload, off)
        if n != rest - wire.HEADER_LEN or c != cid or s == 0:
            return False
    return True


def verdict(frame: bytes, cfg: Config, state: State) -> Verdict:
    """What bpf/stcp_xdp.c (the plain variant) decides for frame."""
    return run(frame, cfg, state)[0]


def run(frame: bytes, cfg: Config, state: State) -> Tuple[Verdict, bytes]:
    """The verdict for frame and the frame as the program leaves it (rewritten only when
    it answers with a COOKIE)."""
    v = _verdict(frame, cfg, state)
    if isinstance(v, tuple):
        return v
    return v, frame


def _verdict(frame: bytes, cfg: Config, state: State):
    if cfg.port == 0:
        return Verdict.PASS_NOT_STCP
    l2 = _ethertype(frame)
    if l2 is None:
        return Verdict.DROP_UNPARSED
    proto, off = l2
    if proto == ETH_P_IP:
        l3 = _ipv4(frame, off)
    elif proto == ETH_P_IPV6:
        l3 = _ipv6(frame, off)
    else:
        return Verdict.PASS_NOT_STCP
    if l3 == _NOT_UDP:
        return Verdict.PASS_NOT_STCP
    if l3 == _LATER_FRAGMENT:
        return Verdict.DROP_FRAGMENT
    if l3 == _UNPARSED:
        return Verdict.DROP_UNPARSED
    u = l3.offset
    if len(frame) < u + 8:
        return Verdict.DROP_UNPARSED
    if _be16(frame, u + 2) != cfg.port:
        return Verdict.PASS_NOT_STCP
    if l3.first_fragment:
        return Verdict.DROP_FRAGMENT
    ulen = _be16(frame, u + 4)
    if ulen < 8 or u + ulen > len(frame):
        return Verdict.DROP_BAD_UDP
    payload = frame[u + 8:u + ulen]
    if len(payload) < wire.HEADER_LEN:
        return Verdict.DROP_SHORT_HEADER
    length, cid, seq = struct.unpack_from("!QQQ", payload)
    if length != len(payload) - wire.HEADER_LEN and (seq == 0 or not _batch(payload, length, cid)):
        return Verdict.DROP_BAD_LENGTH
    if seq == 0:
        if length not in (wire.HANDSHAKE_PAYLOAD_LEN, wire.V1_HANDSHAKE_PAYLOAD_LEN) or cid != 0 \
                or payload[wire.HEADER_LEN] != wire.HS_CLIENT_HELLO:
            return Verdict.DROP_BAD_HANDSHAKE
        return _hello(frame, l3, u, payload, cfg, state)
    if length < wire.AEAD_TAG_LEN:
        return Verdict.DROP_TOO_SHORT
    if length > cfg.max_record_len:
        return Verdict.DROP_TOO_LONG
    if cid in state.live_cids:
        return Verdict.PASS_DATA
    if cid in state.half_open:
        return Verdict.PASS_HALF_OPEN
    # each record of a batch has the first one's size (the last may be shorter), and a
    # RESET must be shorter than the record it answers: the first record decides
    if length + wire.HEADER_LEN > wire.RESET_RECORD_LEN and state.unknown_ok():
        return Verdict.PASS_UNKNOWN_CID_SAMPLED
    return Verdict.DROP_UNKNOWN_CID


# ---------------------------------------------------------------------------------------
# hellos and cookies (docs/PROTOCOL.md section 4.5)
def _hello(frame: bytes, l3: _Udp, u: int, payload: bytes, cfg: Config, state: State):
    key = hello_key(l3.src, l3.v4, cfg)
    if not state.prefix_ok(key):
        return Verdict.DROP_HS_RATE
    p = payload[wire.HEADER_LEN:]
    if state.cookie_keys is None or len(p) != wire.HANDSHAKE_PAYLOAD_LEN or p[1] != wire.PROTOCOL_VERSION \
            or not any(p[8:16]) or any(p[64:]):
        return Verdict.PASS_HANDSHAKE if state.global_ok() else Verdict.DROP_HS_GLOBAL
    current, previous = state.cookie_keys
    data = l3.src + frame[u:u + 2] + p[8:48]             # address, port, client CID, E
    mac = siphash128_ref(current, data)
    cookie = p[48:64]
    if any(cookie):
        if cookie == mac or (previous is not None and cookie == siphash128_ref(previous, data)):
            return Verdict.PASS_COOKIE
    elif state.global_ok():
        return Verdict.PASS_HANDSHAKE
    if _answerable(frame, l3) and state.reply_ok(key):
        return Verdict.TX_COOKIE, _cookie_reply(frame, l3, u, p, mac)
    return Verdict.DROP_BAD_COOKIE if any(cookie) else Verdict.DROP_HS_GLOBAL


def _answerable(frame: bytes, l3: _Udp) -> bool:
    """The program answers only plain IPv4 / IPv6 headers, unicast to unicast."""
    if not l3.simple:
        return False
    o = l3.l3
    if l3.v4:
        s, d = frame[o + 12], frame[o + 16]
        return s not in (0, 127) and s < 224 and d < 224
    src, dst = frame[o + 8:o + 24], frame[o + 24:o + 40]
    return src[0] != 0xFF and dst[0] != 0xFF and src not in (bytes(16), bytes(15) + b"\x01")


def _ones(words: bytes) -> int:
    """One's complement sum of 16-bit big-endian words."""
    total = sum(struct.unpack(f"!{len(words) // 2}H", words))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _cookie_reply(frame: bytes, l3: _Udp, u: int, p: bytes, mac: bytes) -> bytes:
    """The COOKIE record (client CID in the header; type, version, suite echoed; the cookie
    at payload bytes 16..31) in place of the hello, with MACs, IP addresses and UDP ports
    swapped, TTL / hop limit 64, and the UDP checksum computed afresh."""
    out = bytearray(frame)
    o, rec = l3.l3, u + 8
    cookie = wire.HS_COOKIE.to_bytes(1, "big") + bytes([wire.PROTOCOL_VERSION, p[2]]) + bytes(13) + mac + bytes(32)
    out[rec + 8:rec + 88] = p[8:16] + bytes(8) + cookie
    out[u:u + 8] = frame[u + 2:u + 4] + frame[u:u + 2] + frame[u + 4:u + 6] + b"\0\0"
    out[0:12] = frame[6:12] + frame[0:6]
    if l3.v4:
        out[o + 12:o + 20] = frame[o + 16:o + 20] + frame[o + 12:o + 16]
        out[o + 8] = 64
        out[o + 10:o + 12] = b"\0\0"
        out[o + 10:o + 12] = struct.pack("!H", ~_ones(bytes(out[o:o + 20])) & 0xFFFF)
        pseudo = bytes(out[o + 12:o + 20]) + struct.pack("!BBH", 0, UDP, wire.HANDSHAKE_RECORD_LEN + 8)
    else:
        out[o + 8:o + 40] = frame[o + 24:o + 40] + frame[o + 8:o + 24]
        out[o + 7] = 64
        pseudo = bytes(out[o + 8:o + 40]) + struct.pack("!IxxxB", wire.HANDSHAKE_RECORD_LEN + 8, UDP)
    check = ~_ones(pseudo + bytes(out[u:u + 8 + wire.HANDSHAKE_RECORD_LEN])) & 0xFFFF
    out[u + 6:u + 8] = struct.pack("!H", check or 0xFFFF)
    return bytes(out)
