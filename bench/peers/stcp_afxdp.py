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
import contextlib
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


# The program's hello limits (20/s per source, 1000/s in all by default) would rate the
# benchmark's sequential handshakes from one client, not the datapath: lift them here.
XDP_LIMITS = {"hs_rate": 1_000_000, "hs_burst": 1_000_000, "hs_global_rate": 0}
WORKER_ENV = "BENCH_AFXDP_WORKER"     # "W/N" in a worker process of bench.peers.stcp_afxdp2


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
    }


def run_server(args) -> None:
    from stcp.datapath import afxdp

    worker = os.environ.get(WORKER_ENV)

    async def main():
        host, port = C.split_hostport(args.listen)
        if port == 0:
            port = socket_peer.free_udp_port(host)
        iface = iface_of(host)
        if iface == "lo":
            raise RuntimeError("the afxdp peer needs a real interface (not available with --loopback)")
        if worker:
            w, n = (int(x) for x in worker.split("/"))
            afxdp.die_with_parent()
            dp = afxdp.AfxdpDatapath.join(iface, port, w, n)   # the supervisor's program
        else:
            w, n = 0, 1
            dp = afxdp.AfxdpDatapath.open(iface, port, mode="native", xdp_kw=XDP_LIMITS)
        try:
            srv = await dp.start_server(streams.handle, host, port, hooks=[_CidHooks(dp)],
                                        tx=os.environ.get("BENCH_AFXDP_TX", "socket"))
            loop = asyncio.get_running_loop()
            C.stats_on_sigusr1(loop, lambda: driver_counters(srv.driver, w, n), name=str(w))
            C.announce_ready(port)
            stop = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            await stop.wait()
            srv.close()
        finally:
            dp.close()                 # detach what we attached (a worker: forget its CIDs)
    asyncio.run(main())


def run_supervisor(args, nworkers: int) -> None:
    """`stcp serve --datapath afxdp --workers N` with the benchmark's handler: attach the
    afxdp program (hello limit lifted, which stcp's Supervisor does not offer), run N
    worker processes of this module (worker W owns the AF_XDP sockets of the RX queues
    q % N == W), print READY once every worker is; SIGUSR1 is passed on to the workers
    (their counters), SIGTERM stops them and detaches. A worker that dies ends the server
    (bench.run then reports the peer as failed) rather than being replaced."""
    import sys
    import time

    from stcp.datapath import afxdp
    from stcp.datapath.xdp import XdpDatapath

    host, port = C.split_hostport(args.listen)
    iface = iface_of(host)
    if iface == "lo":
        raise RuntimeError("the afxdp peer needs a real interface (not available with --loopback)")
    queues = afxdp.rx_queue_count(iface)
    if queues < nworkers:
        raise RuntimeError(f"{nworkers} workers need {nworkers} RX queues; {iface} has {queues} "
                           "(bench.run --queues)")
    afxdp.load_xsk()
    xdp = XdpDatapath.attach(iface, port, "native", afxdp=True, nworkers=nworkers, **XDP_LIMITS)
    procs: list[subprocess.Popen] = []

    def forward(sig, _frame):
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    stopping = False

    def stop(*_):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGUSR1, forward)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        for w in range(nworkers):
            env = dict(os.environ, **{WORKER_ENV: f"{w}/{nworkers}",
                                      "BENCH_PROFILE_NAME": f"{os.path.splitext(os.path.basename(sys.argv[0]))[0]}-worker{w}"})
            procs.append(subprocess.Popen([sys.executable, "-m", "bench.peers.stcp_afxdp", *sys.argv[1:]],
                                          stdout=subprocess.PIPE, text=True, env=env))
        for w, p in enumerate(procs):
            line = p.stdout.readline()
            if not line.startswith("READY"):
                raise RuntimeError(f"worker {w} did not start (exit {p.poll()}); see the server log")
        print(f"stcp_afxdp: {nworkers} workers over {queues} RX queues of {iface}, XDP {xdp.mode} mode, "
              f"all pinned where this process is", file=sys.stderr, flush=True)
        C.announce_ready(port)
        while not stopping:
            dead = [w for w, p in enumerate(procs) if p.poll() is not None]
            if dead:
                raise RuntimeError(f"worker(s) {dead} exited")
            time.sleep(0.2)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        prog_id = xdp.prog_id
        xdp.close()
        with contextlib.suppress(OSError):
            os.unlink(f"/run/stcp-afxdp-{prog_id}.lock")


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
        from stcp.datapath import xdp
        xdp.check_toolchain()
    except Exception as e:  # noqa: BLE001
        return f"{what} datapath unavailable: {e}"
    return None


def available() -> str | None:
    return kernel_datapath_available(afxdp=True)


def main(argv=None, workers: int = 1) -> None:
    def server(a):
        if workers > 1 and not os.environ.get(WORKER_ENV):
            run_supervisor(a, workers)
        else:
            run_server(a)
    C.run_main(server, lambda a: streams.run_client(socket_peer.connect, a), __doc__, argv)


if __name__ == "__main__":
    main()
