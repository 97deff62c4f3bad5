"""`stcp`: serve, connect, tunnel and demo from the command line.

Every failure a person can act on ends in one line on stderr and a non-zero exit:
1 for runtime errors (timeout, refused address, peer termination), 2 for usage errors.
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import signal
import sys
import threading
import time
from typing import Optional, Tuple

from .. import __version__, wire
from ..api import make_config, open_connection, start_server
from ..errors import STCPError
from ..wire import DEFAULT_PORT

CHUNK = 1 << 16


class UsageError(Exception):
    pass


def parse_hostport(text: str, default_port: Optional[int] = None) -> Tuple[str, int]:
    """'HOST:PORT', '[IPv6]:PORT' or 'HOST' (with a default port)."""
    host, sep, port = text.rpartition(":")
    if text.startswith("[") and "]" in text:
        close = text.index("]")
        host, rest = text[1:close], text[close + 1:]
        port = rest[1:] if rest.startswith(":") else ""
    elif not sep or ":" in host:
        host, port = text, ""
    if not port:
        if default_port is None:
            raise UsageError(f"bad address {text!r}: expected HOST:PORT")
        return host, default_port
    if not port.isdigit() or not 0 <= int(port) <= 65535:
        raise UsageError(f"bad address {text!r}: port must be a number from 0 to 65535")
    if not host:
        raise UsageError(f"bad address {text!r}: missing host")
    return host, int(port)


def config_from_args(args) -> object:
    overrides = {}
    if getattr(args, "idle_timeout", None) is not None:
        overrides["idle_timeout"] = args.idle_timeout
    if getattr(args, "handshake_timeout", None) is not None:
        overrides["handshake_timeout"] = args.handshake_timeout
    if getattr(args, "max_datagram", None) is not None:
        overrides["max_datagram"] = args.max_datagram
    if getattr(args, "key_update_interval", None) is not None:
        overrides["key_update_interval"] = args.key_update_interval
    try:
        return make_config(args.cipher, **overrides)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


# --- serve -------------------------------------------------------------------
async def echo_handler(reader, writer) -> None:
    while True:
        data = await reader.read(CHUNK)
        if not data:
            break
        writer.write(data)
        await writer.drain()
    writer.close()
    await writer.wait_closed()


def forward_handler(target: Tuple[str, int]):
    async def handler(reader, writer) -> None:
        try:
            tcp_reader, tcp_writer = await asyncio.open_connection(*target)
        except OSError as exc:
            writer.abort(f"backend {target[0]}:{target[1]} unreachable: {exc.strerror or exc}")
            return
        await splice(reader, writer, tcp_reader, tcp_writer)
    return handler


async def _pump(src, dst) -> None:
    """Copy until EOF, then finish dst's sending direction (half-close carries through)."""
    while True:
        data = await src.read(CHUNK)
        if not data:
            break
        dst.write(data)
        await dst.drain()
    if dst.can_write_eof():
        dst.write_eof()


async def splice(stcp_reader, stcp_writer, tcp_reader, tcp_writer) -> None:
    """Relay both directions between an STCP stream and a TCP stream."""
    try:
        await asyncio.gather(_pump(stcp_reader, tcp_writer), _pump(tcp_reader, stcp_writer))
    except (OSError, STCPError) as exc:
        stcp_writer.abort(f"relay failed: {exc}")
    finally:
        tcp_writer.close()
    try:
        await stcp_writer.wait_closed()
    except STCPError:
        pass


