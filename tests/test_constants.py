"""Constants shared by C (bpf/stcp_wire.h) and Python must agree; no root needed."""
from __future__ import annotations

import re
import struct
from pathlib import Path

import pytest

from stcp import wire
from stcp.datapath import verdicts, xdp_prog as xdp

HEADER = Path(__file__).resolve().parent.parent / "bpf" / "stcp_wire.h"


def _text() -> str:
    # drop comments so commented-out values cannot match
    src = HEADER.read_text()
    src = re.sub(r"/\*.*?\*/", "", src, flags=re.S)
    return re.sub(r"//[^\n]*", "", src)


def _defines() -> dict[str, int]:
    out = {}
    for name, value in re.findall(r"^\s*#define\s+(STCP_\w+)\s+(\(?[0-9xXa-fA-F]+\)?)\s*$", _text(), flags=re.M):
        out[name] = int(value.strip("()"), 0)
    return out


def _enum() -> dict[str, int]:
    m = re.search(r"enum\s+stcp_verdict\s*\{(.*?)\}", _text(), flags=re.S)
    assert m, "enum stcp_verdict not found in bpf/stcp_wire.h"
    out = {}
    for name, value in re.findall(r"(STCP_V_\w+)\s*=\s*(\d+)", m.group(1)):
        out[name] = int(value)
    return out


def test_header_parses():
    d = _defines()
    assert "STCP_HEADER_LEN" in d and len(d) >= 10


@pytest.mark.parametrize("name", sorted(n for n in _defines() if hasattr(wire, n[len("STCP_"):])))
def test_wire_constant_matches(name):
    assert _defines()[name] == getattr(wire, name[len("STCP_"):]), f"{name} in bpf/stcp_wire.h != stcp.wire"


def test_every_wire_mirror_exists():
    """The constants the XDP program depends on are all mirrored (and so all checked)."""
    needed = {"HEADER_LEN", "AEAD_TAG_LEN", "HANDSHAKE_PAYLOAD_LEN", "HANDSHAKE_RECORD_LEN", "HANDSHAKE_SEQ",
              "HS_CLIENT_HELLO", "HS_SERVER_HELLO", "HS_REJECT", "DEFAULT_MAX_DATAGRAM", "MAX_UDP_PAYLOAD",
              "EPOCH_SHIFT", "CID_WORKER_BITS", "CID_WORKER_SHIFT", "HS_COOKIE", "PROTOCOL_VERSION",
              "COOKIE_LEN", "CLIENT_HELLO_COOKIE_OFFSET", "RESET_RECORD_LEN"}
    missing = {n for n in needed if f"STCP_{n}" not in _defines()}
    assert not missing, f"bpf/stcp_wire.h lacks STCP_{missing}"
    # every STCP_* define is either a wire constant or a declared C-only one
    c_only = {"STCP_MAX_CIDS", "STCP_HS_SOURCES", "STCP_MAP_ABI", "STCP_CID_FILTER_WORDS", "STCP_HALF_OPEN"}
    unknown = {n for n in _defines() if n not in c_only and not hasattr(wire, n[len("STCP_"):])}
    assert not unknown, f"defines with no stcp.wire counterpart: {unknown}"


def test_map_abi_matches_loader():
    assert _defines()["STCP_MAP_ABI"] == xdp.MAP_ABI
    assert _defines()["STCP_MAX_CIDS"] == xdp.DEFAULT_MAX_CIDS
    assert _defines()["STCP_HALF_OPEN"] == xdp.DEFAULT_HALF_OPEN
    assert _defines()["STCP_HS_SOURCES"] == xdp.DEFAULT_HS_SOURCES
    assert _defines()["STCP_CID_FILTER_WORDS"] == xdp.CID_FILTER_WORDS


def test_cid_filter_slot_matches_c():
    """cid_slot() in bpf/stcp_xdp.c folds the wire-order u64; xdp.cid_filter_slot mirrors it."""
    src = (HEADER.parent / "stcp_xdp.c").read_text()
    assert "((__u32)raw ^ (__u32)(raw >> 32)) & (STCP_CID_FILTER_SLOTS - 1)" in src
    cid = 0x0102030405060708
    raw = int.from_bytes(cid.to_bytes(8, "big"), "little")
    assert xdp.cid_filter_slot(cid) == ((raw & 0xFFFFFFFF) ^ (raw >> 32)) % xdp.CID_FILTER_SLOTS
    # the top byte of a CID (its worker) changes the slot
    assert xdp.cid_filter_slot(cid) != xdp.cid_filter_slot(cid ^ (0xFF << 56))


def test_verdict_enum_matches_python():
    c = _enum()
    py = {f"STCP_V_{v.name}": int(v) for v in verdicts.Verdict}
    py["STCP_V_MAX"] = verdicts.VERDICT_MAX
    assert c == py


