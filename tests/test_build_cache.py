"""The build cache of the clang build (stcp/datapath/build_cache.py, xdp_object.build_object):
an attach that finds its build cached compiles nothing; a changed -D value, source or
header compiles anew; a damaged entry is built again, never loaded; a cache directory it
may not trust or write is passed over, and the build still succeeds. clang is counted by
running it through a wrapper ($STCP_CLANG) that logs each compile."""
from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from stcp.datapath.xdp_object import build_object, find_clang
from stcp.datapath.xdp_prog import bpf_source_dir


@pytest.fixture(scope="module")
def clang(tmp_path_factory):
    """A wrapper around clang that appends a line to its log for each compile (-c)."""
    real = find_clang()
    if real is None:
        pytest.skip("the clang build needs clang (scripts/system-deps.sh installs it)")
    d = tmp_path_factory.mktemp("clang")
    log = d / "compiles"
    log.touch()
    wrapper = d / "clang"
    wrapper.write_text(f'#!/bin/sh\ncase " $* " in *" -c "*) echo x >> {log};; esac\nexec {real} "$@"\n')
    wrapper.chmod(0o755)
    return wrapper, log


@pytest.fixture
def build(clang, tmp_path, monkeypatch):
    """build(**sizes) -> (the object's bytes, compiles it took), with a cache of the test's own."""
    wrapper, log = clang
    monkeypatch.setenv("STCP_CLANG", str(wrapper))
    monkeypatch.setenv("STCP_CACHE_DIR", str(tmp_path / "cache"))
    n = [0]

    def run(**sizes) -> tuple:
        n[0] += 1
        out = tmp_path / f"build{n[0]}"
        out.mkdir()
        before = len(log.read_text().splitlines())
        data = Path(build_object(str(out), **sizes)).read_bytes()
        return data, len(log.read_text().splitlines()) - before

    return run


def entries(tmp_path: Path) -> list:
    return sorted((tmp_path / "cache").glob("stcp_xdp-*.o"))


def test_a_cached_build_is_reused_and_a_changed_define_rebuilt(build, tmp_path):
    first, compiles = build(max_cids=4096)
    assert compiles == 1 and first[:4] == b"\x7fELF"
    again, compiles = build(max_cids=4096)
    assert compiles == 0 and again == first
    other, compiles = build(max_cids=8192)
    assert compiles == 1 and other != first
    assert len(entries(tmp_path)) == 2
    assert stat.S_IMODE((tmp_path / "cache").stat().st_mode) == 0o700


def test_a_changed_source_or_header_is_rebuilt(build, tmp_path, monkeypatch):
    src = tmp_path / "bpf"
    shutil.copytree(bpf_source_dir(), src)
    monkeypatch.setenv("STCP_BPF_DIR", str(src))
    base, compiles = build()
    assert compiles == 1 and build() == (base, 0)
    with open(src / "stcp_xdp.c", "a") as f:
        f.write("\n/* edited */\n")
    edited, compiles = build()
    assert compiles == 1 and build() == (edited, 0)
    wire = (src / "stcp_wire.h").read_text()
    guard_end = wire.rindex("#endif")
    (src / "stcp_wire.h").write_text(wire[:guard_end] + "struct stcp_cache_probe { __u32 x; };\n" + wire[guard_end:])
    header, compiles = build()
    assert compiles == 1 and header != edited
    assert len(entries(tmp_path)) == 3


def test_a_damaged_entry_is_rebuilt_not_loaded(build, tmp_path):
    good, _ = build(max_cids=4096)
    [entry] = entries(tmp_path)
    raw = entry.read_bytes()
    i = len(raw) - 100
    for damaged in (raw[:len(raw) // 2],                                 # a partial write
                    raw[:i] + bytes([raw[i] ^ 1]) + raw[i + 1:]):        # one byte of the object changed
        entry.write_bytes(damaged)
        rebuilt, compiles = build(max_cids=4096)
        assert compiles == 1 and rebuilt == good
        assert entry.read_bytes() == raw                # repaired: the next attach uses it
    assert build(max_cids=4096) == (good, 0)


def test_an_unusable_cache_is_passed_over(build, tmp_path, monkeypatch):
    """A cache directory that cannot be made (here: below a file) costs the build nothing
    but its speed."""
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("STCP_CACHE_DIR", str(tmp_path / "file" / "cache"))
    for _ in range(2):
        data, compiles = build(max_cids=4096)
        assert compiles == 1 and data[:4] == b"\x7fELF"


def test_a_cache_others_may_write_is_not_used(build, tmp_path, caplog):
    """What the cache holds goes into the kernel: a directory another user could write
    to is neither read nor written."""
    good, _ = build(max_cids=4096)
    (tmp_path / "cache").chmod(0o777)
    data, compiles = build(max_cids=4096)
    assert compiles == 1 and data == good
    assert "not using the build cache" in caplog.text
    (tmp_path / "cache").chmod(0o700)
    assert build(max_cids=4096) == (good, 0)
