"""The fuzz targets: each C entry point of the sanitizer build (tests/fuzz/build.py) fed
the same arguments as its pure-Python reference, the two results compared.

A target is a function of one bytes input (what libFuzzer mutates, or a corpus file)
that decodes it into arguments with `Input`, calls both sides and raises AssertionError if
they disagree; a memory error or undefined behaviour in the C aborts the process under the
sanitizers first. Inputs are decoded into well-formed calls most of the time (records
sealed under the right key, headers with live-looking fields) and malformed ones some of
the time, so the fuzzer reaches the paths that only authentic records reach.

    open_records   stcp._aead RecordCipher.open_records  vs  stcp.crypto.RecordKey (pure)
    seal_stream    stcp._aead RecordCipher.seal_stream   vs  stcp.crypto.RecordKey (pure)
    group_by_cid   stcp._demux.group_by_cid              vs  stcp.endpoint.group_by_cid_ref
    siphash        stcp._siphash.siphash128              vs  stcp.siphash.siphash128_ref
    xsk_frame      stcp._xsk parse_frame, reply_template, udp_frame  vs  tests/support/xsk_frames.py
    frames         stcp._frames decode_ack_stream, encode_ack_stream  vs  stcp.wire *_ref
"""
from __future__ import annotations

import ctypes
import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Callable, Dict, List, Sequence

from stcp import crypto, wire
from stcp.endpoint import group_by_cid_ref
from stcp.errors import ProtocolViolation
from stcp.siphash import siphash128_ref
from tests.fuzz import build
from tests.support import xsk_frames

U64 = (1 << 64) - 1
CID = 0x0123456789ABCDEF
SUITES = (wire.SUITE_AES_256_GCM, wire.SUITE_CHACHA20_POLY1305)
SECRET = bytes(range(32))


class Input:
    """Reads a fuzz input front to back; past its end every read gives zeros, so any bytes
    decode into some call."""

    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def bytes(self, n: int) -> bytes:
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out + bytes(n - len(out))

    def int(self, nbytes: int) -> int:
        return int.from_bytes(self.bytes(nbytes), "big")

    def pick(self, options: Sequence):
        return options[self.int(1) % len(options)]

    def flag(self) -> bool:
        return bool(self.int(1) & 1)

    def rest(self) -> bytes:
        out = self.data[self.pos:]
        self.pos = len(self.data)
        return out

    @property
    def left(self) -> int:
        return max(0, len(self.data) - self.pos)


# --------------------------------------------------------------------------------------
# the instrumented modules
_modules: Dict[str, ModuleType] = {}


def _libfuzzer() -> ctypes.CDLL:
    """atheris's libFuzzer, loaded (importing the module does it)."""
    core = importlib.import_module("atheris.core_with_libfuzzer")
    return ctypes.CDLL(core.__file__)


def _register_coverage(path: str) -> None:
    """Hand the module's coverage counters to libFuzzer (see build.py for why by hand)."""
    bounds = (ctypes.c_void_p * 4)()
    ctypes.CDLL(path).stcp_fuzz_sancov(bounds)
    if not bounds[0]:
        return                                  # built without coverage (gcc)
    lib = _libfuzzer()
    lib.__sanitizer_cov_8bit_counters_init(ctypes.c_void_p(bounds[0]), ctypes.c_void_p(bounds[1]))
    lib.__sanitizer_cov_pcs_init(ctypes.c_void_p(bounds[2]), ctypes.c_void_p(bounds[3]))


def load(name: str, coverage: bool = False) -> ModuleType:
    """The instrumented copy of stcp.<name> ('_aead', ...), as module stcp_fuzz.<name>."""
    if name not in _modules:
        path = build.module_path(name)
        if not path.exists():
            raise RuntimeError(f"{path} is missing: build it with 'python -m tests.fuzz.build' (make fuzz)")
        spec = importlib.util.spec_from_file_location(f"stcp_fuzz.{name}", path)
        assert spec is not None and spec.loader is not None
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        if coverage:
            _register_coverage(str(path))
        _modules[name] = mod
    return _modules[name]


# --------------------------------------------------------------------------------------
# open_records and seal_stream
_keys: Dict[int, crypto.RecordKey] = {}


def _pure(suite: int) -> crypto.RecordKey:
    if suite not in _keys:
        key = crypto.RecordKey(suite, SECRET)
        key.fast = None                 # the reference path
        _keys[suite] = key
    return _keys[suite]


def _cipher(suite: int):
    key = _pure(suite)
    return load("_aead").RecordCipher(suite, key.key, key.iv)


