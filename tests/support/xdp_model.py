"""The XDP program's rules as a pure-Python function: frame + config + map state -> verdict.

The rules are those of docs/OPERATIONS.md section 6 ("What it checks"), which
bpf/stcp_xdp.c implements. tests/test_xdp_fuzz.py runs random and mutated frames through
the loaded program (BPF_PROG_TEST_RUN) and through verdict() here, and fails on any frame
where the two disagree; tests/test_constants.py checks the parse limits below against the C.

Map state: the live-connection table (a set of CIDs, as parsed from the wire) and the
hello buckets, which depend on time, so the model asks them: State.hello(key) says what
the buckets answer for a well-formed client hello whose source prefix is `key`
(hello_key()). Tests pick bucket settings whose answer does not depend on time.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Callable, Optional, Set

from stcp import wire
from stcp.datapath.verdicts import Verdict

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
    # the buckets' answer for a well-formed hello from source prefix key: None (it passes),
    # Verdict.DROP_HS_RATE or Verdict.DROP_HS_GLOBAL
    hello: Callable[[bytes], Optional[Verdict]] = lambda key: None


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
    return _Udp(off + hlen, bool(flags & 0x2000), src, True)


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
    return _Udp(pos, first_fragment, src, False)


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
        return state.hello(hello_key(l3.src, l3.v4, cfg)) or Verdict.PASS_HANDSHAKE
    if length < wire.AEAD_TAG_LEN:
        return Verdict.DROP_TOO_SHORT
    if length > cfg.max_record_len:
        return Verdict.DROP_TOO_LONG
    if cid not in state.live_cids:
        return Verdict.DROP_UNKNOWN_CID
    return Verdict.PASS_DATA
