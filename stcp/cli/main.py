"""`stcp`: serve, connect, tunnel and demo from the command line (the parser and entry
point; each command lives in its module: serve.py, connect.py, demo.py).

Every failure a person can act on ends in one line on stderr and a non-zero exit:
1 for runtime errors (timeout, refused address, peer termination), 2 for usage errors.
"""
from __future__ import annotations

import argparse
import asyncio
import sys
from typing import List, Optional

from .. import __version__, wire
from ..errors import STCPError
from ..wire import DEFAULT_PORT
from .common import UsageError
from .connect import connect, tunnel
from .demo import demo
from .serve import serve


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stcp", description="STCP: a transport where encryption is not optional")
    p.add_argument("--version", action="version", version=f"stcp {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
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
    s.add_argument("--metrics", metavar="HOST:PORT", help="expose Prometheus metrics at http://HOST:PORT/metrics")
    s.add_argument("--user", metavar="NAME", help="once set up, run as NAME with no capabilities (default: the "
                   "'stcp' account if it exists, else nobody; a process not allowed to change user stays itself)")
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


def main(argv: Optional[List[str]] = None) -> int:
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
