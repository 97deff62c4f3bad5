"""The stcp and stcp-loader commands as subprocesses, as an operator runs them: servers in a
namespace, clients in the other, the loader's status, reading what a server says on
stderr, and the keys they run under (servers get --key, clients pin it with --server-key:
authentication is on everywhere, and no test writes the real state directory)."""
from __future__ import annotations

import hashlib
import json
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

STCP = [sys.executable, "-m", "stcp.cli.main"]


# ---------------------------------------------------------------------------------------
# keys
SERVER_KEY_RE = re.compile(r"server key ([A-Za-z0-9+/]{43}=) \(SHA256:")


def announced_key(text: str) -> str:
    """The public key (base64) a `stcp serve` startup line announces."""
    m = SERVER_KEY_RE.search(text)
    assert m, f"no server key announced in {text!r}"
    return m.group(1)


def key_file(path) -> tuple[str, str]:
    """A new key file at path (0600); (its path, its public key in base64)."""
    from stcp.identity import encode_key, generate_private_key, public_key, save_private_key
    private = generate_private_key()
    save_private_key(str(path), private)
    return str(path), encode_key(public_key(private))


_SESSION_KEY: list = []


def session_key() -> tuple[str, str]:
    """One server key for the test session's namespace servers: (key file, public key)."""
    if not _SESSION_KEY:
        import atexit
        import shutil
        import tempfile
        d = tempfile.mkdtemp(prefix="stcp-test-key-")
        os.chmod(d, 0o755)             # an unprivileged server (setpriv) may read a key of its own here
        atexit.register(shutil.rmtree, d, True)
        _SESSION_KEY.append(key_file(os.path.join(d, "server.key")))
    return _SESSION_KEY[0]


def nobody_key() -> tuple[str, str]:
    """A server key file user nobody (65534) owns, beside session_key(): (key file, public key)."""
    path = os.path.join(os.path.dirname(session_key()[0]), "nobody-owned.key")
    if len(_SESSION_KEY) == 1:
        _SESSION_KEY.append(key_file(path))
        os.chown(path, 65534, 65534)
    return _SESSION_KEY[1]


def pinned() -> tuple[str, str]:
    """`connect` options pinning session_key()."""
    return ("--server-key", session_key()[1])


def wait_for_stderr_line(proc: subprocess.Popen, needle: str, timeout: float) -> list:
    """proc's stderr lines up to and including the first that contains needle; on timeout or
    exit, an AssertionError quoting what it said so far. Lines read past that one (a read
    takes what is there: two processes of a pool may have spoken at once) are kept for the
    next call, not lost."""
    held: list = proc.__dict__.setdefault("_stderr_held", [[], b""])     # [lines read ahead, partial line]
    seen: list = []
    while held[0]:
        seen.append(held[0].pop(0))
        if needle in seen[-1]:
            return seen
    deadline = time.monotonic() + timeout
    fd = proc.stderr.fileno()
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            *lines, held[1] = (held[1] + chunk).split(b"\n")
            held[0] = [ln.decode(errors="replace") for ln in lines]
            while held[0]:
                seen.append(held[0].pop(0))
                if needle in seen[-1]:
                    return seen
        if proc.poll() is not None:
            break
    raise AssertionError(f"server did not say {needle!r}; stderr so far: {seen + [held[1].decode(errors='replace')]}")


# ---------------------------------------------------------------------------------------
# stcp-loader
def tcp_exchange(port: int, data: bytes, host: str = "127.0.0.1", timeout: float = 20) -> bytes:
    """Send data over a TCP connection, half-close, and return all that comes back (a
    tunnel's local side, say)."""
    import socket
    with socket.create_connection((host, port), timeout=timeout) as c:
        c.sendall(data)
        c.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := c.recv(65536):
            out += chunk
        return out


def loader_cmd() -> list[str]:
    exe = Path(sys.executable).parent / "stcp-loader"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "stcp.cli.loader"]


def loader(*args: str, prefix: tuple = (), env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, *loader_cmd(), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})