async def serve(args) -> int:
    host, port = parse_hostport(args.listen, DEFAULT_PORT)
    config = config_from_args(args)
    handler = forward_handler(parse_hostport(args.forward)) if args.forward else echo_handler
    hooks = []
    xdp = None
    metrics = None
    if args.metrics:
        from ..metrics import parse_listen, serve_metrics
        try:
            parse_listen(args.metrics)
        except ValueError as exc:
            raise UsageError(f"bad --metrics address: {exc}") from None
    afxdp = server = None
    worker: Optional[int] = None
    if args.datapath == "afxdp":
        if not args.iface:
            raise UsageError("--datapath afxdp needs --iface IFACE")
        from ..datapath import afxdp as afxdp_mod
        if args.workers < 1:
            raise UsageError("--workers must be at least 1")
        if args.workers > 1 and args.afxdp_worker is None:
            return await _supervise(args, afxdp_mod, port, config)
        if args.afxdp_worker is not None:
            afxdp_mod.die_with_parent()
            w, _, n = args.afxdp_worker.partition("/")
            if not (w.isdigit() and n.isdigit() and int(w) < int(n)):
                raise UsageError(f"bad --afxdp-worker {args.afxdp_worker!r}: expected W/N")
            xdp = afxdp = afxdp_mod.AfxdpDatapath.join(args.iface, port, int(w), int(n))
            worker = int(w)
        else:
            xdp = afxdp = afxdp_mod.AfxdpDatapath.open(args.iface, port, mode=args.xdp_mode,
                                                       max_record_len=config.max_datagram - wire.HEADER_LEN)
        hooks.append(_XdpHooks(afxdp))
        print(f"stcp: AF_XDP on {args.iface}: {len(afxdp.xsks)} RX queue(s), XDP {afxdp.mode} mode, "
              f"{'zero-copy' if afxdp.zerocopy else 'copy'} mode; replies through "
              f"{'the AF_XDP sockets' if args.afxdp_tx == 'afxdp' else 'the UDP socket'}", file=sys.stderr)
    if args.datapath == "xdp":
        if not args.iface:
            raise UsageError("--datapath xdp needs --iface IFACE")
        from ..datapath.xdp import XdpDatapath
        xdp = XdpDatapath.attach_or_reuse(args.iface, port, mode=args.xdp_mode,
                                          max_record_len=config.max_datagram - wire.HEADER_LEN)
        hooks.append(_XdpHooks(xdp))
        print(f"stcp: XDP program on {args.iface} ({xdp.mode} mode)", file=sys.stderr)
    try:
        if afxdp is not None:
            server = await afxdp.start_server(handler, host, port, config=config, hooks=hooks, tx=args.afxdp_tx)
        else:
            # generic-mode XDP runs after GRO and must see single records
            server = await start_server(handler, host, port, config=config, hooks=hooks,
                                        gro=xdp is None or xdp.mode != "generic")
        if worker is not None:
            if args.afxdp_metrics:        # the supervisor serves --metrics; it reads ours here
                from ..metrics import serve_worker_metrics
                metrics = serve_worker_metrics(server, args.afxdp_metrics, worker, args.datapath,
                                               args.cipher or "aes-256-gcm")
        elif args.metrics:
            metrics = serve_metrics(server, args.metrics, args.datapath, args.cipher or "aes-256-gcm",
                                    iface=args.iface)
        bound = server.sockets[0].getsockname()
        mode = f"forwarding to {args.forward}" if args.forward else "echo"
        print(f"stcp: serving on {bound[0]}:{bound[1]} ({mode}, {args.datapath} datapath)", file=sys.stderr,
              flush=True)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, server.close)
        await server.serve_forever()
    finally:
        if metrics is not None:
            metrics.close()
        if afxdp is not None and server is not None:
            st = afxdp.stats()
            d = server.driver
            per_q = ", ".join(f"queue {q}: {n}" for q, n in sorted(d.rx_per_queue.items()))
            print(f"stcp: AF_XDP: {d.rx_xsk} datagrams received through AF_XDP ({d.rx_xsk_wakeups} wakeups; {per_q}), "
                  f"{d.rx_socket} through the UDP socket; sent {d.tx_xsk} through AF_XDP, {d.tx_socket} through the "
                  f"UDP socket; {d.connections_accepted} connections, "
                  f"{d.endpoint.stats.dropped_unknown_cid} datagrams for unknown ones; kernel dropped {st.get('rx_dropped', 0)}, "
                  f"fill ring empty {st.get('rx_fill_ring_empty_descs', 0)}", file=sys.stderr, flush=True)
        if xdp is not None:
            xdp.close()
    return 0


async def _supervise(args, afxdp_mod, port: int, config) -> int:
    """`serve --datapath afxdp --workers N`: the supervisor (and, with --metrics, its exporter:
    the workers' counters read from each worker's unix socket at scrape time, plus the XDP
    program's once)."""
    import shutil
    import tempfile
    metrics_dir = pool = None
    if args.metrics:
        metrics_dir = tempfile.mkdtemp(prefix="stcp-workers-", dir="/run" if os.path.isdir("/run") else None)
    sup = afxdp_mod.Supervisor(args.argv, args.iface, port, args.workers, mode=args.xdp_mode,
                               max_record_len=config.max_datagram - wire.HEADER_LEN, metrics_dir=metrics_dir)
    try:
        if args.metrics:
            from ..metrics import serve_pool_metrics
            pool = serve_pool_metrics(sup.worker_slots, args.metrics, "afxdp", args.cipher or "aes-256-gcm",
                                      iface=args.iface)
        sup.setup()
        if pool is not None:
            sup.say(f"metrics of {args.workers} workers and the XDP program on {pool.http.url}")
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, sup.stop)
        return await sup.run()
    finally:
        if pool is not None:
            pool.close()
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)


