"""The supervisor of a worker pool: N processes serving one port, the socket datapath's
(`stcp serve --workers N`) or the AF_XDP datapath's (`--datapath afxdp --workers N`).

It sets up the pool's part in the kernel once (`setup`, given by the caller, returns a
PoolKernel: the reuseport steering program of stcp/datapath/socket_pool.py, the afxdp XDP
program of stcp/datapath/afxdp.py), starts N worker processes (`spawn` says how: the CLI
runs `stcp serve` again, the benchmark its own peer), replaces the ones that die, and on
close terminates them and releases the kernel part. Each worker process serves through
stcp.server.serve(..., worker=WorkerRole.from_env()); the kernel part sees to it that a
connection's records reach the worker that owns it.

Between the two, the environment, inherited fds and pipes: a worker learns its role from
STCP_WORKER ("W/N"), the port from STCP_WORKER_PORT, the kernel part's fds from
STCP_WORKER_FDS, where to serve its metrics from STCP_WORKER_METRICS (a directory private
to the supervisor), and the server's identity key from the pipe whose end is
STCP_KEY_FD (loaded or made once, before any worker starts, so every worker has the same
key: a client pins one key whichever worker answers, and a RESET from any worker or a
replacement carries the token of the key the connection was made with). It says it is ready
by writing "ready" to the pipe whose end is STCP_READY_FD; a worker that exits before
writing it never became ready. Worker stderr is relayed line by line, prefixed with
"[worker W]".

How a worker is started is composed in one place (Supervisor.command) and run in another
(Supervisor.launch), so a deployment can change either (another user, more fds).
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import (
    Callable,
    Dict,
    List,
    Mapping,
    MutableMapping,
    NamedTuple,
    Optional,
    Protocol,
    Sequence,
    TextIO,
    Tuple,
)

from .errors import STCPError
from .identity import KEY_LEN, encode_key, fingerprint, public_key

WORKER_ENV = "STCP_WORKER"                  # "W/N": this process is worker W of N
READY_FD_ENV = "STCP_READY_FD"              # the fd to write READY to once serving
KEY_FD_ENV = "STCP_KEY_FD"                  # the fd to read the pool's 32-byte private key from
METRICS_DIR_ENV = "STCP_WORKER_METRICS"     # where the worker serves its metrics socket
PORT_ENV = "STCP_WORKER_PORT"               # the port the pool serves
FDS_ENV = "STCP_WORKER_FDS"                 # "a,b,c": the kernel part's fds, inherited
READY = b"ready\n"

MAX_RESTARTS = 5                 # per worker within RESTART_WINDOW seconds, then give up
RESTART_WINDOW = 60.0


class SupervisorError(STCPError):
    """The worker pool cannot run (workers did not start, or died too often); one line."""


class WorkerCommand(NamedTuple):
    """How to start one worker: its command line, and environment variables to add."""
    argv: Sequence[str]
    env: Mapping[str, str] = {}


class PoolKernel(Protocol):
    """A pool's part in the kernel, set up once by the supervisor (it may need privileges
    the workers do not): what steers each connection's records to its worker."""
    datapath: str                 # "socket", "afxdp": the datapath of logs and metrics
    port: int                     # the port the pool serves (its workers bind it)

    def describe(self, nworkers: int) -> str:
        """One line for the log once set up."""
        ...

    def worker_fds(self) -> Sequence[int]:
        """fds every worker inherits (WorkerRole.fds), in this order."""
        ...

    def worker_died(self, worker: int) -> Optional[str]:
        """Clean up after a dead worker before its replacement starts; a line to log, or None."""
        ...

    def close(self) -> None:
        """Release it (the workers are gone)."""
        ...


Spawn = Callable[[int, int], WorkerCommand]        # (worker, nworkers) -> how to start it
Setup = Callable[[int], PoolKernel]                # nworkers -> the kernel part, set up


class WorkerSlot(NamedTuple):
    """One worker slot as the supervisor sees it (the pool's metrics read it)."""
    worker: int                   # 0..N-1
    pid: Optional[int]            # the current process in this slot (None before the first start)
    alive: bool                   # running (not exited)
    path: Optional[str]           # its metrics socket (None until the process serves)
    restarts: int                 # replacements so far


