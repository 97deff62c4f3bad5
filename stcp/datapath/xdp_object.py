"""The STCP XDP program as a libbpf object file, built with clang when it is attached.

libxdp's dispatcher runs several XDP programs on one interface by loading each as a
BPF_PROG_TYPE_EXT program that replaces one of its slots; the kernel checks the slot's
and the program's BTF, so the program must come from an object file with BTF. bcc loads
XDP programs as plain XDP from source it compiles in memory, which the dispatcher cannot
take. So for attaching, bpf/stcp_xdp.c is compiled here with clang into such an object:
same source, same -D map sizes as bcc's build. A build is kept in the build cache
(build_cache.py) under a hash of the compiler, the flags and the preprocessed source, so
an attach builds only what changed since the last. bpf/stcp_clang.h
supplies bcc's map declarations; the few bcc constructs a macro cannot reach are
rewritten in a copy first (map method calls, BPF_TABLE's type string, the entry point's
section), and any other bcc method call on a map is refused by name rather than
mistranslated. bcc still builds the AF_XDP variant and the programs tests run with
BPF_PROG_TEST_RUN (xdp_prog.compile_prog); tests/test_xdp_object.py runs both builds on
the same frames.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile
from pathlib import Path
from typing import List, Optional

from . import build_cache
from .errors import XdpSetupError
from .xdp_prog import DEFAULT_HALF_OPEN, DEFAULT_HS_SOURCES, DEFAULT_MAX_CIDS, PROG_NAME, bpf_source_dir, prog_cflags

CLANG_ENV = "STCP_CLANG"          # a clang binary other than the first `clang` on PATH
_METHODS = {"lookup", "insert", "update", "delete", "redirect_map"}   # see bpf/stcp_clang.h
_MAP_DECL = re.compile(r"\bBPF_(?:PERCPU_ARRAY|ARRAY|HASH|XSKMAP)\(\s*(\w+)")
# BPF_TABLE("type", key, value, name, size) and BPF_F_TABLE("type", key, value, name, size, flags)
_TABLE_DECL = re.compile(r'\bBPF_(F_)?TABLE\(\s*"(\w+)"\s*,([^;]*)\)\s*;')
_UAPI_INCLUDE = re.compile(r"^#include <uapi/linux/(\w+\.h)>", re.M)
_ENTRY = re.compile(rf"^int\s+{PROG_NAME}\s*\(", re.M)


def find_clang() -> Optional[str]:
    """The clang binary to use ($STCP_CLANG, else `clang` on PATH), or None."""
    return shutil.which(os.environ.get(CLANG_ENV) or "clang")


def translate(source: str) -> str:
    """bpf/stcp_xdp.c in bcc's dialect -> the same program for a clang build with
    stcp_clang.h. XdpSetupError names any bcc construct it does not know."""
    maps = set(_MAP_DECL.findall(source))

    def table(m: re.Match) -> str:
        flags, kind = m.group(1) or "", m.group(2)
        args = [a.strip() for a in m.group(3).split(",")]
        if len(args) != (5 if flags else 4):
            raise XdpSetupError(f"stcp_xdp.c: cannot read {m.group(0)!r} as BPF_{flags}TABLE(type, key, value, "
                                f"name, size{', flags' if flags else ''})")
        maps.add(args[2])
        return f"BPF_{flags}TABLE_{kind}({', '.join(args)});"

    out = _TABLE_DECL.sub(table, source)
    if not maps:
        raise XdpSetupError("the XDP source declares no maps: is STCP_BPF_DIR a bcc-style stcp_xdp.c?")
    names = "|".join(sorted(maps, key=len, reverse=True))

    def method(m: re.Match) -> str:
        name, meth = m.group(1), m.group(2)
        if meth not in _METHODS:
            raise XdpSetupError(f"stcp_xdp.c calls bcc's {name}.{meth}(), which the clang build does not "
                                f"translate: add it to bpf/stcp_clang.h and stcp/datapath/xdp_object.py")
        return f"stcp_map_{meth}(&{name}, "

    out = re.sub(rf"\b({names})\s*\.\s*(\w+)\s*\(", method, out)
    out, n = _ENTRY.subn(f'SEC("xdp") int {PROG_NAME}(', out)
    if n != 1:
        raise XdpSetupError(f"stcp_xdp.c has no 'int {PROG_NAME}(...)' entry point at the start of a line")
    return out


def build_object(out_dir: str, max_cids: int = DEFAULT_MAX_CIDS, hs_sources: int = DEFAULT_HS_SOURCES,
                 half_open: int = DEFAULT_HALF_OPEN, afxdp: bool = False) -> str:
    """Compile bpf/stcp_xdp.c into out_dir/stcp_xdp.o (BTF, section "xdp"); its path.
    afxdp=True: the AF_XDP variant (-DSTCP_AFXDP), as compile_prog builds it.
    XdpSetupError with clang's first error line if it fails."""
    clang = find_clang()
    if clang is None:
        raise XdpSetupError("clang not found: the XDP program is built with clang to run beside other XDP "
                            "programs (libxdp's dispatcher); run 'sudo make system-deps' (installs clang)")
    src = bpf_source_dir()
    work = Path(out_dir)
    (work / "uapi" / "linux").mkdir(parents=True, exist_ok=True)
    source = (src / "stcp_xdp.c").read_text()
    for name in set(_UAPI_INCLUDE.findall(source)):    # bcc's include path -> /usr/include's
        (work / "uapi" / "linux" / name).write_text(f"#include <linux/{name}>\n")
    c_file = work / "stcp_xdp.c"
    c_file.write_text(translate(source))
    obj = work / "stcp_xdp.o"
    multiarch = sysconfig.get_config_var("MULTIARCH") or f"{os.uname().machine}-linux-gnu"
    flags = ["-target", "bpf", "-O2", "-g", "-mcpu=v3", "-Wall", "-Wno-unused-function",
             "-Wno-compare-distinct-pointer-types",
             f"-ffile-prefix-map={work}=stcp-build", f"-I{work}", f"-I{src}", f"-I/usr/include/{multiarch}",
             "-include", str(src / "stcp_clang.h"), *prog_cflags(max_cids, hs_sources, afxdp, half_open)]
    key = _cache_key(clang, flags, work, c_file)
    cached = build_cache.load(key, ".o") if key else None
    if cached is not None:
        obj.write_bytes(cached)
        return str(obj)
    r = subprocess.run([clang, *flags, "-c", str(c_file), "-o", str(obj)], capture_output=True, text=True)
    if r.returncode != 0:
        errors = [ln for ln in r.stderr.splitlines() if "error" in ln] or r.stderr.splitlines() or ["(no output)"]
        raise XdpSetupError(f"compiling {src / 'stcp_xdp.c'} with {clang} failed: {errors[0].strip()}; "
                            "'sudo make system-deps' installs clang and libbpf-dev")
    if key:
        build_cache.store(key, obj.read_bytes(), ".o")
    return str(obj)


