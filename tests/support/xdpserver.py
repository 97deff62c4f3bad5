"""An echo server on the xdp datapath with any Config and XDP limits, run in a namespace as
its own process (python -m tests.support.xdpserver), for tests that need settings the
`stcp serve` command line does not offer (a hello budget of 0, a fixed identity key, a
tiny CID table).

    ARGS = {"listen": "10.77.1.1:4480", "iface": "veth0", "mode": "native",
            "limits": {...}, "config": {...}, "max_connections": N, "key": "hex"}
    python -m tests.support.xdpserver 'JSON ARGS'

It says "serving" on stderr once ready; on SIGTERM it closes and prints one JSON line on
stdout: the endpoint's statistics and the datapath's count of failed live-table inserts.
start() and finish() do both from a test.
"""
from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from dataclasses import asdict
from typing import Any, Dict

from tests.support.procs import wait_for_stderr_line


async def _main(args: Dict[str, Any]) -> None:
    from stcp.connection import Config
    from stcp.server import serve
    from tests.support.servers import echo

    host, _, port = args["listen"].rpartition(":")
    cfg = dict(args.get("config", {}))
    if args.get("key"):
        cfg["static_key"] = bytes.fromhex(args["key"])
    server = await serve(echo, host.strip("[]"), int(port), datapath="xdp", iface=args["iface"],
                         xdp_mode=args.get("mode", "native"), xdp_limits=args.get("limits") or None,
                         config=Config(**cfg), max_connections=args.get("max_connections", 100_000))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, server.close)
    print(f"serving (XDP prog {server.datapath.prog_id})", file=sys.stderr, flush=True)
    await server.wait_closed()
    out = asdict(server.endpoint.stats)
    out["cid_table_full"] = server.datapath.cid_table_full
    print(json.dumps(out), flush=True)


def start(host, args: Dict[str, Any], timeout: float = 90) -> subprocess.Popen:
    """The server in host's namespace, serving (an AssertionError quotes its stderr if not)."""
    p = host.popen([sys.executable, "-m", "tests.support.xdpserver", json.dumps(args)], stdin=subprocess.DEVNULL,
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for_stderr_line(p, "serving", timeout)
    except BaseException:
        p.kill()
        p.wait()
        raise
    return p


def finish(p: subprocess.Popen) -> Dict[str, Any]:
    """SIGTERM; the statistics it printed."""
    if p.poll() is None:
        p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=30)
    lines = out.decode().strip().splitlines()
    assert p.returncode == 0 and lines, f"server exited {p.returncode}: {err.decode(errors='replace')[-2000:]}"
    return json.loads(lines[-1])


if __name__ == "__main__":
    asyncio.run(_main(json.loads(sys.argv[1])))
