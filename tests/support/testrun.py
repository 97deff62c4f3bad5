"""The XDP program loaded but never attached, run on crafted frames with BPF_PROG_TEST_RUN.

A program that is not attached runs only when a test runs it, so each run moves exactly one
verdict counter: run() returns the XDP action and that verdict. Either build of
bpf/stcp_xdp.c: bcc's (as the AF_XDP datapath loads it) or clang's (the object libxdp
attaches, stcp/datapath/xdp_object.py), loaded here as a plain XDP program with libbpf.
Needs root and the build's toolchain; require_testrun() skips with the reason otherwise.
"""
from __future__ import annotations

import ctypes
import os
import struct
from typing import Dict, Optional, Tuple

import pytest

XDP_ABORTED, XDP_DROP, XDP_PASS, XDP_TX, XDP_REDIRECT = 0, 1, 2, 3, 4
PORT = 4433
# BPF_PROG_TEST_RUN takes frames from the Ethernet header up to a page less XDP's headroom
# and tailroom
MIN_FRAME, MAX_FRAME = 14, 3000


class Opts(ctypes.Structure):           # struct bpf_test_run_opts (libbpf)
    _fields_ = [("sz", ctypes.c_size_t), ("data_in", ctypes.c_void_p), ("data_out", ctypes.c_void_p),
                ("data_size_in", ctypes.c_uint32), ("data_size_out", ctypes.c_uint32),
                ("ctx_in", ctypes.c_void_p), ("ctx_out", ctypes.c_void_p), ("ctx_size_in", ctypes.c_uint32),
                ("ctx_size_out", ctypes.c_uint32), ("retval", ctypes.c_uint32), ("repeat", ctypes.c_int),
                ("duration", ctypes.c_uint32), ("flags", ctypes.c_uint32), ("cpu", ctypes.c_uint32),
                ("batch_size", ctypes.c_uint32)]


BUILDS = ("bcc", "clang")
# map types (include/uapi/linux/bpf.h) whose entries always exist: reset() zeroes them
_ARRAYS = {2, 6}            # BPF_MAP_TYPE_ARRAY, BPF_MAP_TYPE_PERCPU_ARRAY
_PERCPU = {6}


def require_testrun(build: str = "bcc") -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to load BPF programs")
    try:
        from stcp.datapath import bpf, libxdp, xdp_prog
        from stcp.datapath.xdp_object import find_clang
        bpf.libbpf()
        if build == "bcc":
            xdp_prog.check_toolchain()
        elif find_clang() is None:
            pytest.skip("the clang build needs clang (scripts/system-deps.sh installs it)")
        else:
            why = libxdp.available()
            if why:
                pytest.skip(why)
    except Exception as e:  # XdpSetupError with the reason
        pytest.skip(f"XDP toolchain unavailable: {e}")


_OBJECT: list = []          # the clang build's ObjectDir, made once per test process


def _clang_object() -> str:
    """The path of bpf/stcp_xdp.c built by clang with the default sizes, built on first use:
    an object file is only read, and each load of it makes maps of its own, so one build
    serves every module (removed when the process exits)."""
    if not _OBJECT:
        import atexit

        from stcp.datapath.xdp_object import ObjectDir
        _OBJECT.append(ObjectDir())
        atexit.register(_OBJECT[0].close)
    return _OBJECT[0].path


class _ClangBuild:
    """bpf/stcp_xdp.c built by clang, loaded as a plain XDP program through libbpf."""

    def __init__(self):
        from stcp.datapath import libxdp
        from stcp.datapath.xdp_prog import PROG_NAME
        _xdp, self.lib, _ = libxdp.libraries()
        self.obj = self.lib.bpf_object__open_file(_clang_object().encode(), None)
        assert self.obj, "libbpf could not open the clang build"
        rc = self.lib.bpf_object__load(self.obj)
        assert rc == 0, f"loading the clang build failed: {os.strerror(-rc)}"
        self.fd = self.lib.bpf_program__fd(self.lib.bpf_object__find_program_by_name(self.obj, PROG_NAME.encode()))

    def close(self) -> None:
        self.lib.bpf_object__close(self.obj)