def _cache_key(clang: str, flags: List[str], work: Path, c_file: Path) -> Optional[str]:
    """The build's name in the cache: a hash of the compiler (its path and --version), the
    flags (-D map sizes included), the translated source and what the preprocessor makes
    of it with every header it includes, so that a change to any of them builds anew.
    None (build without the cache) if the preprocessor fails: the compile then says why."""
    version = subprocess.run([clang, "--version"], capture_output=True)
    pre = subprocess.run([clang, *flags, "-E", "-P", str(c_file)], capture_output=True)
    if version.returncode != 0 or pre.returncode != 0:
        return None
    h = hashlib.sha256()
    for part in (clang.encode(), version.stdout, "\0".join(flags).replace(str(work), "@WORK@").encode(),
                 c_file.read_bytes(), pre.stdout):
        h.update(len(part).to_bytes(8, "little") + part)
    return f"stcp_xdp-{h.hexdigest()}"


class ObjectDir:
    """A temporary directory holding one build (removed by close() / the with block)."""

    def __init__(self, max_cids: int = DEFAULT_MAX_CIDS, hs_sources: int = DEFAULT_HS_SOURCES,
                 half_open: int = DEFAULT_HALF_OPEN, afxdp: bool = False):
        self._dir = tempfile.mkdtemp(prefix="stcp-xdp-")
        try:
            self.path = build_object(self._dir, max_cids, hs_sources, half_open, afxdp)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> "ObjectDir":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
