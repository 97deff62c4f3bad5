"""A UDP load balancer as Kubernetes runs one, in network namespaces: kernel nftables DNAT
through a hash map over the backends, the mechanism of kube-proxy's nftables mode, with
conntrack keeping each flow on the backend it was first sent to.

    with balanced_hosts(3) as net:          # namespaces client, lb, server 1..3
        net.run_server(k, argv)             # in server k's namespace
        net.client.popen(argv)              # clients reach net.vip:net.port through lb
        net.remove(3)                       # server 3 leaves the map; its flows are forgotten

Topology (every address assigned here, no default route anywhere):

    client 10.79.0.2 --- 10.79.0.1 lb 10.79.k.1 --- 10.79.k.2 server k   (k = 1..n)

The virtual IP 10.79.100.1 belongs to no interface, like a Service's ClusterIP: the client
routes 10.79.0.0/16 through lb, whose prerouting chain DNATs UDP to VIP:port onto the
backend `jhash ip saddr . udp sport mod n` picks in its map; conntrack un-NATs the replies.
Removing a backend rewrites the map and the rule (mod n-1) in one transaction and
deletes the conntrack entries whose replies came from it, as kube-proxy does for UDP: the
other flows keep their entries, so only the removed backend's connections move.

Run as `python -m tests.support.balancer forget-backend IP` inside lb's namespace, this
module deletes those conntrack entries (pyroute2, the owner's netlink library).
"""
from __future__ import annotations

import contextlib
import sys
import uuid
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Sequence

from tests.support.netns import Host, sh

VIP = "10.79.100.1"
SEED = 0x57C9


def ruleset(port: int, backends: Sequence[str]) -> str:
    """The balancer's table, replacing the previous one in the same transaction."""
    elements = ", ".join(f"{i} : {ip}" for i, ip in enumerate(backends))
    return (f"table ip stcp_lb\n"
            f"flush table ip stcp_lb\n"
            f"table ip stcp_lb {{\n"
            f"  chain prerouting {{\n"
            f"    type nat hook prerouting priority dstnat; policy accept;\n"
            f"    ip daddr {VIP} udp dport {port} dnat to jhash ip saddr . udp sport mod {len(backends)} "
            f"seed {SEED:#x} map {{ {elements} }}\n"
            f"  }}\n"
            f"}}\n")


@dataclass
class Balanced:
    client: Host
    lb: Host
    servers: Dict[int, Host]            # k -> server k (10.79.k.2)
    port: int
    vip: str = VIP
    backends: List[int] = field(default_factory=list)

    def set_backends(self, ks: Sequence[int]) -> None:
        self.lb.run("nft", "-f", "-", input=ruleset(self.port, [self.servers[k].ip4 for k in ks]))
        self.backends = list(ks)

    def remove(self, k: int) -> int:
        """Take server k out of the map and forget its flows; how many conntrack entries went."""
        self.set_backends([b for b in self.backends if b != k])
        out = self.lb.run(sys.executable, "-m", "tests.support.balancer", "forget-backend", self.servers[k].ip4)
        return int(out.stdout.strip())

    def flows(self) -> Dict[str, int]:
        """Conntrack entries per backend address (their replies' source)."""
        listing = self.lb.run(sys.executable, "-m", "tests.support.balancer", "count-flows").stdout
        return {ip: int(n) for ip, n in (ln.split() for ln in listing.splitlines() if ln.strip())}


def nft_unavailable() -> str | None:
    import shutil
    if shutil.which("nft") is None:
        return "needs nftables' nft command (scripts/system-deps.sh installs it)"
    return None


@contextlib.contextmanager
def balanced_hosts(n: int = 3, port: int = 7443, tag: str | None = None) -> Iterator[Balanced]:
    tag = tag or uuid.uuid4().hex[:6]
    client = Host(f"stcp-lbc-{tag}", "lb0", "10.79.0.2", "")
    lb = Host(f"stcp-lb-{tag}", "c0", "10.79.0.1", "")
    servers = {k: Host(f"stcp-lbs{k}-{tag}", "lb0", f"10.79.{k}.2", "") for k in range(1, n + 1)}
    made: List[str] = []
    try:
        for h in (client, lb, *servers.values()):
            sh("ip", "netns", "add", h.ns)
            made.append(h.ns)
            h.run("ip", "link", "set", "lo", "up")

        def link(a: Host, a_if: str, a_ip: str, b: Host, b_if: str, b_ip: str) -> None:
            ta, tb = f"l{uuid.uuid4().hex[:8]}", f"l{uuid.uuid4().hex[:8]}"
            sh("ip", "link", "add", ta, "type", "veth", "peer", "name", tb)
            for t, h, name, ip in ((ta, a, a_if, a_ip), (tb, b, b_if, b_ip)):
                sh("ip", "link", "set", t, "netns", h.ns)
                h.run("ip", "link", "set", t, "name", name)
                h.run("ip", "addr", "add", f"{ip}/24", "dev", name)
                h.run("ip", "link", "set", name, "up")

        link(client, "lb0", client.ip4, lb, "c0", lb.ip4)
        client.run("ip", "route", "add", "10.79.0.0/16", "via", lb.ip4)
        for k, s in servers.items():
            link(lb, f"s{k}", f"10.79.{k}.1", s, "lb0", s.ip4)
            s.run("ip", "route", "add", "10.79.0.0/24", "via", f"10.79.{k}.1")
        lb.run("sysctl", "-q", "-w", "net.ipv4.ip_forward=1")
        net = Balanced(client, lb, servers, port)
        net.set_backends(sorted(servers))
        yield net
    finally:
        for ns in made:
            sh("ip", "netns", "del", ns, check=False)


# ---------------------------------------------------------------------------------------
# conntrack, run inside lb's namespace
def _entries():
    from pyroute2 import Conntrack
    ct = Conntrack()
    return ct, [e for e in ct.dump_entries() if e.tuple_orig.proto == 17]


def main(argv: Sequence[str]) -> None:
    ct, entries = _entries()
    if argv[0] == "forget-backend":
        gone = [e for e in entries if e.tuple_reply.saddr == argv[1]]
        for e in gone:
            ct.delete(e)
        print(len(gone))
    elif argv[0] == "count-flows":
        counts: Dict[str, int] = {}
        for e in entries:
            counts[e.tuple_reply.saddr] = counts.get(e.tuple_reply.saddr, 0) + 1
        for ip, c in sorted(counts.items()):
            print(ip, c)
    ct.close()


if __name__ == "__main__":
    main(sys.argv[1:])
