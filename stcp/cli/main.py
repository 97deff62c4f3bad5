"""`stcp`: serve, connect, tunnel, demo and the key commands from the command line (the
parser and entry point; each command lives in its module: serve.py, connect.py, demo.py,
identity.py).

Every failure a person can act on ends in one line on stderr and a non-zero exit:
1 for runtime errors (timeout, refused address, peer termination), 2 for usage errors.
`connect` exits 0 when both directions finished and 130 when SIGINT or SIGTERM cut it short
(after aborting the connection, so the server knows); `serve` and `tunnel` exit 0 when
stopped by either signal. Ctrl-C never prints a traceback.
When stdout closes early (`stcp connect ... | head`), 141 (128 + SIGPIPE, the status a
shell shows for cat in the same place) and nothing on stderr.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import List, Optional

from .. import __version__, eventloop, wire
from ..cid_layout import DEFAULT_SERVER_ID_BITS, MAX_SERVER_ID_BITS
from ..errors import STCPError
from ..wire import DEFAULT_PORT
from . import config_file
from .common import UsageError
from .connect import connect, tunnel
from .demo import demo
from .identity import keygen, known_hosts, pubkey
from .serve import serve


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="stcp", description="STCP: a transport where encryption is not optional")
    p.add_argument("--version", action="version", version=f"stcp {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", metavar="FILE",
                        help="read options from this TOML file (key = long option name); typed options win")
        sp.add_argument("--cipher", choices=sorted(wire.SUITES), default=None,
                        help="record protection (default aes-256-gcm); serve: the only one clients may use "
                        "(default: either)")
        sp.add_argument("--handshake-timeout", type=float, default=None, metavar="S",
                        help="give up a handshake after S seconds (default 10)")
        sp.add_argument("--idle-timeout", type=float, default=None, metavar="S",
                        help="end a connection silent for S seconds (default 30)")
        sp.add_argument("--max-datagram", type=int, default=None, metavar="BYTES",
                        help=f"largest UDP payload sent (default {wire.DEFAULT_MAX_DATAGRAM})")
        sp.add_argument("--key-update-interval", type=int, default=None, metavar="N",
                        help="records per key before a key update (default 4194304)")

    s = sub.add_parser("serve", help="serve STCP: echo each stream, or forward it to a TCP backend")
    s.add_argument("--listen", default=f"127.0.0.1:{DEFAULT_PORT}", metavar="HOST:PORT",
                   help=f"UDP address to serve on, [v6]:PORT for IPv6; port 0: any free port, printed at start "
                   f"(default 127.0.0.1:{DEFAULT_PORT})")
    s.add_argument("--forward", metavar="HOST:PORT", help="relay each stream to this TCP backend")
    s.add_argument("--datapath", choices=["socket", "xdp", "afxdp"], default="socket",
                   help="socket: a UDP socket (default); xdp: the same behind an XDP program on --iface dropping "
                   "what belongs to no connection; afxdp: records through AF_XDP sockets on --iface (needs root)")
    s.add_argument("--iface", help="interface for the xdp and afxdp datapaths")
    s.add_argument("--xdp-mode", choices=["native", "generic", "auto"], default="auto",
                   help="xdp, afxdp: attach in the driver (native), in the kernel's generic path, or native "
                   "falling back to generic (auto, the default)")
    # scale-out: worker processes on one port, and the server id in the CIDs
    s.add_argument("--workers", type=int, default=None, metavar="N",
                   help="N processes on the port, each record steered to its connection's by connection ID. "
                        "socket: default one per CPU this process may use (1: one process, no steering); "
                        "afxdp: each owns whole RX queues (default 1)")
    s.add_argument("--server-id", type=int, default=None, metavar="ID",
                   help="this host's id in its connection IDs, for a load balancer that routes by connection "
                        "ID (docs/DEPLOY.md)")
    s.add_argument("--server-id-bits", type=int, default=None, metavar="B",
                   help=f"connection ID bits for --server-id (0-{MAX_SERVER_ID_BITS}, default "
                        f"{DEFAULT_SERVER_ID_BITS}; 56-B bits stay random)")
    s.add_argument("--afxdp-tx", choices=["socket", "afxdp"], default="socket",
                   help="afxdp: send replies through the kernel UDP socket (default) or the AF_XDP TX ring")
    s.add_argument("--metrics", metavar="HOST:PORT", help="expose Prometheus metrics at http://HOST:PORT/metrics")
    s.add_argument("--user", metavar="NAME", help="once set up, run as NAME with no capabilities (default: the "
                   "'stcp' account if it exists, else nobody; a process not allowed to change user stays itself)")
    logs = s.add_argument_group("logging (to stderr: a line per connection at its end, one per backend failure)")
    logs.add_argument("--log-format", choices=["text", "json"], default="text",
                      help="text (timestamped key=value lines, the default) or one JSON object per line")
    logs.add_argument("-v", "--verbose", action="count", default=0, help="more detail (debug)")
    logs.add_argument("-q", "--quiet", action="count", default=0,
                      help="no line per connection (-q), only errors (-qq)")
    # identity (docs/OPERATIONS.md, "Keys")
    s.add_argument("--key", metavar="FILE", help="the server's private key (stcp keygen --out FILE); default: "
                   "the one in the state directory, made on first start")
    s.add_argument("--state-dir", metavar="DIR", help="where the server keeps its key when --key is not given "
                   "(default /var/lib/stcp for root, else $XDG_STATE_HOME/stcp or ~/.local/state/stcp)")
    s.add_argument("--allow-clients", metavar="FILE", help="admit only clients proving one of these public "
                   "keys (one base64 key per line, '#' comments)")
    common(s)

    def client_keys(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--server-key", metavar="BASE64", help="accept only the server holding this key "
                        "(its public key, as `stcp serve` prints it); default: the known-hosts file")
        sp.add_argument("--known-hosts", metavar="FILE", help="trust on first use: the server keys seen before "
                        "(default $XDG_CONFIG_HOME/stcp/known_hosts or ~/.config/stcp/known_hosts)")
        sp.add_argument("--key", metavar="FILE", help="prove this client key to the server (stcp keygen)")

    c = sub.add_parser("connect", help="like ncat: stdin to the server, the server's stream to stdout")
    c.add_argument("address", metavar="HOST:PORT", help=f"the server, [v6]:PORT for IPv6 (port default {DEFAULT_PORT})")
    c.add_argument("--progress", action="store_true",
                   help="show bytes each way, the rate and the elapsed time on stderr (as pv does)")
    client_keys(c)
    common(c)

    t = sub.add_parser("tunnel", help="carry each local TCP client over its own STCP connection")
    t.add_argument("--listen", required=True, metavar="HOST:PORT",
                   help="TCP address to accept clients on; port 0: any free port, printed at start")
    t.add_argument("--to", required=True, metavar="HOST:PORT",
                   help=f"the STCP server, [v6]:PORT for IPv6 (port default {DEFAULT_PORT})")
    client_keys(t)
    common(t)

    k = sub.add_parser("keygen", help="make an X25519 key file (mode 0600) and print its public key")
    k.add_argument("--out", required=True, metavar="FILE", help="the new key file (never overwritten)")
    sub.add_parser("pubkey", help="print the public key of the private key on stdin (stcp pubkey < FILE)")
    h = sub.add_parser("known-hosts", help="the known-hosts file: list it, or forget a server's key")
    h.add_argument("action", choices=["list", "remove"], help="list the file, or remove a server's entry")
    h.add_argument("address", nargs="?", metavar="HOST:PORT", help="remove: the server to forget")
    h.add_argument("--known-hosts", metavar="FILE", help="the file (default as for connect)")

    d = sub.add_parser("demo", help="a server and a client on loopback, moving data both ways")
    d.add_argument("--mib", type=int, default=16, help="MiB to send (default 16)")
    common(d)
    return p


EXIT_BROKEN_PIPE = 128 + 13     # SIGPIPE

COMMANDS = {"serve": serve, "connect": connect, "tunnel": tunnel, "demo": demo, "keygen": keygen, "pubkey": pubkey,
            "known-hosts": known_hosts}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    argv = list(argv) if argv is not None else sys.argv[1:]
    try:
        argv = config_file.expand(parser, argv)
    except UsageError as exc:
        print(f"stcp: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    args.argv = argv
    if args.command == "known-hosts" and args.action == "remove" and not args.address:
        parser.error("known-hosts remove needs HOST:PORT")
    try:
        return eventloop.run(COMMANDS[args.command](args))
    except BrokenPipeError:        # stdout closed early (`| head`): end quietly, as cat does
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())     # no error at exit's flush
        return EXIT_BROKEN_PIPE
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
