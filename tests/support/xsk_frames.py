"""The AF_XDP frame parser's pure-Python reference: what stcp/_ext/xsk_frame.c's
parse_frame(), reply_template() and udp_frame() must return, written from the rules in
stcp/_xsk.pyi, separately from the C, so the two can disagree (tests/fuzz compares them).

The rules: Ethernet with at most one VLAN tag (802.1Q or 802.1ad); IPv4 (options skipped,
fragments refused, Ethernet padding past the total length ignored) or IPv6 (at most six
hop-by-hop, routing or destination-options headers walked, fragments refused, padding past
the payload length ignored); UDP with a length of at least 8 inside the packet. A frame
that breaks one raises ValueError("malformed frame: <reason>") with the C's reason text.
"""
from __future__ import annotations

import ipaddress
import struct
from typing import Optional, Tuple

from tests.support.packets import csum

ETH_P_IP, ETH_P_IPV6, ETH_P_8021Q, ETH_P_8021AD = 0x0800, 0x86DD, 0x8100, 0x88A8
UDP = 17
IPV6_EXT = (0, 43, 60)            # hop-by-hop, routing, destination options
IPV6_EXT_MAX = 6
TEMPLATE_MAX = 18 + 40 + 8


class Parsed:
    def __init__(self) -> None:
        self.vlan: Optional[Tuple[int, int]] = None     # (TPID, TCI)
        self.family = 0
        self.src = self.dst = b""
        self.sport = self.dport = 0
        self.payload = b""
        self.macs = b""


def _bad(why: str) -> ValueError:
    return ValueError(f"malformed frame: {why}")


def parse(frame: bytes) -> Parsed:
    p = Parsed()
    n = len(frame)
    if n < 14:
        raise _bad("frame shorter than an Ethernet header")
    p.macs = frame[:12]
    off = 14
    proto = struct.unpack_from("!H", frame, 12)[0]
    if proto in (ETH_P_8021Q, ETH_P_8021AD):
        if n < 18:
            raise _bad("truncated VLAN tag")
        tci, proto = struct.unpack_from("!HH", frame, 14)
        p.vlan = (struct.unpack_from("!H", frame, 12)[0], tci)
        off = 18
    if proto == ETH_P_IP:
        if n < off + 20:
            raise _bad("truncated IPv4 header")
        if frame[off] >> 4 != 4:
            raise _bad("IPv4 header with another version")
        ihl = (frame[off] & 15) * 4
        if ihl < 20:
            raise _bad("IPv4 header length below 20")
        if n < off + ihl:
            raise _bad("truncated IPv4 options")
        total = struct.unpack_from("!H", frame, off + 2)[0]
        if total < ihl or n < off + total:
            raise _bad("IPv4 total length outside the frame")
        if frame[off + 9] != UDP:
            raise _bad("not UDP")
        if struct.unpack_from("!H", frame, off + 6)[0] & 0x3FFF:
            raise _bad("IPv4 fragment")
        p.family, p.src, p.dst = 4, frame[off + 12:off + 16], frame[off + 16:off + 20]
        l4, end = off + ihl, off + total
    elif proto == ETH_P_IPV6:
        if n < off + 40:
            raise _bad("truncated IPv6 header")
        if frame[off] >> 4 != 6:
            raise _bad("IPv6 header with another version")
        end = off + 40 + struct.unpack_from("!H", frame, off + 4)[0]
        if n < end:
            raise _bad("IPv6 payload length outside the frame")
        p.family, p.src, p.dst = 6, frame[off + 8:off + 24], frame[off + 24:off + 40]
        nxt, l4 = frame[off + 6], off + 40
        for _ in range(IPV6_EXT_MAX):
            if nxt == UDP:
                break
            if nxt in IPV6_EXT:
                if end < l4 + 2:
                    raise _bad("truncated IPv6 extension header")
                nxt, l4 = frame[l4], l4 + (frame[l4 + 1] + 1) * 8
                if l4 > end:
                    raise _bad("IPv6 extension header outside the frame")
            elif nxt == 44:
                raise _bad("IPv6 fragment")
            else:
                raise _bad("not UDP")
        if nxt != UDP:
            raise _bad("not UDP")
    else:
        raise _bad("neither IPv4 nor IPv6")
    if end < l4 + 8:
        raise _bad("truncated UDP header")
    p.sport, p.dport, ulen = struct.unpack_from("!HHH", frame, l4)
    if ulen < 8:
        raise _bad("UDP length below 8")
    if l4 + ulen > end:
        raise _bad("UDP length outside the packet")
    p.payload = frame[l4 + 8:l4 + ulen]
    return p


