"""AF_XDP in C (stcp/_ext/xsk.c, libxdp): UMEM, fill/completion/RX/TX rings, batch receive
and transmit; frames parsed and reply headers built in stcp/_ext/xsk_frame.c, received
datagrams joined into GRO-like entries in stcp/_ext/xsk_gro.c.

Built only where libxdp-dev and libbpf-dev are installed (setup.py skips it otherwise).
The socket is created with libxdp's "inhibit program load" flag: put fd() into the
XSKMAP of the XDP program (bpf/stcp_xdp.c with -DSTCP_AFXDP) under queue_id.
Addresses look like the socket module's: (host, port) for IPv4, (host, port, flowinfo,
scope_id) for IPv6, and for IPv4 with v4mapped=True ('::ffff:a.b.c.d', port, 0, 0).
The GIL is released around system calls; use one socket from one thread at a time.
"""
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union, final, overload

from _typeshed import ReadableBuffer

Address = Union[Tuple[str, int], Tuple[str, int, int, int]]
# (payload, addr) for one datagram; (buffer, addr, segment_size) for datagrams of that size
# back to back (the last may be shorter), as stcp._udpio.recvmmsg(gro=True) gives them
Entry = Union[Tuple[bytes, Address], Tuple[bytes, Address, int]]

MAX_RECV_BATCH: int

@final
class XskSocket:
    zerocopy: bool
    queue_id: int
    ifindex: int
    ifname: str
    closed: bool
    sg: bool
    def __init__(self, ifname: str, queue_id: int, frame_count: int = 4096, frame_size: int = 4096,
                 ring_size: int = 2048, zerocopy: Optional[bool] = None, sg: bool = True) -> None:
        """OSError if the interface or queue does not exist, or AF_XDP cannot bind there.
        zerocopy=None takes what the driver offers; False forces copy mode; True fails
        unless the driver does zero-copy. sg: bind with XDP_USE_SG, so a packet longer than
        a frame (a GSO buffer generic XDP passed whole) arrives in pieces, gathered by
        recv(); where the kernel or driver refuses it, the socket binds without (sg False)."""
    def fileno(self) -> int: ...
    def fd(self) -> int: ...
    @overload
    def recv(self, max_n: int = 64, v4mapped: bool = False, templates: Literal[False] = ...,
             gro: bool = True) -> List[Entry]: ...
    @overload
    def recv(self, max_n: int, v4mapped: bool, templates: Literal[True],
             gro: bool = True) -> Tuple[List[Entry], Dict[Address, bytes]]:
        """The UDP payloads of up to max_n frames waiting on the RX ring ([] if none), as
        parse_frames() gives them; frames that do not parse as Ethernet/IPv4|IPv6/UDP are
        counted (stats()['rx_malformed']) and skipped. The frames go back to the fill ring
        before it returns. With templates, also the headers of a reply to each sender (see
        reply_template), for send_udp()."""
    @overload
    def recv(self, max_n: int, v4mapped: bool, templates: bool,
             gro: bool = True) -> Any: ...
    def send_udp(self, datagrams: Sequence[ReadableBuffer], template: ReadableBuffer) -> int:
        """UDP datagrams behind a reply template, lengths and IPv4/UDP checksums computed in
        C, on the TX ring; returns how many were queued (fewer when frames or ring slots run
        out: send the rest another way). ValueError for a bad template or a datagram too
        long for a frame, before anything is queued."""
    def send(self, frames: Sequence[ReadableBuffer]) -> int:
        """Queue whole Ethernet frames (14..frame_size bytes each; headers and checksums are
        the caller's) on the TX ring and kick the kernel until it took them; returns how many
        were queued (fewer when free frames or ring slots run out). ValueError/TypeError on a
        bad frame, before anything is queued. The afxdp datapath itself sends replies with
        send_udp (`--afxdp-tx afxdp`)."""
    def poll(self, timeout_ms: int = 0) -> bool:
        """True when frames are waiting; waits at most timeout_ms (-1: 60 s)."""
    def stats(self) -> Dict[str, int]:
        """tx_frames, tx_kicks, rx_frames, rx_bytes, rx_malformed, rx_chained (packets that came in
        pieces), rx_gathered (those of them copied twice: gathered before parsing, because
        they did not all come in one recv()), fill_wakeups (user space) and the kernel's
        XDP_STATISTICS: rx_dropped, rx_invalid_descs, rx_ring_full, rx_fill_ring_empty_descs."""
    def close(self) -> None: ...
    def __enter__(self) -> "XskSocket": ...
    def __exit__(self, *exc: object) -> None: ...

@overload
def parse_frames(frames: Sequence[ReadableBuffer], v4mapped: bool = False, ifindex: int = 0,
                 templates: Literal[False] = ..., gro: bool = True) -> List[Entry]: ...
@overload
def parse_frames(frames: Sequence[ReadableBuffer], v4mapped: bool, ifindex: int, templates: Literal[True],
                 gro: bool = True) -> Tuple[List[Entry], Dict[Address, bytes]]:
    """What recv() returns for these frames taken off the ring in this order: malformed
    ones skipped; with gro, one flow's consecutive datagrams (same link, IP and UDP headers)
    joined as UDP GRO joins them (each the size of the first but the last, which may be
    shorter and ends the entry; at most 64 and 65507 bytes); a datagram holding several
    records (a GSO buffer generic XDP passed whole) an entry of its own, cut at its first
    record's size. stcp.datapath.afxdp.rx_entries is the pure-Python reference."""

def parse_frame(frame: ReadableBuffer, v4mapped: bool = False, ifindex: int = 0) -> Tuple[bytes, Address]:
    """The parser recv() uses, on one Ethernet frame: (UDP payload, source address);
    ValueError saying what is wrong when the frame is malformed or not UDP."""

def reply_template(frame: ReadableBuffer) -> bytes:
    """The Ethernet/IP/UDP headers of a reply to frame: MACs, addresses and ports swapped,
    the VLAN tag kept as it arrived (802.1Q or 802.1ad, same TCI), IPv4 without options
    (DF, TTL 64) or IPv6 (hop limit 64); lengths and checksums zero until
    udp_frame()/send_udp() fill them. ValueError if malformed."""

def udp_frame(template: ReadableBuffer, payload: ReadableBuffer) -> bytes:
    """The frame send_udp() would transmit for payload (tests check its checksums)."""
