"""libbpf through ctypes: the few bpf(2) commands the XDP datapath needs on fds and ids.

Programs and maps are opened by id (the kernel's names for them, found through netlink
and program info), or by a pin path; maps are read and written element by element. Every
call raises OSError with the errno on failure; map lookups and deletes return None/False
for a missing key instead.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import threading
from typing import Any, Dict, Iterator, Optional, Tuple

from .errors import XdpSetupError

BPF_NOEXIST = 1                   # map_update flag: fail if the key exists
BPF_XDP = 37                      # enum bpf_attach_type: an XDP BPF link


class _LinkCreateOpts(ctypes.Structure):
    """struct bpf_link_create_opts up to `flags` (libbpf takes a shorter struct by its sz)."""
    _fields_ = [("sz", ctypes.c_size_t), ("flags", ctypes.c_uint32)]


class _ProgLoadOpts(ctypes.Structure):
    """struct bpf_prog_load_opts up to log_buf (libbpf takes a shorter struct by its sz)."""
    _fields_ = [("sz", ctypes.c_size_t), ("attempts", ctypes.c_int), ("expected_attach_type", ctypes.c_uint32),
                ("prog_btf_fd", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32), ("prog_ifindex", ctypes.c_uint32),
                ("kern_version", ctypes.c_uint32), ("attach_btf_id", ctypes.c_uint32),
                ("attach_prog_fd", ctypes.c_uint32), ("attach_btf_obj_fd", ctypes.c_uint32),
                ("fd_array", ctypes.c_void_p), ("func_info", ctypes.c_void_p), ("func_info_cnt", ctypes.c_uint32),
                ("func_info_rec_size", ctypes.c_uint32), ("line_info", ctypes.c_void_p),
                ("line_info_cnt", ctypes.c_uint32), ("line_info_rec_size", ctypes.c_uint32),
                ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32), ("log_buf", ctypes.c_char_p)]


class _BpfProgInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32), ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64), ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64), ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32), ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16), ("ifindex", ctypes.c_uint32), ("gpl_compatible", ctypes.c_uint32),
        ("netns_dev", ctypes.c_uint64), ("netns_ino", ctypes.c_uint64),
        ("nr_jited_ksyms", ctypes.c_uint32), ("nr_jited_func_lens", ctypes.c_uint32),
        ("jited_ksyms", ctypes.c_uint64), ("jited_func_lens", ctypes.c_uint64),
        ("btf_id", ctypes.c_uint32), ("func_info_rec_size", ctypes.c_uint32),
        ("func_info", ctypes.c_uint64), ("nr_func_info", ctypes.c_uint32),
        ("nr_line_info", ctypes.c_uint32), ("line_info", ctypes.c_uint64),
        ("jited_line_info", ctypes.c_uint64), ("nr_jited_line_info", ctypes.c_uint32),
        ("line_info_rec_size", ctypes.c_uint32), ("jited_line_info_rec_size", ctypes.c_uint32),
        ("nr_prog_tags", ctypes.c_uint32), ("prog_tags", ctypes.c_uint64),
        ("run_time_ns", ctypes.c_uint64), ("run_cnt", ctypes.c_uint64),
    ]


class _BpfMapInfo(ctypes.Structure):
    _fields_ = [
        ("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32), ("max_entries", ctypes.c_uint32), ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
    ]


class _BpfLinkInfo(ctypes.Structure):
    # struct bpf_link_info: the union after prog_id is 8-byte aligned; its `tracing` member
    # (freplace links too) starts with attach_type, target_obj_id, target_btf_id
    _fields_ = [("type", ctypes.c_uint32), ("id", ctypes.c_uint32), ("prog_id", ctypes.c_uint32),
                ("_pad", ctypes.c_uint32), ("attach_type", ctypes.c_uint32), ("target_obj_id", ctypes.c_uint32),
                ("target_btf_id", ctypes.c_uint32), ("_rest", ctypes.c_uint8 * 100)]


BPF_LINK_TYPE_TRACING = 2         # fentry/fexit and freplace (BPF_PROG_TYPE_EXT) links

_lock = threading.Lock()
_lib: Optional[ctypes.CDLL] = None


def libbpf() -> ctypes.CDLL:
    """libbpf.so with the signatures used here declared (loaded once); XdpSetupError if missing.
    Callers may declare more functions on it (tests run programs with bpf_prog_test_run_opts)."""
    global _lib
    with _lock:
        if _lib is None:
            name = ctypes.util.find_library("bpf") or "libbpf.so.1"
            try:
                lib = ctypes.CDLL(name, use_errno=True)
            except OSError as e:
                raise XdpSetupError(f"libbpf not loadable ({e}); run 'sudo make system-deps'") from None
            vp, cp, u32 = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint32
            for fn, args in {
                "bpf_obj_get": [cp], "bpf_obj_pin": [ctypes.c_int, cp],
                "bpf_map_create": [ctypes.c_int, cp, u32, u32, u32, vp],
                "bpf_prog_get_fd_by_id": [u32], "bpf_map_get_fd_by_id": [u32], "bpf_link_get_fd_by_id": [u32],
                "bpf_link_get_next_id": [u32, ctypes.POINTER(u32)],
                "bpf_obj_get_info_by_fd": [ctypes.c_int, vp, ctypes.POINTER(u32)],
                "bpf_map_lookup_elem": [ctypes.c_int, vp, vp],
                "bpf_map_update_elem": [ctypes.c_int, vp, vp, ctypes.c_uint64],
                "bpf_map_delete_elem": [ctypes.c_int, vp],
                "bpf_map_get_next_key": [ctypes.c_int, vp, vp],
                "libbpf_num_possible_cpus": [],
                "bpf_link_create": [ctypes.c_int, ctypes.c_int, ctypes.c_int, vp],
                "bpf_prog_load": [ctypes.c_int, cp, cp, cp, ctypes.c_size_t, vp],
            }.items():
                f = getattr(lib, fn)
                f.argtypes = args
                f.restype = ctypes.c_int
            _lib = lib
        return _lib


def check(rc: int, what: str) -> int:
    """rc if it is not an error, else OSError naming `what` (libbpf returns -errno, or -1 and errno)."""
    if rc < 0:
        e = -rc if rc != -1 else (ctypes.get_errno() or 1)
        raise OSError(e, f"{what}: {os.strerror(e)}")
    return rc


def map_create(map_type: int, name: str, key_size: int, value_size: int, max_entries: int) -> int:
    """An fd of a new map (BPF_MAP_TYPE_* map_type; bcc cannot declare every type)."""
    return check(libbpf().bpf_map_create(map_type, name.encode(), key_size, value_size, max_entries, None),
                 f"create BPF map {name}")


def prog_load(prog_type: int, name: str, insns: bytes) -> int:
    """An fd of a new program of BPF_PROG_TYPE_* prog_type from raw instructions (struct
    bpf_insn, 8 bytes each). A refusal by the verifier raises OSError whose message ends
    with the verifier's last line, the one that says why. Under the project's license: a
    program calling a GPL-only helper would be refused, and none here needs one."""
    lib = libbpf()
    lic = b"Apache-2.0"
    rc = lib.bpf_prog_load(prog_type, name.encode(), lic, insns, len(insns) // 8, None)
    if rc >= 0:
        return rc
    err = -rc if rc != -1 else (ctypes.get_errno() or 1)
    log = ctypes.create_string_buffer(1 << 16)
    opts = _ProgLoadOpts(sz=ctypes.sizeof(_ProgLoadOpts), log_level=1, log_size=len(log),
                         log_buf=ctypes.cast(log, ctypes.c_char_p))
    rc = lib.bpf_prog_load(prog_type, name.encode(), lic, insns, len(insns) // 8, ctypes.byref(opts))
    if rc >= 0:                                   # it loaded the second time: keep it
        return rc
    lines = [ln for ln in log.value.decode(errors="replace").splitlines()
             if ln.strip() and not ln.startswith(("processed ", "verification time"))]
    raise OSError(err, f"load BPF program {name}: {os.strerror(err)}" + (f" (verifier: {lines[-1]})" if lines else ""))


def prog_fd_by_id(prog_id: int) -> int:
    return check(libbpf().bpf_prog_get_fd_by_id(prog_id), f"open BPF program id {prog_id}")


def map_fd_by_id(map_id: int) -> int:
    return check(libbpf().bpf_map_get_fd_by_id(map_id), f"open BPF map id {map_id}")


def obj_get(path: str) -> int:
    """An fd of the object pinned at path."""
    return check(libbpf().bpf_obj_get(path.encode()), f"open pinned object {path}")


def pin(fd: int, path: str) -> None:
    check(libbpf().bpf_obj_pin(fd, path.encode()), f"pin {path}")


def xdp_link_create(prog_fd: int, ifindex: int, flags: int) -> int:
    """An fd of a new BPF link attaching the XDP program to the interface (flags: the
    XDP_FLAGS_* mode). The program stays attached while the link fd is open and detaches
    when the last one closes, with no privilege needed for that."""
    opts = _LinkCreateOpts(ctypes.sizeof(_LinkCreateOpts), flags)
    return check(libbpf().bpf_link_create(prog_fd, ifindex, BPF_XDP, ctypes.byref(opts)),
                 f"attach XDP program (BPF link) to ifindex {ifindex}")


def prog_info(fd: int) -> Dict[str, Any]:
    """id, name, map ids and (with kernel.bpf_stats_enabled=1) run_time_ns / run_cnt."""
    lib = libbpf()
    info = _BpfProgInfo()
    n = ctypes.c_uint32(ctypes.sizeof(info))
    check(lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(n)), "BPF program info")
    count = info.nr_map_ids
    ids = (ctypes.c_uint32 * max(count, 1))()
    info2 = _BpfProgInfo()
    info2.nr_map_ids = count
    info2.map_ids = ctypes.addressof(ids)
    n = ctypes.c_uint32(ctypes.sizeof(info2))
    check(lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info2), ctypes.byref(n)), "BPF program info")
    return {"id": info.id, "name": info.name.decode(errors="replace"), "type": info.type,
            "map_ids": list(ids[:min(count, info2.nr_map_ids)]),
            "run_time_ns": info2.run_time_ns, "run_cnt": info2.run_cnt}


def map_info(fd: int) -> Dict[str, Any]:
    info = _BpfMapInfo()
    n = ctypes.c_uint32(ctypes.sizeof(info))
    check(libbpf().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(n)), "BPF map info")
    return {"id": info.id, "name": info.name.decode(errors="replace"), "type": info.type,
            "key_size": info.key_size, "value_size": info.value_size, "max_entries": info.max_entries,
            "map_flags": info.map_flags}


def map_lookup(fd: int, key: bytes, value_size: int) -> Optional[bytes]:
    """The value stored under key (value_size bytes: per-CPU maps hold one per possible CPU,
    each rounded up to 8 bytes), None if there is none."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value_size)
    rc = libbpf().bpf_map_lookup_elem(fd, k, v)
    if rc < 0:
        if -rc == errno.ENOENT or ctypes.get_errno() == errno.ENOENT:
            return None
        check(rc, "BPF map lookup")
    return v.raw


