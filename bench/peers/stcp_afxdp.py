"""STCP on the AF_XDP datapath (`stcp serve --datapath afxdp`), same asyncio-streams
handler and client as the `stcp` peer: only the server's receive path differs (the XDP
program redirects good records to an AF_XDP socket per RX queue; replies leave through
the UDP socket, or the AF_XDP TX ring with BENCH_AFXDP_TX=afxdp).

The server finds its interface from the listen address, attaches the program (in generic
mode unless BENCH_XDP_MODE says native; bench.run --xdp-mode) with the per-source
handshake limit lifted (the benchmark's handshakes all come from one client) and detaches
it when it is stopped (SIGTERM). Needs root, bcc and stcp._xsk; not
available on loopback.
"""
from __future__ import annotations

import asyncio
import os
import signal
import subprocess

from bench import common as C
from bench.peers import stcp as socket_peer, streams


def iface_of(host: str) -> str:
    """The interface that owns host in this network namespace."""
    out = subprocess.run(["ip", "-o", "addr", "show", "to", host], capture_output=True, text=True).stdout
    for line in out.splitlines():
        parts = line.split()
        if len(parts) > 1:
            return parts[1].split("@")[0]
    raise RuntimeError(f"no interface has address {host}")


# The program's hello limits (20/s per source, 1000/s in all by default) would rate the
# benchmark's sequential handshakes from one client, not the datapath: lift them here.
XDP_LIMITS = {"hs_rate": 1_000_000, "hs_burst": 1_000_000, "hs_global_rate": 0}
# How the XDP peers attach (bench.run --xdp-mode sets it): generic by default, since on
# veth native mode makes the client segment every GSO buffer (docs/OPERATIONS.md section 6).
XDP_MODE = os.environ.get("BENCH_XDP_MODE", "generic")


def driver_counters(driver, worker: int, nworkers: int) -> dict:
    """What the AF_XDP driver counted so far (bench.common.stats_on_sigusr1)."""
    return {
        "worker": worker,
        "workers": nworkers,
        "queues": sorted(driver.rx_per_queue),
        "rx_xsk": driver.rx_xsk,
        "rx_socket": driver.rx_socket,
        "rx_per_queue": {str(q): n for q, n in driver.rx_per_queue.items()},
        "tx_xsk": driver.tx_xsk,
        "tx_socket": driver.tx_socket,
        "connections_accepted": driver.connections_accepted,
        # deterministic costs of the receive path: wake-ups, batches and entries per record,
        # and the AF_XDP sockets' own counters (ring full, fill ring empty, packets in pieces)
        "counts": {"wakeups": driver.rx_xsk_wakeups, "batches": driver.rx_xsk_batches,
                   "entries": driver.rx_xsk_entries, **xsk_stats(driver)},
    }


def xsk_stats(driver) -> dict:
    """The AF_XDP sockets' counters, summed over the driver's queues."""
    out: dict = {}
    for x in driver.xsks:
        if not x.closed:
            for k, v in x.stats().items():
                out[k] = out.get(k, 0) + v
    return out


def run_server(args) -> None:
    """The server alone, or (started by run_supervisor) one of its workers."""
    from stcp.server import serve
    from stcp.supervisor import WorkerRole

    role = WorkerRole.from_env()

    async def main():
        host, port = C.split_hostport(args.listen)
        if port == 0:
            port = socket_peer.free_udp_port(host)
        iface = iface_of(host)
        if iface == "lo":
            raise RuntimeError("the afxdp peer needs a real interface (not available with --loopback)")
        w, n = (role.index, role.count) if role else (0, 1)
        loop = asyncio.get_running_loop()
        box: dict = {}
        # installed before the server says it is ready: SIGUSR1 would otherwise kill
        C.stats_on_sigusr1(loop, lambda: driver_counters(box["srv"].driver, w, n) if box else {}, name=str(w))
        srv = box["srv"] = await serve(streams.handle, host, port, datapath="afxdp", iface=iface, xdp_mode=XDP_MODE,
                                       xdp_limits=XDP_LIMITS, afxdp_tx=os.environ.get("BENCH_AFXDP_TX", "socket"),
                                       worker=role,     # a worker serves under the key its supervisor holds
                                       server_key=None if role else C.stcp_keys(args)["server_key"])
        try:
            if role is None:
                C.announce_ready(port)
            else:
                role.notify_ready()
            stop = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
        finally:
            srv.close()                # detach what we attached (a worker: forget its CIDs)
    asyncio.run(main())


def run_supervisor(args, nworkers: int) -> None:
    """`stcp serve --datapath afxdp --workers N` with the benchmark's handler: a
    stcp.server.WorkerPool (hello limit lifted, which `stcp serve` does not offer) running N
    worker processes of this module (worker W owns the AF_XDP sockets of the RX queues
    q % N == W); READY once every worker is; SIGUSR1 is passed on to the workers (their
    counters), SIGTERM stops them and detaches. A worker that dies ends the server (bench.run
    then reports the peer as failed) rather than being replaced."""
    import sys

    from stcp.server import WorkerPool
    from stcp.supervisor import WorkerCommand

    host, port = C.split_hostport(args.listen)
    iface = iface_of(host)
    if iface == "lo":
        raise RuntimeError("the afxdp peer needs a real interface (not available with --loopback)")
    me = os.path.splitext(os.path.basename(sys.argv[0]))[0]

    def spawn(w: int, n: int) -> WorkerCommand:
        return WorkerCommand([sys.executable, "-m", "bench.peers.stcp_afxdp", *sys.argv[1:]],
                             {"BENCH_PROFILE_NAME": f"{me}-worker{w}"})

    async def main():
        pool = WorkerPool(spawn, port, iface=iface, workers=nworkers, xdp_mode=XDP_MODE, xdp_limits=XDP_LIMITS,
                          server_key=C.stcp_keys(args)["server_key"], max_restarts=0)
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGUSR1, pool.signal_workers, signal.SIGUSR1)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, pool.close)
        try:
            await pool.start()
            C.announce_ready(port)
            await pool.serve_forever()
        finally:
            pool.close()
            await pool.wait_closed()
    asyncio.run(main())


def kernel_datapath_available(afxdp: bool) -> str | None:
    """None when the XDP (afxdp=False) or AF_XDP datapath can run here, otherwise why not."""
    why = socket_peer.available()
    if why:
        return why
    what = "AF_XDP" if afxdp else "XDP"
    if os.geteuid() != 0:
        return f"needs root ({'XDP and AF_XDP' if afxdp else 'XDP'})"
    try:
        if afxdp:
            from stcp import _xsk  # noqa: F401
        from stcp.datapath.xdp_prog import check_toolchain
        check_toolchain()
    except Exception as e:
        return f"{what} datapath unavailable: {e}"
    return None


def available() -> str | None:
    return kernel_datapath_available(afxdp=True)


def main(argv=None, workers: int = 1) -> None:
    def server(a):
        if workers > 1:
            run_supervisor(a, workers)
        else:
            run_server(a)
    C.run_main(server, lambda a: streams.run_client(socket_peer.connect, a), __doc__, argv)


if __name__ == "__main__":
    main()