def worker_socket_path(directory: str, worker: int, pid: int) -> str:
    """Where worker `worker` (process `pid`) serves its metrics: one path per process, so a
    replacement is never mistaken for its predecessor."""
    return os.path.join(directory, f"worker-{worker}-{pid}.sock")


@dataclass
class WorkerRole:
    """What a worker process was told by its supervisor."""
    index: int                            # W of W/N
    count: int                            # N
    ready_fd: Optional[int] = None        # write READY here once serving
    metrics_dir: Optional[str] = None     # serve metrics at worker_socket_path(metrics_dir, W, pid)
    port: Optional[int] = None            # the pool's port (the command line may say 0)
    fds: Tuple[int, ...] = ()             # the kernel part's fds (PoolKernel.worker_fds)
    static_key: Optional[bytes] = field(default=None, repr=False)    # the pool's identity key

    @classmethod
    def from_env(cls, environ: Optional[MutableMapping[str, str]] = None) -> Optional["WorkerRole"]:
        """This process's role if a supervisor started it, else None. Takes the variables out
        of the environment, so the worker's own children do not inherit them, and reads the
        identity key from its pipe."""
        env = os.environ if environ is None else environ
        spec = env.pop(WORKER_ENV, None)
        fd = env.pop(READY_FD_ENV, None)
        metrics_dir = env.pop(METRICS_DIR_ENV, None)
        port = env.pop(PORT_ENV, None)
        fds = env.pop(FDS_ENV, None)
        key_fd = env.pop(KEY_FD_ENV, None)
        if spec is None:
            return None
        w, _, n = spec.partition("/")
        if not (w.isdigit() and n.isdigit() and int(w) < int(n)):
            raise SupervisorError(f"bad {WORKER_ENV}={spec!r}: expected W/N with W < N")
        if fds and not all(f.isdigit() for f in fds.split(",")):
            raise SupervisorError(f"bad {FDS_ENV}={fds!r}: expected fd numbers separated by commas")
        return cls(int(w), int(n), int(fd) if fd and fd.isdigit() else None, metrics_dir or None,
                   int(port) if port and port.isdigit() else None,
                   tuple(int(f) for f in fds.split(",")) if fds else (),
                   _read_key(int(key_fd)) if key_fd and key_fd.isdigit() else None)

    def notify_ready(self) -> None:
        """Tell the supervisor this worker serves (once; later calls do nothing)."""
        if self.ready_fd is None:
            return
        try:
            os.write(self.ready_fd, READY)
        except OSError:
            pass                  # the supervisor is gone; PR_SET_PDEATHSIG ends us
        finally:
            os.close(self.ready_fd)
            self.ready_fd = None


def _read_key(fd: int) -> bytes:
    """The pool's key from the supervisor's pipe (then closed)."""
    data = b""
    try:
        while chunk := os.read(fd, 64):
            data += chunk
    finally:
        os.close(fd)
    if len(data) != KEY_LEN:
        raise SupervisorError(f"the supervisor handed down {len(data)} key bytes, not {KEY_LEN}")
    return data


def _key_pipe(key: bytes) -> int:
    """A pipe holding `key` for a worker to read: its read end (the write end is closed)."""
    rfd, wfd = os.pipe()
    try:
        os.write(wfd, key)        # 32 bytes: far below the pipe's capacity, written at once
    finally:
        os.close(wfd)
    return rfd


