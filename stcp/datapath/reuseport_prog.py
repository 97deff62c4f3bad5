"""The SO_REUSEPORT steering program, as the 50 BPF instructions it is.

A BPF_PROG_TYPE_SK_REUSEPORT program picking the socket of a UDP reuseport group by the
worker bits of the record's connection ID (docs/PROTOCOL.md section 3.1.1). The kernel
runs it for every datagram to the group's address and port, after the UDP header checks
and before any socket is chosen; its context starts at the UDP header.

It is written here as instructions rather than as C for bcc or clang: compiling it took
bcc seconds at every `stcp serve` start (tens of seconds on a loaded host) and needed
kernel headers, for a program with one branch per verdict. Loading these takes a
millisecond and needs only libbpf. What it does, in C:

    if (ctx->ip_protocol != IPPROTO_UDP || ctx->len < 8 + STCP_HEADER_LEN
            || bpf_skb_load_bytes(ctx, 8 + 8, &ids, 16) < 0)      // cid, seq
        return count(PASS_NOT_STCP, SK_PASS);              // the kernel's 4-tuple hash
    if (ids.cid == 0 && ids.seq == 0)
        return count(PASS_HELLO, SK_PASS);                 // the kernel's hash
    worker = be64toh(ids.cid) >> STCP_CID_WORKER_SHIFT;
    err = bpf_sk_select_reuseport(ctx, &sockarray, &worker, 0);
    if (err == 0) return count(PASS_WORKER, SK_PASS);
    if (err == -ENOENT) return count(PASS_ORPHAN, SK_PASS);  // worker gone: a live one RESETs
    return count(DROP_WRONG_GROUP, SK_DROP);               // a socket of another group

count() bumps the per-CPU (packets, bytes) counter of its verdict (bytes: ctx->len, the
UDP header and payload) and returns the action. bpf_skb_load_bytes rather than direct
access: the header may lie past the skb's linear part, where data_end stops. The
verdicts are ReuseportVerdict's values (below), the shift and header length stcp/wire.py's;
the Python reference is reuseport.classify(), and tests/test_reuseport.py sends datagrams
through the loaded program to check the two agree.
"""
from __future__ import annotations

import enum
import errno
import socket
import struct
import sys
from typing import Dict, List, Tuple

from ..wire import CID_WORKER_SHIFT, HANDSHAKE_SEQ, HEADER_LEN
from .verdicts import Named


class ReuseportVerdict(Named, enum.IntEnum):
    """What the program decided: one per-CPU counter each, the key its number. Append only."""
    PASS_NOT_STCP = 0        # not UDP, or payload under the 24-byte header: the kernel's hash
    PASS_HELLO = 1           # cid 0 and seq 0: the kernel's hash picks a live worker
    PASS_WORKER = 2          # record sent to its CID's worker socket
    PASS_ORPHAN = 3          # no socket at the CID's worker key (worker dead or restarting): the
                             # kernel's hash picks a live worker, which answers with a RESET
    DROP_WRONG_GROUP = 4     # the key's socket belongs to another reuseport group


VERDICT_MAX = len(ReuseportVerdict)

UDP_HEADER_LEN = 8
SK_DROP, SK_PASS = 0, 1
# struct sk_reuseport_md (linux/bpf.h): offsets of the u32 fields read
CTX_LEN = 16
CTX_IP_PROTOCOL = 24
# helper ids (enum bpf_func_id)
MAP_LOOKUP_ELEM = 1
SKB_LOAD_BYTES = 26
SK_SELECT_REUSEPORT = 82
BPF_PSEUDO_MAP_FD = 1

# opcodes (linux/bpf_common.h, linux/bpf.h): class | size/op | source
_LDX_W, _LDX_DW, _STX_W, _STX_DW = 0x61, 0x79, 0x63, 0x7B
_MOV_K, _MOV_X, _ADD_K, _ADD_X, _OR_X, _RSH_K = 0xB7, 0xBF, 0x07, 0x0F, 0x4F, 0x77
_TO_BE = 0xDC                 # BPF_ALU | BPF_END | BPF_TO_BE: a no-op on big-endian hosts
_LD_IMM64 = 0x18
_JEQ_K, _JNE_K, _JLT_K, _JSLT_K = 0x15, 0x55, 0xA5, 0xC5
_CALL, _EXIT = 0x85, 0x95
_R0, _R1, _R2, _R3, _R4, _R6, _R7, _R8, _R9, _FP = 0, 1, 2, 3, 4, 6, 7, 8, 9, 10
_IDS, _WORKER, _KEY = -16, -20, -4    # stack offsets: cid+seq (16 bytes), u32 worker, u32 counter key


