"""stcp-loader: attach, inspect and detach the STCP XDP program.

    stcp-loader attach IFACE [--mode native|generic|auto] [--port N] [--force] ...
    stcp-loader status [IFACE] [--json]
    stcp-loader detach IFACE
    stcp-loader metrics [IFACE...] [--listen HOST:PORT] [--once]

`--netns NS` (before or after the command) works on an interface inside the network
namespace NS (as `ip netns exec NS` would) while keeping the host's bpffs for the pins.
Errors are one line on stderr and a non-zero exit: 1 for a refused operation (already
attached, nothing to detach), 2 for bad usage or a setup problem.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .. import wire
from ..datapath.verdicts import Verdict

DEFAULT_PORT = wire.DEFAULT_PORT          # the port `stcp serve` listens on by default
EXIT_REFUSED = 1
EXIT_SETUP = 2


def build_parser() -> argparse.ArgumentParser:
    from ..datapath import xdp_prog

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--netns", default=argparse.SUPPRESS,
                        help="network namespace (name under /run/netns) holding the interface")
    p = argparse.ArgumentParser(prog="stcp-loader", parents=[common],
                                description="Attach, inspect and detach the STCP XDP program.")
    sub = p.add_subparsers(dest="command", required=True, metavar="{attach,detach,status,metrics}")

    a = sub.add_parser("attach", parents=[common], help="compile, attach and pin the XDP program, then exit")
    a.add_argument("iface")
    a.add_argument("--mode", choices=xdp_prog.MODES, default="auto",
                   help="native (driver), generic (skb), or auto: native, else generic (default)")
    a.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"STCP UDP port (default {DEFAULT_PORT})")
    a.add_argument("--max-record-len", type=int, default=xdp_prog.DEFAULT_MAX_RECORD_LEN,
                   help=f"largest data record payload accepted (default {xdp_prog.DEFAULT_MAX_RECORD_LEN})")
    a.add_argument("--hs-rate", type=int, default=xdp_prog.DEFAULT_HS_RATE,
                   help=f"client hellos per second per source prefix (default {xdp_prog.DEFAULT_HS_RATE})")
    a.add_argument("--hs-burst", type=int, default=xdp_prog.DEFAULT_HS_BURST,
                   help=f"client hello burst per source prefix (default {xdp_prog.DEFAULT_HS_BURST})")
    a.add_argument("--hs-prefix4", type=int, default=xdp_prog.DEFAULT_HS_PREFIX4,
                   help=f"IPv4 sources share a hello bucket per /N (default {xdp_prog.DEFAULT_HS_PREFIX4})")
    a.add_argument("--hs-prefix6", type=int, default=xdp_prog.DEFAULT_HS_PREFIX6,
                   help=f"IPv6 sources share a hello bucket per /N (default {xdp_prog.DEFAULT_HS_PREFIX6})")
    a.add_argument("--hs-global-rate", type=int, default=xdp_prog.DEFAULT_HS_GLOBAL_RATE,
                   help=f"client hellos per second from all sources together, 0 for no limit "
                        f"(default {xdp_prog.DEFAULT_HS_GLOBAL_RATE})")
    a.add_argument("--hs-global-burst", type=int, default=xdp_prog.DEFAULT_HS_GLOBAL_BURST,
                   help=f"client hello burst from all sources together (default {xdp_prog.DEFAULT_HS_GLOBAL_BURST})")
    a.add_argument("--max-cids", type=int, default=xdp_prog.DEFAULT_MAX_CIDS,
                   help=f"capacity of the live-connection table (default {xdp_prog.DEFAULT_MAX_CIDS})")
    a.add_argument("--force", action="store_true", help="replace an XDP program already attached")

    d = sub.add_parser("detach", parents=[common], help="remove the XDP program and its pins")
    d.add_argument("iface")

    s = sub.add_parser("status", parents=[common], help="attachment, config and verdict counters")
    s.add_argument("iface", nargs="?")
    s.add_argument("--json", action="store_true", help="machine-readable output")

    m = sub.add_parser("metrics", parents=[common], help="serve the verdict counters to Prometheus (stcp.metrics)")
    m.add_argument("ifaces", nargs="*", metavar="IFACE",
                   help="interfaces to export (default: every one found under /sys/fs/bpf/stcp/ or attached)")
    m.add_argument("--listen", default="127.0.0.1:9401", help="HOST:PORT of /metrics (default 127.0.0.1:9401)")
    m.add_argument("--once", action="store_true", help="print the metrics to stdout once and exit")
    return p


def _global(c: dict) -> str:
    if not c["hs_global_rate"]:
        return "no global limit"
    return f"{c['hs_global_rate']}/s burst {c['hs_global_burst']}"


def _fmt_status(st: dict) -> str:
    if not st["attached"]:
        extra = f" (stale pins at {st['pin_dir']})" if st.get("pinned") else ""
        return f"{st['iface']}: no STCP XDP program attached{extra}"
    c = st["config"]
    lines = [
        f"{st['iface']}: STCP XDP attached, {st['mode']} mode, prog id {st['prog_id']}",
        f"  port {c['port']}, max record {c['max_record_len']} bytes, "
        f"hellos {c['hs_rate']}/s burst {c['hs_burst']} per IPv4 /{c['hs_prefix4']} and IPv6 /{c['hs_prefix6']}, "
        f"{_global(c)} in all, {st['live_cids']} live connection IDs",
        f"  pins: {st['pin_dir']}" + ("" if st["pinned"] else " (not pinned in this mount namespace)"),
        f"  {'verdict':<22}{'packets':>14}{'bytes':>16}",
    ]
    for v in Verdict:
        cnt = st["counters"][v.key]
        lines.append(f"  {v.key:<22}{cnt['packets']:>14}{cnt['bytes']:>16}")
    return "\n".join(lines)


def _run(args: argparse.Namespace) -> int:
    from ..datapath import xdp_admin

    if args.command == "attach":
        st = xdp_admin.attach(args.iface, args.port, args.mode, args.max_record_len, force=args.force,
                        netns=args.netns, hs_rate=args.hs_rate, hs_burst=args.hs_burst, max_cids=args.max_cids,
                        hs_prefix4=args.hs_prefix4, hs_prefix6=args.hs_prefix6,
                        hs_global_rate=args.hs_global_rate, hs_global_burst=args.hs_global_burst)
        print(f"attached STCP XDP to {args.iface} in {st['mode']} mode (prog id {st['prog_id']}, "
              f"port {st['config']['port']}); maps pinned at {st['pin_dir']}")
        if st.get("private_pins"):
            print("stcp-loader: note: /sys/fs/bpf was not mounted here (ip netns exec gives a private /sys), so "
                  "the pins were made in a private bpffs and vanish on exit; the program stays attached and "
                  "status/detach still find it; use --netns NS to pin in the host's bpffs", file=sys.stderr)
        return 0
    if args.command == "detach":
        r = xdp_admin.detach(args.iface, netns=args.netns)
        print(f"detached STCP XDP (prog id {r['prog_id']}, {r['mode']} mode) from {args.iface}; "
              f"removed {r['pin_dir']}")
        return 0
    if args.command == "status":
        sts = xdp_admin.status(args.iface, netns=args.netns)
        if args.json:
            print(json.dumps({"interfaces": sts}, indent=2, sort_keys=True))
        elif not sts:
            print("no STCP XDP program attached to any interface" + (f" in netns {args.netns}" if args.netns else ""))
        else:
            print("\n".join(_fmt_status(s) for s in sts))
        return 0
    if args.command == "metrics":
        from ..metrics import run_loader_metrics
        return run_loader_metrics(args.ifaces, args.listen, netns=args.netns, once=args.once)
    raise AssertionError(args.command)


def main(argv: Optional[List[str]] = None) -> int:
    from ..datapath.errors import XdpAlreadyAttached, XdpNotAttached, XdpSetupError

    args = build_parser().parse_args(argv)
    args.netns = getattr(args, "netns", None)
    try:
        return _run(args)
    except (XdpAlreadyAttached, XdpNotAttached) as e:
        print(f"stcp-loader: {e}", file=sys.stderr)
        return EXIT_REFUSED
    except XdpSetupError as e:
        print(f"stcp-loader: {e}", file=sys.stderr)
        return EXIT_SETUP
    except OSError as e:
        print(f"stcp-loader: {e}", file=sys.stderr)
        return EXIT_SETUP


if __name__ == "__main__":
    sys.exit(main())
