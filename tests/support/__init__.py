"""Helpers shared by the tests and by bench/: namespaces and veth pairs (netns), a faulty
UDP shim (faults), the in-memory network of the sans-IO tests (sim), crafted packets
(packets), what the kernel datapath needs (kernel), the stcp commands as subprocesses
(procs), servers and traffic on loopback (servers), scraping and the dashboards
(metrics), an in-process AF_XDP worker pool (workers).

Test modules import from here, never from each other.
"""