def test_verdicts_dense_and_named():
    values = sorted(int(v) for v in verdicts.Verdict)
    assert values == list(range(len(values)))
    for v in verdicts.Verdict:
        assert v.name.startswith(("PASS_", "DROP_", "TX_"))
    assert {v.key for v in verdicts.PASS_VERDICTS} == {"pass_not_stcp", "pass_handshake", "pass_data",
                                                       "pass_cookie", "pass_half_open",
                                                       "pass_unknown_cid_sampled"}
    assert {v.key for v in verdicts.TX_VERDICTS} == {"tx_cookie"}
    assert set(verdicts.Verdict) == set(verdicts.PASS_VERDICTS + verdicts.DROP_VERDICTS + verdicts.TX_VERDICTS)


def _struct_format(name: str) -> str:
    """The struct module format of a C struct of __u32/__u64 fields and __u64 arrays."""
    body = re.search(rf"struct {name}\s*\{{(.*?)\}};", _text(), flags=re.S).group(1)
    fmt = "="
    for bits, n in re.findall(r"__u(\d+)\s+\w+(?:\[(\d+)\])?;", body):
        fmt += {"32": "I", "64": "Q"}[bits] * int(n or 1)
    return fmt


def test_struct_layouts_match_c():
    """struct stcp_config / stcp_counter / stcp_cookie_keys as declared in C vs the struct
    formats in xdp_prog.py and xdp_cookie.py."""
    from stcp.datapath import xdp_cookie
    src = _text()
    fmt = _struct_format("stcp_config")
    assert struct.calcsize(fmt) == xdp.CONFIG.size and fmt == xdp.CONFIG.format
    # the keys: two secrets of 16 bytes (two words each), expiry, flag, reserved
    assert struct.calcsize(_struct_format("stcp_cookie_keys")) == xdp_cookie.KEYS.size
    assert _struct_format("stcp_cookie_keys") == "=QQQQQII" and xdp_cookie.KEYS.format == "=16s16sQII"
    assert struct.calcsize(_struct_format("stcp_prefix_buckets")) == 16
    cnt = re.search(r"struct stcp_counter\s*\{(.*?)\};", src, flags=re.S).group(1)
    assert re.findall(r"__u(\d+)\s+\w+;", cnt) == ["64", "64"] and xdp.COUNTER.size == 16


def test_cid_worker_bits():
    """The CID structure of PROTOCOL.md section 3.1.1: worker in the top bits, then the
    server id, the rest random, enough random bits against off-path guessing, and room for
    every RX queue's worker; the XDP program reads the worker byte by the shared shift (the
    reuseport program, stcp/datapath/reuseport_prog.py, takes it from stcp/wire.py)."""
    from stcp import cid_layout
    assert wire.CID_WORKER_SHIFT == 64 - wire.CID_WORKER_BITS
    assert wire.MAX_CID_WORKERS == 1 << wire.CID_WORKER_BITS >= xdp.XSK_MAX
    assert cid_layout.random_bits(cid_layout.MAX_SERVER_ID_BITS) == cid_layout.MIN_RANDOM_BITS >= 32
    assert cid_layout.random_bits(0) == 64 - wire.CID_WORKER_BITS == 56
    src = (HEADER.parent / "stcp_xdp.c").read_text()
    assert "__builtin_bswap64(raw_cid) >> STCP_CID_WORKER_SHIFT" in src
    doc = (HEADER.parent.parent / "docs" / "PROTOCOL.md").read_text()
    top = 63 - wire.CID_WORKER_BITS + 1
    assert (f"cid = worker (bits 63..{top}, u8) || server id (B bits, 0 <= B <= {cid_layout.MAX_SERVER_ID_BITS}) "
            f"|| random ({64 - wire.CID_WORKER_BITS} - B bits)") in doc
    assert f"never fewer than {cid_layout.MIN_RANDOM_BITS}" in doc
    assert f"default B = {cid_layout.DEFAULT_SERVER_ID_BITS}" in doc


def test_steering_verdict_and_config_field():
    assert verdicts.Verdict.DROP_WRONG_WORKER.key == "drop_wrong_worker"
    cfg = re.search(r"struct stcp_config\s*\{(.*?)\};", _text(), flags=re.S).group(1)
    assert re.search(r"__u32\s+nworkers;", cfg), "struct stcp_config lacks nworkers"


def test_reuseport_socket_options_match_kernel_headers():
    from stcp.datapath import reuseport
    header = Path("/usr/include/asm-generic/socket.h")
    if not header.is_file():
        pytest.skip(f"{header} not installed (linux-libc-dev)")
    defs = dict(re.findall(r"#define\s+(SO_\w+)\s+(\d+)", header.read_text()))
    for name in ("SO_ATTACH_REUSEPORT_EBPF", "SO_DETACH_REUSEPORT_BPF", "SO_COOKIE"):
        assert int(defs[name]) == getattr(reuseport, name), name


