"""SO_REUSEPORT steering by connection ID: N worker processes on one UDP port.

A BPF_PROG_TYPE_SK_REUSEPORT program (stcp/datapath/reuseport_prog.py) picks the socket of a UDP
reuseport group for each datagram: a record goes to the socket at key = its CID's worker
bits (docs/PROTOCOL.md section 3.1.1) in a REUSEPORT_SOCKARRAY; a client hello (cid 0,
seq 0) goes where the kernel's 4-tuple hash sends it, over the group's live sockets; so
does a record whose worker has no socket (its connection died with that worker, and
whichever worker gets it says so with a stateless RESET).

One ReuseportSteering serves one reuseport group, i.e. one bound address and port (an
IPv4 and an IPv6 socket on the same port are two groups: two steerings, or one
dual-stack "::" group). Its pieces and who needs what:

* load() (the supervisor, once): creates the socket map and the counters through the bpf
  syscall and loads the program's instructions with the maps' fds in them (no compiler:
  it takes a millisecond). Needs CAP_BPF (root has it): the kernel allows neither a
  REUSEPORT_SOCKARRAY nor an SK_REUSEPORT program without it, whatever
  kernel.unprivileged_bpf_disabled says. Any failure is a ReuseportError with one line
  saying why; the server then runs one worker.
* The three fds (fds()) are handed to each worker at fork or exec (subprocess pass_fds)
  and reopened there with from_fds(). No pins under /sys/fs/bpf: pins outlive the
  processes and need cleaning up, and `ip netns exec` gives each process a private bpffs;
  inherited fds live exactly as long as the pool.
* join(worker, sock) (each worker, after binding its SO_REUSEPORT socket, at every
  (re)start): attaches the program to the socket's group and puts the socket at key
  `worker`. Needs no capability given the fds. The program belongs to the group, and a
  group exists only while one of its sockets is open: if every worker died, the restarted
  ones form a new group without a program, so each join attaches again (re-attaching the
  same program to a group that has it changes nothing).
* A worker that exits or dies closes its socket; the kernel then removes it from the map
  and the group. Until a new process joins at the same key, its records go where the
  kernel's hash sends them (pass_orphan), to a live worker, which finds the key empty
  (worker_gone) and answers with a stateless RESET: the dead worker's clients learn at
  once that their connections are gone. Hellos spread over the remaining sockets. Other
  workers are untouched.
* counters() (anyone holding the fds): per-verdict (packets, bytes) over all CPUs.

Workers must not connect() their sockets: a group with a connected socket is looked up by
score, not by the program. A dropped datagram makes the kernel answer ICMP port
unreachable (rate limited), as for a closed port; clients count and ignore it.

The bpf(2) calls go through stcp/datapath/bpf.py, the binding the XDP datapath uses too.
"""
from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Any, Callable, Dict, Optional, Tuple

from ..errors import STCPError
from ..wire import CID_WORKER_SHIFT, HANDSHAKE_SEQ, HEADER_LEN, MAX_CID_WORKERS
from . import bpf
from .errors import XdpSetupError
from .reuseport_prog import VERDICT_MAX, ReuseportVerdict, instructions

PROG_NAME = "stcp_reuseport"
MAX_WORKERS = MAX_CID_WORKERS            # keys of the socket map: every value of the worker bits

# linux/bpf.h and asm-generic/socket.h
BPF_MAP_TYPE_PERCPU_ARRAY = 6
BPF_MAP_TYPE_REUSEPORT_SOCKARRAY = 20
BPF_PROG_TYPE_SK_REUSEPORT = 21
SO_ATTACH_REUSEPORT_EBPF = 52
SO_DETACH_REUSEPORT_BPF = 68
SO_COOKIE = 57

_KEY = struct.Struct("=I")
_SOCK_VALUE = struct.Struct("=Q")       # an fd on update, the socket's cookie on lookup
_COUNTER = struct.Struct("=QQ")         # struct stcp_counter

_CAP_HINT = ("SO_REUSEPORT steering needs CAP_BPF to load (root, or grant it: "
             "setpriv --inh-caps +bpf --ambient-caps +bpf, systemd AmbientCapabilities=CAP_BPF)")


class ReuseportError(STCPError):
    """Steering cannot be set up; str() is one line saying why and what to do."""


