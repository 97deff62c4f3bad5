"""`stcp demo`: STCP's main job in one command, a server and a client on loopback moving
data both ways."""
from __future__ import annotations

import hashlib
import os
import time
from typing import Any

from ..api import open_connection
from ..exchange import exchange
from ..identity import fingerprint
from ..server import start_server
from .common import config_from_args
from .serve import echo_handler


async def demo(args: Any) -> int:
    """STCP's main job in one command: a server and a client on loopback moving data both ways."""
    config = config_from_args(args)
    server = await start_server(echo_handler, "127.0.0.1", 0, config=config)
    port = server.sockets[0].getsockname()[1]
    print(f"server: listening on 127.0.0.1:{port} (echo, socket datapath), server key "
          f"{fingerprint(server.public_key)}")
    size = args.mib << 20
    payload = os.urandom(size)
    t0 = time.perf_counter()
    _, first = await open_connection("127.0.0.1", port, server_key=server.public_key, config=config)
    t1 = time.perf_counter()
    first.abort("demo: handshake timing only")
    reader, writer = await open_connection("127.0.0.1", port, server_key=server.public_key, config=config)
    t2 = time.perf_counter()
    conn = writer.connection
    print(f"client: handshakes done in {(t1 - t0) * 1e3:.2f} ms (first, with one-time setup) and "
          f"{(t2 - t1) * 1e3:.2f} ms, cipher {writer.get_extra_info('cipher')}, the server proved the "
          f"pinned key")
    t1 = t2
    echoed = await exchange(reader, writer, payload)
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
