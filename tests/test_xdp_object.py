"""The clang build of the XDP program (stcp/datapath/xdp_object.py): the bcc-dialect source
rewritten for bpf/stcp_clang.h, refusals of what it cannot translate, and (root) an object
whose maps are defined exactly as bcc defines them, so either build's maps can be handed
to the other (stcp/datapath/xdp_handover.py). tests/test_xdp_fuzz.py and
tests/test_xdp_failclosed.py run both builds on the same frames."""
from __future__ import annotations

import os
import re

import pytest

from stcp.datapath.errors import XdpSetupError
from stcp.datapath.xdp_object import translate
from stcp.datapath.xdp_prog import MAP_NAMES, bpf_source_dir


def test_translates_the_real_source():
    src = (bpf_source_dir() / "stcp_xdp.c").read_text()
    out = translate(src)
    assert out.count('SEC("xdp") int stcp_xdp(') == 1
    assert not re.search(r"\bstcp_\w+\s*\.\s*(lookup|insert|update|delete|redirect_map)\s*\(", out)
    assert 'BPF_TABLE("' not in out and "BPF_TABLE_lru_hash(struct stcp_src, struct stcp_prefix_buckets, " \
        "stcp_hs_bucket," in out
    assert 'BPF_F_TABLE("' not in out and "BPF_F_TABLE_hash(__u32, struct stcp_cookie_keys, stcp_cookie, 1, " \
        "BPF_F_NO_PREALLOC);" in out
    for name in MAP_NAMES.values():
        assert f"stcp_map_lookup(&{name}, " in out or f"stcp_map_insert(&{name}, " in out, name
    # everything else is untouched: the same lines, in the same order
    assert len(out.splitlines()) == len(src.splitlines())


def test_refuses_what_it_cannot_translate():
    base = "BPF_HASH(m, __u32, __u64, 4);\nint stcp_xdp(struct xdp_md *ctx)\n{\n%s\n\treturn 2;\n}\n"
    assert "stcp_map_update(&m, &k, &v);" in translate(base % "\tm.update(&k, &v);")
    with pytest.raises(XdpSetupError, match=r"m\.increment\(\), which the clang build does not translate"):
        translate(base % "\tm.increment(k);")
    with pytest.raises(XdpSetupError, match="no 'int stcp_xdp"):
        translate("BPF_ARRAY(a, __u64, 1);\nstatic int other(void) { return 0; }\n")
    with pytest.raises(XdpSetupError, match="declares no maps"):
        translate("int stcp_xdp(struct xdp_md *ctx) { return 2; }\n")
    with pytest.raises(XdpSetupError, match="BPF_TABLE"):
        translate('BPF_TABLE("hash", __u32, m, 4);\nint stcp_xdp(struct xdp_md *ctx) { return 2; }\n')
    with pytest.raises(XdpSetupError, match=r"BPF_F_TABLE\(type, key, value, name, size, flags\)"):
        translate('BPF_F_TABLE("hash", __u32, __u64, m, 4);\nint stcp_xdp(struct xdp_md *ctx) { return 2; }\n')


@pytest.mark.root
@pytest.mark.parametrize("afxdp", [False, True], ids=["plain", "afxdp"])
def test_both_builds_define_the_same_maps(tmp_path, afxdp):
    """The object's maps (as libbpf will create them) against the maps of bcc's build,
    loaded: same names, types, key and value sizes, capacities and flags (a map handed over
    must match in all of them), the table sizes taken from the build flags. Either variant:
    a server loads clang's build of each where clang and libxdp are there."""
    from tests.support.testrun import require_testrun
    require_testrun("bcc")
    require_testrun("clang")
    from stcp.datapath import bpf, libxdp, xdp_prog
    from stcp.datapath.xdp_object import build_object

    clang = libxdp.object_maps(build_object(str(tmp_path), max_cids=4096, half_open=512, afxdp=afxdp))
    b, fn = xdp_prog.compile_prog(max_cids=4096, half_open=512, afxdp=afxdp)
    try:
        bcc = {}
        for mid in bpf.prog_info(fn.fd)["map_ids"]:
            fd = bpf.map_fd_by_id(mid)
            try:
                i = bpf.map_info(fd)
                bcc[i["name"]] = (i["type"], i["key_size"], i["value_size"], i["max_entries"], i["map_flags"])
            finally:
                os.close(fd)
    finally:
        xdp_prog.release_bcc(b)
    assert clang == bcc
    assert set(clang) >= set(MAP_NAMES.values())
    assert clang[MAP_NAMES["cids"]][3] == 4096 and clang[MAP_NAMES["half_open"]][3] == 512
    assert clang[MAP_NAMES["cookie"]][4] == 1       # BPF_F_NO_PREALLOC
    assert ("stcp_xsks" in clang) == afxdp
