"""Markers turned into skips that say why, and the fixtures the tests share.

Markers (registered in pyproject.toml); a test that needs a privilege says so with a marker
and is skipped, with the reason, where it is missing, never silently passed:

    root     needs root
    netns    makes network namespaces and veth pairs (root, iproute2)
    xdp      the XDP program: namespaces, bcc with kernel headers, bpffs, libbpf
    xsk      the stcp._xsk extension (built when the libxdp headers are installed)
    afxdp    the AF_XDP datapath: xdp and xsk
    unshare  a private mount namespace (root, unshare -m)
    slow     long end-to-end runs: `pytest -m 'not slow'` is the quick loop

Fixtures: `veth` (a factory of namespace pairs joined by veth, torn down after the test)
and `netns_pair` (one such pair); `xdp_toolchain` and `afxdp_toolchain` (session-wide:
ready, or the test skips with the reason); `xdp_prog` (the XDP program loaded for
BPF_PROG_TEST_RUN, one load per build for the session, its maps emptied for each module);
`stcp_server` (a factory of loopback STCP servers, each on its own event-loop thread for the
test's duration).
"""
from __future__ import annotations

import compileall
import contextlib
import os
import sys
from pathlib import Path

import pytest

from tests.support import kernel
from tests.support.netns import veth_pair
from tests.support.servers import ServerThread, echo
from tests.support.testrun import BUILDS

# marker -> the check that names what is missing (None: nothing is); a test with several
# markers is skipped for the first one missing, in this order
REQUIREMENTS = {
    "root": kernel.root_unavailable,
    "netns": kernel.netns_unavailable,
    "xdp": kernel.xdp_unavailable,
    "xsk": kernel.xsk_unavailable,
    "afxdp": kernel.afxdp_unavailable,
    "unshare": kernel.unshare_unavailable,
}


def pytest_sessionstart(session) -> None:
    """Bytecode for the repository's own packages before any test starts a subprocess.
    Several hundred of them run Python (stcp, stcp-loader, servers, bench peers), each
    importing most of stcp; under PYTHONDONTWRITEBYTECODE (set where this suite runs) no
    __pycache__ is ever written, so each one compiled the same sources again, about half a
    second each on this 2-CPU machine. compileall skips what is up to date, and Python
    checks each .pyc against its source, so an edit is never run stale."""
    if sys.dont_write_bytecode:
        root = Path(__file__).resolve().parent.parent
        for package in ("stcp", "bench", "tests"):
            compileall.compile_dir(root / package, quiet=2)   # a read-only tree: as before


@pytest.fixture(autouse=True, scope="session")
def build_cache(tmp_path_factory):
    """One build cache (stcp/datapath/build_cache.py) for the session and every process it
    starts, never the machine's /var/cache/stcp: the clang build of the XDP program is
    compiled once per set of flags, as on a server that restarts, and a run leaves nothing
    behind. tests/test_build_cache.py tests the cache itself."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("STCP_CACHE_DIR", str(tmp_path_factory.mktemp("build-cache")))
        yield


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list) -> None:
    """A skip mark with the reason on each selected test whose requirement is missing, so
    the report names the test and no fixture of it is set up (a module-scoped one may
    attach an XDP program). trylast: after -m/-k deselected, so only what runs is checked."""
    for item in items:
        for marker, unavailable in REQUIREMENTS.items():
            if item.get_closest_marker(marker) is not None:
                why = unavailable()
                if why:
                    item.add_marker(pytest.mark.skip(reason=why))
                    break


def _require(unavailable) -> None:
    why = unavailable()
    if why:
        pytest.skip(why)


# ---------------------------------------------------------------------------------------
# namespaces and the kernel datapath
# The user's configuration directory as the session found it: what runs pip (fresh installs,
# wheels) still needs its pip.conf when a test moves the rest aside.
_REAL_CONFIG = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Every test's commands get a configuration and state directory of their own, so a
    client's known-hosts file never holds what an earlier test or run recorded (two servers
    with different keys on one test address would otherwise look like an attack). A module
    that tests the defaults themselves defines its own `home`."""
    config = tmp_path / "home" / ".config"
    config.mkdir(parents=True)
    if (_REAL_CONFIG / "pip").is_dir():
        (config / "pip").symlink_to(_REAL_CONFIG / "pip")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(config))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "home" / ".local" / "state"))
    return tmp_path / "home"


@pytest.fixture
def veth():
    """veth(mtu=1500, queues=1) -> (a, b): two namespaces joined by a veth pair
    (tests/support/netns.py), deleted when the test ends; call it again for another pair."""
    _require(kernel.netns_unavailable)
    with contextlib.ExitStack() as stack:
        yield lambda **kw: stack.enter_context(veth_pair(**kw))


@pytest.fixture
def netns_pair(veth):
    """(a, b): one namespace pair with the default veth (MTU 1500, one queue)."""
    return veth()


@pytest.fixture(scope="session")
def xdp_toolchain() -> None:
    """The XDP program can be compiled and attached here, or the test skips saying why."""
    _require(kernel.xdp_unavailable)


@pytest.fixture(scope="session")
def afxdp_toolchain(xdp_toolchain) -> None:
    """The AF_XDP datapath can run here (XDP toolchain and stcp._xsk), or the test skips."""
    _require(kernel.xsk_unavailable)


@pytest.fixture(scope="session", params=BUILDS)
def _loaded_prog(request):
    """One LoadedProg per build for the whole session: a bcc compile costs several seconds
    on this 2-CPU machine, and the modules that run the program differ only in what its
    maps hold, which xdp_prog resets."""
    from tests.support.testrun import LoadedProg, require_testrun
    require_testrun(request.param)
    p = LoadedProg(request.param)
    try:
        yield p
    finally:
        p.close()


@pytest.fixture(scope="module")
def xdp_prog(_loaded_prog):
    """tests.support.testrun.LoadedProg, shared by a module's tests (configure() resets its
    limits), once per build (bcc's and clang's, testrun.BUILDS), or the test skips saying why.
    Each module starts from maps as a fresh load leaves them (LoadedProg.reset())."""
    _loaded_prog.reset()
    return _loaded_prog


# ---------------------------------------------------------------------------------------
# servers
@pytest.fixture
def stcp_server():
    """stcp_server(handler=echo, host="127.0.0.1", config=None) -> ServerThread (.port,
    .address, .server, .loop): an STCP server on its own event-loop thread, closed when the
    test ends. A client in the test (blocking API or an asyncio.run of its own) reaches it
    over loopback."""
    servers: list[ServerThread] = []

    def start(handler=echo, host: str = "127.0.0.1", config=None) -> ServerThread:
        servers.append(ServerThread(handler, host, 0, config))
        return servers[-1]

    yield start
    for s in servers:
        s.close()
