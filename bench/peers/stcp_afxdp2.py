"""STCP on the AF_XDP datapath with two worker processes (`stcp serve --datapath afxdp
--workers 2`, with the benchmark's handler): bench.peers.stcp_afxdp's server run by its
supervisor (run_supervisor), same client. Needs an interface with at least 2 RX queues
(bench.run makes the veth with --queues, default 2). Each worker reports its own receive
counters (records per RX queue, CPU) on SIGUSR1, from which bench.run gives records/s
per worker. Both workers inherit the server's CPU pinning (one CPU on the 2-CPU bench
machine), so this measures how the work splits, not scaling over CPUs."""
from __future__ import annotations

from bench.peers import stcp_afxdp

WORKERS = 2
available = stcp_afxdp.available


def main(argv=None) -> None:
    stcp_afxdp.main(argv, workers=WORKERS)


if __name__ == "__main__":
    main()
