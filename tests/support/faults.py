"""A fault-injecting UDP shim between a client and a server on loopback.

`tc netem` is not in this kernel, so loss, duplication, reordering and bursts are made
here: the client talks to the shim's port, the shim relays to the server through one
upstream socket per client, and a `Faults` policy decides each datagram's fate.
"""
from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple


@dataclass
class Faults:
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0            # share of datagrams delayed by up to `reorder_delay`
    reorder_delay: float = 0.004
    burst_at: Optional[int] = None  # index (per direction) where a burst of consecutive losses starts
    burst_len: int = 50
    seed: int = 1
    mutate: Optional[Callable[[str, int, bytes], Optional[bytes]]] = None   # (direction, index, data)
    counts: Dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    dropped: Dict[str, int] = field(default_factory=lambda: {"up": 0, "down": 0})
    log: List[Tuple[str, bytes]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def decide(self, direction: str, data: bytes) -> List[Tuple[float, bytes]]:
        """(delay, datagram) pairs to deliver for one datagram sent."""
        i = self.counts[direction]
        self.counts[direction] = i + 1
        self.log.append((direction, data))
        if self.mutate is not None:
            data = self.mutate(direction, i, data)
            if data is None:
                self.dropped[direction] += 1
                return []
        if self.burst_at is not None and self.burst_at <= i < self.burst_at + self.burst_len:
            self.dropped[direction] += 1
            return []
        if self.rng.random() < self.loss:
            self.dropped[direction] += 1
            return []
        copies = 2 if self.rng.random() < self.duplicate else 1
        out = []
        for _ in range(copies):
            delay = self.rng.uniform(0, self.reorder_delay) if self.rng.random() < self.reorder else 0.0
            out.append((delay, data))
        return out


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self, shim: "FaultShim", client_addr):
        self.shim = shim
        self.client_addr = client_addr
        self.transport = None

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        self.shim._deliver("down", data, lambda d: self.shim.transport.sendto(d, self.client_addr))


class FaultShim(asyncio.DatagramProtocol):
    def __init__(self, target: Tuple[str, int], faults: Faults):
        self.target = target
        self.faults = faults
        self.transport = None
        self._upstreams: Dict[tuple, _Upstream] = {}
        self._pending: Dict[tuple, List[bytes]] = {}
        self.loop = asyncio.get_event_loop()

    @classmethod
    async def start(cls, target: Tuple[str, int], faults: Faults) -> "FaultShim":
        loop = asyncio.get_running_loop()
        shim = cls(target, faults)
        await loop.create_datagram_endpoint(lambda: shim, local_addr=("127.0.0.1", 0))
        return shim

    @property
    def port(self) -> int:
        return self.transport.get_extra_info("sockname")[1]

    def connection_made(self, transport) -> None:
        self.transport = transport

    def datagram_received(self, data: bytes, addr) -> None:
        up = self._upstreams.get(addr)
        if up is None:
            up = _Upstream(self, addr)
            self._upstreams[addr] = up
            self._pending[addr] = [data]
            self.loop.create_task(self._open_upstream(addr, up))
            return
        if up.transport is None:
            self._pending[addr].append(data)
            return
        self._deliver("up", data, lambda d: up.transport.sendto(d))

    async def _open_upstream(self, addr, up: _Upstream) -> None:
        await self.loop.create_datagram_endpoint(lambda: up, remote_addr=self.target)
        for data in self._pending.pop(addr):
            self._deliver("up", data, lambda d: up.transport.sendto(d))

    def _deliver(self, direction: str, data: bytes, send) -> None:
        for delay, d in self.faults.decide(direction, data):
            if delay:
                self.loop.call_later(delay, send, d)
            else:
                send(d)

    def close(self) -> None:
        for up in self._upstreams.values():
            if up.transport is not None:
                up.transport.close()
        self.transport.close()