def xdp_status(ns: str, iface: str = "veth0") -> dict:
    """`stcp-loader --netns NS status IFACE --json`: that interface's entry."""
    r = loader("--netns", ns, "status", iface, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["interfaces"][0]


# ---------------------------------------------------------------------------------------
# `stcp serve --datapath afxdp` in a namespace, `stcp connect` clients in the other
AFXDP_PORT = 4479
WORKER_RE = re.compile(r"\[worker (\d+)\] AF_XDP: (\d+) datagrams received through AF_XDP \([^)]*\), (\d+) "
                       r"through the UDP socket; sent \d+ through AF_XDP, \d+ through the UDP socket; "
                       r"(\d+) connections, (\d+) datagrams for unknown ones")


def serve_afxdp(host_ns, addr: str, mode: str = "native", *extra: str) -> subprocess.Popen:
    return host_ns.popen([*STCP, "serve", "--listen", addr, "--datapath", "afxdp",
                          "--iface", host_ns.ifname, "--xdp-mode", mode, "--key", session_key()[0], *extra],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def stop(proc: subprocess.Popen) -> str:
    """SIGTERM, wait, and the rest of its stderr."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=15)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        raise AssertionError(f"server ignored SIGTERM; stderr: {err!r}") from None
    return err.decode(errors="replace")


def worker_pids(lines: list) -> dict:
    """{worker: pid} from a pool's "worker N started (pid P)" lines (the last start wins)."""
    return {int(m.group(1)): int(m.group(2)) for m in
            (re.search(r"worker (\d+) started \(pid (\d+)\)", ln) for ln in lines) if m}


def serve_workers(a, n: int, port: int = AFXDP_PORT) -> tuple:
    """An afxdp server with n workers on a's veth, ready; (process, {worker: pid})."""
    server = serve_afxdp(a, f"{a.ip4}:{port}", "native", "--workers", str(n))
    lines = wait_for_stderr_line(server, f"afxdp datapath, {n} workers", timeout=90)
    pids = worker_pids(lines)
    assert len(pids) == n, lines
    return server, pids


def kill_worker(server: subprocess.Popen, worker: int, pid: int, timeout: float = 90) -> int:
    """SIGKILL a pool's worker and wait until the supervisor's replacement serves; its pid."""
    os.kill(pid, signal.SIGKILL)
    lines = wait_for_stderr_line(server, f"[worker {worker}] serving on", timeout=timeout)
    new = worker_pids(lines).get(worker)
    assert new is not None and new != pid, lines
    return new


def clients(b, addr: str, count: int, *extra: str) -> list:
    return [subprocess.Popen(b.cmd(*STCP, "connect", *pinned(), addr, *extra),
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            for _ in range(count)]


def read_all(procs: list) -> tuple:
    """Read every client's stdout in its own thread, from the start: a client blocked on a
    full stdout pipe stops its event loop and hears nothing (then times out)."""
    outs: list = [None] * len(procs)

    def drain(i, p):
        outs[i] = p.stdout.read()

    threads = [threading.Thread(target=drain, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in threads:
        t.start()
    return outs, threads


def client_results(procs: list, datas: list, outs: list, timeout: float = 120) -> tuple:
    """Wait for every client; each that exited 0 must have echoed its data intact.
    (how many did, [the non-empty stderr lines of each that did not])."""
    ok, failed = 0, []
    for p, d, out in zip(procs, datas, outs, strict=True):
        p.wait(timeout=timeout)
        if p.returncode == 0:
            assert hashlib.sha256(out).digest() == hashlib.sha256(d).digest()
            ok += 1
        else:
            failed.append([ln for ln in p.stderr.read().decode(errors="replace").splitlines() if ln.strip()])
        for pipe in (p.stdin, p.stdout, p.stderr):   # now, not when the garbage collector finds them
            if pipe is not None:
                pipe.close()
    return ok, failed


def echo_all(b, addr: str, datas: list, timeout: float = 120) -> tuple:
    """One `stcp connect` client per item of datas, from b, each sending its data and reading
    the echo to the end, all at once: client_results for them."""
    procs = clients(b, addr, len(datas))
    outs, readers = read_all(procs)
    for p, d in zip(procs, datas, strict=True):
        p.stdin.write(d)
        p.stdin.close()
    for t in readers:
        t.join(timeout=timeout)
    return client_results(procs, datas, outs, timeout)


# ---------------------------------------------------------------------------------------
# an unprivileged user, for the tests of what needs which capability
def as_nobody(caps: str) -> list[str]:
    """The command prefix that runs as nobody with only `caps` (setpriv syntax: "-all", "-all,+bpf")."""
    return ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", f"--inh-caps={caps}",
            f"--ambient-caps={caps}"]


def nobody_unavailable() -> str | None:
    """Why as_nobody cannot be used here, or None."""
    import shutil
    if os.geteuid() != 0:
        return "needs root to switch to nobody"
    if shutil.which("setpriv") is None:
        return "needs util-linux's setpriv"
    root = Path(__file__).resolve().parent.parent.parent
    p = subprocess.run([*as_nobody("-all"), sys.executable, "-c", "import stcp.datapath.reuseport"],
                       cwd=root, capture_output=True, text=True)
    if p.returncode:
        return f"user nobody cannot import stcp from {root}: {p.stderr.strip().splitlines()[-1:]}"
    return None
