"""The worker supervisor's contract with its workers (stcp.supervisor), without root or XDP:
a worker learns its role, the pool's port, the kernel part's fds and the identity key
from the environment and inherited fds, and says it is ready over a pipe; a worker that
exits before that fails the start at once (not after the ready timeout); stderr is
relayed with the worker's number; a worker that dies is replaced (after the kernel part
cleaned up), or ends the pool when no restarts are allowed; closing terminates every
worker and releases the kernel part.

The pools themselves: tests/test_afxdp.py (AF_XDP), tests/test_socket_pool.py (socket).
"""
from __future__ import annotations

import asyncio
import io
import os
import sys
import time

import pytest

from stcp import identity
from stcp.supervisor import (
    FDS_ENV,
    METRICS_DIR_ENV,
    PORT_ENV,
    READY_FD_ENV,
    WORKER_ENV,
    Supervisor,
    SupervisorError,
    WorkerCommand,
    WorkerRole,
)

# A worker: reads its role, says something on stderr, signals ready (unless told not to),
# then waits to be terminated (or exits with the code it was given).
WORKER = """
import os, sys, time
from stcp.supervisor import WorkerRole
role = WorkerRole.from_env()
print(f"stcp: role {role.index}/{role.count} metrics={role.metrics_dir} env_left={os.environ.get('STCP_WORKER')}",
      file=sys.stderr, flush=True)
fds = [os.read(fd, 5).decode() for fd in role.fds]
print(f"stcp: port={role.port} fds={fds}", file=sys.stderr, flush=True)
key = role.static_key.hex() if role.static_key else None
print(f"stcp: key={key} key_fd_left={os.environ.get('STCP_KEY_FD')}", file=sys.stderr, flush=True)
mode = os.environ.get("TEST_MODE", "ready")
if mode == "exit":
    sys.exit(3)
if mode == "never_ready":
    time.sleep(60)
role.notify_ready()
if mode == "die_after_ready":
    time.sleep(0.2)
    sys.exit(4)
time.sleep(60)
"""


def spawn(mode: str = "ready"):
    def command(w: int, n: int) -> WorkerCommand:
        return WorkerCommand([sys.executable, "-c", WORKER], {"TEST_MODE": mode})
    return command


def no_attach(n: int):
    raise AssertionError("start() alone must not attach")


class FakeKernel:
    """A PoolKernel whose fd is a pipe holding a word (each worker reads it from its copy)."""
    datapath = "socket"
    port = 4321

    def __init__(self, n: int):
        self.r, w = os.pipe()
        os.write(w, b"steer" * 1000)
        os.close(w)
        self.died: list = []
        self.closed = False

    def describe(self, n: int) -> str:
        return f"fake kernel part for {n} workers"

    def worker_fds(self):
        return (self.r,)

    def worker_died(self, w: int):
        self.died.append(w)
        return f"cleaned up after worker {w}"

    def close(self) -> None:
        os.close(self.r)
        self.closed = True


def test_role_from_env_takes_the_variables_out():
    env = {WORKER_ENV: "1/3", READY_FD_ENV: "7", METRICS_DIR_ENV: "/run/x", PORT_ENV: "7443", FDS_ENV: "9,10",
           "OTHER": "kept"}
    role = WorkerRole.from_env(env)
    assert (role.index, role.count, role.ready_fd, role.metrics_dir) == (1, 3, 7, "/run/x")
    assert (role.port, role.fds, role.static_key) == (7443, (9, 10), None)
    assert env == {"OTHER": "kept"}
    assert WorkerRole.from_env({}) is None
    for bad in ("3/3", "x/2", "2"):
        with pytest.raises(SupervisorError, match="expected W/N"):
            WorkerRole.from_env({WORKER_ENV: bad})


def test_workers_start_ready_relay_and_terminate():
    out = io.StringIO()
    key = os.urandom(32)
    kernels = []

    def setup(n: int) -> FakeKernel:
        kernels.append(FakeKernel(n))
        return kernels[-1]

    async def main():
        sup = Supervisor(spawn(), setup, 2, metrics_dir="/tmp/nowhere", out=out, static_key=key)
        try:
            sup.setup()
            await sup.start(ready_timeout=30)
            slots = sup.worker_slots()
            assert [s.worker for s in slots] == [0, 1] and all(s.alive for s in slots)
            assert all(s.path and s.path.startswith("/tmp/nowhere/worker-") for s in slots)
            pids = [s.pid for s in slots]
        finally:
            sup.close()
            await sup.wait_closed()
        assert all(p.returncode is not None for p in sup.procs.values())
        return pids

    pids = asyncio.run(main())
    text = out.getvalue()
    assert "stcp: fake kernel part for 2 workers" in text
    for w, pid in enumerate(pids):
        assert f"stcp: worker {w} started (pid {pid})" in text
        assert f"stcp: [worker {w}] role {w}/2 metrics=/tmp/nowhere env_left=None" in text
        assert f"stcp: [worker {w}] port=4321 fds=['steer']" in text
        assert f"stcp: [worker {w}] key={key.hex()} key_fd_left=None" in text   # the same key for all
    assert "serving on port 4321 (socket datapath, 2 workers)" in text
    assert kernels[0].closed and kernels[0].died == []


