"""The `stcp` command as a user runs it: subprocesses, files, exit codes and one-line errors."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import pytest

from tests.support.procs import announced_key, key_file, tcp_exchange

STCP = [sys.executable, "-m", "stcp.cli.main"]


def free_port(kind=socket.SOCK_DGRAM) -> int:
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Every command runs with its own home: the known-hosts file and the state directory
    live in the test's tmp_path, never in the real ones."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "home" / ".local" / "state"))
    return tmp_path / "home"


@pytest.fixture
def server(tmp_path):
    """An echo `stcp serve` on a free loopback port, under a key of its own; yields the
    port (start(...).key is the base64 public key it announced)."""
    procs = []

    def start(*extra: str) -> "Port":
        port = free_port()
        key = key_file(tmp_path / f"server-{len(procs)}.key")[0]
        proc = subprocess.Popen([*STCP, "serve", "--listen", f"127.0.0.1:{port}", "--workers", "1", "--key", key,
                                 *extra],
                                stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        line = proc.stderr.readline()
        assert "serving on" in line, line
        return Port(port, announced_key(line))

    yield start
    for proc in procs:
        proc.terminate()
        assert proc.wait(10) == 0          # SIGTERM is a clean shutdown


class Port(int):
    """A server's port that also knows the key it announced."""
    key: str

    def __new__(cls, port: int, key: str) -> "Port":
        p = super().__new__(cls, port)
        p.key = key
        return p


