"""The `stcp` command's details an operator meets first: option ranges, port 0, options that
do not apply, one wording for a port in use, `| head`, IPv6 addresses, help for every
option, and `serve --cipher` restricting clients. Subprocesses, one-line errors, exit codes."""
from __future__ import annotations

import argparse
import re
import select
import socket
import subprocess

import pytest

from stcp.cli.loader import build_parser as loader_parser
from stcp.cli.main import build_parser
from tests.support.procs import announced_key, key_file, tcp_exchange
from tests.test_cli import STCP, free_port, home  # noqa: F401  (home: the autouse fixture)

IN_USE = "address already in use (another process has it; pick another port or stop that process)"


def run(*argv: str, stdin: bytes = b"", timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([*STCP, *argv], input=stdin, capture_output=True, timeout=timeout)


def one_line(r: subprocess.CompletedProcess) -> str:
    lines = r.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def serve(tmp_path):
    """`stcp serve ARGS` with a key of its own; returns (process, its serving line)."""
    procs = []

    def start(*extra: str):
        key = key_file(tmp_path / f"server-{len(procs)}.key")[0]
        proc = subprocess.Popen([*STCP, "serve", "--key", key, *extra], stderr=subprocess.PIPE, text=True)
        procs.append(proc)
        line = proc.stderr.readline()
        assert "serving on" in line, line + proc.stderr.read()
        return proc, line

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def tunnel_exchange(host: str, port: int, key: str, data: bytes) -> bytes:
    """Through `stcp tunnel --listen 127.0.0.1:0 --to HOST:PORT`, which must announce the
    TCP port it got and the server as written (IPv6 in brackets)."""
    proc = subprocess.Popen([*STCP, "tunnel", "--listen", "127.0.0.1:0", "--to", f"{host}:{port}",
                             "--server-key", key], stderr=subprocess.PIPE, text=True)
    try:
        first = proc.stderr.readline()
        m = re.fullmatch(rf"stcp: tunnel from tcp 127\.0\.0\.1:(\d+) to stcp {re.escape(host)}:{port}\n", first)
        assert m and int(m.group(1)) != 0, first
        return tcp_exchange(int(m.group(1)), data)
    finally:
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("option,value,message", [
    ("--idle-timeout", "-1", "--idle-timeout must be a finite number of seconds greater than 0, not -1"),
    ("--idle-timeout", "0", "--idle-timeout must be a finite number of seconds greater than 0, not 0"),
    ("--handshake-timeout", "0", "--handshake-timeout must be a finite number of seconds greater than 0, not 0"),
    ("--handshake-timeout", "nan", "--handshake-timeout must be a finite number of seconds greater than 0, not nan"),
    ("--handshake-timeout", "inf", "--handshake-timeout must be a finite number of seconds greater than 0, not inf"),
    ("--max-datagram", "-1", "--max-datagram must be between "),
    ("--key-update-interval", "-1", "--key-update-interval must be between 1 and "),
])
@pytest.mark.parametrize("command", ["serve", "connect"])
def test_out_of_range_values_are_usage_errors(command, option, value, message):
    where = ["--listen", f"127.0.0.1:{free_port()}"] if command == "serve" else [f"127.0.0.1:{free_port()}"]
    r = run(command, *where, f"{option}={value}", timeout=20)
    assert r.returncode == 2
    assert one_line(r).startswith("stcp: " + message)


@pytest.mark.parametrize("argv,what", [
    (["connect", "127.0.0.1:0"], "address '127.0.0.1:0'"),
    (["tunnel", "--listen", "127.0.0.1:0", "--to", "localhost:0"], "--to 'localhost:0'"),
    (["serve", "--listen", "127.0.0.1:0", "--forward", "127.0.0.1:0"], "--forward '127.0.0.1:0'"),
])
def test_port_0_is_no_destination(argv, what):
    r = run(*argv)
    assert r.returncode == 2
    assert one_line(r) == f"stcp: bad {what}: port 0 is not a destination; give the port it listens on (1 to 65535)"


def test_listen_port_0_prints_the_bound_port(serve):
    _, line = serve("--listen", "127.0.0.1:0")
    port = int(re.search(r"serving on 127\.0\.0\.1:(\d+) ", line).group(1))
    assert port != 0
    r = run("connect", "--server-key", announced_key(line), f"127.0.0.1:{port}", stdin=b"ping")
    assert r.returncode == 0 and r.stdout == b"ping", r.stderr


def test_tunnel_listen_port_0_prints_the_bound_port(serve):
    _, line = serve("--listen", "127.0.0.1:0")
    port = int(re.search(r"serving on 127\.0\.0\.1:(\d+) ", line).group(1))
    assert tunnel_exchange("127.0.0.1", port, announced_key(line), b"through") == b"through"


@pytest.mark.parametrize("extra,flags,verb", [
    (["--iface", "lo"], "--iface", "applies"),
    (["--xdp-mode", "native"], "--xdp-mode", "applies"),
    (["--xdp-mode=auto"], "--xdp-mode", "applies"),          # the default, typed: still meant for XDP
    (["--afxdp-tx", "afxdp", "--iface", "lo"], "--iface, --afxdp-tx", "apply"),
])
def test_kernel_options_on_the_socket_datapath_are_refused(extra, flags, verb):
    r = run("serve", "--listen", f"127.0.0.1:{free_port()}", *extra)
    assert r.returncode == 2
    assert one_line(r).startswith(f"stcp: {flags} {verb} to --datapath xdp or afxdp, not socket; ")


def test_forward_name_that_does_not_resolve_stops_the_server():
    r = run("serve", "--listen", f"127.0.0.1:{free_port()}", "--forward", "nosuch.invalid:80")
    assert r.returncode == 1
    assert one_line(r).startswith("stcp: cannot resolve the --forward host 'nosuch.invalid': ")


def test_port_in_use_is_worded_one_way(serve, tmp_path):
    taken = socket.socket(socket.AF_INET, socket.SOCK_STREAM)     # one port, taken for UDP and TCP
    taken.bind(("127.0.0.1", 0))
    port = taken.getsockname()[1]
    taken.listen()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        udp.bind(("127.0.0.1", port))
    except OSError:
        pytest.skip("the TCP port's number is taken for UDP by someone else")
    try:
        key = key_file(tmp_path / "k")[0]
        cases = {
            "serve": ["serve", "--listen", f"127.0.0.1:{port}", "--key", key],
            "tunnel": ["tunnel", "--listen", f"127.0.0.1:{port}", "--to", "127.0.0.1:7443"],
            "metrics": ["serve", "--listen", "127.0.0.1:0", "--key", key, "--metrics", f"127.0.0.1:{port}"],
        }
        for what, argv in cases.items():
            r = run(*argv)
            assert r.returncode == 1, (what, r.stderr)
            label = " (metrics)" if what == "metrics" else ""
            assert one_line(r) == f"stcp: cannot listen on 127.0.0.1:{port}{label}: {IN_USE}", what
    finally:
        udp.close()
        taken.close()


def test_closed_stdout_ends_connect_quietly(serve):
    """`stcp connect ... | head -c 10`: no '[Errno 32] Broken pipe', the status cat gets."""
    _, line = serve("--listen", "127.0.0.1:0")
    port = int(re.search(r"serving on 127\.0\.0\.1:(\d+) ", line).group(1))
    cmd = " ".join([*STCP, "connect", "--server-key", announced_key(line), f"127.0.0.1:{port}"])
    r = subprocess.run(["bash", "-c", f"head -c 4000000 /dev/zero | {cmd} | head -c 10 >/dev/null; "
                        "echo ${PIPESTATUS[1]} >&2"], capture_output=True, timeout=60, text=True)
    assert r.stderr.strip() == "141", r.stderr


def ipv6_loopback_unavailable():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
    except OSError as exc:
        return f"no IPv6 loopback: {exc}"
    return None


@pytest.mark.skipif(ipv6_loopback_unavailable() is not None, reason=str(ipv6_loopback_unavailable()))
def test_ipv6_addresses_in_brackets(serve):
    proc, line = serve("--listen", "[::1]:0")
    m = re.search(r"serving on \[::1\]:(\d+) ", line)
    assert m, line
    port, key = int(m.group(1)), announced_key(line)
    r = run("connect", "--server-key", key, f"[::1]:{port}", stdin=b"six")
    assert r.returncode == 0 and r.stdout == b"six", r.stderr
    assert select.select([proc.stderr], [], [], 20)[0], "no log line for the connection"
    log = proc.stderr.readline()
    assert re.search(r" connection closed peer=\[::1\]:\d+ ", log), log
    assert tunnel_exchange("[::1]", port, key, b"v6") == b"v6"
    closed = free_port()
    r = run("connect", "--handshake-timeout", "1", f"[::1]:{closed}")
    assert r.returncode == 1
    error = one_line(r)
    assert error == (f"stcp: nothing listens on UDP [::1]:{closed}: the host answered 'port unreachable' "
                     "(is the STCP server running?)"), error


def _options(parser: argparse.ArgumentParser, path: str):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _options(sub, f"{path} {name}")
        elif not isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            yield path, action


@pytest.mark.parametrize("prog,parser", [("stcp", build_parser), ("stcp-loader", loader_parser)])
def test_every_option_of_every_command_has_help(prog, parser):
    missing = [f"{path} {'/'.join(a.option_strings) or a.dest}" for path, a in _options(parser(), prog)
               if not a.help or a.help == argparse.SUPPRESS]
    assert not missing, f"options without help: {missing}"


def test_serve_cipher_refuses_clients_offering_another(serve):
    proc, line = serve("--listen", "127.0.0.1:0", "--cipher", "chacha20-poly1305")
    port = int(re.search(r"serving on 127\.0\.0\.1:(\d+) ", line).group(1))
    key = announced_key(line)
    r = run("connect", "--server-key", key, "--cipher", "aes-256-gcm", "--handshake-timeout", "1",
            f"127.0.0.1:{port}", stdin=b"x")
    assert r.returncode == 1
    assert "server rejected the handshake: unsupported cipher suite (aes-256-gcm; the server accepts another)" \
        in one_line(r)
    refused = proc.stderr.readline()
    assert re.fullmatch(r"stcp: refused \d+ client hello\(s\) offering a cipher other than chacha20-poly1305 "
                        r"\(--cipher\)\n", refused), refused
    r = run("connect", "--server-key", key, "--cipher", "chacha20-poly1305", f"127.0.0.1:{port}", stdin=b"ok")
    assert r.returncode == 0 and r.stdout == b"ok", r.stderr


def test_metrics_port_0_prints_the_bound_port(serve):
    import urllib.request
    _, line = serve("--listen", "127.0.0.1:0", "--metrics", "127.0.0.1:0")
    m = re.search(r"; metrics on (http://127\.0\.0\.1:(\d+)/metrics)$", line.strip())
    assert m and int(m.group(2)) != 0, line
    with urllib.request.urlopen(m.group(1), timeout=10) as page:
        assert b"stcp_" in page.read()


@pytest.mark.parametrize("datapath", ["xdp", "afxdp"])
def test_port_in_use_on_the_kernel_datapaths(datapath, tmp_path):
    """The same line when the UDP port behind the XDP program is taken, in a namespace of its
    own (the program attaches to its veth, never to a shared interface)."""
    from tests.support import kernel
    from tests.support.netns import veth_pair
    why = kernel.xdp_unavailable() if datapath == "xdp" else kernel.afxdp_unavailable()
    if why:
        pytest.skip(why)
    key = key_file(tmp_path / "k")[0]
    with veth_pair() as (a, _b):
        holder = a.popen([*STCP[:1], "-c", "import socket, sys, time; s = socket.socket(socket.AF_INET, "
                          f"socket.SOCK_DGRAM); s.bind(('{a.ip4}', 4570)); print(flush=True); time.sleep(120)"],
                         stdout=subprocess.PIPE)
        try:
            holder.stdout.readline()            # bound
            r = a.run(*STCP, "serve", "--datapath", datapath, "--iface", a.ifname, "--xdp-mode", "generic",
                      "--listen", f"{a.ip4}:4570", "--key", key, check=False,
                      timeout=120)
        finally:
            holder.kill()
            holder.wait()
        assert r.returncode == 1, r.stderr
        assert r.stderr.strip() == f"stcp: cannot listen on {a.ip4}:4570: {IN_USE}"
        assert "xdp" not in a.run("ip", "link", "show", a.ifname).stdout      # detached again


def test_listen_port_0_with_several_workers_is_refused():
    """Each worker would bind a port of its own: the pool needs one port."""
    r = run("serve", "--listen", "127.0.0.1:0", "--workers", "2")
    assert r.returncode == 2
    assert one_line(r) == ("stcp: --listen port 0 with --workers 2: the workers share one port; give one "
                           "(or drop --workers)")
