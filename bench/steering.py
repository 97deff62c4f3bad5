"""Give each benchmark namespace its own receive CPU on a veth pair.

By default veth runs the receiver's whole stack on the *sender's* CPU (the packet is
handed over inside the sender's xmit), which hides receive cost.  Two knobs fix that:

* threaded NAPI: the receiving veth gets a NAPI instance (veth only has one while GRO is
  on or an XDP program is attached, so GRO is switched on first, through pyroute2's
  ethtool ioctls since the ethtool binary may be absent), `threaded` is set to 1 and the
  resulting `napi/<dev>-<id>` kthread is pinned to the namespace's CPU.  The receive path
  (GRO, IP, UDP/TCP) then runs in that kthread.
  veth only hands a packet to NAPI when it is "eligible for GRO" (veth_xmit): with TSO on
  the sending device that needs rx-gro-list or rx-udp-gro-forwarding on the receiver,
  otherwise the packet goes through netif_rx (backlog, where RPS applies) and the NAPI
  kthread idles.  rx-udp-gro-forwarding is switched on for that; it only aggregates UDP
  that is *forwarded* (no local socket), so local UDP delivery is unchanged.
* RPS on every rx queue (`queues/rx-N/rps_cpus`), as a second line: whatever is still
  received in softirq context elsewhere is steered to the namespace's CPU.

Each step is attempted and recorded (ok / error text); nothing here is fatal, the result
says what was actually in force.
"""
from __future__ import annotations

import subprocess
import sys
import time

GRO_ON = r"""
import sys
from pyroute2.ethtool import Ethtool
e = Ethtool()
f = e.get_features(sys.argv[1])
f.features["rx-gro"].enable = True
f.features["rx-udp-gro-forwarding"].enable = True
e.set_features(sys.argv[1], f)
g = e.get_features(sys.argv[1]).features
print(int(g["rx-gro"].enable and g["rx-udp-gro-forwarding"].enable))
"""


def napi_threads() -> dict[int, str]:
    out = {}
    for line in subprocess.run(["ps", "-eo", "pid=,comm="], capture_output=True, text=True).stdout.splitlines():
        pid, _, comm = line.strip().partition(" ")
        if comm.strip().startswith("napi/"):
            out[int(pid)] = comm.strip()
    return out


def _step(record: dict, name: str, fn) -> bool:
    try:
        val = fn()
        record[name] = {"ok": True, **({"value": val} if val is not None else {})}
        return True
    except Exception as e:  # record and go on
        msg = getattr(e, "stderr", None) or str(e)
        record[name] = {"ok": False, "error": (msg or repr(e)).strip()[:300]}
        return False


MODES = ("all", "napi", "rps", "none")


def steer(host, cpu: int, mode: str = "all") -> dict:
    """Apply RX steering for `host` (a tests.support.netns.Host) onto `cpu`; return what applied.
    mode: all (threaded NAPI + RPS), napi (threaded NAPI only), rps (RPS only), none."""
    dev = host.ifname
    rec: dict = {"namespace": host.ns, "device": dev, "cpu": cpu, "mode": mode}
    sysdir = f"/sys/class/net/{dev}"
    if mode == "none":
        rec["summary"] = "none (veth default: receive runs on the sender's CPU)"
        return rec

    if mode in ("all", "napi"):
        _napi(host, cpu, rec, sysdir)
    if mode in ("all", "rps"):
        def rps():
            mask = format(1 << cpu, "x")
            host.run("sh", "-c", f"for q in {sysdir}/queues/rx-*; do echo {mask} > $q/rps_cpus; done")
            return host.run("sh", "-c", f"for q in {sysdir}/queues/rx-*; do echo ${{q##*/}}=$(cat $q/rps_cpus); done"
                            ).stdout.split()

        _step(rec, "rps_cpus", rps)
    rec["summary"] = describe(rec)
    return rec


def _napi(host, cpu: int, rec: dict, sysdir: str) -> None:
    dev = host.ifname
    _step(rec, "gro", lambda: int(host.run(sys.executable, "-c", GRO_ON, dev).stdout.strip()))

    before = napi_threads()

    def threaded():
        host.run("sh", "-c", f"echo 1 > {sysdir}/threaded")
        return int(host.run("cat", f"{sysdir}/threaded").stdout.strip())

    if _step(rec, "threaded_napi", threaded):
        new = {}
        for _ in range(20):  # the kthread appears at once; allow a moment
            new = {p: c for p, c in napi_threads().items() if p not in before}
            if new:
                break
            time.sleep(0.05)

        def pin():
            if not new:
                raise RuntimeError("no new napi/* kthread appeared")
            for pid in new:
                subprocess.run(["taskset", "-pc", str(cpu), str(pid)], check=True,
                               capture_output=True, text=True)
            return {str(p): c for p, c in new.items()}

        _step(rec, "napi_kthreads_pinned", pin)


def _queues(rec: dict) -> str:
    v = (rec.get("rps_cpus") or {}).get("value")
    return ", ".join(x.split("=")[0] for x in v) if isinstance(v, list) else "rx-*"


def describe(rec: dict) -> str:
    pinned = (rec.get("napi_kthreads_pinned") or {}).get("value") or {}
    napi = (f"{len(pinned)} napi kthreads (one per queue) pinned to CPU {rec['cpu']}" if len(pinned) > 1
            else f"napi kthread pinned to CPU {rec['cpu']}")
    parts = []
    for key, label in (("gro", "GRO + rx-udp-gro-forwarding on"), ("threaded_napi", "threaded NAPI"),
                       ("napi_kthreads_pinned", napi),
                       ("rps_cpus", f"RPS {_queues(rec)} -> CPU {rec['cpu']}")):
        st = rec.get(key)
        if st is None:
            continue
        parts.append(label if st["ok"] else f"{label}: FAILED ({st['error']})")
    return "; ".join(parts)
