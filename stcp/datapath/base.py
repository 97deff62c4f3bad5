"""What a datapath is to the server: how datagrams get in and out, and what must happen in
the kernel as connections come and go.

stcp.server.serve() assembles every server the same way on a Datapath: the endpoint runs
with server_config(config), open_driver() binds and returns the driver that moves the
datagrams, server_hooks() run for each connection, and close() releases what the datapath
holds once the driver is closed. Three implement it: SocketDatapath (stcp.datapath.socket),
XdpDatapath (stcp.datapath.xdp) and AfxdpDatapath (stcp.datapath.afxdp).

A datapath may also define worker_gone(w) -> bool: whether no live process owns the CIDs
of worker w (stcp.cid_layout), so that the endpoint may answer them with a stateless RESET
(ServerEndpoint). Without it only the server's own worker byte is answered.
"""
from __future__ import annotations

import asyncio
from typing import Callable, Optional, Protocol, Sequence, runtime_checkable

from ..connection import Config, Connection
from ..endpoint import ServerEndpoint
from .socket import ServerDriver


@runtime_checkable
class Datapath(Protocol):
    name: str                     # "socket", "xdp", "afxdp": the datapath of logs and metrics

    @property
    def iface(self) -> Optional[str]:
        """The interface a kernel datapath is attached to (None: any)."""
        ...

    def server_config(self, config: Config) -> Config:
        """The config the server's endpoint runs with (afxdp names its worker in every CID)."""
        ...

    def open_driver(self, loop: asyncio.AbstractEventLoop, host: str, port: int, endpoint: ServerEndpoint,
                    on_new: Callable[[Connection], None],
                    on_ended: Optional[Callable[[Connection], None]]) -> ServerDriver:
        """Bind host:port and return the driver that moves the server's datagrams."""
        ...

    def server_hooks(self) -> Sequence[object]:
        """Hooks the server runs for each of its connections (see stcp.server.Server)."""
        ...

    def close(self) -> None:
        """Release what the datapath holds (the server has closed its driver already)."""
        ...


class CidTable(Protocol):
    """The kernel's table of live connection IDs (XdpDatapath, AfxdpDatapath)."""

    def add_cid(self, cid: int) -> None: ...

    def remove_cid(self, cid: int) -> None: ...


class LiveCidHooks:
    """Server hooks that keep the kernel's table of live connection IDs in step with the
    server's connections: the XDP program passes data records only for the CIDs in it."""

    def __init__(self, table: CidTable):
        self.table = table

    def connection_created(self, conn: Connection) -> None:
        self.table.add_cid(conn.local_cid)

    def connection_ended(self, conn: Connection) -> None:
        self.table.remove_cid(conn.local_cid)