def _record(inp: Input, key: crypto.RecordKey, epoch: int, pt_len: int) -> bytes:
    """One record for open_records: mostly sealed under key (so it can authenticate), with
    the fields the screen checks drawn from small sets; sometimes raw bytes or mutated."""
    mode = inp.int(1)
    if mode & 3 == 0:
        return inp.bytes(inp.int(1) % 96)
    cid = CID if not mode & 4 else inp.pick((0, CID ^ 1, U64))
    rec_epoch = epoch if not mode & 8 else inp.int(2)
    pn = inp.pick((1, 2, 3, 4, 5, 6, 7, 8, 100, wire.PN_MASK - 1, wire.PN_MASK)) if not mode & 16 else inp.int(6)
    if mode & 32:
        body = inp.bytes(max(0, pt_len - wire.STREAM_FRAME_OVERHEAD))
        pt = wire.encode_stream(inp.int(1) * 8 if inp.flag() else inp.int(8) & ((1 << 63) - 1), body,
                                inp.int(1) == 1)
    else:
        pt = inp.bytes(pt_len)
    rec = key.seal(cid, wire.make_seq(rec_epoch, pn), pt)
    if mode & 64:                               # one byte changed: header field or ciphertext
        b = bytearray(rec)
        b[inp.int(2) % len(b)] ^= inp.int(1) | 1
        rec = bytes(b)
    if mode & 128:
        rec = rec[:inp.int(2) % (len(rec) + 1)]
    return rec


def open_records(data: bytes) -> None:
    inp = Input(data)
    suite = inp.pick(SUITES)
    key, c = _pure(suite), _cipher(suite)
    epoch = inp.pick((0, 0, 1, 0xFFFF))
    largest = inp.pick((-1, -1, 0, 1, 3, 7, 100, wire.PN_MASK))
    limit = inp.pick((1 << 62, U64, 0, 64, 4096, (1 << 62) - 1))
    entries: List = []
    bad_args = False
    for _ in range(inp.int(1) % 10):
        kind = inp.int(1)
        pt_len = inp.pick((0, 1, 11, 12, 13, 40, 200, 1400))
        recs = [_record(inp, key, epoch, pt_len) for _ in range(1 + (kind >> 2) % 5)]
        if kind & 3 == 0:                       # a GRO buffer: (buffer, segment_size)
            buf = b"".join(recs)
            seg = inp.pick((len(recs[0]) or 1, len(recs[0]) + 1, 1, 7, 1 << 40, sys.maxsize, 0, -1))
            bad_args |= seg < 1
            entries.append((buf, seg))
        elif kind & 3 == 1:                     # an empty one
            entries.append((b"", inp.pick((1, 1400, sys.maxsize))))
        else:
            entries.extend(recs)
    if bad_args:
        try:
            c.open_records(entries, CID, epoch, largest, limit)
        except ValueError:
            return
        raise AssertionError("open_records accepted a segment_size below 1")
    got = c.open_records(entries, CID, epoch, largest, limit)
    want = key.open_records(entries, CID, epoch, largest, limit)
    assert got == want, (entries, got, want)


