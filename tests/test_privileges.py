"""A server on the kernel datapaths parses the network's input with no privileges
(stcp.privileges): once the XDP program is attached and its maps and sockets are open, it
runs as an unprivileged user with every capability set empty and PR_SET_NO_NEW_PRIVS, and
dumps no core. Started as root (dropping to --user) or as that user with exactly the
capabilities the datapath needs, and nothing else; either way the live-CID table, the
metrics and the detach at exit keep working through what it holds.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from stcp import privileges
from tests.support.procs import (
    AFXDP_PORT,
    STCP,
    echo_all,
    kill_worker,
    pinned,
    serve_afxdp,
    serve_workers,
    session_key,
    stop,
    wait_for_stderr_line,
    worker_pids,
    xdp_status,
)
from tests.support.unprivileged import proc_status, python_as, threads_status

PORT = 4483
SIZE = 24 << 20
NOBODY = 65534


def _py(code: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout)


def _assert_unprivileged(pid: int) -> dict:
    """Every thread of pid: the user nobody, no capability in any set, no new privileges."""
    for st in threads_status(pid):
        assert set(st["Uid"].split()) == {str(NOBODY)}, st["Uid"]
        assert set(st["Gid"].split()) == {str(privileges.account("nobody").pw_gid)}, st["Gid"]
        for k in ("CapEff", "CapPrm", "CapInh", "CapAmb"):
            assert int(st[k], 16) == 0, f"{k} {st[k]}"
        assert st["NoNewPrivs"] == "1"
    _assert_no_core_dump(pid)
    return proc_status(pid)


def _assert_no_core_dump(pid: int) -> None:
    """No core file (RLIMIT_CORE 0) and not dumpable: the kernel then gives /proc/PID/mem (and
    the rest of /proc/PID/) to root, so the user the server runs as can neither ptrace it nor
    read its memory (the keys)."""
    with open(f"/proc/{pid}/limits") as f:
        core = next(line for line in f if line.startswith("Max core file size"))
    assert core.split()[4:6] == ["0", "0"], core
    assert os.stat(f"/proc/{pid}/mem").st_uid == 0, "the server is dumpable"


# --------------------------------------------------------------------------------------
# the mechanism
@pytest.mark.root
def test_drop_privileges_leaves_nothing_to_regain():
    code = """if True:
        import ctypes, json, os, resource
        from stcp import privileges
        pw = privileges.drop_privileges("nobody")
        st = privileges.status()
        try:
            os.setuid(0); back = True
        except PermissionError:
            back = False
        dumpable = ctypes.CDLL(None).prctl(3, 0, 0, 0, 0)       # PR_GET_DUMPABLE
        print(json.dumps({"st": st, "core": resource.getrlimit(resource.RLIMIT_CORE), "back": back,
                          "dumpable": dumpable, "caps": sorted(privileges.effective_capabilities())}))
    """
    r = _py(code)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    st = out["st"]
    assert set(st["Uid"].split()) == {str(NOBODY)} and st["Groups"] == ""
    for k in ("CapEff", "CapPrm", "CapInh", "CapAmb", "CapBnd"):    # root had CAP_SETPCAP: bounding set emptied too
        assert int(st[k], 16) == 0, (k, st[k])
    assert st["NoNewPrivs"] == "1"
    assert out["core"] == [0, 0] and out["dumpable"] == 0
    assert out["back"] is False and out["caps"] == []


@pytest.mark.root
def test_drop_refuses_while_other_threads_run():
    """Capabilities and no_new_privs are per thread: a thread started before the drop would
    keep them, so the drop refuses instead (the server drops before starting any)."""
    code = """if True:
        import threading, time
        from stcp import privileges
        threading.Thread(target=time.sleep, args=(5,), name="early", daemon=True).start()
        try:
            privileges.drop_privileges("nobody")
        except privileges.PrivilegeError as e:
            print(e)
    """
    r = _py(code)
    assert r.returncode == 0, r.stderr
    assert "other threads running" in r.stdout and "early" in r.stdout


@pytest.mark.root
def test_drop_right_after_a_joined_helper_thread():
    """The XDP setup runs netlink in a helper thread it joins (netlink.off_loop); the drop
    follows at once, while the kernel may still list that thread for a moment. The drop
    waits for it to be gone rather than refuse."""
    code = """if True:
        import os, threading
        from stcp import privileges
        for _ in range(200):
            t = threading.Thread(target=sum, args=([1, 2],))
            t.start()
            t.join()
        privileges.drop_privileges("nobody")
        print(os.getuid(), len(os.listdir("/proc/self/task")))
    """
    r = _py(code)
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(NOBODY), "1"], r.stdout


def test_an_unknown_user_is_one_line():
    with pytest.raises(privileges.PrivilegeError, match="no user 'no-such-stcp-user'"):
        privileges.account("no-such-stcp-user")


# --------------------------------------------------------------------------------------
# `stcp serve --datapath xdp` in a namespace, a client in the other
def _serve(a, prefix, python_cmd, env, *extra, key=None):
    """The xdp server under prefix, with the session's server key (key: a copy its user can read)."""
    return subprocess.Popen(["ip", "netns", "exec", a.ns, *prefix, *python_cmd, "serve", "--listen",
                             f"{a.ip4}:{PORT}", "--datapath", "xdp", "--iface", a.ifname,
                             "--key", key or session_key()[0], *extra],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def _echo_checking(a, b, server, check) -> None:
    data = os.urandom(SIZE)
    client = subprocess.Popen(b.cmd(*STCP, "connect", *pinned(), f"{a.ip4}:{PORT}"), stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out: list = []
    reader = threading.Thread(target=lambda: out.append(client.stdout.read()), daemon=True)
    reader.start()
    client.stdin.write(data[:SIZE // 2])
    client.stdin.flush()
    check(server.pid)                              # mid-transfer: the connection is live
    client.stdin.write(data[SIZE // 2:])
    client.stdin.close()
    client.wait(timeout=120)
    reader.join(timeout=30)
    assert client.returncode == 0, client.stderr.read().decode(errors="replace")[-2000:]
    assert out and out[0] == data, "the echo differs from what was sent"


def _metrics(a, port: int) -> str:
    r = a.run(sys.executable, "-c", f"import urllib.request; print(urllib.request.urlopen("
              f"'http://127.0.0.1:{port}/metrics', timeout=10).read().decode())", check=False)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _check_running(a, metrics_port):
    def check(pid: int) -> None:
        _assert_unprivileged(pid)
        # the CID table is written through held map fds: the live connection is in it
        assert xdp_status(a.ns)["live_cids"] >= 1
        body = _metrics(a, metrics_port)               # the XDP counters, read through held fds
        xdp = "\n".join(ln for ln in body.splitlines() if ln.startswith("stcp_xdp_") and "cpu" not in ln)
        assert 'stcp_xdp_attached{iface="veth0",mode="native",netns=""} 1.0' in xdp, xdp
        assert 'stcp_xdp_packets_total{iface="veth0",netns="",verdict="pass_data"}' in xdp, xdp
    return check


def _after(a, server) -> None:
    deadline = time.monotonic() + 15
    while xdp_status(a.ns)["live_cids"] and time.monotonic() < deadline:
        time.sleep(0.2)
    live = xdp_status(a.ns)["live_cids"]
    err = stop(server)
    assert live == 0, f"the ended connection's CID is still in the kernel table; server: {err}"
    assert server.returncode == 0, err
    link = a.run("ip", "-d", "link", "show", a.ifname).stdout
    assert "prog/xdp" not in link, f"the unprivileged server left its XDP program attached: {link}"


def _serve_echo_check(a, b, prefix, python_cmd, env, metrics_port: int, *extra: str, key=None) -> None:
    """The xdp server under prefix: unprivileged while a client echoes through it, its CID
    table and metrics working, and gone without a trace after SIGTERM."""
    server = _serve(a, prefix, python_cmd, env, "--metrics", f"127.0.0.1:{metrics_port}", *extra, key=key)
    try:
        wait_for_stderr_line(server, "serving on", timeout=90)
        _echo_checking(a, b, server, _check_running(a, metrics_port))
    finally:
        if server.poll() is None:
            _after(a, server)
        else:
            pytest.fail(f"the server exited: {stop(server)}")


@pytest.mark.root
@pytest.mark.xdp
@pytest.mark.parametrize("user", ["--user nobody", "default"])
def test_xdp_server_started_as_root_serves_as_nobody(netns_pair, user):
    a, b = netns_pair
    extra = ["--user", "nobody"] if user != "default" else []
    if user == "default" and privileges.default_user() != "nobody":
        pytest.skip(f"the default account here is {privileges.default_user()!r}")
    _serve_echo_check(a, b, [], STCP, None, 9481, *extra)


CAPS = ["net_admin", "bpf", "perfmon"]


def _setpriv(caps):
    spec = ",".join(f"+{c}" for c in caps)
    return ["setpriv", "--reuid", "nobody", "--regid", str(privileges.account("nobody").pw_gid), "--clear-groups",
            "--inh-caps", spec, "--ambient-caps", spec, "--"]


@pytest.fixture(scope="module")
def nobody_python(tmp_path_factory):
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux)")
    cmd, env, why = python_as(["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "--"],
                              tmp_path_factory.mktemp("nobody"))
    if cmd is None:
        pytest.skip(why)
    return cmd, env


@pytest.fixture(scope="module")
def nobody_key():
    """The session's server key, copied where nobody can read it (its own, mode 0600, in a
    directory others may traverse): a server started as nobody reads its key before it
    serves, and the clients pin the session key."""
    d = tempfile.mkdtemp(prefix="stcp-nobody-key-")
    try:
        os.chmod(d, 0o711)
        path = os.path.join(d, "server.key")
        shutil.copyfile(session_key()[0], path)
        os.chown(path, NOBODY, privileges.account("nobody").pw_gid)
        os.chmod(path, 0o600)
        yield path
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.mark.root
@pytest.mark.xdp
def test_xdp_server_with_exactly_its_capabilities_and_no_root(netns_pair, nobody_python, nobody_key):
    """`setpriv --reuid nobody --ambient-caps +net_admin,+bpf,+perfmon`: what a systemd unit
    with User=nobody and AmbientCapabilities= gives; the server loads, attaches, serves,
    clears those capabilities once set up, and detaches at exit."""
    a, b = netns_pair
    cmd, env = nobody_python
    _serve_echo_check(a, b, _setpriv(CAPS), cmd, env, 9482, key=nobody_key)


@pytest.mark.root
@pytest.mark.xdp
@pytest.mark.parametrize("without", CAPS)
def test_each_capability_is_needed(netns_pair, nobody_python, nobody_key, without):
    """One fewer and the server refuses in one line that names it (CAP_PERFMON: the
    verifier refuses the program's packet-pointer arithmetic without it; see
    stcp/privileges.py)."""
    a, _b = netns_pair
    cmd, env = nobody_python
    server = _serve(a, _setpriv([c for c in CAPS if c != without]), cmd, env, key=nobody_key)
    _out, err = server.communicate(timeout=90)
    lines = [ln for ln in err.decode().splitlines() if ln.strip()]
    assert server.returncode == 1 and len(lines) == 1, err
    assert f"CAP_{without.upper()}" in lines[0] and "AmbientCapabilities" in lines[0]
    assert "prog/xdp" not in a.run("ip", "-d", "link", "show", a.ifname).stdout


# --------------------------------------------------------------------------------------
# AF_XDP: alone, and a worker pool whose supervisor restarts a worker after the drop
@pytest.mark.root
@pytest.mark.afxdp
def test_afxdp_server_serves_as_nobody(netns_pair):
    a, b = netns_pair
    addr = f"{a.ip4}:{AFXDP_PORT}"
    _afxdp_echo_check(a, b, addr, serve_afxdp(a, addr, "native"))


AFXDP_CAPS = [*CAPS, "net_raw", "ipc_lock"]


@pytest.mark.root
@pytest.mark.afxdp
def test_afxdp_server_with_exactly_its_capabilities_and_no_root(netns_pair, nobody_python, nobody_key):
    """The AF_XDP datapath as a systemd unit with User=nobody and the five capabilities of
    the OPERATIONS.md table would run it: it sets up, serves as nobody with none left, and
    detaches at exit."""
    a, b = netns_pair
    cmd, env = nobody_python
    addr = f"{a.ip4}:{AFXDP_PORT}"
    server = subprocess.Popen(["ip", "netns", "exec", a.ns, *_setpriv(AFXDP_CAPS), *cmd, "serve", "--listen", addr,
                               "--datapath", "afxdp", "--iface", a.ifname, "--xdp-mode", "native",
                               "--key", nobody_key],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    _afxdp_echo_check(a, b, addr, server)


def _afxdp_echo_check(a, b, addr: str, server: subprocess.Popen) -> None:
    try:
        wait_for_stderr_line(server, "serving on", timeout=90)
        _assert_unprivileged(server.pid)
        ok, failed = echo_all(b, addr, [os.urandom(1 << 20) for _ in range(2)])
        assert ok == 2, failed
    finally:
        err = stop(server)
    assert server.returncode == 0, err
    assert "through AF_XDP" in err and "prog/xdp" not in a.run("ip", "-d", "link", "show", a.ifname).stdout


@pytest.mark.root
@pytest.mark.afxdp
@pytest.mark.slow
def test_worker_pool_workers_drop_and_a_replacement_does_too(veth):
    """The supervisor keeps its privileges (it starts replacements); every worker, the
    replacement of a killed one included, serves as nobody with no capabilities."""
    a, b = veth(queues=2)
    server, pids = serve_workers(a, 2)
    try:
        assert proc_status(server.pid)["Uid"].split()[0] == "0"          # the supervisor
        for pid in pids.values():
            _assert_unprivileged(pid)
        _assert_unprivileged(kill_worker(server, 1, pids[1]))
        ok, failed = echo_all(b, f"{a.ip4}:{AFXDP_PORT}", [os.urandom(256 << 10) for _ in range(6)])
        assert ok == 6, failed
    finally:
        err = stop(server)
    assert server.returncode == 0, err
    assert "prog/xdp" not in a.run("ip", "-d", "link", "show", a.ifname).stdout


@pytest.mark.root
def test_an_unprivileged_user_still_serves_on_the_socket_datapath(nobody_python, nobody_key):
    """`stcp serve` always gives up what it may: started without any privilege it stays
    who it is (changing user is not allowed it), sets no-new-privs and serves."""
    cmd, env = nobody_python
    port = 4484
    server = subprocess.Popen(["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups", "--", *cmd,
                               "serve", "--listen", f"127.0.0.1:{port}", "--key", nobody_key], env=env,
                              stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_stderr_line(server, "serving on", timeout=60)
        _assert_unprivileged(server.pid)
        data = os.urandom(100_000)
        r = subprocess.run([*STCP, "connect", *pinned(), f"127.0.0.1:{port}"], input=data, capture_output=True,
                           timeout=60)
        assert r.returncode == 0 and r.stdout == data, r.stderr
    finally:
        err = stop(server)
    assert server.returncode == 0, err


@pytest.mark.root
def test_socket_pool_workers_drop_and_a_replacement_does_too(xdp_toolchain):
    """`serve --workers 2` on the socket datapath: the supervisor keeps its privileges (it
    loaded the steering and starts replacements); every worker, the replacement of a killed
    one included, serves as nobody with no capabilities, and still steers and echoes."""
    port = 4485
    server = subprocess.Popen([*STCP, "serve", "--listen", f"127.0.0.1:{port}", "--workers", "2",
                               "--key", session_key()[0]],
                              stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        lines = wait_for_stderr_line(server, "(socket datapath, 2 workers)", timeout=120)
        pids = worker_pids(lines)
        assert len(pids) == 2, lines
        assert proc_status(server.pid)["Uid"].split()[0] == "0"          # the supervisor
        for pid in pids.values():
            _assert_unprivileged(pid)
        _assert_unprivileged(kill_worker(server, 1, pids[1]))
        for _ in range(4):                     # new connections land on either worker by the kernel's hash
            data = os.urandom(200_000)
            r = subprocess.run([*STCP, "connect", *pinned(), f"127.0.0.1:{port}"], input=data,
                               capture_output=True, timeout=60)
            assert r.returncode == 0 and r.stdout == data, r.stderr
    finally:
        err = stop(server)
    assert server.returncode == 0, err
