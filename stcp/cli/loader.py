"""stcp-loader: attach, reconfigure, inspect and detach the STCP XDP program.

    stcp-loader attach IFACE [--mode native|generic|auto] [--port N] [--priority N] [--force] ...
    stcp-loader set IFACE [--hs-rate N] [--hs-burst N] ... [--max-record-len N [--force]]
    stcp-loader status [IFACE] [--json]
    stcp-loader detach IFACE
    stcp-loader metrics [IFACE...] [--listen HOST:PORT] [--once]
    stcp-loader doctor

`--netns NS` (before or after the command) works on an interface inside the network
namespace NS (as `ip netns exec NS` would) while keeping the host's bpffs for the pins.
Errors are one line on stderr and a non-zero exit: 1 for a refused operation (already
attached, nothing to detach, a replacement a running server cannot survive), 2 for bad
usage or a setup problem.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .. import __version__, wire
from ..datapath.verdicts import Verdict

DEFAULT_PORT = wire.DEFAULT_PORT          # the port `stcp serve` listens on by default
EXIT_REFUSED = 1
EXIT_SETUP = 2
LIMITS = ("hs_rate", "hs_burst", "hs_prefix4", "hs_prefix6", "hs_global_rate", "hs_global_burst",
          "max_record_len")                # `set` may change these; `attach` takes them too


def _limit_options(p: argparse.ArgumentParser, defaults: bool) -> None:
    """The limits of `attach` (with their defaults) and of `set` (unset: unchanged)."""
    from ..datapath import xdp_prog as x

    def d(value: int) -> Optional[int]:
        return value if defaults else None

    def h(text: str, value: int) -> str:
        return f"{text} (default {value})" if defaults else f"{text} (unchanged if not given)"

    p.add_argument("--max-record-len", type=int, default=d(x.DEFAULT_MAX_RECORD_LEN), metavar="N",
                   help=h("largest data record payload accepted, bytes", x.DEFAULT_MAX_RECORD_LEN))
    p.add_argument("--hs-rate", type=int, default=d(x.DEFAULT_HS_RATE), metavar="N",
                   help=h("client hellos per second per source prefix", x.DEFAULT_HS_RATE))
    p.add_argument("--hs-burst", type=int, default=d(x.DEFAULT_HS_BURST), metavar="N",
                   help=h("client hello burst per source prefix", x.DEFAULT_HS_BURST))
    p.add_argument("--hs-prefix4", type=int, default=d(x.DEFAULT_HS_PREFIX4), metavar="BITS",
                   help=h("IPv4 sources share a hello bucket per /BITS", x.DEFAULT_HS_PREFIX4))
    p.add_argument("--hs-prefix6", type=int, default=d(x.DEFAULT_HS_PREFIX6), metavar="BITS",
                   help=h("IPv6 sources share a hello bucket per /BITS", x.DEFAULT_HS_PREFIX6))
    p.add_argument("--hs-global-rate", type=int, default=d(x.DEFAULT_HS_GLOBAL_RATE), metavar="N",
                   help=h("client hellos per second from all sources together, 0 for no limit",
                          x.DEFAULT_HS_GLOBAL_RATE))
    p.add_argument("--hs-global-burst", type=int, default=d(x.DEFAULT_HS_GLOBAL_BURST), metavar="N",
                   help=h("client hello burst from all sources together", x.DEFAULT_HS_GLOBAL_BURST))


def build_parser() -> argparse.ArgumentParser:
    from ..datapath import libxdp, xdp_prog

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--netns", default=argparse.SUPPRESS, metavar="NS",
                        help="network namespace (name under /run/netns) holding the interface")
    p = argparse.ArgumentParser(prog="stcp-loader", parents=[common],
                                description="Attach, reconfigure, inspect and detach the STCP XDP program.",
                                epilog="Exit codes: 0 done, 1 refused (see the message), 2 usage or setup problem. "
                                       "docs/OPERATIONS.md section 6 describes every command.")
    p.add_argument("--version", action="version", version=f"stcp-loader (stcp) {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="{attach,set,detach,status,metrics,doctor}")

    a = sub.add_parser("attach", parents=[common], help="build, attach and pin the XDP program, then exit",
                       description="Build the XDP program, attach it to IFACE (through libxdp, beside other "
                                   "XDP programs loaded that way) and pin its maps; the kernel keeps it after "
                                   "the command exits.")
    a.add_argument("iface", metavar="IFACE", help="interface to attach to")
    a.add_argument("--mode", choices=xdp_prog.MODES, default="auto",
                   help="native (driver), generic (skb), or auto: native, else generic (default)")
    a.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"STCP UDP port (default {DEFAULT_PORT})")
    _limit_options(a, defaults=True)
    a.add_argument("--max-cids", type=int, default=xdp_prog.DEFAULT_MAX_CIDS, metavar="N",
                   help=f"capacity of the live-connection table (default {xdp_prog.DEFAULT_MAX_CIDS})")
    a.add_argument("--priority", type=int, default=libxdp.DEFAULT_PRIORITY, metavar="N",
                   help="order among the programs of libxdp's dispatcher, lower runs first "
                        f"(default {libxdp.DEFAULT_PRIORITY}, as xdp-loader's)")
    a.add_argument("--force", action="store_true",
                   help="replace the STCP program (its connection table, limits and counters carry over) or "
                        "another XDP program that cannot run beside it")

    c = sub.add_parser("set", parents=[common], help="change limits of the attached program in place",
                       description="Change limits in the running program's config map; it stays attached and "
                                   "keeps its connection table, so a server on IFACE carries on.")
    c.add_argument("iface", metavar="IFACE", help="interface carrying the STCP program")
    _limit_options(c, defaults=False)
    c.add_argument("--force", action="store_true",
                   help="allow lowering --max-record-len (live connections' larger records are then dropped)")
    c.add_argument("--json", action="store_true", help="print the new status as JSON")

    d = sub.add_parser("detach", parents=[common], help="remove the XDP program and its pins",
                       description="Remove the STCP program from IFACE (other programs of libxdp's dispatcher "
                                   "stay) and its pins.")
    d.add_argument("iface", metavar="IFACE", help="interface carrying the STCP program")

    s = sub.add_parser("status", parents=[common], help="attachment, config and verdict counters")
    s.add_argument("iface", nargs="?", metavar="IFACE", help="one interface (default: every one carrying STCP)")
    s.add_argument("--json", action="store_true", help="machine-readable output")

    m = sub.add_parser("metrics", parents=[common], help="serve the verdict counters to Prometheus (stcp.metrics)")
    m.add_argument("ifaces", nargs="*", metavar="IFACE",
                   help="interfaces to export (default: every one found under /sys/fs/bpf/stcp/ or attached)")
    m.add_argument("--listen", default="127.0.0.1:9401", metavar="HOST:PORT",
                   help="address of /metrics (default 127.0.0.1:9401)")
    m.add_argument("--once", action="store_true", help="print the metrics to stdout once and exit")

    sub.add_parser("doctor", parents=[common], help="check what the kernel datapath needs, and say what is missing",
                   description="Check privileges, bpffs, clang, libxdp, bcc, kernel headers and the kernel's "
                               "support for libxdp's dispatcher; exit 0 if `attach` can work, 1 if not.")
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
    if st.get("dispatcher_id"):
        others = ", ".join(f"{b['name']} (id {b['prog_id']})" for b in st["beside"]) or "no other program"
        where = f"behind libxdp's dispatcher (id {st['dispatcher_id']}) with {others}"
    else:
        where = "alone"
    lines = [
        f"{st['iface']}: STCP XDP attached, {st['mode']} mode, prog id {st['prog_id']}, {where}",
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


def _attach(args: argparse.Namespace) -> int:
    from ..datapath import xdp_admin

    st = xdp_admin.attach(args.iface, args.port, args.mode, args.max_record_len, force=args.force, netns=args.netns,
                          max_cids=args.max_cids, priority=args.priority,
                          **{k: getattr(args, k) for k in LIMITS if k != "max_record_len"})
    if st.get("dispatcher_id"):
        how = f"behind libxdp's dispatcher (id {st['dispatcher_id']})"
    elif st.get("loader") == "libxdp":
        how = ("alone: libxdp could not put its dispatcher in front (the kernel refuses it, or no bpffs; "
               "see 'stcp-loader doctor'), so no other XDP program can join it")
    else:
        how = "alone, loaded with bcc: clang and libxdp ('sudo make system-deps') let it run beside other XDP programs"
    print(f"attached STCP XDP to {args.iface} in {st['mode']} mode (prog id {st['prog_id']}, "
          f"port {st['config']['port']}, {st['live_cids']} live connection IDs); {how}; maps pinned at {st['pin_dir']}")
    if st.get("private_pins"):
        print("stcp-loader: note: /sys/fs/bpf was not mounted here (ip netns exec gives a private /sys), so "
              "the pins were made in a private bpffs and vanish on exit; the program stays attached and "
              "status/detach still find it; use --netns NS to pin in the host's bpffs", file=sys.stderr)
    return 0


def _set(args: argparse.Namespace) -> int:
    from ..datapath import xdp_admin

    changes = {k: getattr(args, k) for k in LIMITS if getattr(args, k) is not None}
    st = xdp_admin.set_limits(args.iface, netns=args.netns, force=args.force, **changes)
    if args.json:
        print(json.dumps(st, indent=2, sort_keys=True))
        return 0
    c = st["config"]
    done = ", ".join(f"{k.replace('_', '-')} {c[k]}" for k in changes)
    print(f"set {done} on {args.iface} "
          f"(prog id {st['prog_id']}, still attached, {st['live_cids']} live connection IDs)")
    return 0


def _run(args: argparse.Namespace) -> int:
    from ..datapath import xdp_admin

    if args.command == "attach":
        return _attach(args)
    if args.command == "set":
        return _set(args)
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
    if args.command == "doctor":
        from ..datapath.xdp_doctor import run_doctor
        return run_doctor(__version__)
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
