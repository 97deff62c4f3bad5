"""Keys on the command line, as an operator meets them: keygen and pubkey, a server's key
kept in its state directory across restarts, trust on first use and a changed key, allow
lists, and every way a key can be wrong: one line on stderr, a non-zero exit, no traceback."""
from __future__ import annotations

import os
import re
import socket
import stat
import subprocess
import time

import pytest

from stcp.identity import decode_key, encode_key, fingerprint, public_key
from tests.support.procs import STCP, announced_key, key_file, tcp_exchange, wait_for_stderr_line

B64KEY = re.compile(r"^[A-Za-z0-9+/]{43}=$")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """A home of the test's own: the default known-hosts file and state directory live there."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("XDG_STATE_HOME", raising=False)
    return tmp_path / "home"


def run(*args: str, stdin: bytes = b"", timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*STCP, *args], input=stdin, capture_output=True, timeout=timeout)


def one_line(r: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in r.stderr.decode().splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr.decode(), r.stderr.decode()
    assert lines[0].startswith("stcp: "), lines
    return lines[0]


def free_port(kind: int = socket.SOCK_DGRAM) -> int:
    s = socket.socket(socket.AF_INET, kind)
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


@pytest.fixture
def serve(tmp_path):
    """serve(*args, port=None) -> (process, port, startup lines): `stcp serve` on loopback."""
    procs = []

    def start(*args: str, port: int = 0):
        port = port or free_port()
        proc = subprocess.Popen([*STCP, "serve", "--listen", f"127.0.0.1:{port}", "--workers", "1", *args],
                                stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
        procs.append(proc)
        return proc, port, wait_for_stderr_line(proc, "serving on", timeout=30)

    yield start
    for p in procs:
        if p.poll() is None:
            p.terminate()
        p.wait(10)


def stop(proc) -> None:
    proc.terminate()
    assert proc.wait(10) == 0


# --- keygen / pubkey ---------------------------------------------------------------------
def test_keygen_writes_0600_prints_the_public_key_and_never_overwrites(tmp_path):
    out = tmp_path / "server.key"
    r = run("keygen", "--out", str(out))
    assert r.returncode == 0 and r.stderr == b""
    pub = r.stdout.decode().strip()
    assert r.stdout.decode().count("\n") == 1 and B64KEY.match(pub)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert encode_key(public_key(decode_key(out.read_text()))) == pub
    r2 = run("pubkey", stdin=out.read_bytes())
    assert r2.returncode == 0 and r2.stdout.decode().strip() == pub
    before = out.read_bytes()
    r3 = run("keygen", "--out", str(out))
    assert r3.returncode == 1 and r3.stdout == b""
    assert "already exists: refusing to overwrite" in one_line(r3)
    assert out.read_bytes() == before


def test_pubkey_of_garbage_is_one_line():
    r = run("pubkey", stdin=b"not a key\n")
    assert r.returncode == 1 and "the private key on stdin is not base64 text" in one_line(r)


# --- the server's key ------------------------------------------------------------------
def test_serve_makes_a_key_in_its_state_dir_once_and_keeps_it(serve, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    proc, port, lines = serve("--state-dir", str(state))
    assert any(f"made a new server key in {state}/server.key" in ln for ln in lines), lines
    key = announced_key(lines[-1])
    assert f"({fingerprint(decode_key(key))})" in lines[-1]
    assert stat.S_IMODE((state / "server.key").stat().st_mode) == 0o600
    stop(proc)
    proc, port, lines = serve("--state-dir", str(state), port=port)
    assert len(lines) == 1 and announced_key(lines[0]) == key         # restarted: the same identity
    r = run("connect", "--server-key", key, f"127.0.0.1:{port}", stdin=b"same server")
    assert r.returncode == 0 and r.stdout == b"same server"
    stop(proc)


def test_serve_default_state_dir_is_under_home_for_a_user(home, monkeypatch):
    import stcp.identity as identity
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    assert identity.default_state_dir() == str(home / ".local" / "state" / "stcp")
    monkeypatch.setenv("XDG_STATE_HOME", "/srv/state")
    assert identity.default_state_dir() == "/srv/state/stcp"
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    assert identity.default_state_dir() == "/var/lib/stcp"


def test_serve_with_key_file_announces_that_key(serve, tmp_path):
    path, pub = key_file(tmp_path / "server.key")
    _proc, _port, lines = serve("--key", path)
    assert lines == [f"stcp: serving on 127.0.0.1:{_port} (echo, socket datapath); server key {pub} "
                     f"({fingerprint(decode_key(pub))})"]


@pytest.mark.parametrize("setup,needle", [
    ("missing_dir", "state directory {tmp}/nowhere does not exist: create it"),
    ("loose", "is accessible by others (mode 0644): run chmod 600"),
    ("corrupt", "is not base64 text"),
    ("short", "is 16 bytes, an X25519 key is 32"),
    ("no_file", "key file {tmp}/absent.key does not exist"),
    ("bad_allow", "allow list {tmp}/allow line 3 is not base64 text"),
])
def test_serve_refuses_a_bad_key_in_one_line(tmp_path, setup, needle):
    args = {"missing_dir": ["--state-dir", str(tmp_path / "nowhere")],
            "no_file": ["--key", str(tmp_path / "absent.key")]}.get(setup)
    if args is None:
        path = tmp_path / "k.key"
        if setup == "bad_allow":
            key_file(path)
            (tmp_path / "allow").write_text(f"# clients\n{key_file(tmp_path / 'c.key')[1]} alice\nbob\n")
            args = ["--key", str(path), "--allow-clients", str(tmp_path / "allow")]
        else:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
            os.write(fd, {"loose": encode_key(bytes(32)).encode(), "corrupt": b"%%%%\n",
                          "short": encode_key(bytes(16)).encode()}[setup])
            os.close(fd)
            os.chmod(path, 0o644 if setup == "loose" else 0o600)
            args = ["--key", str(path)]
    r = run("serve", "--listen", f"127.0.0.1:{free_port()}", *args, timeout=20)
    assert r.returncode == 1
    assert needle.format(tmp=tmp_path) in one_line(r)


# --- pinning and trust on first use ----------------------------------------------------------
def test_connect_with_a_wrong_pinned_key_names_both_fingerprints(serve, tmp_path):
    path, pub = key_file(tmp_path / "server.key")
    _proc, port, _ = serve("--key", path)
    other = key_file(tmp_path / "other.key")[1]
    t0 = time.monotonic()
    r = run("connect", "--server-key", other, "--handshake-timeout", "1", f"127.0.0.1:{port}", stdin=b"secret")
    assert time.monotonic() - t0 < 10
    assert r.returncode == 1 and r.stdout == b""
    assert one_line(r) == (f"stcp: handshake failed: expected server key {fingerprint(decode_key(other))} "
                           f"(--server-key), presented {fingerprint(decode_key(pub))} (no acceptable server hello "
                           f"within 1 s)")


@pytest.mark.parametrize("bad", ["not-base64!", encode_key(bytes(31))])
def test_a_malformed_server_key_is_one_line(bad):
    r = run("connect", "--server-key", bad, "127.0.0.1:7443")
    assert r.returncode == 1 and "--server-key is" in one_line(r)


def test_trust_on_first_use_then_a_changed_key_then_accepting_it(serve, tmp_path, home):
    kh = home / ".config" / "stcp" / "known_hosts"
    a_path, a_pub = key_file(tmp_path / "a.key")
    proc, port, _ = serve("--key", a_path)
    r = run("connect", f"127.0.0.1:{port}", stdin=b"one")
    assert r.returncode == 0 and r.stdout == b"one"
    assert one_line(r) == (f"stcp: first connection to 127.0.0.1:{port}: trusting its server key "
                           f"{fingerprint(decode_key(a_pub))} and recording it in {kh} (pin it instead with "
                           f"--server-key {a_pub})")
    assert kh.read_text() == f"127.0.0.1:{port} {a_pub}\n"
    assert stat.S_IMODE(kh.stat().st_mode) == 0o600
    r = run("connect", f"127.0.0.1:{port}", stdin=b"two")
    assert r.returncode == 0 and r.stdout == b"two" and r.stderr == b""
    stop(proc)

    b_path, b_pub = key_file(tmp_path / "b.key")         # the server comes back with another key
    proc, port, _ = serve("--key", b_path, port=port)
    r = run("connect", "--handshake-timeout", "1", f"127.0.0.1:{port}", stdin=b"three")
    assert r.returncode == 1 and r.stdout == b""
    line = one_line(r)
    assert (f"the server key of 127.0.0.1:{port} has changed: expected {fingerprint(decode_key(a_pub))} "
            f"(known-hosts file {kh} line 1), presented {fingerprint(decode_key(b_pub))}") in line
    assert f"`stcp known-hosts remove 127.0.0.1:{port}`" in line
    r = run("known-hosts", "remove", f"127.0.0.1:{port}")
    assert r.returncode == 0 and f"removed 127.0.0.1:{port}" in one_line(r)
    r = run("connect", f"127.0.0.1:{port}", stdin=b"four")
    assert r.returncode == 0 and r.stdout == b"four" and "first connection" in one_line(r)
    assert kh.read_text() == f"127.0.0.1:{port} {b_pub}\n"
    r = run("known-hosts", "remove", f"127.0.0.1:{port + 1}")
    assert r.returncode == 1 and "is not in" in one_line(r)


def test_known_hosts_keeps_comments_and_names_ipv6_in_brackets(tmp_path):
    from stcp.known_hosts import KnownHosts, host_entry
    assert host_entry("::1", 7443) == "[::1]:7443" and host_entry("Example.COM", 1) == "example.com:1"
    kh = KnownHosts(str(tmp_path / "sub" / "known_hosts"))
    k1, k2 = os.urandom(32), os.urandom(32)
    assert kh.record("[::1]:7443", k1) and not kh.record("[::1]:7443", k2)
    with open(kh.path, "a") as f:
        f.write("# a note\nexample.com:9 " + encode_key(k2))          # no final newline
    assert kh.record("10.0.0.1:5", k2)
    assert [e.host for e in kh.entries()] == ["[::1]:7443", "example.com:9", "10.0.0.1:5"]
    assert kh.remove("example.com:9") == 1
    assert open(kh.path).read() == (f"[::1]:7443 {encode_key(k1)}\n# a note\n10.0.0.1:5 {encode_key(k2)}\n")
    r = run("known-hosts", "list", "--known-hosts", kh.path)
    assert r.stdout.decode().splitlines()[0] == f"[::1]:7443 {encode_key(k1)} {fingerprint(k1)}"


def test_ipv6_server_is_recorded_in_brackets(serve, tmp_path, home):
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    path, pub = key_file(tmp_path / "server.key")
    port = free_port()
    proc = subprocess.Popen([*STCP, "serve", "--listen", f"[::1]:{port}", "--workers", "1", "--key", path],
                            stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_stderr_line(proc, "serving on", timeout=30)
        r = run("connect", f"[::1]:{port}", stdin=b"v6")
        assert r.returncode == 0 and r.stdout == b"v6"
        assert (home / ".config" / "stcp" / "known_hosts").read_text() == f"[::1]:{port} {pub}\n"
    finally:
        stop(proc)


def test_a_corrupt_known_hosts_file_is_one_line(tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text("127.0.0.1:1 " + encode_key(os.urandom(32)) + "\nthis line is wrong\n")
    r = run("connect", "--known-hosts", str(kh), "127.0.0.1:7443")
    assert r.returncode == 1
    assert f"known-hosts file {kh} line 2 is not 'HOST:PORT KEY': fix or delete it" in one_line(r)


# --- allow lists -----------------------------------------------------------------------------
def test_allow_list_admits_listed_clients_only(serve, tmp_path):
    server_path, server_pub = key_file(tmp_path / "server.key")
    alice, alice_pub = key_file(tmp_path / "alice.key")
    mallory = key_file(tmp_path / "mallory.key")[0]
    (tmp_path / "allow").write_text(f"# who may connect\n\n{alice_pub}   alice's laptop\n")
    _proc, port, lines = serve("--key", server_path, "--allow-clients", str(tmp_path / "allow"))
    assert lines[-1].endswith(f"; admitting 1 client key(s) from {tmp_path / 'allow'}")
    pin = ["--server-key", server_pub, f"127.0.0.1:{port}"]
    r = run("connect", "--key", alice, *pin, stdin=b"alice")
    assert r.returncode == 0 and r.stdout == b"alice"
    for key in (["--key", mallory], []):
        t0 = time.monotonic()
        r = run("connect", *key, "--handshake-timeout", "30", *pin, stdin=b"let me in")
        assert time.monotonic() - t0 < 15            # at once: not at the handshake (or idle) timeout, 30 s
        assert r.returncode == 1 and r.stdout == b""
        assert "peer terminated the connection: ACCESS_DENIED" in one_line(r)


def test_a_client_key_file_with_loose_permissions_is_refused(tmp_path):
    path = key_file(tmp_path / "c.key")[0]
    os.chmod(path, 0o640)
    r = run("connect", "--key", path, "--server-key", encode_key(os.urandom(32)), "127.0.0.1:7443")
    assert r.returncode == 1 and f"key file {path} is accessible by others (mode 0640)" in one_line(r)


def test_tunnel_trusts_on_first_use_and_presents_its_client_key(serve, tmp_path, home):
    """`stcp tunnel` without --server-key records the server's key once for all its TCP
    clients and presents --key to an allow-list server; a tunnel without a key has each
    client refused ACCESS_DENIED (one line each) and keeps serving."""
    server_path, server_pub = key_file(tmp_path / "server.key")
    alice, alice_pub = key_file(tmp_path / "alice.key")
    (tmp_path / "allow").write_text(f"{alice_pub} alice\n")
    _proc, port, _ = serve("--key", server_path, "--allow-clients", str(tmp_path / "allow"))
    kh = home / ".config" / "stcp" / "known_hosts"

    def tunnel(*args: str) -> tuple[subprocess.Popen, int]:
        tcp_port = free_port(socket.SOCK_STREAM)
        proc = subprocess.Popen([*STCP, "tunnel", "--listen", f"127.0.0.1:{tcp_port}", "--to", f"127.0.0.1:{port}",
                                 "--handshake-timeout", "30", *args], stderr=subprocess.PIPE)
        wait_for_stderr_line(proc, "tunnel from", timeout=30)
        return proc, tcp_port

    proc, tcp_port = tunnel("--key", alice)
    try:
        assert [tcp_exchange(tcp_port, b"client %d" % i) for i in range(2)] == [b"client 0", b"client 1"]
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    assert proc.returncode == 0
    lines = [ln for ln in err.decode().splitlines() if ln.strip()]
    assert lines == [f"stcp: first connection to 127.0.0.1:{port}: trusting its server key "
                     f"{fingerprint(decode_key(server_pub))} and recording it in {kh} (pin it instead with "
                     f"--server-key {server_pub})"], lines
    assert kh.read_text() == f"127.0.0.1:{port} {server_pub}\n"

    proc, tcp_port = tunnel()                                # no client key: denied, the tunnel stays
    try:
        for _ in range(2):
            t0 = time.monotonic()
            with pytest.raises(ConnectionResetError):     # refused: the TCP client sees a reset, not an end
                tcp_exchange(tcp_port, b"let me in")
            assert time.monotonic() - t0 < 15
        assert proc.poll() is None
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=10)
    lines = [ln for ln in err.decode().splitlines() if ln.strip()]
    assert len(lines) == 2 and all("ACCESS_DENIED" in ln and ln.startswith("stcp: tunnel: ") for ln in lines), lines
    assert "Traceback" not in err.decode()