def parse_frame(frame: bytes, v4mapped: bool = False, ifindex: int = 0):
    """(UDP payload, source address) as the socket module would report the source."""
    p = parse(frame)
    if p.family == 4:
        host = str(ipaddress.IPv4Address(p.src))
        return p.payload, (f"::ffff:{host}", p.sport, 0, 0) if v4mapped else (host, p.sport)
    src = ipaddress.IPv6Address(p.src)
    return p.payload, (_ntop6(p.src), p.sport, 0, ifindex if src.is_link_local else 0)


def _ntop6(raw: bytes) -> str:
    """inet_ntop's text: like ipaddress's, except that glibc writes an IPv4-mapped or
    -compatible address with a dotted quad."""
    a = ipaddress.IPv6Address(raw)
    if raw[:10] == bytes(10) and raw[10:12] in (b"\xff\xff", b"\x00\x00") and \
            (raw[10:12] == b"\xff\xff" or raw[12:14] != bytes(2)):
        prefix = "::ffff:" if raw[10:12] == b"\xff\xff" else "::"
        return prefix + str(ipaddress.IPv4Address(raw[12:]))
    return a.compressed


def reply_template(frame: bytes) -> bytes:
    """The headers of a reply: MACs, addresses and ports swapped, the VLAN tag kept, IPv4
    without options (DF, TTL 64) or IPv6 (hop limit 64), lengths and checksums zero."""
    p = parse(frame)
    t = p.macs[6:12] + p.macs[:6]
    if p.vlan:
        t += struct.pack("!HH", *p.vlan)
    if p.family == 4:
        t += struct.pack("!HBBHHHBBH4s4s", ETH_P_IP, 0x45, 0, 0, 0, 0x4000, 64, UDP, 0, p.dst, p.src)
    else:
        t += struct.pack("!HIHBB16s16s", ETH_P_IPV6, 6 << 28, 0, UDP, 64, p.dst, p.src)
    return t + struct.pack("!HHHH", p.dport, p.sport, 0, 0)


def udp_frame(template: bytes, payload: bytes) -> bytes:
    """The frame send_udp() transmits behind a template: lengths and the IPv4 and UDP
    checksums filled in; ValueError("bad template: ...") for a template that is not one."""
    n = len(template)
    if n > TEMPLATE_MAX:
        raise ValueError("bad template: template too long")
    if n < 14:
        raise ValueError("bad template: template shorter than an Ethernet header")
    off, proto = 14, struct.unpack_from("!H", template, 12)[0]
    if proto in (ETH_P_8021Q, ETH_P_8021AD):
        if n < 18:
            raise ValueError("bad template: truncated VLAN tag")
        proto, off = struct.unpack_from("!H", template, 16)[0], 18
    if proto == ETH_P_IP:
        if n != off + 28 or template[off] != 0x45 or template[off + 9] != UDP:
            raise ValueError("bad template: not an IPv4/UDP template")
        udp_off = off + 20
    elif proto == ETH_P_IPV6:
        if n != off + 48 or template[off] >> 4 != 6 or template[off + 6] != UDP:
            raise ValueError("bad template: not an IPv6/UDP template")
        udp_off = off + 40
    else:
        raise ValueError("bad template: template is neither IPv4 nor IPv6")
    if len(payload) > 65507:
        raise ValueError("bad template: payload too long")
    f = bytearray(template + payload)
    ulen = 8 + len(payload)
    struct.pack_into("!H", f, udp_off + 4, ulen & 0xFFFF)
    if proto == ETH_P_IP:
        struct.pack_into("!H", f, off + 2, (20 + ulen) & 0xFFFF)     # the template's ID stays
        struct.pack_into("!H", f, off + 10, 0)
        struct.pack_into("!H", f, off + 10, csum(bytes(f[off:off + 20])))
        pseudo = bytes(f[off + 12:off + 20])
    else:
        struct.pack_into("!H", f, off + 4, ulen & 0xFFFF)
        pseudo = bytes(f[off + 8:off + 40])
    struct.pack_into("!H", f, udp_off + 6, 0)
    c = csum(pseudo + struct.pack("!HH", UDP, ulen) + bytes(f[udp_off:]))
    struct.pack_into("!H", f, udp_off + 6, c or 0xFFFF)
    return bytes(f)
