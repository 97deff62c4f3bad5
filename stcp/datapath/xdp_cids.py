"""The XDP program's connection-ID tables as one process keeps them (CidTables, which
XdpDatapath is): a half-open connection's CID lives in the stcp_half_open LRU, an
ENCRYPTED one's in the stcp_cids hash; either way it counts once in its prefilter slot
(stcp_cid_filter). Invariant: a CID in a table has a slot count >= 1 (the filter is
raised before the insert and lowered after the delete), so the filter never hides a
connection. Each object remembers what it added, to take back only that (forget_own()).
"""
from __future__ import annotations

import errno
import logging
import os
import struct
import threading
import time
from typing import List

from . import bpf
from .xdp_prog import CID, FILTER_WORD, ProgHandles, cid_filter_slot

log = logging.getLogger("stcp.datapath.xdp")

FULL_RETRY = 1.0              # seconds a failed live-table insert keeps hellos refused without trying again


class CidTables:
    """The live and half-open CID tables of one program (handles), with the prefilter."""

    def __init__(self, iface: str, handles: ProgHandles):
        self.iface = iface
        self._h = handles
        self._cids: set[int] = set()          # in the live table, added by this object
        self._half_open: set[int] = set()     # in the half-open LRU, added by this object
        self._lock = threading.Lock()
        self._full_until = 0.0                # a live insert failed: refuse hellos until then
        self.cid_table_full = 0               # live inserts that failed: the table was full
        self.max_cids: int = bpf.map_info(handles.maps["cids"])["max_entries"]

    def add_cid(self, cid: int, tag: int = 1) -> bool:
        """Let data records for this connection ID through (cid as parsed from the wire);
        False if the live table is full. tag (1-255) is the entry's value, which the
        program ignores: the afxdp supervisor tags each worker's CIDs so it can remove a
        dead worker's (cids_tagged)."""
        with self._lock:
            self._filter_adjust(cid, +1)
            if not self._insert_live(cid, tag):
                self._filter_adjust(cid, -1)          # already live (counted once only), or full
            return cid in self._cids

    def add_half_open(self, cid: int, tag: int = 1) -> None:
        """A new connection's CID, from its server hello until it is ENCRYPTED (promote())."""
        with self._lock:
            self._filter_adjust(cid, +1)
            bpf.map_update(self._h.maps["half_open"], CID.pack(cid), bytes([tag]))
            self._half_open.add(cid)

    def promote(self, cid: int, tag: int = 1) -> bool:
        """Move a half-open CID into the live table (its connection is ENCRYPTED); False if
        the table is full (the CID stays half-open: the caller ends the connection)."""
        with self._lock:
            if cid not in self._half_open:
                self._filter_adjust(cid, +1)
            if not self._insert_live(cid, tag):
                if cid not in self._half_open:
                    self._filter_adjust(cid, -1)
                return cid in self._cids
            if cid in self._half_open:
                bpf.map_delete(self._h.maps["half_open"], CID.pack(cid))
                self._half_open.discard(cid)
            return True

    def _insert_live(self, cid: int, tag: int) -> bool:
        """Insert into the live table; False if it was there already or there is no room."""
        try:
            if not bpf.map_update(self._h.maps["cids"], CID.pack(cid), bytes([tag]), bpf.BPF_NOEXIST):
                self._cids.add(cid)
                return False
        except OSError as e:
            if e.errno != errno.E2BIG:
                raise
            self._table_full()
            return False
        self._cids.add(cid)
        return True

    def _table_full(self) -> None:
        self.cid_table_full += 1
        if time.monotonic() >= self._full_until:
            log.warning("the live-connection table of the XDP program on %s is full (%d entries)",
                        self.iface, self.max_cids)
        self._full_until = time.monotonic() + FULL_RETRY

    def remove_cid(self, cid: int) -> None:
        """Forget a connection ID, live or half-open."""
        with self._lock:
            key = CID.pack(cid)
            live = bpf.map_delete(self._h.maps["cids"], key)
            half = bpf.map_delete(self._h.maps["half_open"], key)
            # the LRU may have evicted a half-open entry: its count goes with our record of it
            if live or half or cid in self._half_open:
                self._filter_adjust(cid, -1)
            self._cids.discard(cid)
            self._half_open.discard(cid)

    def has_room(self) -> bool:
        """Whether the live table has room for one more connection (a server asks before it
        accepts a hello). The table may hold entries this object does not know of (another
        process's, a dead server's), so it is asked: a throwaway CID is inserted and removed
        at once (the prefilter never names it, so the program passes nothing for it). After
        a failed insert, False for FULL_RETRY seconds without asking again."""
        if time.monotonic() < self._full_until:
            return False
        fd = self._h.maps["cids"]
        probe = CID.pack(int.from_bytes(os.urandom(8), "big") | 1)
        with self._lock:
            try:
                if bpf.map_update(fd, probe, b"\0", bpf.BPF_NOEXIST):
                    bpf.map_delete(fd, probe)
            except OSError as e:
                if e.errno != errno.E2BIG:
                    raise
                self._table_full()
                return False
        return True

    def _filter_adjust(self, cid: int, delta: int) -> None:
        slot = cid_filter_slot(cid)
        key = struct.pack("=I", slot >> 3)
        fd = self._h.maps["cid_filter"]
        word = FILTER_WORD.unpack(bpf.map_lookup(fd, key, 8) or bytes(8))[0]
        shift = (slot & 7) * 8
        count = (word >> shift) & 0xFF
        if count == 0xFF:
            return                                    # saturated: sticky, the hash decides
        count = max(0, count + delta)
        bpf.map_update(fd, key, FILTER_WORD.pack((word & ~(0xFF << shift)) | (count << shift)))

    def has_cid(self, cid: int) -> bool:
        return bpf.map_lookup(self._h.maps["cids"], CID.pack(cid), 1) is not None

    def has_half_open(self, cid: int) -> bool:
        return bpf.map_lookup(self._h.maps["half_open"], CID.pack(cid), 1) is not None

    def filter_count(self, cid: int) -> int:
        """The prefilter count of cid's slot (tests and diagnostics)."""
        slot = cid_filter_slot(cid)
        raw = bpf.map_lookup(self._h.maps["cid_filter"], struct.pack("=I", slot >> 3), 8) or bytes(8)
        return (FILTER_WORD.unpack(raw)[0] >> ((slot & 7) * 8)) & 0xFF

    def cids_tagged(self, tag: int) -> List[int]:
        """The CIDs, live or half-open, whose entry carries tag (see add_cid)."""
        out = []
        for fd in (self._h.maps["cids"], self._h.maps["half_open"]):
            for k in bpf.map_keys(fd, 8, self.max_cids * 4):
                v = bpf.map_lookup(fd, k, 1)
                if v is not None and v[0] == tag:
                    out.append(CID.unpack(k)[0])
        return out

    def cids(self) -> List[int]:
        return [CID.unpack(k)[0] for k in bpf.map_keys(self._h.maps["cids"], 8, self.max_cids * 4)]

    def forget_own(self) -> None:
        """Remove every CID this object added (the program stays, with everyone else's)."""
        for cid in list(self._cids | self._half_open):
            try:
                self.remove_cid(cid)
            except OSError:
                pass
