"""STCP on the XDP datapath (`stcp serve --datapath xdp`): the socket-datapath server
(kernel UDP socket) with the STCP XDP program attached on the server's veth (generic mode
unless BENCH_XDP_MODE says native; bench.run --xdp-mode), dropping what does not belong to
a live connection or a well-formed hello before the stack sees it:
`stcp.serve(..., datapath="xdp")`. Same handler and client as the `stcp` peer. The
per-source hello limit is lifted, as for stcp_afxdp (the benchmark's handshakes all come
from one client). Root, bcc; not available on loopback.
"""
from __future__ import annotations

import asyncio
import signal
import sys

from bench import common as C
from bench.peers import stcp as socket_peer, streams
from bench.peers.stcp_afxdp import XDP_LIMITS, XDP_MODE, iface_of, kernel_datapath_available


def run_server(args) -> None:
    from stcp.server import serve

    async def main():
        host, port = C.split_hostport(args.listen)
        if port == 0:
            port = socket_peer.free_udp_port(host)
        iface = iface_of(host)
        if iface == "lo":
            raise RuntimeError("the xdp peer needs a real interface (not available with --loopback)")
        srv = await serve(streams.handle, host, port, datapath="xdp", iface=iface, xdp_mode=XDP_MODE,
                          xdp_limits=XDP_LIMITS, server_key=C.stcp_keys(args)["server_key"])
        try:
            C.announce_ready(port)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            verdicts = {k: v[0] for k, v in srv.datapath.counters().items() if v[0]}
            print(f"stcp_xdp: XDP verdicts (packets) {verdicts}", flush=True, file=sys.stderr)
        finally:
            srv.close()                # detach what we attached
    asyncio.run(main())


def available() -> str | None:
    return kernel_datapath_available(afxdp=False)


def main(argv=None) -> None:
    C.run_main(run_server, lambda a: streams.run_client(socket_peer.connect, a), __doc__, argv)


if __name__ == "__main__":
    main()
