"""STCP on the XDP datapath (`stcp serve --datapath xdp`): the socket-datapath server
(`stcp.start_server`, kernel UDP socket) with the STCP XDP program attached in native
mode on the server's veth, dropping what does not belong to a live connection or a
well-formed hello before the stack sees it; the server keeps the program's table of live
connection IDs in step (hooks, as stcp/cli/main.py does). Same handler and client as the
`stcp` peer. The per-source hello limit is lifted, as for stcp_afxdp (the benchmark's
handshakes all come from one client). Root, bcc; not available on loopback.
"""
from __future__ import annotations

import asyncio
import signal

from bench import common as C
from bench.peers import stcp as socket_peer
from bench.peers import streams
from bench.peers.stcp_afxdp import XDP_LIMITS, _CidHooks, iface_of, kernel_datapath_available


def run_server(args) -> None:
    from stcp.datapath.xdp import XdpDatapath

    async def main():
        stcp = socket_peer._stcp()
        host, port = C.split_hostport(args.listen)
        if port == 0:
            port = socket_peer.free_udp_port(host)
        iface = iface_of(host)
        if iface == "lo":
            raise RuntimeError("the xdp peer needs a real interface (not available with --loopback)")
        dp = XdpDatapath.attach(iface, port, "native", **XDP_LIMITS)
        try:
            srv = await stcp.start_server(streams.handle, host, port, hooks=[_CidHooks(dp)])
            C.announce_ready(port)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            srv.close()
            verdicts = {k: v[0] for k, v in dp.counters().items() if v[0]}
            print(f"stcp_xdp: XDP verdicts (packets) {verdicts}", flush=True, file=__import__("sys").stderr)
        finally:
            dp.close()                 # detach what we attached
    asyncio.run(main())


def available() -> str | None:
    return kernel_datapath_available(afxdp=False)


def main(argv=None) -> None:
    C.run_main(run_server, lambda a: streams.run_client(socket_peer.connect, a), __doc__, argv)


if __name__ == "__main__":
    main()