def test_reuseport_program_matches_kernel_headers():
    """The steering program is raw instructions: its helper ids, map-fd marker and context
    offsets are the kernel's (linux/bpf.h: helpers numbered by their place in the mapper)."""
    from stcp.datapath import reuseport_prog as rp
    header = Path("/usr/include/linux/bpf.h")
    if not header.is_file():
        pytest.skip(f"{header} not installed (linux-libc-dev)")
    src = header.read_text()
    mapper = src[src.index("#define __BPF_FUNC_MAPPER(FN)"):]
    helpers = re.findall(r"FN\((\w+)", mapper)
    for name, value in (("map_lookup_elem", rp.MAP_LOOKUP_ELEM), ("skb_load_bytes", rp.SKB_LOAD_BYTES),
                        ("sk_select_reuseport", rp.SK_SELECT_REUSEPORT)):
        assert helpers.index(name) == value, name
    assert re.search(rf"#define\s+BPF_PSEUDO_MAP_FD\s+{rp.BPF_PSEUDO_MAP_FD}\b", src)
    md = re.search(r"struct sk_reuseport_md \{(.*?)\n\};", src, flags=re.S).group(1)
    md = re.sub(r"/\*.*?\*/", "", md, flags=re.S)
    off, offsets = 0, {}
    for m in re.finditer(r"__bpf_md_ptr\([^,]+,\s*(\w+)\)|__u32\s+(\w+);", md):
        if m.group(1):
            off = (off + 7) // 8 * 8
            offsets[m.group(1)] = off
            off += 8
        else:
            offsets[m.group(2)] = off
            off += 4
    assert (offsets["len"], offsets["ip_protocol"]) == (rp.CTX_LEN, rp.CTX_IP_PROTOCOL)


def test_parse_limits_match_the_model():
    """The model the fuzz test checks the program against (tests/support/xdp_model.py) walks as far
    as bpf/stcp_xdp.c does: the same VLAN depth, extension-header count and header kinds, and
    the same longest GSO/GRO batch."""
    import socket

    from tests.support import xdp_model
    src = (HEADER.parent / "stcp_xdp.c").read_text()
    limits = dict(re.findall(r"^#define\s+(VLAN_MAX_DEPTH|IPV6_EXT_MAX|STCP_BATCH_MAX)\s+(\d+)", src, flags=re.M))
    assert {k: int(v) for k, v in limits.items()} == {"VLAN_MAX_DEPTH": xdp_model.VLAN_MAX_DEPTH,
                                                      "IPV6_EXT_MAX": xdp_model.IPV6_EXT_MAX,
                                                      "STCP_BATCH_MAX": xdp_model.BATCH_MAX}
    body = re.search(r"int ipv6_walkable\(__u8 nexthdr\)\s*\{(.*?)\}", src, flags=re.S).group(1)
    walked = {getattr(socket, name) for name in re.findall(r"IPPROTO_\w+", body)}
    assert walked == set(xdp_model.WALKED)
    cfg = xdp_model.Config()
    assert (cfg.hs_prefix4, cfg.hs_prefix6, cfg.max_record_len) == \
        (xdp.DEFAULT_HS_PREFIX4, xdp.DEFAULT_HS_PREFIX6, xdp.DEFAULT_MAX_RECORD_LEN)


def test_fail_closed_and_hello_budget_contract():
    """The fail-closed verdict, the global hello budget's verdict and the config fields
    the loader writes; every verdict is explained in docs/OPERATIONS.md."""
    assert verdicts.Verdict.DROP_UNPARSED.key == "drop_unparsed"
    assert verdicts.Verdict.DROP_HS_GLOBAL.key == "drop_hs_global"
    cfg = re.search(r"struct stcp_config\s*\{(.*?)\};", _text(), flags=re.S).group(1)
    for field in ("hs_prefix4", "hs_prefix6", "hs_global_rate", "hs_global_burst", "hs_global_cost_ns",
                  "hs_global_cap_ns"):
        assert re.search(rf"__u(32|64)\s+{field};", cfg), f"struct stcp_config lacks {field}"
    assert (xdp.DEFAULT_HS_PREFIX4, xdp.DEFAULT_HS_PREFIX6) == (32, 64)
    doc = (HEADER.parent.parent / "docs" / "OPERATIONS.md").read_text()
    for v in verdicts.Verdict:
        assert f"`{v.key}`" in doc, f"docs/OPERATIONS.md does not explain verdict {v.key}"
