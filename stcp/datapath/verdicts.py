"""Verdicts of the XDP program (bpf/stcp_xdp.c), mirrored from `enum stcp_verdict` in
bpf/stcp_wire.h. tests/test_constants.py checks that both sides agree.

Each verdict indexes one per-CPU (packets, bytes) counter in the program's
`stcp_counters` map. Values are append-only: never renumber.
"""
from __future__ import annotations

import enum


class Named:
    """How a verdict is shown: counters(), status output and metrics use `key`. A mixin, so the
    XDP and the reuseport verdicts (two enums, two BPF programs) are named alike."""
    name: str

    @property
    def key(self) -> str:
        """The name used in counters(), status output and metrics: 'drop_unknown_cid'."""
        return self.name.lower()

    @property
    def is_drop(self) -> bool:
        return self.name.startswith("DROP_")


class Verdict(Named, enum.IntEnum):
    PASS_NOT_STCP = 0       # shown not to be UDP to the STCP port (ARP, ICMP, TCP, other ports, ...)
    PASS_HANDSHAKE = 1      # well-formed client hello within its source's rate
    PASS_DATA = 2           # well-formed data record for a live connection ID
    DROP_SHORT_HEADER = 3   # UDP payload shorter than the 24-byte record header
    DROP_BAD_LENGTH = 4     # length field != UDP payload length - 24
    DROP_TOO_SHORT = 5      # data record payload below the AEAD tag size
    DROP_TOO_LONG = 6       # data record payload above the configured maximum
    DROP_FRAGMENT = 7       # first IP fragment of an STCP datagram; any later fragment of a UDP datagram
    DROP_UNKNOWN_CID = 8    # data record whose CID is not in the live-connection table
    DROP_HS_RATE = 9        # client hello over its source prefix's token bucket
    DROP_BAD_HANDSHAKE = 10  # seq 0 but not a v2 (112) or v1 (80) client hello, cid 0
    DROP_BAD_UDP = 11       # UDP length field < 8 or past the end of the frame
    DROP_WRONG_WORKER = 12  # afxdp: a live CID whose worker does not own the RX queue it came in on
    DROP_UNPARSED = 13      # headers not walkable to the UDP port: truncated or malformed, a third
                            # VLAN tag, more IPv6 extension headers than the program walks
    DROP_HS_GLOBAL = 14     # client hello over the global hello budget (all sources together)


VERDICT_MAX = len(Verdict)   # == STCP_V_MAX
DROP_VERDICTS = tuple(v for v in Verdict if v.is_drop)
PASS_VERDICTS = tuple(v for v in Verdict if not v.is_drop)
