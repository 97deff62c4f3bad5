"""STCP on the AF_XDP datapath (`stcp serve --datapath afxdp`), same asyncio-streams
handler and client as the `stcp` peer: only the server's receive path differs (the XDP
program redirects good records to an AF_XDP socket per RX queue; replies leave through
the UDP socket, or the AF_XDP TX ring with BENCH_AFXDP_TX=afxdp).

The server finds its interface from the listen address, attaches the program in native
mode with the per-source handshake limit lifted (the benchmark's handshakes all come from
one client) and detaches it when it is stopped (SIGTERM). Needs root, bcc and stcp._xsk; not
available on loopback.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess

from bench import common as C
from bench.peers import stcp as socket_peer
from bench.peers import streams


def iface_of(host: str) -> str:
    """The interface that owns host in this network namespace."""
    out = subprocess.run(["ip", "-o", "addr", "show", "to", host], capture_output=True, text=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 1:
            return parts[1].split("@")[0]
    raise RuntimeError(f"no interface has address {host}")


class _CidHooks:
    def __init__(self, dp):
        self.dp = dp

    def connection_created(self, conn) -> None:
        self.dp.add_cid(conn.local_cid)

    def connection_ended(self, conn) -> None:
        self.dp.remove_cid(conn.local_cid)


def run_server(args) -> None:
    from stcp.datapath.afxdp import AfxdpDatapath

    async def main():
        host, port = C.split_hostport(args.listen)
        if port == 0:
            port = socket_peer.free_udp_port(host)
        iface = iface_of(host)
        if iface == "lo":
            raise RuntimeError("the afxdp peer needs a real interface (not available with --loopback)")
        # The program's per-source hello limit (20/s by default) would rate the benchmark's
        # sequential handshakes from one client, not the datapath: lift it here.
        dp = AfxdpDatapath.open(iface, port, mode="native", xdp_kw={"hs_rate": 1_000_000, "hs_burst": 1_000_000})
        try:
            srv = await dp.start_server(streams.handle, host, port, hooks=[_CidHooks(dp)],
                                        tx=os.environ.get("BENCH_AFXDP_TX", "socket"))
            C.announce_ready(port)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            srv.close()
        finally:
            dp.close()                 # detach what we attached
    asyncio.run(main())


def available() -> str | None:
    why = socket_peer.available()
    if why:
        return why
    if os.geteuid() != 0:
        return "needs root (XDP and AF_XDP)"
    try:
        from stcp import _xsk  # noqa: F401
        from stcp.datapath import xdp
        xdp.check_toolchain()
    except Exception as e:  # noqa: BLE001
        return f"AF_XDP datapath unavailable: {e}"
    return None


def main(argv=None) -> None:
    C.run_main(run_server, lambda a: streams.run_client(socket_peer.connect, a), __doc__, argv)


if __name__ == "__main__":
    main()
