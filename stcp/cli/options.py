"""The checks on option values argparse cannot make alone: each refused value is a usage
error (exit 2) naming the flag and the allowed range."""
from __future__ import annotations

from typing import Any, Optional, Tuple

from .common import UsageError, parse_hostport

# options that only the kernel datapaths read, with their defaults (given: typed, or not the default)
KERNEL_OPTIONS = {"iface": ("--iface", None), "xdp_mode": ("--xdp-mode", "auto"),
                  "afxdp_tx": ("--afxdp-tx", "socket")}


def destination(text: str, what: str, default_port: Optional[int] = None) -> Tuple[str, int]:
    """A HOST:PORT to send to (`what`: the option's name, for the error): port 0 means
    "any port" only to a listener."""
    parsed = parse_hostport(text, default_port)
    if parsed[1] == 0:
        raise UsageError(f"bad {what} {text!r}: port 0 is not a destination; give the port it listens on (1 to 65535)")
    return parsed


def check_datapath_options(args: Any) -> None:
    """--iface, --xdp-mode and --afxdp-tx given with --datapath socket would be ignored: refuse."""
    if args.datapath != "socket":
        return
    typed = getattr(args, "argv", None) or []
    given = [flag for attr, (flag, default) in KERNEL_OPTIONS.items()
             if getattr(args, attr, default) != default or any(a == flag or a.startswith(flag + "=") for a in typed)]
    if given:
        one = len(given) == 1
        raise UsageError(f"{', '.join(given)} {'applies' if one else 'apply'} to --datapath xdp or afxdp, not "
                         f"socket; add --datapath xdp (or afxdp), or drop {'it' if one else 'them'}")