class LoadedProg:
    """The plain (not afxdp) program with its maps, built by bcc or clang; configure()
    writes stcp_config."""

    def __init__(self, build: str = "bcc"):
        from stcp.datapath import bpf, xdp_prog
        from stcp.datapath.xdp import XdpDatapath
        self.xdp = xdp_prog
        self.bpf = bpf
        self.build = build
        if build == "bcc":
            self.b, fn = xdp_prog.compile_prog()
            fd = fn.fd
        else:
            self.b = _ClangBuild()
            fd = self.b.fd
        self.h = xdp_prog.open_prog(bpf.prog_info(fd)["id"])
        self.dp = XdpDatapath("test", 0, "none", self.h, False, None, None)   # add_cid on these maps
        self.global_fd = self._map_fd("stcp_buckets")
        self.lib = bpf.libbpf()
        self.lib.bpf_prog_test_run_opts.argtypes = [ctypes.c_int, ctypes.POINTER(Opts)]
        self._counts = self.counts()
        self.out = b""

    def reset(self) -> None:
        """Every map as a fresh load leaves it (hash maps empty, arrays zeroed: the config,
        the counters, the CID filter, the buckets) and a new XdpDatapath over them, so one
        load serves many modules as if each had loaded its own: the program's code does not
        change between loads, only its maps' contents do."""
        from stcp.datapath.xdp import XdpDatapath
        b = self.bpf
        ncpus = b.possible_cpus()
        for mid in b.prog_info(self.h.prog_fd)["map_ids"]:
            fd = b.map_fd_by_id(mid)
            try:
                info = b.map_info(fd)
                if info["type"] in _ARRAYS:
                    size = info["value_size"]
                    if info["type"] in _PERCPU:
                        size = (size + 7) // 8 * 8 * ncpus
                    for i in range(info["max_entries"]):
                        b.map_update(fd, struct.pack("=I", i), bytes(size))
                else:
                    for k in list(b.map_keys(fd, info["key_size"], 1 << 24)):
                        b.map_delete(fd, k)
                    assert next(b.map_keys(fd, info["key_size"], 1), None) is None, info["name"]
            finally:
                os.close(fd)
        self.dp = XdpDatapath("test", 0, "none", self.h, False, None, None)
        self._counts = self.counts()
        assert not any(self._counts.values()), self._counts
        self.out = b""

    def _map_fd(self, name: str) -> int:
        b = self.bpf
        for mid in b.prog_info(self.h.prog_fd)["map_ids"]:
            fd = b.map_fd_by_id(mid)
            if b.map_info(fd)["name"] == name:
                return fd
            os.close(fd)
        raise AssertionError(f"the program has no map {name}")

    def configure(self, port: int = PORT, max_record_len: Optional[int] = None, hs_rate: int = 1_000_000,
                  hs_burst: int = 1_000_000, **hello) -> None:
        """Defaults: hellos and COOKIE replies limited by nothing a test reaches (1e6/s per
        source, no global budget unless hello names one), no unknown-CID record let through."""
        x = self.xdp
        hello.setdefault("hs_global_rate", 0)
        hello.setdefault("ck_rate", 1_000_000)
        hello.setdefault("ck_burst", 1_000_000)
        hello.setdefault("uk_rate", 0)
        x.write_config(self.h, port, x.DEFAULT_MAX_RECORD_LEN if max_record_len is None else max_record_len,
                       hs_rate, hs_burst, **hello)

    def set_cookie_keys(self, current: Optional[bytes], previous: Optional[bytes] = None,
                        expires_ns: int = 1 << 62) -> None:
        """Write the cookie keys as a server would (current None: remove them)."""
        from stcp.datapath import xdp_cookie
        fd = self.h.maps["cookie"]
        if current is None:
            xdp_cookie.clear_keys(fd)
        else:
            self.bpf.map_update(fd, struct.pack("=I", 0), xdp_cookie.pack_keys(current, previous, expires_ns))

    def reset_buckets(self) -> None:
        """Empty the per-source LRU, refill the shared buckets, end cookie mode."""
        b = self.bpf
        fd = self.h.maps["hs_bucket"]
        for k in list(b.map_keys(fd, 16, 1 << 20)):
            b.map_delete(fd, k)
        for i in range(3):                 # the global hello budget, unknown CIDs, cookie mode (off)
            b.map_update(self.global_fd, struct.pack("=I", i), struct.pack("=Q", 0))

    def run(self, frame: bytes) -> Tuple[int, str]:
        """(XDP action, the verdict whose counter moved) for one frame; the frame as the
        program left it (what XDP_TX sends) is in self.out."""
        assert MIN_FRAME <= len(frame) <= MAX_FRAME, len(frame)
        buf = ctypes.create_string_buffer(frame, len(frame))
        out = ctypes.create_string_buffer(MAX_FRAME + 256)
        o = Opts(sz=ctypes.sizeof(Opts), data_in=ctypes.addressof(buf), data_size_in=len(frame),
                 data_out=ctypes.addressof(out), data_size_out=len(out), repeat=1)
        rc = self.lib.bpf_prog_test_run_opts(self.h.prog_fd, ctypes.byref(o))
        assert rc == 0, f"BPF_PROG_TEST_RUN failed: {os.strerror(-rc if rc < 0 else ctypes.get_errno())}"
        self.out = out.raw[:o.data_size_out]
        after = self.counts()
        moved = [k for k in after if after[k] != self._counts[k]]
        assert len(moved) == 1 and after[moved[0]] == self._counts[moved[0]] + 1, (moved, frame.hex())
        self._counts = after
        return o.retval, moved[0]

    def counts(self) -> Dict[str, int]:
        return {k: p for k, (p, _b) in self.xdp.read_counters(self.h).items()}

    def close(self) -> None:
        os.close(self.global_fd)
        self.dp.close()
        if self.build == "bcc":
            self.xdp.release_bcc(self.b)
        else:
            self.b.close()