def classify(payload: bytes) -> Tuple[ReuseportVerdict, Optional[int]]:
    """What the program decides for a UDP payload before it looks at the map: (PASS_WORKER,
    worker) for a record, else (PASS_NOT_STCP or PASS_HELLO, None). The Python reference of
    stcp/datapath/reuseport_prog.py, tested against it."""
    if len(payload) < HEADER_LEN:
        return ReuseportVerdict.PASS_NOT_STCP, None
    cid, seq = struct.unpack_from("!QQ", payload, 8)
    if cid == 0 and seq == HANDSHAKE_SEQ:
        return ReuseportVerdict.PASS_HELLO, None
    return ReuseportVerdict.PASS_WORKER, cid >> CID_WORKER_SHIFT


def _info(read: Callable[[int], Dict[str, Any]], fd: int) -> Optional[Dict[str, Any]]:
    """bpf.map_info / bpf.prog_info of fd, None if fd is no such object."""
    try:
        return read(fd)
    except OSError:
        return None


# --------------------------------------------------------------------------------------
def _load_program(sockarray_fd: int) -> Tuple[int, int]:
    """(prog fd, counters map fd) of a freshly loaded program using the socket map."""
    counters_fd = bpf.map_create(BPF_MAP_TYPE_PERCPU_ARRAY, "stcp_rp_counters", _KEY.size, _COUNTER.size,
                                 VERDICT_MAX)
    try:
        return bpf.prog_load(BPF_PROG_TYPE_SK_REUSEPORT, PROG_NAME, instructions(sockarray_fd, counters_fd)), \
            counters_fd
    except OSError as e:
        os.close(counters_fd)
        hint = f"; {_CAP_HINT}" if e.errno == errno.EPERM else ""
        raise ReuseportError(f"loading {PROG_NAME} failed ({e.strerror}){hint}") from None


def socket_cookie(sock: socket.socket) -> int:
    """The kernel's id of a socket (SO_COOKIE), what the socket map returns on lookup."""
    return struct.unpack("=Q", sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8))[0]


def detach(sock: socket.socket) -> None:
    """Remove the steering program from sock's group: the kernel's hash decides again."""
    sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_REUSEPORT_BPF, 0)