class _XdpHooks:
    """Keeps the kernel's table of live connection IDs in step with the server's connections."""

    def __init__(self, xdp):
        self.xdp = xdp

    def connection_created(self, conn) -> None:
        self.xdp.add_cid(conn.local_cid)

    def connection_ended(self, conn) -> None:
        self.xdp.remove_cid(conn.local_cid)


# --- connect -----------------------------------------------------------------
def _stdin_chunks(loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
    """Read stdin in a thread: it may be a file, a pipe or a terminal.

    os.read on the raw descriptor, not sys.stdin.buffer: a daemon thread blocked inside the
    buffered reader holds its lock, and the interpreter aborts at exit (SIGABRT) when the
    connection ends before stdin does."""
    fd = sys.stdin.fileno()
    while True:
        try:
            data = os.read(fd, CHUNK)
        except OSError:
            data = b""
        try:
            loop.call_soon_threadsafe(queue.put_nowait, data)
        except RuntimeError:       # the loop is gone: the command is exiting
            return
        if not data:
            return


async def connect(args) -> int:
    host, port = parse_hostport(args.address, DEFAULT_PORT)
    config = config_from_args(args)
    reader, writer = await open_connection(host, port, config=config)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue(maxsize=0)
    threading.Thread(target=_stdin_chunks, args=(loop, queue), daemon=True).start()
    out = sys.stdout.buffer

    async def upload() -> None:
        while True:
            data = await queue.get()
            if not data:
                writer.write_eof()
                return
            writer.write(data)
            await writer.drain()

    async def download() -> None:
        while True:
            data = await reader.read(CHUNK)
            if not data:
                out.flush()
                return
            out.write(data)

    up = asyncio.create_task(upload())
    try:
        await download()           # raises the connection's own reason if it ends badly
    finally:
        if not up.done():          # the server finished first: stop reading stdin
            up.cancel()
        (upload_error,) = await asyncio.gather(up, return_exceptions=True)
    if isinstance(upload_error, Exception):
        raise upload_error
    writer.write_eof()
    await writer.wait_closed()
    return 0


# --- tunnel ------------------------------------------------------------------
async def tunnel(args) -> int:
    lhost, lport = parse_hostport(args.listen)
    target = parse_hostport(args.to, DEFAULT_PORT)
    config = config_from_args(args)

    async def on_client(tcp_reader, tcp_writer) -> None:
        try:
            reader, writer = await open_connection(*target, config=config)
        except (OSError, STCPError) as exc:
            print(f"stcp: tunnel: {exc}", file=sys.stderr)
            tcp_writer.close()
            return
        await splice(reader, writer, tcp_reader, tcp_writer)

    try:
        server = await asyncio.start_server(on_client, lhost, lport)
    except OSError as exc:
        raise STCPError(f"cannot listen on {lhost}:{lport}: {exc.strerror or exc}") from None
    print(f"stcp: tunnel from tcp {lhost}:{lport} to stcp {target[0]}:{target[1]}", file=sys.stderr, flush=True)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.close)
    async with server:
        try:
            await server.serve_forever()
        except asyncio.CancelledError:
            pass
    return 0


