"""stcp/datapath/heap.py: the malloc thresholds a datapath sets for bulk receive, and the
glibc variables that opt out. Each case runs in a fresh process (the setting is per process)."""
from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the tuning is glibc's mallopt")

# a 3 MiB buffer, as a batch's plaintext is: where did malloc put it? (mallinfo2: hblkhd is
# the bytes in mmapped blocks)
PROBE = r"""
import ctypes, json, sys
class MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd",
                                                "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]
libc = ctypes.CDLL(None)
libc.mallinfo2.restype = MallInfo2
{setup}
before = libc.mallinfo2().hblkhd
buf = bytes(3 << 20)
print(json.dumps({{"mmapped": libc.mallinfo2().hblkhd - before, "applied": applied}}))
"""

VIA_API = """
import asyncio, stcp
from stcp.datapath import heap
async def main():
    server = await stcp.start_server(lambda r, w: None, "127.0.0.1", 0)
    server.close()
    await server.wait_closed()
asyncio.run(main())
applied = heap.applied
"""


def probe(setup: str, **env: str) -> dict:
    import json
    environ = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    out = subprocess.run([sys.executable, "-c", PROBE.format(setup=setup)], env={**environ, **env},
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_after_tuning_a_whole_batch_stays_on_the_heap():
    got = probe("from stcp.datapath.heap import tune_heap\napplied = tune_heap()")
    assert got == {"mmapped": 0, "applied": True}


def test_untuned_glibc_maps_such_a_buffer_afresh():
    """The control: what the tuning changes (glibc's default puts it in fresh mmapped pages)."""
    got = probe("applied = None")
    assert got["mmapped"] >= 3 << 20


@pytest.mark.parametrize("variable", ["MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"])
def test_an_operator_who_set_glibcs_variables_keeps_them(variable):
    got = probe("from stcp.datapath.heap import tune_heap\napplied = tune_heap()", **{variable: "131072"})
    assert got["applied"] is False
    if variable == "MALLOC_MMAP_THRESHOLD_":
        assert got["mmapped"] >= 3 << 20


def test_a_server_started_through_the_api_tunes_its_process():
    got = probe(VIA_API)
    assert got == {"mmapped": 0, "applied": True}