def connect(port: int, stdin: bytes, *extra: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """`stcp connect` pinning the server's announced key (a Port), else trusting on first use."""
    pin = ("--server-key", port.key) if isinstance(port, Port) else ()
    return subprocess.run([*STCP, "connect", *pin, *extra, f"127.0.0.1:{port}"], input=stdin,
                          capture_output=True, timeout=timeout)


@pytest.mark.parametrize("size", [0, 1, 65_537, 3 << 20])
def test_connect_echo_is_byte_identical(server, size, tmp_path):
    port = server()
    data = os.urandom(size)
    (tmp_path / "in").write_bytes(data)
    with open(tmp_path / "in", "rb") as fin, open(tmp_path / "out", "wb") as fout:
        rc = subprocess.run([*STCP, "connect", "--server-key", port.key, f"127.0.0.1:{port}"], stdin=fin, stdout=fout,
                            stderr=subprocess.PIPE, timeout=60).returncode
    assert rc == 0
    assert (tmp_path / "out").read_bytes() == data


def test_forward_relays_to_a_tcp_backend(server):
    backend = socket.socket()
    backend.bind(("127.0.0.1", 0))
    backend.listen()
    port = server("--forward", f"127.0.0.1:{backend.getsockname()[1]}")
    proc = subprocess.Popen([*STCP, "connect", "--server-key", port.key, f"127.0.0.1:{port}"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    proc.stdin.write(b"request through the tunnel")
    proc.stdin.close()                              # half-close reaches the backend as EOF
    backend.settimeout(20)
    conn, _ = backend.accept()
    received = b""
    while chunk := conn.recv(4096):
        received += chunk
    assert received == b"request through the tunnel"
    conn.sendall(b"answer from the backend")
    conn.close()
    assert proc.stdout.read() == b"answer from the backend"
    assert proc.wait(20) == 0
    backend.close()


def test_tunnel_carries_tcp_clients_over_stcp(server):
    stcp_port = server()
    tcp_port = free_port(socket.SOCK_STREAM)
    tunnel = subprocess.Popen([*STCP, "tunnel", "--listen", f"127.0.0.1:{tcp_port}", "--to",
                               f"127.0.0.1:{stcp_port}", "--server-key", stcp_port.key], stderr=subprocess.PIPE,
                              text=True)
    try:
        assert "tunnel from" in tunnel.stderr.readline()
        for _ in range(2):                      # two clients, each over its own STCP connection
            data = os.urandom(200_000)
            assert tcp_exchange(tcp_port, data) == data
    finally:
        tunnel.terminate()
        tunnel.wait(10)


def test_silent_server_gives_handshake_timeout():
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    try:
        t0 = time.monotonic()
        r = connect(silent.getsockname()[1], b"", "--handshake-timeout", "1")
        assert r.returncode == 1
        assert r.stderr.decode().strip() == "stcp: handshake timed out after 1 s"
        assert time.monotonic() - t0 < 10
    finally:
        silent.close()


def test_unreachable_port_fails_at_once_and_says_why():
    port = free_port()
    t0 = time.monotonic()
    r = connect(port, b"")                     # the default 10 s handshake timeout
    assert r.returncode == 1
    err = r.stderr.decode().strip().splitlines()
    assert err == [f"stcp: nothing listens on UDP 127.0.0.1:{port}: the host answered 'port unreachable' "
                   f"(is the STCP server running?)"]
    assert time.monotonic() - t0 < 5           # interpreter start-up included; not the 10 s timeout


def test_port_in_use(server, tmp_path):
    port = server()
    r = subprocess.run([*STCP, "serve", "--listen", f"127.0.0.1:{port}", "--workers", "1",
                        "--key", key_file(tmp_path / "k")[0]],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 1
    assert r.stderr.strip() == (f"stcp: cannot listen on 127.0.0.1:{port}: address already in use "
                                "(another process has it; pick another port or stop that process)")


@pytest.mark.parametrize("address,message", [
    ("127.0.0.1:99999", "port must be a number from 0 to 65535"),
    ("no-such-host.invalid:7443", "cannot resolve 'no-such-host.invalid'"),
    (":7443", "missing host"),
])
def test_bad_address(address, message):
    r = subprocess.run([*STCP, "connect", address], capture_output=True, text=True, timeout=20, input="")
    assert r.returncode in (1, 2)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0]


def test_peer_termination_reason_reaches_the_user(server):
    closed_port = free_port(socket.SOCK_STREAM)          # nothing listens there
    port = server("--forward", f"127.0.0.1:{closed_port}")
    r = connect(port, b"hello")
    assert r.returncode == 1
    lines = r.stderr.decode().strip().splitlines()
    assert lines == ["stcp: peer terminated the connection: APPLICATION_ABORT (backend unreachable: "
                     "Connection refused)"]            # what failed, never the backend's address


def test_forward_never_tells_the_client_the_backend_address(tmp_path):
    """Finding 9: anyone who completes a handshake used to learn the backend's address from
    the abort reason. The client now hears what failed; only the server's log says where."""
    closed_port = free_port(socket.SOCK_STREAM)
    port = free_port()
    key, public = key_file(tmp_path / "server.key")
    proc = subprocess.Popen([*STCP, "serve", "--listen", f"127.0.0.1:{port}", "--workers", "1", "--key", key,
                             "--forward", f"127.0.0.1:{closed_port}"], stderr=subprocess.PIPE, text=True)
    try:
        assert "serving on" in proc.stderr.readline()
        r = connect(Port(port, public), b"hello")
        log_line = proc.stderr.readline()
    finally:
        proc.terminate()
        proc.wait(10)
    client_err = r.stderr.decode()
    assert r.returncode == 1 and "backend unreachable: Connection refused" in client_err
    assert str(closed_port) not in client_err and "127.0.0.1:" not in client_err
    # the operator's one line: the backend, the client and the reason
    assert " warning backend unreachable peer=127.0.0.1:" in log_line, log_line
    assert f"backend=127.0.0.1:{closed_port} " in log_line and 'error="Connection refused"' in log_line, log_line


def test_demo_runs():
    r = subprocess.run([*STCP, "demo", "--mib", "2"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "SHA-256 matches" in r.stdout


def test_serve_exposes_metrics(server):
    import urllib.request
    metrics_port = free_port(socket.SOCK_STREAM)
    port = server("--metrics", f"127.0.0.1:{metrics_port}")
    assert connect(port, b"count me").stdout == b"count me"
    body = ""
    for _ in range(50):                  # the server's connection ends just after the client's
        body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
        if 'stcp_connections_closed_total{reason="normal"} 1.0' in body:
            break
        time.sleep(0.1)
    assert 'stcp_connections_closed_total{reason="normal"} 1.0' in body
    assert "stcp_build_info" in body


def test_bad_metrics_address_is_a_usage_error():
    r = subprocess.run([*STCP, "serve", "--listen", "127.0.0.1:0", "--workers", "1", "--metrics", "nonsense"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 2
    assert r.stderr.startswith("stcp: bad --metrics address")


def test_a_failed_relay_tells_the_client_what_failed_never_where():
    """splice() returns the error that ended the relay (tunnel prints it), but what reaches
    the STCP peer is the error's strerror (stcp.cli.common.describe), never the OSError's
    text: asyncio quotes addresses in them, and the backend's address stays with the operator."""
    import asyncio

    from stcp.cli.common import splice

    class StcpSide:
        reason = None

        async def read(self, n):
            await asyncio.sleep(3600)             # the client sends nothing meanwhile

        def write(self, data):
            pass

        async def drain(self):
            pass

        def can_write_eof(self):
            return False

        def abort(self, reason):
            self.reason = reason

        async def wait_closed(self):
            pass

    class TcpSide(StcpSide):
        async def read(self, n):
            raise ConnectionResetError(104, "Connection reset by peer at 10.9.8.7:5432")

        def close(self):
            pass

    stcp_side, tcp_side = StcpSide(), TcpSide()
    error = asyncio.run(asyncio.wait_for(splice(stcp_side, stcp_side, tcp_side, tcp_side), 10))
    assert isinstance(error, ConnectionResetError)
    assert stcp_side.reason is not None and stcp_side.reason.startswith("relay failed")
    assert stcp_side.reason == "relay failed: Connection reset by peer", stcp_side.reason