# --- demo --------------------------------------------------------------------
async def demo(args) -> int:
    """STCP's main job in one command: a server and a client on loopback moving data both ways."""
    config = config_from_args(args)
    server = await start_server(echo_handler, "127.0.0.1", 0, config=config)
    port = server.sockets[0].getsockname()[1]
    print(f"server: listening on 127.0.0.1:{port} (echo, socket datapath)")
    size = args.mib << 20
    payload = os.urandom(size)
    t0 = time.perf_counter()
    _, first = await open_connection("127.0.0.1", port, config=config)
    t1 = time.perf_counter()
    first.abort("demo: handshake timing only")
    reader, writer = await open_connection("127.0.0.1", port, config=config)
    t2 = time.perf_counter()
    conn = writer.connection
    print(f"client: handshakes done in {(t1 - t0) * 1e3:.2f} ms (first, with one-time setup) and "
          f"{(t2 - t1) * 1e3:.2f} ms, cipher {writer.get_extra_info('cipher')}")
    t1 = t2

    async def upload() -> None:
        for i in range(0, size, 1 << 20):
            writer.write(payload[i:i + (1 << 20)])
            await writer.drain()
        writer.write_eof()

    up = asyncio.create_task(upload())
    echoed = await reader.read()
    await up
    await writer.wait_closed()
    t2 = time.perf_counter()
    ok = hashlib.sha256(echoed).digest() == hashlib.sha256(payload).digest()
    print(f"client: sent {size >> 20} MiB, got {len(echoed) >> 20} MiB back in {t2 - t1:.2f} s "
          f"({2 * size / (t2 - t1) / 1e6:.1f} MB/s both ways), SHA-256 {'matches' if ok else 'DIFFERS'}")
    s = conn.stats
    print(f"client: {s.records_sent} records sent, {s.records_received} received, "
          f"{s.retransmitted_records} retransmitted, min rtt {conn.min_rtt * 1e3:.2f} ms, "
          f"closed cleanly")
    server.close()
    await server.wait_closed()
    return 0 if ok else 1


# --- entry point -------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stcp", description="STCP: a transport where encryption is not optional")
    p.add_argument("--version", action="version", version=f"stcp {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp):
        sp.add_argument("--cipher", choices=sorted(wire.SUITES), default=None,
                        help="record protection (default aes-256-gcm)")
        sp.add_argument("--handshake-timeout", type=float, default=None, metavar="S",
                        help="give up a handshake after S seconds (default 10)")
        sp.add_argument("--idle-timeout", type=float, default=None, metavar="S",
                        help="end a connection silent for S seconds (default 30)")
        sp.add_argument("--max-datagram", type=int, default=None, metavar="BYTES",
                        help=f"largest UDP payload sent (default {wire.DEFAULT_MAX_DATAGRAM})")
        sp.add_argument("--key-update-interval", type=int, default=None, metavar="N",
                        help="records per key before a key update (default 4194304)")

    s = sub.add_parser("serve", help="serve STCP: echo each stream, or forward it to a TCP backend")
    s.add_argument("--listen", default=f"127.0.0.1:{DEFAULT_PORT}", metavar="HOST:PORT")
    s.add_argument("--forward", metavar="HOST:PORT", help="relay each stream to this TCP backend")
    s.add_argument("--datapath", choices=["socket", "xdp", "afxdp"], default="socket")
    s.add_argument("--iface", help="interface for the xdp and afxdp datapaths")
    s.add_argument("--xdp-mode", choices=["native", "generic", "auto"], default="auto")
    s.add_argument("--workers", type=int, default=1, metavar="N",
                   help="afxdp: N worker processes, each owning whole RX queues (default 1: no workers)")
    s.add_argument("--afxdp-tx", choices=["socket", "afxdp"], default="socket",
                   help="afxdp: send replies through the kernel UDP socket (default) or the AF_XDP TX ring")
    s.add_argument("--afxdp-worker", help=argparse.SUPPRESS)      # W/N, set by the supervisor
    s.add_argument("--afxdp-metrics", help=argparse.SUPPRESS)     # DIR for the worker's metrics socket
    s.add_argument("--metrics", metavar="HOST:PORT", help="expose Prometheus metrics at http://HOST:PORT/metrics")
    common(s)

    c = sub.add_parser("connect", help="like ncat: stdin to the server, the server's stream to stdout")
    c.add_argument("address", metavar="HOST:PORT")
    common(c)

    t = sub.add_parser("tunnel", help="carry each local TCP client over its own STCP connection")
    t.add_argument("--listen", required=True, metavar="HOST:PORT")
    t.add_argument("--to", required=True, metavar="HOST:PORT")
    common(t)

    d = sub.add_parser("demo", help="a server and a client on loopback, moving data both ways")
    d.add_argument("--mib", type=int, default=16, help="MiB to send (default 16)")
    common(d)
    return p


COMMANDS = {"serve": serve, "connect": connect, "tunnel": tunnel, "demo": demo}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        return asyncio.run(COMMANDS[args.command](args))
    except UsageError as exc:
        print(f"stcp: {exc}", file=sys.stderr)
        return 2
    except (STCPError, OSError) as exc:
        print(f"stcp: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
