"""The sanitizer build: every C extension of setup.py's EXTENSIONS compiled again, with
AddressSanitizer and UndefinedBehaviorSanitizer (and, with clang, libFuzzer's coverage
counters), into build/fuzz/. `python -m tests.fuzz.build` (or `make fuzz`) makes it.

The copies do not replace the package's own extensions: tests/fuzz/targets.py loads them
by path under other module names, next to the pure-Python references they are checked
against. CPython itself is not instrumented, so the sanitizer runtimes are preloaded into
the interpreter (sanitizer_env()): gcc's libasan and libubsan, which clang's instrumentation
of this vintage also calls. With PYTHONMALLOC=malloc every PyMem_* allocation goes through
the sanitized malloc, so a write past a PyMem_Calloc'd array is caught, not lost in an
obmalloc arena.

Coverage: clang's inline 8-bit counters and PC table. The preloaded libasan defines weak,
do-nothing versions of the functions that register them with libFuzzer and shadows the
fuzzer's own, so each module is linked with sancov_shim.c, which reports where its
counters are, and tests/fuzz/targets.py hands them to atheris's libFuzzer itself. gcc
builds the sanitizers without coverage (the fuzzer then mutates blind); unavailable()
says why nothing can be built at all.
"""
from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Dict, List, Optional, Tuple

ROOT = Path(__file__).resolve().parents[2]
OUT = ROOT / "build" / "fuzz"
SHIM = Path(__file__).with_name("sancov_shim.c")
SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=undefined", "-fno-omit-frame-pointer",
            "-g", "-O1"]
COVERAGE = ["-fsanitize-coverage=inline-8bit-counters,pc-table"]
# What the package's flags carry that the instrumented build must not: optimisation level
# (SANITIZE sets it) and hidden visibility (the shim's entry point must stay visible).
DROP_FLAGS = {"-O2", "-fvisibility=hidden"}


def compiler() -> Tuple[Optional[str], bool]:
    """(the C compiler to use, whether it instruments for coverage): clang if there, else gcc."""
    for cc, coverage in (("clang", True), ("gcc", False), ("cc", False)):
        path = shutil.which(cc)
        if path:
            return path, coverage
    return None, False


def runtime_libs() -> List[str]:
    """The sanitizer runtimes to preload: gcc's libasan and libubsan, found where gcc keeps them."""
    gcc = shutil.which("gcc")
    libs = []
    for name in ("libasan.so", "libubsan.so"):
        path = ""
        if gcc:
            path = subprocess.run([gcc, f"-print-file-name={name}"], capture_output=True, text=True).stdout.strip()
        if not path or not os.path.isabs(path) or not os.path.exists(path):
            return []
        libs.append(os.path.realpath(path))
    return libs


def unavailable() -> Optional[str]:
    """Why the sanitizer build cannot be made or run here, or None."""
    cc, _coverage = compiler()
    if cc is None:
        return "no C compiler (clang or gcc) for the sanitizer build"
    if not runtime_libs():
        return "gcc's libasan/libubsan runtimes are not installed (Debian: gcc, libasan8, libubsan1)"
    return None


def extensions() -> list:
    """setup.py's EXTENSIONS (imported, not run as a setup script)."""
    return runpy.run_path(str(ROOT / "setup.py"), run_name="stcp_setup")["EXTENSIONS"]


def module_path(name: str, out: Path = OUT) -> Path:
    """Where the instrumented copy of extension `name` ('_aead', ...) is."""
    return out / (name + sysconfig.get_config_var("EXT_SUFFIX"))


def _stale(target: Path, inputs: List[Path]) -> bool:
    if not target.exists():
        return True
    built = target.stat().st_mtime
    return any(p.stat().st_mtime > built for p in inputs)


def build(out: Path = OUT, quiet: bool = False) -> Dict[str, Path]:
    """Build what is missing or older than its sources; {'_aead': path, ...}. An extension
    that cannot be built (stcp._xsk without libxdp) is left out with a warning, as setup.py
    leaves it out of the package."""
    cc, coverage = compiler()
    if cc is None:
        raise RuntimeError(unavailable())
    out.mkdir(parents=True, exist_ok=True)
    include = sysconfig.get_paths()["include"]
    flags = SANITIZE + (COVERAGE if coverage else [])
    built: Dict[str, Path] = {}
    for ext in extensions():
        name = ext.name.rpartition(".")[2]
        target = module_path(name, out)
        sources = [ROOT / s for s in ext.sources]
        inputs = sources + [ROOT / d for d in ext.depends] + [SHIM, Path(__file__)]
        if not _stale(target, inputs):
            built[name] = target
            continue
        objs = []
        try:
            for src in sources + [SHIM]:
                obj = out / "obj" / name / (src.stem + ".o")
                obj.parent.mkdir(parents=True, exist_ok=True)
                cflags = [f for f in ext.extra_compile_args if f not in DROP_FLAGS]
                subprocess.run([cc, "-fPIC", *cflags, *flags, f"-I{include}", "-c", str(src), "-o", str(obj)],
                               check=True, capture_output=True, text=True)
                objs.append(str(obj))
            # the sanitizer runtimes are not linked in: the interpreter has them preloaded
            subprocess.run([cc, "-shared", *objs, *[f"-l{lib}" for lib in ext.libraries], "-o", str(target)],
                           check=True, capture_output=True, text=True)
        except subprocess.CalledProcessError as exc:
            print(f"fuzz build: not building {name}: {(exc.stderr or '').strip().splitlines()[-1:]}",
                  file=sys.stderr)
            continue
        if not quiet:
            print(f"fuzz build: {target.relative_to(ROOT)} ({os.path.basename(cc)}, "
                  f"{'with' if coverage else 'without'} coverage)", file=sys.stderr)
        built[name] = target
    return built


def sanitizer_env(base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The environment a Python process needs to load the instrumented modules."""
    env = dict(os.environ if base is None else base)
    env["LD_PRELOAD"] = ":".join(runtime_libs() + [p for p in env.get("LD_PRELOAD", "").split(":") if p])
    env["PYTHONMALLOC"] = "malloc"
    # CPython frees little at exit: leak reports would be about the interpreter, not us
    env["ASAN_OPTIONS"] = "detect_leaks=0:allocator_may_return_null=1:" + env.get("ASAN_OPTIONS", "")
    env["UBSAN_OPTIONS"] = "print_stacktrace=1:" + env.get("UBSAN_OPTIONS", "")
    env["STCP_FUZZ_SANITIZED"] = "1"
    return env


def sanitized() -> bool:
    """True in a process started with sanitizer_env()."""
    return os.environ.get("STCP_FUZZ_SANITIZED") == "1"


if __name__ == "__main__":
    why = unavailable()
    if why:
        sys.exit(f"fuzz build: {why}")
    build()