class _Asm:
    """Instructions with jumps to labels, resolved by code()."""

    def __init__(self) -> None:
        self.insns: List[Tuple[int, int, int, object, int]] = []   # op, dst, src, off or label, imm
        self.labels: Dict[str, int] = {}

    def __call__(self, op: int, dst: int = 0, src: int = 0, off: object = 0, imm: int = 0) -> None:
        self.insns.append((op, dst, src, off, imm))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.insns)

    def map_fd(self, dst: int, fd: int) -> None:
        """dst = the map behind fd (a two-slot load the kernel resolves at load time)."""
        self(_LD_IMM64, dst, BPF_PSEUDO_MAP_FD, 0, fd)
        self(0, 0, 0, 0, 0)

    def code(self) -> bytes:
        out = bytearray()
        for pc, (op, dst, src, target, imm) in enumerate(self.insns):
            off = self.labels[target] - pc - 1 if isinstance(target, str) else target
            assert isinstance(off, int)
            regs = dst | src << 4 if sys.byteorder == "little" else dst << 4 | src
            out += struct.pack("=BBhi", op, regs, off, imm)
        return bytes(out)


def instructions(sockarray_fd: int, counters_fd: int) -> bytes:
    """The program for the socket map (REUSEPORT_SOCKARRAY) and the counters map (per-CPU
    array of VERDICT_MAX (packets, bytes) u64 pairs) at these fds."""
    v = {m.name: int(m) for m in ReuseportVerdict}
    a = _Asm()
    a(_MOV_X, _R6, _R1)                                   # r6 = ctx
    a(_LDX_W, _R7, _R6, CTX_LEN)                          # r7 = ctx->len
    a(_MOV_K, _R8, imm=v["PASS_NOT_STCP"])                # r8 = verdict, r9 = action
    a(_MOV_K, _R9, imm=SK_PASS)
    a(_LDX_W, _R1, _R6, CTX_IP_PROTOCOL)
    a(_JNE_K, _R1, off="count", imm=socket.IPPROTO_UDP)
    a(_JLT_K, _R7, off="count", imm=UDP_HEADER_LEN + HEADER_LEN)
    a(_MOV_X, _R1, _R6)                                   # bpf_skb_load_bytes(ctx, 16, fp-16, 16)
    a(_MOV_K, _R2, imm=UDP_HEADER_LEN + 8)
    a(_MOV_X, _R3, _FP)
    a(_ADD_K, _R3, imm=_IDS)
    a(_MOV_K, _R4, imm=16)
    a(_CALL, imm=SKB_LOAD_BYTES)
    a(_JSLT_K, _R0, off="count", imm=0)
    a(_MOV_K, _R8, imm=v["PASS_HELLO"])
    a(_LDX_DW, _R1, _FP, _IDS)                            # cid, as on the wire
    a(_LDX_DW, _R2, _FP, _IDS + 8)                        # seq
    assert HANDSHAKE_SEQ == 0                             # cid | seq == 0 tests both
    a(_OR_X, _R2, _R1)
    a(_JEQ_K, _R2, off="count", imm=0)
    a(_TO_BE, _R1, imm=64)                                # worker = be64toh(cid) >> shift
    a(_RSH_K, _R1, imm=CID_WORKER_SHIFT)
    a(_STX_W, _FP, _R1, _WORKER)
    a(_MOV_X, _R1, _R6)                                   # bpf_sk_select_reuseport(ctx, map, &worker, 0)
    a.map_fd(_R2, sockarray_fd)
    a(_MOV_X, _R3, _FP)
    a(_ADD_K, _R3, imm=_WORKER)
    a(_MOV_K, _R4, imm=0)
    a(_CALL, imm=SK_SELECT_REUSEPORT)
    a(_MOV_K, _R8, imm=v["PASS_WORKER"])
    a(_JEQ_K, _R0, off="count", imm=0)
    a(_MOV_K, _R8, imm=v["PASS_ORPHAN"])
    a(_JEQ_K, _R0, off="count", imm=-errno.ENOENT)
    a(_MOV_K, _R8, imm=v["DROP_WRONG_GROUP"])
    a(_MOV_K, _R9, imm=SK_DROP)
    a.label("count")                                      # counters[r8] += (1, len); return r9
    a(_STX_W, _FP, _R8, _KEY)
    a.map_fd(_R1, counters_fd)
    a(_MOV_X, _R2, _FP)
    a(_ADD_K, _R2, imm=_KEY)
    a(_CALL, imm=MAP_LOOKUP_ELEM)
    a(_JEQ_K, _R0, off="out", imm=0)
    a(_LDX_DW, _R1, _R0, 0)                               # struct stcp_counter {packets, bytes}
    a(_ADD_K, _R1, imm=1)
    a(_STX_DW, _R0, _R1, 0)
    a(_LDX_DW, _R1, _R0, 8)
    a(_ADD_X, _R1, _R7)
    a(_STX_DW, _R0, _R1, 8)
    a.label("out")
    a(_MOV_X, _R0, _R9)
    a(_EXIT)
    return a.code()
