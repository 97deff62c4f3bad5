"""Ethernet frames for the XDP program's tests, built layer by layer.

Stacked VLAN tags, IPv4 with options and fragment fields, IPv6 with extension-header chains
and fragment headers, UDP with a correct checksum (the kernel checks it when a frame goes
all the way to a socket) or any length field. Nothing here decides a verdict: that is
tests/support/xdp_model.py's job, written separately so the two can disagree.
"""
from __future__ import annotations

import ipaddress
import struct
from typing import Iterable, Optional, Sequence, Tuple

from tests.support.packets import csum

ETH_P_IP, ETH_P_IPV6, ETH_P_ARP = 0x0800, 0x86DD, 0x0806
ETH_P_8021Q, ETH_P_8021AD = 0x8100, 0x88A8
HOPOPTS, TCP, UDP, ROUTING, FRAGMENT, ESP, AH, ICMPV6, NONE, DSTOPTS = 0, 6, 17, 43, 44, 50, 51, 58, 59, 60

MAC_A = "02:00:00:00:00:0a"
MAC_B = "02:00:00:00:00:0b"


def _mac(m: str) -> bytes:
    return bytes.fromhex(m.replace(":", ""))


def eth(payload: bytes, ethertype: int, vlans: Sequence[Tuple[int, int]] = (), src: str = MAC_B,
        dst: str = MAC_A) -> bytes:
    """vlans: (TPID, TCI) outermost first, e.g. [(0x88A8, 100), (0x8100, 200)] for QinQ."""
    tags = b"".join(struct.pack("!HH", tpid, tci) for tpid, tci in vlans)
    return _mac(dst) + _mac(src) + tags + struct.pack("!H", ethertype) + payload


def udp(payload: bytes, sport: int, dport: int, src: str, dst: str, ulen: Optional[int] = None) -> bytes:
    """A UDP header and payload with the checksum over the pseudo-header of src -> dst
    (computed over the real length even when ulen overrides the length field)."""
    length = 8 + len(payload)
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        pseudo = s.packed + d.packed + struct.pack("!BBH", 0, UDP, length)
    else:
        pseudo = s.packed + d.packed + struct.pack("!IxxxB", length, UDP)
    hdr = struct.pack("!HHHH", sport, dport, length, 0)
    ck = csum(pseudo + hdr + payload) or 0xFFFF
    return struct.pack("!HHHH", sport, dport, length if ulen is None else ulen, ck) + payload


def ipv4(payload: bytes, src: str, dst: str, proto: int = UDP, frag_off: int = 0, mf: bool = False,
         options: bytes = b"", ident: int = 0x4242, version: int = 4, ihl: Optional[int] = None) -> bytes:
    """frag_off in 8-byte units; options padded to 4 bytes; ihl overrides the header length."""
    options += bytes(-len(options) % 4)
    hl = 20 + len(options)
    flags = (0x2000 if mf else 0) | (frag_off & 0x1FFF)
    vihl = (version << 4) | ((hl // 4) if ihl is None else ihl)
    hdr = struct.pack("!BBHHHBBH4s4s", vihl, 0, hl + len(payload), ident, flags, 64, proto, 0,
                      ipaddress.IPv4Address(src).packed, ipaddress.IPv4Address(dst).packed) + options
    return hdr[:10] + struct.pack("!H", csum(hdr)) + hdr[12:] + payload


def ext_opts(nexthdr: int, hdrlen: int = 0) -> bytes:
    """A hop-by-hop or destination-options header of (hdrlen + 1) * 8 bytes, all padding."""
    size = (hdrlen + 1) * 8
    pad = size - 2
    return bytes([nexthdr, hdrlen]) + bytes([1, pad - 2]) + bytes(pad - 2)   # one PadN option


def ext_routing(nexthdr: int, hdrlen: int = 0) -> bytes:
    """A routing header with Segments Left 0 (type 0: the receiver ignores it)."""
    return bytes([nexthdr, hdrlen, 0, 0]) + bytes((hdrlen + 1) * 8 - 4)


def ext_frag(nexthdr: int, offset: int = 0, more: bool = False, ident: int = 0x1234) -> bytes:
    """A fragment header; offset in 8-byte units."""
    return struct.pack("!BBHI", nexthdr, 0, (offset << 3) | (1 if more else 0), ident)


def ipv6(payload: bytes, src: str, dst: str, nexthdr: int = UDP, exts: Iterable[Tuple[int, bytes]] = (),
         version: int = 6) -> bytes:
    """exts: (header type, header bytes whose first byte is rewritten to chain them), in
    order; the last one points at nexthdr."""
    exts = list(exts)
    chain = b""
    types = [t for t, _ in exts] + [nexthdr]
    for i, (_, body) in enumerate(exts):
        chain += bytes([types[i + 1]]) + body[1:]
    first = types[0]
    rest = chain + payload
    return (struct.pack("!IHBB16s16s", version << 28, len(rest), first, 64,
                        ipaddress.IPv6Address(src).packed, ipaddress.IPv6Address(dst).packed) + rest)


def dst_opts_chain(n: int) -> list:
    """n empty destination-options headers (8 bytes each)."""
    return [(DSTOPTS, ext_opts(0))] * n


def udp4_frame(payload: bytes, src: str = "10.0.0.2", dst: str = "10.0.0.1", sport: int = 40000,
               dport: int = 4433, vlans: Sequence[Tuple[int, int]] = (), ulen: Optional[int] = None,
               **ip_kw) -> bytes:
    return eth(ipv4(udp(payload, sport, dport, src, dst, ulen), src, dst, **ip_kw), ETH_P_IP, vlans)


def udp6_frame(payload: bytes, src: str = "fd00::2", dst: str = "fd00::1", sport: int = 40000,
               dport: int = 4433, vlans: Sequence[Tuple[int, int]] = (), exts=(), ulen: Optional[int] = None,
               mac_src: str = MAC_B, mac_dst: str = MAC_A) -> bytes:
    return eth(ipv6(udp(payload, sport, dport, src, dst, ulen), src, dst, UDP, exts), ETH_P_IPV6, vlans,
               src=mac_src, dst=mac_dst)
