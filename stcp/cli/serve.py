"""`stcp serve`: echo each stream, or forward it to a TCP backend, on any datapath; with
`--workers N` (N > 1; on the socket datapath one per CPU unless told) the supervisor of N
worker processes on the port (stcp.server.WorkerPool), each running this same command line,
which loads (or makes) the server key once and hands it to every worker.

Once set up, the server runs as an unprivileged user with no capabilities (--user; see
stcp.privileges). The pool's supervisor keeps its privileges: it parses no datagram, and
it needs them to attach, detach and start replacement workers, each of which drops its
own once it has joined."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import signal
import socket
import sys
from typing import Any, Awaitable, Callable, Tuple

from .. import server as stcp_server
from ..address import hostport
from ..connection import Config
from ..errors import STCPError
from ..wire import DEFAULT_PORT
from .common import CHUNK, UsageError, config_from_args, describe, parse_hostport, splice
from .identity import allowed_clients, describe_key, server_identity
from .logs import setup_logging
from .options import check_datapath_options, destination


async def echo_handler(reader: Any, writer: Any) -> None:
    while True:
        data = await reader.read(CHUNK)
        if not data:
            break
        writer.write(data)
        await writer.drain()
    writer.close()
    await writer.wait_closed()


def forward_handler(target: Tuple[str, int]) -> Callable[[Any, Any], Awaitable[None]]:
    """Relay each stream to the TCP backend at target. A backend failure is logged (with the
    backend's address) and the client told only that the backend failed: the address of a
    server's internal backend is not the client's business."""
    backend = stcp_server.format_address(target)

    def backend_failed(writer: Any, what: str, exc: OSError) -> None:
        conn = writer.get_extra_info("connection")
        fields = stcp_server.connection_fields(conn, writer.get_extra_info("peername"))
        stcp_server.log.warning(f"backend {what}", extra={"fields": {
            **fields, "backend": backend, "error": describe(exc)}})

    async def handler(reader: Any, writer: Any) -> None:
        try:
            tcp_reader, tcp_writer = await asyncio.open_connection(*target)
        except OSError as exc:
            backend_failed(writer, "unreachable", exc)
            writer.abort(f"backend unreachable: {describe(exc)}")
            return
        error = await splice(reader, writer, tcp_reader, tcp_writer)
        if isinstance(error, OSError) and not isinstance(error, STCPError):
            backend_failed(writer, "failed", error)
    return handler


async def backend(text: str) -> Tuple[str, int]:
    """--forward HOST:PORT, resolved once at start: a name that does not resolve stops the
    server now, not each connection later. The name is kept (and resolved again per
    connection), so a backend that moves in DNS is followed."""
    host, port = destination(text, "--forward")
    try:
        await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise STCPError(f"cannot resolve the --forward host {host!r}: {exc.strerror}") from None
    return host, port


class _Startup:
    """SIGINT and SIGTERM while `serve` starts: remembered by a plain signal handler, which runs
    even while a blocking call holds the event loop (the XDP program compiles for seconds), so
    the startup finishes, releases what it set up and `serve` exits 0 as it would later."""

    def __init__(self) -> None:
        self.signalled = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._caught)

    def _caught(self, signum: int, frame: Any) -> None:
        self.signalled = True

    def hand_over(self, stop: Callable[[], None]) -> bool:
        """From now on a signal calls stop (through the event loop); True if one came before."""
        def stopping() -> None:
            self.signalled = True
            stop()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stopping)
        return self.signalled


async def serve(args: Any) -> int:
    startup = _Startup()
    setup_logging(args.log_format, args.verbose - args.quiet)
    host, port = parse_hostport(args.listen, DEFAULT_PORT)
    config = config_from_args(args)
    if args.cipher:                 # the one suite clients may use; the others are refused REJECT_SUITE
        config = dataclasses.replace(config, accepted_suites=(config.suite,))
    check_datapath_options(args)
    handler = forward_handler(await backend(args.forward)) if args.forward else echo_handler
    if args.metrics:
        from ..metrics import parse_listen
        try:
            parse_listen(args.metrics)
        except ValueError as exc:
            raise UsageError(f"bad --metrics address: {exc}") from None
    if args.datapath in ("xdp", "afxdp") and not args.iface:
        raise UsageError(f"--datapath {args.datapath} needs --iface IFACE")
    workers = worker_count(args)
    if port == 0 and workers > 1:     # each worker would bind a port of its own: one port or one worker
        if args.workers is not None:
            raise UsageError(f"--listen port 0 with --workers {args.workers}: the workers share one port; "
                             "give one (or drop --workers)")
        workers = 1
    role = None
    if args.datapath in ("socket", "afxdp"):
        from ..supervisor import WorkerRole
        role = WorkerRole.from_env()          # set when our supervisor started this process
    if role is None or role.static_key is None:     # a worker serves under the key its supervisor holds
        private, note = server_identity(args)
        if note:
            print(f"stcp: {note}", file=sys.stderr, flush=True)
        config = dataclasses.replace(config, static_key=private)
    allowed = allowed_clients(args)
    if workers > 1 and role is None:
        from ..datapath.reuseport import ReuseportError
        from ..datapath.socket import bind_udp
        bind_udp(host, port).close()      # a port in use: said once here, not once per worker
        try:
            return await _supervise(args, host, port, config, workers, startup)
        except ReuseportError as exc:         # socket pool without CAP_BPF or libbpf: nothing was started
            print(f"stcp: {workers} workers need the SO_REUSEPORT steering program: {exc}; serving with "
                  "one worker", file=sys.stderr, flush=True)
    server = await stcp_server.serve(handler, host, port, datapath=args.datapath, iface=args.iface,
                                     xdp_mode=args.xdp_mode, afxdp_tx=args.afxdp_tx, worker=role,
                                     config=config, allowed_clients=allowed, metrics=None if role else args.metrics,
                                     drop_privileges=args.user or True)
    dp = server.datapath
    watch = None
    try:
        if startup.hand_over(server.close):     # before the startup line: a SIGTERM after it is clean
            return 0                            # one came during startup: close what it set up
        if args.datapath == "afxdp":
            from ..datapath.afxdp import AfxdpDatapath
            assert isinstance(dp, AfxdpDatapath)
            print(f"stcp: AF_XDP on {args.iface}: {len(dp.xsks)} RX queue(s), XDP {dp.mode} mode, "
                  f"{'zero-copy' if dp.zerocopy else 'copy'} mode; replies through "
                  f"{'the AF_XDP sockets' if args.afxdp_tx == 'afxdp' else 'the UDP socket'}", file=sys.stderr)
        elif args.datapath == "xdp":
            from ..datapath.xdp import XdpDatapath
            assert isinstance(dp, XdpDatapath)
            print(f"stcp: XDP program on {args.iface} ({dp.mode} mode)", file=sys.stderr)
        bound = server.sockets[0].getsockname()
        mode = f"forwarding to {args.forward}" if args.forward else "echo"
        admits = f"; admitting {len(allowed)} client key(s) from {args.allow_clients}" if allowed is not None else ""
        exporter = getattr(server.metrics, "address", None)      # --metrics HOST:0: the port it got
        admits += f"; metrics on http://{hostport(*exporter)}/metrics" if exporter else ""
        print(f"stcp: serving on {hostport(bound[0], bound[1])} ({mode}, {args.datapath} datapath); server key "
              f"{describe_key(server.public_key)}{admits}", file=sys.stderr, flush=True)
        if role is not None:
            role.notify_ready()
        watch = asyncio.ensure_future(_report_refused_suites(server, args.cipher)) if args.cipher else None
        await server.serve_forever()
    finally:
        if watch is not None:
            watch.cancel()
        server.close()
        if args.datapath == "afxdp":
            _report_afxdp(server)
    return 0


async def _report_refused_suites(server: stcp_server.Server, cipher: str, every: float = 1.0) -> None:
    """serve --cipher: say on stderr that clients offering another suite are refused, at most
    one line per `every` seconds however many hellos arrive (they are unauthenticated)."""
    seen = server.endpoint.stats.rejected_suite
    while True:
        await asyncio.sleep(every)
        now = server.endpoint.stats.rejected_suite
        if now > seen:
            print(f"stcp: refused {now - seen} client hello(s) offering a cipher other than {cipher} (--cipher)",
                  file=sys.stderr, flush=True)
            seen = now


def _report_afxdp(server: stcp_server.Server) -> None:
    """What went through AF_XDP and what through the UDP socket (the tests read this line)."""
    from ..datapath.afxdp import AfxdpDatapath, AfxdpServerDriver
    assert isinstance(server.datapath, AfxdpDatapath) and isinstance(server.driver, AfxdpServerDriver)
    st = server.datapath.stats()
    d = server.driver
    per_q = ", ".join(f"queue {q}: {n}" for q, n in sorted(d.rx_per_queue.items()))
    print(f"stcp: AF_XDP: {d.rx_xsk} datagrams received through AF_XDP ({d.rx_xsk_wakeups} wakeups; {per_q}), "
          f"{d.rx_socket} through the UDP socket; sent {d.tx_xsk} through AF_XDP, {d.tx_socket} through the "
          f"UDP socket; {d.connections_accepted} connections, "
          f"{d.endpoint.stats.dropped_unknown_cid} datagrams for unknown ones; kernel dropped "
          f"{st.get('rx_dropped', 0)}, fill ring empty {st.get('rx_fill_ring_empty_descs', 0)}; "
          f"{st.get('rx_chained', 0)} packets came in pieces ({st.get('rx_gathered', 0)} gathered before parsing)",
          file=sys.stderr, flush=True)


def worker_count(args: Any) -> int:
    """--workers, or its default: one per CPU this process may run on (socket), 1 (afxdp, xdp)."""
    if args.workers is None:
        if args.datapath != "socket":
            return 1
        from ..datapath.reuseport import MAX_WORKERS
        return max(1, min(len(os.sched_getaffinity(0)), MAX_WORKERS))
    if args.workers < 1:
        raise UsageError("--workers must be at least 1")
    if args.workers > 1 and args.datapath == "xdp":
        raise UsageError("--workers needs --datapath socket or afxdp: the xdp datapath serves from one process")
    return int(args.workers)


async def _supervise(args: Any, host: str, port: int, config: Config, workers: int, startup: _Startup) -> int:
    """`serve --workers N`: the supervisor of N processes running this same command line (and,
    with --metrics, the pool's exporter). ReuseportError before anything started where the
    socket pool cannot steer."""
    from ..supervisor import WorkerCommand

    def spawn(w: int, n: int) -> WorkerCommand:
        return WorkerCommand([sys.executable, "-m", "stcp.cli.main", *args.argv])

    pool = stcp_server.WorkerPool(spawn, port, datapath=args.datapath, host=host, iface=args.iface,
                                  workers=workers, xdp_mode=args.xdp_mode, config=config, metrics=args.metrics)
    if startup.hand_over(pool.close):
        return 0
    try:
        await pool.start()
        await pool.serve_forever()
    finally:
        pool.close()
        await pool.wait_closed()
    return 0