def test_worker_exiting_before_ready_fails_the_start_at_once():
    out = io.StringIO()

    async def main():
        sup = Supervisor(spawn("exit"), no_attach, 2, out=out)
        t0 = time.monotonic()
        try:
            with pytest.raises(SupervisorError, match=r"worker\(s\) 0, 1 exited before serving"):
                await sup.start(ready_timeout=60)
        finally:
            await sup.wait_closed()
        return time.monotonic() - t0

    took = asyncio.run(main())
    assert took < 20, took


def test_close_while_starting_returns_quietly():
    """SIGTERM while the workers are still starting (stcp serve's handler calls close()):
    start() returns at once, with no asyncio traceback about an unretrieved exception."""
    out = io.StringIO()
    unretrieved: list = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: unretrieved.append(ctx["message"]))
        sup = Supervisor(spawn("never_ready"), no_attach, 2, out=out)
        asyncio.get_running_loop().call_later(0.5, sup.close)
        t0 = time.monotonic()
        try:
            await sup.start(ready_timeout=60)
        finally:
            await sup.wait_closed()
        took = time.monotonic() - t0
        import gc
        gc.collect()                  # an unretrieved exception is reported when its future is freed
        await asyncio.sleep(0)
        return took

    took = asyncio.run(main())
    assert took < 20, took
    assert unretrieved == [] and "serving" not in out.getvalue(), (unretrieved, out.getvalue())


def test_dead_worker_is_replaced_or_ends_the_pool():
    async def main(max_restarts: int) -> tuple:
        out = io.StringIO()
        sup = Supervisor(spawn("die_after_ready"), FakeKernel, 1, out=out, max_restarts=max_restarts)
        sup.setup()
        kernel = sup.kernel
        try:
            await sup.start(ready_timeout=30)
            with pytest.raises(SupervisorError, match=f"worker 0 died {max_restarts + 1} times"):
                await asyncio.wait_for(sup.wait(), 30)
        finally:
            await sup.wait_closed()
        return out.getvalue(), kernel

    text, kernel = asyncio.run(main(0))
    assert "restarting it" not in text and kernel.died == [] and kernel.closed
    text, kernel = asyncio.run(main(2))
    assert text.count("worker 0 (pid") == 2 and text.count("died (exit code 4)") == 2
    assert text.count("stcp: worker 0 started") == 3
    assert kernel.died == [0, 0] and text.count("cleaned up after worker 0") == 2, "before each restart"


def test_every_worker_and_replacement_gets_the_pools_key():
    """The supervisor hands its one key to each worker through a pipe (not the environment
    or the command line); a replacement gets the same key; the serving line names it."""
    key = identity.generate_private_key()

    async def main() -> str:
        out = io.StringIO()
        sup = Supervisor(spawn("die_after_ready"), no_attach, 2, out=out, max_restarts=1, static_key=key)
        try:
            await sup.start(ready_timeout=30)
            with pytest.raises(SupervisorError, match="died 2 times"):
                await asyncio.wait_for(sup.wait(), 30)
        finally:
            await sup.wait_closed()
        return out.getvalue()

    text = asyncio.run(main())
    got = [line.split("key=")[1] for line in text.splitlines() if "] key=" in line]
    assert len(got) >= 3, text                   # two workers and at least one replacement
    assert set(got) == {f"{key.hex()} key_fd_left=None"}, got
    assert f"server key {identity.encode_key(identity.public_key(key))}" in text
    assert key.hex() not in "".join(os.environ.values())


def test_notify_ready_writes_once_and_closes_its_end():
    """READY is written once, then the worker's end of the pipe is closed."""
    r, w = os.pipe()
    try:
        role = WorkerRole(0, 1, ready_fd=w)
        role.notify_ready()
        role.notify_ready()                      # once only
        assert os.read(r, 100) == b"ready\n"
        with pytest.raises(OSError):
            os.fstat(w)                          # closed after signalling
    finally:
        os.close(r)