def map_update(fd: int, key: bytes, value: bytes, flags: int = 0) -> bool:
    """False if flags=BPF_NOEXIST and the key exists."""
    k = ctypes.create_string_buffer(key, len(key))
    v = ctypes.create_string_buffer(value, len(value))
    rc = libbpf().bpf_map_update_elem(fd, k, v, flags)
    if rc < 0 and flags & BPF_NOEXIST and (-rc == errno.EEXIST or ctypes.get_errno() == errno.EEXIST):
        return False
    check(rc, "BPF map update")
    return True


def map_delete(fd: int, key: bytes) -> bool:
    """False if there was no such key."""
    k = ctypes.create_string_buffer(key, len(key))
    rc = libbpf().bpf_map_delete_elem(fd, k)
    if rc < 0:
        if -rc == errno.ENOENT or ctypes.get_errno() == errno.ENOENT:
            return False
        check(rc, "BPF map delete")
    return True


def map_keys(fd: int, key_size: int, limit: int) -> Iterator[bytes]:
    """The map's keys, at most limit of them (a map changing meanwhile may repeat or skip some)."""
    lib = libbpf()
    prev = None
    nxt = ctypes.create_string_buffer(key_size)
    for _ in range(limit):
        if lib.bpf_map_get_next_key(fd, prev, nxt) < 0:
            return
        yield nxt.raw
        prev = ctypes.create_string_buffer(nxt.raw, key_size)


def freplace_links() -> Iterator[Tuple[int, int]]:
    """(target program id, replacing program id) of every freplace link in the system: the
    programs libxdp's dispatcher runs are linked to it this way."""
    lib = libbpf()
    cur, nxt = 0, ctypes.c_uint32()
    while lib.bpf_link_get_next_id(cur, ctypes.byref(nxt)) == 0:
        cur = nxt.value
        try:
            fd = check(lib.bpf_link_get_fd_by_id(cur), f"open BPF link id {cur}")
        except OSError:
            continue                              # gone meanwhile
        try:
            info = _BpfLinkInfo()
            n = ctypes.c_uint32(ctypes.sizeof(info))
            if lib.bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(n)) == 0 \
                    and info.type == BPF_LINK_TYPE_TRACING and info.target_obj_id:
                yield info.target_obj_id, info.prog_id
        finally:
            os.close(fd)


def possible_cpus() -> int:
    return check(libbpf().libbpf_num_possible_cpus(), "possible CPUs")
