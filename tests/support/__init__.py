"""Helpers shared by the tests and by bench/: namespaces, veth pairs and sockets inside them
(netns), a faulty UDP shim (faults), the in-memory network of the sans-IO tests (sim),
crafted packets (packets), what the privileged tests need (kernel), the stcp commands as
subprocesses (procs), loopback servers and traffic (servers), waiting with a deadline
(poll), scraping and the dashboards (metrics), an in-process AF_XDP worker pool (workers),
many connections from one process (loadclient).

Test modules import from here, never from each other.
"""