def seal_stream(data: bytes) -> None:
    inp = Input(data)
    suite = inp.pick(SUITES)
    key, c = _pure(suite), _cipher(suite)
    cid = inp.pick((CID, 0, U64, inp.int(8)))
    first = inp.pick((1, 2, U64, U64 - 1, U64 - 4095, inp.int(8)))
    offset = inp.pick((0, 1, 1 << 62, U64, U64 - 100, inp.int(8)))
    chunk = inp.pick((1, 2, 7, 1400, 65535, 0, 65536, -1, inp.int(2)))
    fin = inp.flag()
    payload = inp.rest()
    if inp.data[:1] == b"\xff":                 # now and then the long runs: up to 4096 records and past
        payload = payload * (1 + 4097 // max(1, len(payload)))
    n = -(-len(payload) // chunk) if chunk > 0 else 0
    valid = 1 <= chunk <= 0xFFFF and len(payload) >= 1 and n <= 4096 and first + n - 1 <= U64 \
        and offset + len(payload) <= U64
    if not valid:
        try:
            c.seal_stream(cid, first, payload, offset, chunk, fin)
        except (ValueError, OverflowError):
            return
        raise AssertionError(f"seal_stream accepted chunk={chunk} len={len(payload)} first={first} offset={offset}")
    got = c.seal_stream(cid, first, payload, offset, chunk, fin)
    assert got == key.seal_stream(cid, first, payload, offset, chunk, fin)
    # and what it sealed opens again, as one stretch of stream data where it is one
    seg = wire.HEADER_LEN + wire.STREAM_FRAME_OVERHEAD + chunk + wire.AEAD_TAG_LEN
    assert c.open_records([(got, seg)], cid, first >> wire.EPOCH_SHIFT, -1, U64) == \
        key.open_records([(got, seg)], cid, first >> wire.EPOCH_SHIFT, -1, U64)


# --------------------------------------------------------------------------------------
# group_by_cid
ADDRS = (None, ("10.0.0.1", 4000), ("10.0.0.1", 4001), ("fd00::1", 4000, 0, 0))


def _datagram(inp: Input) -> bytes:
    mode = inp.int(1)
    if mode & 3 == 0:
        return inp.bytes(inp.int(1) % 40)
    cid = inp.pick((1, 2, 0, U64, CID))
    seq = inp.pick((0, 1, 2, U64))
    body = inp.bytes(inp.int(1) % 24)
    return wire.pack_header(len(body), cid, seq) + body


def group_by_cid(data: bytes) -> None:
    inp = Input(data)
    batch: List = []
    for _ in range(inp.int(1) % 12):
        kind = inp.int(1)
        addr = inp.pick(ADDRS)
        if kind & 3 == 0:                       # a GRO buffer
            size = inp.int(1) % 30 + wire.HEADER_LEN
            pieces = [_datagram(inp)[:size].ljust(size, b"\0") for _ in range(1 + kind % 5)]
            buf = b"".join(pieces)[:len(pieces) * size - inp.int(1) % size]
            batch.append((buf, addr, inp.pick((size, 0, -1, len(buf), len(buf) + 1, 1, sys.maxsize))))
        else:
            batch.append((_datagram(inp), addr))
    demux = load("_demux")
    assert demux.group_by_cid(batch) == group_by_cid_ref(batch), batch


# --------------------------------------------------------------------------------------
# siphash
def siphash(data: bytes) -> None:
    inp = Input(data)
    key_len = inp.pick((16, 16, 16, 0, 15, 17))
    key = inp.bytes(key_len)
    msg = inp.rest()
    fn = load("_siphash").siphash128
    if key_len != 16:
        try:
            fn(key, msg)
        except ValueError:
            return
        raise AssertionError(f"siphash128 took a {key_len}-byte key")
    assert fn(key, msg) == siphash128_ref(key, msg)


# --------------------------------------------------------------------------------------
# the AF_XDP frame parser
def _same(c_call: Callable, ref_call: Callable):
    """Both return the same value, or both raise ValueError (ProtocolViolation where the
    reference is a stcp.wire decoder) of one class with the same message."""
    try:
        want = ref_call()
    except (ValueError, ProtocolViolation) as exc:
        try:
            got = c_call()
        except (ValueError, ProtocolViolation) as c_exc:
            assert type(c_exc) is type(exc) and str(c_exc) == str(exc), (repr(c_exc), repr(exc))
            return None
        raise AssertionError(f"C accepted what the reference refuses ({exc}): {got!r}") from None
    got = c_call()
    assert got == want, (got, want)
    return got


def xsk_frame(data: bytes) -> None:
    inp = Input(data)
    flags = inp.int(1)
    raw_template = inp.bytes(inp.int(1) % 80) if flags & 4 else None
    frame = inp.rest()
    xsk = load("_xsk")
    v4mapped, ifindex = bool(flags & 1), (flags >> 4)
    _same(lambda: xsk.parse_frame(frame, v4mapped, ifindex), lambda: xsk_frames.parse_frame(frame, v4mapped, ifindex))
    template = _same(lambda: xsk.reply_template(frame), lambda: xsk_frames.reply_template(frame))
    payload = frame[-(flags >> 3):] if flags >> 3 else b""
    for t in (template, raw_template):
        if t is not None:
            _same(lambda t=t: xsk.udp_frame(t, payload), lambda t=t: xsk_frames.udp_frame(t, payload))


def xsk_frame_seeds() -> List[bytes]:
    """Frames of every shape the parser takes, behind a flags byte (and a template's
    length byte where flag 4 asks for one), so mutation starts from frames that parse."""
    from tests.support import frames as f
    pl = bytes(range(40))
    shapes = [
        f.udp4_frame(pl), f.udp4_frame(pl, vlans=[(f.ETH_P_8021Q, 5)]), f.udp4_frame(b"", options=bytes(8)),
        f.udp4_frame(pl, vlans=[(f.ETH_P_8021AD, 7)]) + bytes(12),          # Ethernet padding
        f.udp4_frame(pl, frag_off=3), f.udp6_frame(pl), f.udp6_frame(pl, src="fe80::1"),
        f.udp6_frame(pl, src="::ffff:10.0.0.1"), f.udp6_frame(pl, src="::10.0.0.1"),
        f.udp6_frame(pl, exts=f.dst_opts_chain(2) + [(f.ROUTING, f.ext_routing(0, 1))]),
        f.udp6_frame(pl, exts=f.dst_opts_chain(6)), f.udp6_frame(pl, exts=f.dst_opts_chain(7)),
        f.udp6_frame(pl, exts=[(f.HOPOPTS, f.ext_opts(0)), (f.FRAGMENT, f.ext_frag(0))]),
    ]
    return [bytes([flags]) + shape for shape in shapes for flags in (0x00, 0x01, 0x21, 0x50)]


# --------------------------------------------------------------------------------------
# the ACK and STREAM frames of a small record
def frames(data: bytes) -> None:
    """Flags byte 1: decode the rest as a plaintext. Flags byte 0: encode the call the rest
    spells (range count, ranges as u64 pairs, delay, offset, data length, data), then decode
    what both encoded."""
    inp = Input(data)
    codec = load("_frames")
    if inp.int(1) & 1:
        plaintext = inp.rest()
        _same(lambda: codec.decode_ack_stream(plaintext), lambda: wire.decode_ack_stream_ref(plaintext))
        return
    count = inp.int(1) % 72
    ranges = None if count == 71 else tuple((inp.int(8), inp.int(8)) for _ in range(count))
    delay = inp.int(5) - 16                             # negative now and then
    offset = inp.int(9) - 256                           # out of u64 both ways now and then
    data_len = inp.int(2)
    payload = None if data_len == 0xFFFF else inp.bytes(data_len % 1400)
    out = _same(lambda: codec.encode_ack_stream(ranges, delay, offset, payload),
                lambda: wire.encode_ack_stream_ref(ranges, delay, offset, payload))
    if out is not None:
        _same(lambda: codec.decode_ack_stream(out), lambda: wire.decode_ack_stream_ref(out))


def frames_seeds() -> List[bytes]:
    """Plaintexts of every frame type and of ACK then STREAM (decode), and encode calls with
    one, several and MAX_ACK_RANGES ranges."""
    every = [wire.encode_stream(5, b"hello", True), wire.encode_ack([(40, 50), (20, 30), (0, 3)], 9),
             wire.encode_frame(wire.MaxDataFrame(1 << 30)), wire.encode_frame(wire.PingFrame()),
             wire.encode_frame(wire.CloseFrame(1, "x")), wire.encode_frame(wire.KeyUpdateFrame(1)), bytes(3),
             wire.encode_frame(wire.ClientAuthFrame(bytes(32), bytes(32))),
             wire.encode_frame(wire.ResetTokenFrame(bytes(16)))]
    seeds = [b"\x01" + f for f in every]
    seeds += [b"\x01" + wire.encode_ack([(9, 12)]) + wire.encode_stream(100, bytes(64)),
              b"\x01" + wire.encode_ack([(200 - 3 * i, 200 - 3 * i) for i in range(64)])]

    def call(ranges, delay, offset, payload):
        head = bytes([0, len(ranges)]) + b"".join(lo.to_bytes(8, "big") + hi.to_bytes(8, "big") for lo, hi in ranges)
        return head + (delay + 16).to_bytes(5, "big") + (offset + 256).to_bytes(9, "big") \
            + len(payload).to_bytes(2, "big") + payload
    seeds += [call([(1, 1)], 0, 0, bytes(64)), call([(30, 40), (10, 20), (0, 5)], 25, 1 << 40, b"echo"),
              call([(500 - 4 * i, 501 - 4 * i) for i in range(64)], 0, 7, b"")]
    return seeds


SEEDS: Dict[str, Callable[[], List[bytes]]] = {"xsk_frame": xsk_frame_seeds, "frames": frames_seeds}

TARGETS: Dict[str, Callable[[bytes], None]] = {
    "open_records": open_records,
    "seal_stream": seal_stream,
    "group_by_cid": group_by_cid,
    "siphash": siphash,
    "xsk_frame": xsk_frame,
    "frames": frames,
}
MODULES = {"open_records": "_aead", "seal_stream": "_aead", "group_by_cid": "_demux", "siphash": "_siphash",
           "xsk_frame": "_xsk", "frames": "_frames"}
