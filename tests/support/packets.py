"""Crafted STCP records and Ethernet/IP/UDP frames, for the kernel-datapath tests and
bench/xdp_flood.py. Nothing here is sealed: the XDP program only reads the header."""
from __future__ import annotations

import ipaddress
import struct
from typing import Optional

from stcp import wire


def record(length: int, cid: int, seq: int, payload: bytes) -> bytes:
    return struct.pack("!QQQ", length, cid, seq) + payload


def data_record(cid: int, n: int = 32, seq: int = 1) -> bytes:
    return record(n, cid, seq, bytes(n))


def hello(cid: int = 0, kind: int = 1, n: int = wire.HANDSHAKE_PAYLOAD_LEN) -> bytes:
    return record(n, cid, 0, bytes([kind]) + bytes(n - 1))


def csum(b: bytes) -> int:
    """The Internet checksum (RFC 1071) of b."""
    if len(b) % 2:
        b += b"\0"
    s = sum(struct.unpack(f"!{len(b) // 2}H", b))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def udp_frame(src_mac: str, dst_mac: str, src: str, dst: str, sport: int, dport: int, payload: bytes,
              udp_len: Optional[int] = None, vlan: Optional[int] = None) -> bytes:
    """An Ethernet frame with IPv4 or IPv6 + UDP; udp_len overrides the UDP length field."""
    ulen = 8 + len(payload) if udp_len is None else udp_len
    s, d = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if s.version == 4:
        udp = struct.pack("!HHHH", sport, dport, ulen, 0) + payload          # checksum 0: none
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), 0x4242, 0, 64, 17, 0, s.packed, d.packed)
        ip = ip[:10] + struct.pack("!H", csum(ip)) + ip[12:] + udp
        ethertype = 0x0800
    else:
        pseudo = s.packed + d.packed + struct.pack("!IxxxB", 8 + len(payload), 17)
        udp = struct.pack("!HHHH", sport, dport, ulen, 0) + payload
        ck = csum(pseudo + udp) or 0xFFFF
        udp = udp[:6] + struct.pack("!H", ck) + udp[8:]
        ip = struct.pack("!IHBB16s16s", 0x60000000, len(udp), 17, 64, s.packed, d.packed) + udp
        ethertype = 0x86DD
    mac = lambda m: bytes.fromhex(m.replace(":", ""))  # noqa: E731
    tag = struct.pack("!HH", 0x8100, vlan) if vlan is not None else b""
    return mac(dst_mac) + mac(src_mac) + tag + struct.pack("!H", ethertype) + ip
