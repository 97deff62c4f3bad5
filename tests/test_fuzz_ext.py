"""The C extensions under AddressSanitizer and UBSan, against their pure-Python references.

For each target of tests/fuzz/targets.py: its corpus (tests/corpus/TARGET/) replayed, then a
few seconds of coverage-guided fuzzing with atheris from a fixed random seed (so a failure
here repeats on the next run; exploring is `make fuzz`'s job), in a subprocess with the
sanitizer runtimes preloaded. A memory error, undefined behaviour or a result that differs from the
reference fails the test with the fuzzer's report. `make fuzz FUZZ_SECONDS=600` is the
long run by hand.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

from tests.fuzz import build
from tests.fuzz.targets import TARGETS

SECONDS = int(os.environ.get("STCP_FUZZ_SECONDS", "3"))
RNG_SEED = os.environ.get("STCP_FUZZ_RNG_SEED", "1")


def _unavailable():
    why = build.unavailable()
    if why:
        return why
    if importlib.util.find_spec("atheris") is None:
        return "atheris is not installed (pip install -e '.[fuzz]'; make installs it)"
    return None


pytestmark = pytest.mark.skipif(_unavailable() is not None, reason=str(_unavailable()))


@pytest.fixture(scope="module")
def sanitizer_build():
    built = build.build(quiet=True)
    return built


def _run(*args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "tests.fuzz", *args], cwd=build.ROOT, capture_output=True,
                          text=True, timeout=timeout)


def _report(stderr: str) -> str:
    """The Python traceback atheris prints, which says which call disagreed, and the tail
    of libFuzzer's report, which holds the input."""
    head = stderr.find("=== Uncaught Python exception")
    return (stderr[head:head + 3000] + "\n...\n" if head >= 0 else "") + stderr[-3000:]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_fuzz_target(target, sanitizer_build, tmp_path):
    from tests.fuzz.targets import MODULES
    if MODULES[target] not in sanitizer_build:
        pytest.skip(f"stcp.{MODULES[target]} was not built (see 'python -m tests.fuzz.build')")
    r = _run(target, "--replay", timeout=300)
    assert r.returncode == 0, r.stderr[-6000:]
    assert "all agree" in r.stderr
    r = _run(target, "--seconds", str(SECONDS), "--rng-seed", RNG_SEED, "--out", str(tmp_path),
             timeout=SECONDS + 120)
    assert r.returncode == 0, _report(r.stderr)
    runs = [line for line in r.stderr.splitlines() if line.startswith("stat::number_of_executed_units:")]
    assert runs and int(runs[0].split()[-1]) > 0, r.stderr[-3000:]


def test_a_sanitizer_report_fails_the_run(sanitizer_build, tmp_path):
    """The harness is not blind: a write past a PyMem array in an instrumented module is
    reported and fails the process (the bug open_records had, reproduced on purpose
    through the sanitized interpreter: bytes.__new__ of a negative-size buffer is refused,
    so use ctypes on a PyMem_Calloc'd block)."""
    code = ("import ctypes; p = ctypes.pythonapi.PyMem_Calloc; p.restype = ctypes.c_void_p; "
            "a = p(1, 16); ctypes.memset(a + 16, 0, 1)")
    r = subprocess.run([sys.executable, "-c", code], env=build.sanitizer_env(), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "heap-buffer-overflow" in r.stderr, r.stderr[-2000:]
