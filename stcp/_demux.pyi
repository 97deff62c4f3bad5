"""A receive batch grouped by connection ID, in C (stcp/_ext/demux.c).

Reads record headers only (length:u64 | cid:u64 | seq:u64); stcp.endpoint.group_by_cid_ref is
the pure-Python reference. Addresses pass through as the receive call gave them.
"""
from typing import Optional, Sequence, Tuple, Union

Address = Union[Tuple[str, int], Tuple[str, int, int, int]]

def group_by_cid(batch: Sequence[Union[Tuple[bytes, Optional[Address]],
                                       Tuple[bytes, Optional[Address], int]]]
                 ) -> list[Tuple[int, Optional[Address], list[Union[bytes, Tuple[bytes, int]]]]]:
    """Consecutive datagrams from one address whose header names one nonzero connection ID
    with a nonzero seq (data records), grouped; a GRO buffer (buffer, addr, segment_size)
    whose records all name one such ID stays whole as a (buffer, segment_size) pair; every
    other datagram (short, cid 0, seq 0, a piece of a mixed buffer) alone with cid -1."""