def die_with_parent() -> None:
    """A worker gets SIGTERM when its supervisor goes away (PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)
    except Exception:
        pass


class Supervisor:
    """Sets up the kernel part (setup), runs the workers (start), replaces the ones that
    die (up to max_restarts within restart_window seconds each; 0: a death ends the pool),
    and on close() terminates them and releases the kernel part. static_key: the identity
    key every worker serves with (None: each worker's own, which only tests want)."""

    def __init__(self, spawn: Spawn, setup: Setup, nworkers: int, *, metrics_dir: Optional[str] = None,
                 out: Optional[TextIO] = None, max_restarts: int = MAX_RESTARTS,
                 restart_window: float = RESTART_WINDOW, static_key: Optional[bytes] = None):
        self.spawn = spawn
        self.setup_kernel = setup
        self.n = nworkers
        self.out = out or sys.stderr
        self.max_restarts = max_restarts
        self.restart_window = restart_window
        self.metrics_dir = metrics_dir        # workers serve their metrics on unix sockets here
        self.static_key = static_key
        self.kernel: Optional[PoolKernel] = None
        self.procs: Dict[int, asyncio.subprocess.Process] = {}
        self.restarts: Dict[int, List[float]] = {w: [] for w in range(nworkers)}
        self.restart_count: Dict[int, int] = {w: 0 for w in range(nworkers)}
        self.ready: Dict[int, asyncio.Event] = {}
        self._readiness: Dict[int, "asyncio.Task[bool]"] = {}
        self._watchers: List["asyncio.Task[None]"] = []
        self._relays: List["asyncio.Task[None]"] = []
        self._stopping = False
        self._stop = asyncio.Event()
        self.failed: Optional[str] = None

    def say(self, text: str) -> None:
        print(f"stcp: {text}", file=self.out, flush=True)

    def setup(self) -> None:
        """Set up the kernel part (blocking; raises what setup raises)."""
        self.kernel = self.setup_kernel(self.n)
        self.say(self.kernel.describe(self.n))

    async def start(self, ready_timeout: float = 60.0) -> None:
        """Start every worker and wait until each says it is ready; SupervisorError if one
        exits first or they take longer than ready_timeout (close() meanwhile: returns)."""
        for w in range(self.n):
            await self._spawn(w)
        ready = asyncio.ensure_future(asyncio.gather(*self._readiness.values()))
        stop = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait((ready, stop), timeout=ready_timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
        if self._stop.is_set() or not ready.done():
            ready.cancel()
            with contextlib.suppress(asyncio.CancelledError):   # retrieved, so asyncio logs no traceback
                await ready
            if self._stop.is_set():
                return
            raise SupervisorError("the workers did not start (see their lines above)")
        gone = [w for w, ok in zip(self._readiness, ready.result(), strict=True) if not ok]
        if gone:
            raise SupervisorError(f"worker(s) {', '.join(map(str, gone))} exited before serving "
                                  "(see their lines above)")
        k = self.kernel
        key = ""
        if self.static_key is not None:
            pub = public_key(self.static_key)
            key = f"; server key {encode_key(pub)} ({fingerprint(pub)})"
        self.say((f"serving on port {k.port} ({k.datapath} datapath, {self.n} workers)" if k is not None
                  else f"serving ({self.n} workers)") + key)
        self._watchers = [asyncio.ensure_future(self._watch(w)) for w in range(self.n)]

    async def wait(self) -> None:
        """Until close(), or SupervisorError once a worker died more often than allowed."""
        await self._stop.wait()
        if self.failed:
            raise SupervisorError(self.failed)

    def close(self) -> None:
        """Ask the pool to stop; wait_closed() terminates the workers and detaches."""
        self._stop.set()

    def signal_workers(self, sig: int) -> None:
        """Pass a signal on to every running worker (the benchmark asks them for counters)."""
        for proc in self.procs.values():
            if proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    def command(self, w: int, ready_fd: int, key_fd: Optional[int]) -> Tuple[WorkerCommand, Tuple[int, ...]]:
        """How worker w starts: spawn's command with the role in its environment, and the
        fds it inherits (the ready pipe's write end, the key pipe's read end, the kernel part's)."""
        cmd = self.spawn(w, self.n)
        env = {**cmd.env, WORKER_ENV: f"{w}/{self.n}", READY_FD_ENV: str(ready_fd)}
        fds = [ready_fd]
        if self.metrics_dir:
            env[METRICS_DIR_ENV] = self.metrics_dir
        if self.kernel is not None:
            env[PORT_ENV] = str(self.kernel.port)
            kfds = tuple(self.kernel.worker_fds())
            if kfds:
                env[FDS_ENV] = ",".join(map(str, kfds))
                fds += kfds
        if key_fd is not None:
            env[KEY_FD_ENV] = str(key_fd)
            fds.append(key_fd)
        return WorkerCommand(cmd.argv, env), tuple(fds)

    async def launch(self, cmd: WorkerCommand, pass_fds: Tuple[int, ...]) -> asyncio.subprocess.Process:
        """Start one worker process (stdout discarded, stderr relayed)."""
        return await asyncio.create_subprocess_exec(
            *cmd.argv, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE, env={**os.environ, **cmd.env}, pass_fds=pass_fds)

    async def _spawn(self, w: int) -> None:
        rfd, wfd = os.pipe()
        key_fd = None
        try:
            if self.static_key is not None:
                key_fd = _key_pipe(self.static_key)
            proc = await self.launch(*self.command(w, wfd, key_fd))
        except BaseException:
            os.close(rfd)
            raise
        finally:
            os.close(wfd)                 # the worker holds the only write end now
            if key_fd is not None:
                os.close(key_fd)
        self.procs[w] = proc
        self.ready[w] = asyncio.Event()
        self.say(f"worker {w} started (pid {proc.pid})")
        self._readiness[w] = asyncio.ensure_future(self._await_ready(w, rfd))
        self._relays.append(asyncio.ensure_future(self._relay(w, proc)))

    async def _await_ready(self, w: int, rfd: int) -> bool:
        """True once worker w wrote READY; False if its end closed first (it exited)."""
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader),
                                                    os.fdopen(rfd, "rb", buffering=0))
        try:
            line = await reader.readline()
        finally:
            transport.close()
        if line == READY:
            self.ready[w].set()
            return True
        return False

    async def _relay(self, w: int, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while True:
            line = await proc.stderr.readline()
            if not line:
                break
            text = line.decode(errors="replace").rstrip()
            if text.startswith("stcp: "):
                text = text[6:]
            print(f"stcp: [worker {w}] {text}", file=self.out, flush=True)

    async def _watch(self, w: int) -> None:
        while not self._stopping:
            proc = self.procs[w]
            rc = await proc.wait()
            if self._stopping:
                return
            how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
            now = time.monotonic()
            recent = [t for t in self.restarts[w] if now - t < self.restart_window] + [now]
            self.restarts[w] = recent
            if len(recent) > self.max_restarts:
                self.failed = (f"worker {w} died {len(recent)} times within {self.restart_window:.0f} s ({how}); "
                               "giving up")
                self._stop.set()
                return
            self.say(f"worker {w} (pid {proc.pid}) died ({how}); its connections are lost; restarting it")
            if self.kernel is not None:
                line = self.kernel.worker_died(w)
                if line:
                    self.say(line)
            if self.metrics_dir:
                with contextlib.suppress(OSError):
                    os.unlink(worker_socket_path(self.metrics_dir, w, proc.pid))
            self.restart_count[w] += 1
            await self._spawn(w)

    def worker_slots(self) -> List[WorkerSlot]:
        """A WorkerSlot per worker, for the pool's metrics (called from the exporter's thread:
        it only reads)."""
        out = []
        for w in range(self.n):
            proc = self.procs.get(w)
            pid = proc.pid if proc is not None else None
            ready = w in self.ready and self.ready[w].is_set()     # its exporter is up once it is ready
            path = worker_socket_path(self.metrics_dir, w, pid) if self.metrics_dir and pid and ready else None
            out.append(WorkerSlot(w, pid, proc is not None and proc.returncode is None, path,
                                  self.restart_count[w]))
        return out

    async def wait_closed(self) -> None:
        """Terminate the workers (SIGTERM, then SIGKILL after 10 s) and release the kernel part."""
        self._stopping = True
        self._stop.set()
        for t in [*self._readiness.values(), *self._watchers]:
            t.cancel()
        self.signal_workers(signal.SIGTERM)
        for w, proc in self.procs.items():
            try:
                await asyncio.wait_for(proc.wait(), 10)
            except asyncio.TimeoutError:
                self.say(f"worker {w} ignored SIGTERM; killing it")
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        await asyncio.sleep(0.1)          # let the relays print the workers' last lines
        if self.kernel is not None:
            self.kernel.close()
            self.kernel = None
