"""TLS 1.3 over kernel TCP with Python's blocking `ssl` sockets.

Server: handshakes one at a time in the accept loop (the handshake and RTT tests are
sequential), so no thread start-up is charged to a handshake; a connection that asks for
the sink (the bulk tests) is then served in a thread of its own, so bulk8's connections
run concurrently.  Full handshakes only: the client never resumes.
"""
from __future__ import annotations

import socket
import ssl
import threading
import time

from bench import common as C


def server_context(args) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(args.cert, args.key)
    # No session tickets: every handshake is a full one, as STCP's are.
    ctx.num_tickets = 0
    return ctx


def client_context(args) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_verify_locations(args.cafile)
    return ctx


def recv_exact(s, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = s.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("peer closed early")
        buf += chunk
    return bytes(buf)


def recv_into_exact(conn, buf: memoryview, n: int) -> None:
    got = 0
    while got < n:
        k = conn.recv_into(buf[got:n])
        if not k:
            raise ConnectionError("peer closed early")
        got += k


def serve_sink(conn) -> None:
    total = 0
    buf = memoryview(bytearray(1 << 20))
    hdr = memoryview(bytearray(C.FRAME_HDR))
    while True:
        recv_into_exact(conn, hdr, C.FRAME_HDR)
        n = int.from_bytes(hdr, "big")
        if n == 0:
            break
        while n:
            k = conn.recv_into(buf[:min(n, len(buf))])
            if not k:
                raise ConnectionError("peer closed early")
            n -= k
            total += k
    conn.sendall(total.to_bytes(C.COUNT_LEN, "big"))
    conn.recv(1)  # wait for the client to close


def serve_echo(conn) -> None:
    while True:
        data = conn.recv(65536)
        if not data:
            break
        conn.sendall(data)


def _close(raw, conn=None) -> None:
    for s in (conn, raw):
        if s is not None:
            try:
                s.close()
            except OSError:
                pass


def _sink_thread(raw, conn) -> None:
    try:
        serve_sink(conn)
    except (OSError, ssl.SSLError):
        pass
    finally:
        _close(raw, conn)


def server(args) -> None:
    ctx = server_context(args)
    host, port = C.split_hostport(args.listen)
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    ls = socket.socket(fam, socket.SOCK_STREAM)
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, port))
    ls.listen(128)
    C.announce_ready(ls.getsockname()[1])
    while True:
        raw, _ = ls.accept()
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw.settimeout(30)
        conn = None
        try:
            conn = ctx.wrap_socket(raw, server_side=True)
            mode = conn.recv(1)
            if mode == C.MODE_SINK:
                threading.Thread(target=_sink_thread, args=(raw, conn), daemon=True).start()
                continue
            if mode == C.MODE_ECHO:
                serve_echo(conn)
        except (OSError, ssl.SSLError):
            pass  # handshake-only clients close without a TLS close_notify
        _close(raw, conn)


def connect(args, ctx):
    host, port = C.split_hostport(args.connect)
    raw = socket.create_connection((host, port), timeout=30)
    raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return ctx.wrap_socket(raw, server_hostname=C.SERVER_NAME)


def client(args) -> None:
    ctx = client_context(args)
    blocking_client(args, lambda: connect(args, ctx))


def _cipher(s) -> str | None:
    try:
        c = s.cipher()                    # ssl.SSLSocket: (name, version, bits); stcp: the name
        return c[0] if isinstance(c, tuple) else str(c)
    except Exception:  # informational only
        return None


def _sink(s, share: int, deadline: float, framed: bytes) -> tuple[int, int]:
    """Sink frames (after the mode byte) on a blocking socket-like object: (sent, count)."""
    sent = 0
    while sent < share and time.perf_counter() < deadline:
        n = min(C.BULK_CHUNK, share - sent)
        s.sendall(framed if n == C.BULK_CHUNK else C.frame(C.payload(n)))
        sent += n
    s.sendall(C.END_FRAME)
    return sent, int.from_bytes(recv_exact(s, C.COUNT_LEN), "big")


def blocking_client(args, connect) -> None:
    """The three tests against a blocking socket-like API: `connect()` returns an object
    with sendall, recv and close, usable as a context manager, once the handshake is done."""
    cpu0 = C.cpu_seconds()
    if args.test == "bulk":
        framed = C.frame(C.payload())
        with connect() as s:
            t0 = time.perf_counter()
            s.sendall(C.MODE_SINK)
            sent, got = _sink(s, args.bytes, t0 + args.duration, framed)
            elapsed = time.perf_counter() - t0
            cipher = _cipher(s)
        C.emit(C.bulk_result(sent, got, elapsed, C.cpu_seconds() - cpu0, cipher=cipher))
    elif args.test == "bulk8":
        # As streams.client's bulk8, one thread per connection: all connections are opened
        # (handshake and mode byte) first, then send their shares at once.
        framed = C.frame(C.payload())
        socks = []
        try:
            for _ in range(args.connections):
                s = connect()
                socks.append(s)
                s.sendall(C.MODE_SINK)
            per_conn: list = [None] * len(socks)
            errors: list = []
            t0 = time.perf_counter()
            deadline = t0 + args.duration

            def one(i, s, share):
                try:
                    sent, got = _sink(s, share, deadline, framed)
                    per_conn[i] = (sent, got, time.perf_counter() - t0)
                except Exception as e:  # reported in the result
                    errors.append(repr(e))
                    per_conn[i] = (share, 0, time.perf_counter() - t0)

            threads = [threading.Thread(target=one, args=(i, s, share))
                       for i, (s, share) in enumerate(zip(socks, C.shares(args.bytes, len(socks)), strict=True))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - t0
            cipher = _cipher(socks[0])
        finally:
            for s in socks:
                s.close()
        res = C.bulk8_result(per_conn, elapsed, C.cpu_seconds() - cpu0, cipher=cipher)
        if errors:
            res.update(ok=False, error="; ".join(errors[:3]))
        C.emit(res)
    elif args.test == "handshake":
        samples, to_open, errors = [], [], 0
        t_start = time.perf_counter()
        for _ in range(args.count):
            t0 = time.perf_counter()
            try:
                s = connect()
                t1 = time.perf_counter()
                s.close()
            except Exception:  # OSError (ssl.SSLError too) or the transport's own errors
                errors += 1
                continue
            samples.append(time.perf_counter() - t0)
            to_open.append(t1 - t0)
            if time.perf_counter() - t_start > args.time_limit:
                break
        elapsed = time.perf_counter() - t_start
        C.emit(C.handshake_result(samples, elapsed, C.cpu_seconds() - cpu0, errors,
                                  connect_latency=C.latency_summary(to_open)))
    else:  # rtt
        msgs = C.rtt_messages(args.count + C.RTT_WARMUP, args.size)
        samples, bad = [], 0
        with connect() as s:
            s.sendall(C.MODE_ECHO)
            t_start = time.perf_counter()
            for i, m in enumerate(msgs):
                t0 = time.perf_counter()
                s.sendall(m)
                back = recv_exact(s, len(m))
                dt = time.perf_counter() - t0
                bad += back != m
                if i >= C.RTT_WARMUP:
                    samples.append(dt)
                if time.perf_counter() - t_start > args.time_limit:
                    break
        C.emit(C.rtt_result(samples, C.cpu_seconds() - cpu0, bad, args.size))


def main(argv=None) -> None:
    C.run_main(server, client, __doc__, argv)


if __name__ == "__main__":
    main()


def available() -> str | None:
    return None