class ReuseportSteering:
    """The socket map, the counters and the program of one reuseport group (see module doc)."""

    def __init__(self, sockarray_fd: int, counters_fd: int, prog_fd: int):
        self.sockarray_fd = sockarray_fd
        self.counters_fd = counters_fd
        self.prog_fd = prog_fd

    @classmethod
    def load(cls) -> "ReuseportSteering":
        """Create the maps and load the program. ReuseportError if this host cannot."""
        try:
            fd = bpf.map_create(BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, "stcp_rp_socks", _KEY.size, _SOCK_VALUE.size,
                                MAX_WORKERS)
        except XdpSetupError as e:        # libbpf missing
            raise ReuseportError(str(e)) from None
        except OSError as e:
            hint = _CAP_HINT if e.errno == errno.EPERM else "is this a Linux kernel with BPF (4.19 or later)?"
            raise ReuseportError(f"cannot create the reuseport socket map ({os.strerror(e.errno or 0)}); "
                                 f"{hint}") from None
        try:
            prog_fd, counters_fd = _load_program(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, counters_fd, prog_fd)

    @classmethod
    def from_fds(cls, sockarray_fd: int, counters_fd: int, prog_fd: int) -> "ReuseportSteering":
        """Adopt the fds a worker inherited from the process that called load() (fds())."""
        try:
            m, c = _info(bpf.map_info, sockarray_fd), _info(bpf.map_info, counters_fd)
            p = _info(bpf.prog_info, prog_fd)
        except XdpSetupError as e:        # libbpf missing
            raise ReuseportError(str(e)) from None
        if (m is None or (m["type"], m["key_size"], m["value_size"]) != (BPF_MAP_TYPE_REUSEPORT_SOCKARRAY, 4, 8)
                or c is None or (c["type"], c["max_entries"]) != (BPF_MAP_TYPE_PERCPU_ARRAY, VERDICT_MAX)
                or p is None or p["type"] != BPF_PROG_TYPE_SK_REUSEPORT):
            raise ReuseportError(f"fds {sockarray_fd}, {counters_fd}, {prog_fd} are not a reuseport steering's "
                                 "socket map, counters and program; pass ReuseportSteering.fds() of the "
                                 "supervisor, in that order")
        return cls(sockarray_fd, counters_fd, prog_fd)

    @property
    def prog_id(self) -> int:
        """The program's id, as bpftool shows it (bpftool prog show id N)."""
        info = _info(bpf.prog_info, self.prog_fd)
        if info is None:
            raise ReuseportError("the steering program's fd is closed")
        return int(info["id"])

    def fds(self) -> Tuple[int, int, int]:
        """(socket map, counters, program): what a worker needs, for pass_fds and from_fds()."""
        return self.sockarray_fd, self.counters_fd, self.prog_fd

    # -- the group -----------------------------------------------------------------------
    def attach(self, sock: socket.socket) -> None:
        """Make the program decide for sock's reuseport group (any member socket will do)."""
        try:
            sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_REUSEPORT_EBPF, struct.pack("=i", self.prog_fd))
        except OSError as e:
            raise ReuseportError(f"attaching the steering program to the socket failed ({e.strerror}); "
                                 "it must be a bound UDP socket with SO_REUSEPORT") from None

    def insert(self, worker: int, sock: socket.socket) -> None:
        """Put sock at key worker, replacing whatever socket was there."""
        self._check_worker(worker)
        try:
            bpf.map_update(self.sockarray_fd, _KEY.pack(worker), _SOCK_VALUE.pack(sock.fileno()))
        except OSError as e:
            raise ReuseportError(f"putting worker {worker}'s socket in the steering map failed "
                                 f"({os.strerror(e.errno or 0)}); it must be a bound UDP socket with "
                                 "SO_REUSEPORT") from None

    def join(self, worker: int, sock: socket.socket) -> None:
        """What a worker does after binding its socket, at every (re)start: attach, insert."""
        self.attach(sock)
        self.insert(worker, sock)

    def remove(self, worker: int) -> bool:
        """Empty key worker (its records go by the kernel's hash from now on); False if it was empty."""
        self._check_worker(worker)
        return bpf.map_delete(self.sockarray_fd, _KEY.pack(worker))

    def cookie(self, worker: int) -> Optional[int]:
        """socket_cookie() of the socket at key worker, None if the key is empty."""
        self._check_worker(worker)
        value = bpf.map_lookup(self.sockarray_fd, _KEY.pack(worker), _SOCK_VALUE.size)
        return None if value is None else int(_SOCK_VALUE.unpack(value)[0])

    def workers(self) -> Dict[int, int]:
        """{worker: socket cookie} of every key that has a socket."""
        out = {}
        for w in range(MAX_WORKERS):
            c = self.cookie(w)
            if c is not None:
                out[w] = c
        return out

    @staticmethod
    def _check_worker(worker: int) -> None:
        if not 0 <= worker < MAX_WORKERS:
            raise ReuseportError(f"worker {worker} is outside 0..{MAX_WORKERS - 1} (the CID's worker bits)")

    # -- counters ------------------------------------------------------------------------
    def counters(self) -> Dict[str, Tuple[int, int]]:
        """verdict key ('pass_worker', 'pass_orphan', ...) -> (packets, bytes), all CPUs.
        Bytes count the UDP header and payload."""
        ncpu = bpf.possible_cpus()
        out = {}
        for v in ReuseportVerdict:
            # per-CPU values, 8-aligned; an array map has every key
            raw = bpf.map_lookup(self.counters_fd, _KEY.pack(int(v)), _COUNTER.size * ncpu)
            if raw is None:
                raise OSError(errno.ENOENT, f"read the steering counters: no entry {int(v)}")
            pk = by = 0
            for cpu in range(ncpu):
                p, b = _COUNTER.unpack_from(raw, cpu * _COUNTER.size)
                pk += p
                by += b
            out[v.key] = (pk, by)
        return out

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        """Close our fds. The program stays with any group it is attached to (and keeps its
        maps) until the group's last socket closes."""
        for name in ("sockarray_fd", "counters_fd", "prog_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, name, -1)

    def __enter__(self) -> "ReuseportSteering":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
