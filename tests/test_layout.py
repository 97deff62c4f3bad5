"""The package's shape, read from the source with `ast`: private names stay private, layers
point one way (core <- datapath <- server/api <- cli; metrics observe), files stay small.

Nothing here imports the code under test: a violation is found even in a module that would
fail to import on this machine (no bcc, no root)."""
from __future__ import annotations

import ast
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Set, Tuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
TREES = ("stcp", "tests", "bench", "scripts")

MAX_PY_LINES = 600        # a Python module in stcp/
MAX_C_LINES = 700         # a C file in stcp/_ext/ or bpf/

# Private names one module takes from another, each with the reason it must. Keep it short:
# prefer a public name, or testing through the public API.
ALLOWED_PRIVATE: Dict[Tuple[str, str], str] = {
    ("tests.test_vectors", "stcp.crypto._aead"):
        "the fixed-key connections run on both record paths; crypto picks the C one at import "
        "(STCP_PURE_PYTHON), and a switch in the API only for this test would be dead code",
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources() -> Iterator[Path]:
    for tree in TREES:
        for path in sorted((ROOT / tree).rglob("*.py")):
            if "__pycache__" not in path.parts:
                yield path


# every first-party module: a .py file, a package, or a C extension (its .pyi stub)
MODULES: Set[str] = {_module_name(p) for p in _sources()} | {
    _module_name(p) for p in (ROOT / "stcp").rglob("*.pyi")}
PACKAGES: Set[str] = {_module_name(p) for p in _sources() if p.name == "__init__.py"}
# C extensions: named _x by convention (the fast path behind a Python module); the names they
# export are their API, typed in their .pyi stub, so importing the module itself is fine.
EXTENSIONS: Set[str] = {_module_name(p) for p in (ROOT / "stcp").rglob("*.pyi")}


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@dataclass
class Module:
    name: str
    path: Path
    tree: ast.Module
    lines: int
    # every first-party module this one imports, anywhere in the file (lazy imports too)
    imports: Set[str] = field(default_factory=set)
    # (line, "module.name") for each private name of another module it reaches
    private_uses: Set[Tuple[int, str]] = field(default_factory=set)


def _resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    """The absolute name of the module a `from X import ...` reads from."""
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _owner(dotted: str) -> Optional[Tuple[str, List[str]]]:
    """The longest first-party module that is a prefix of a dotted path, and the rest."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in MODULES:
            return ".".join(parts[:i]), parts[i:]
    return None


def _private_use(dotted: str) -> Optional[str]:
    """The first private step of a dotted path into first-party code ("stcp.x._y"), else None.
    A C extension module (stcp._aead) is a step into a module, not a private name."""
    owner = _owner(dotted)
    if owner is None:
        return None
    mod, rest = owner
    if rest and _private(rest[0]):
        return f"{mod}.{rest[0]}"
    return None


def _dotted(node: ast.expr) -> Optional[List[str]]:
    names: List[str] = []
    while isinstance(node, ast.Attribute):
        names.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        names.append(node.id)
        return names[::-1]
    return None


def _scan(path: Path, text: Optional[str] = None) -> Module:
    text = path.read_text() if text is None else text
    name = _module_name(path)
    is_package = path.name == "__init__.py"
    m = Module(name, path, ast.parse(text, str(path)), text.count("\n"))
    bound: Dict[str, str] = {}          # local name -> the first-party module (or object path) it stands for
    for node in ast.walk(m.tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if _owner(a.name):
                    m.imports.add(_owner(a.name)[0])
                    if a.asname:
                        bound[a.asname] = a.name
                    else:
                        top = a.name.split(".")[0]
                        bound[top] = top
                    use = _private_use(a.name)
                    if use and not use.startswith(name + "."):
                        m.private_uses.add((node.lineno, use))
        elif isinstance(node, ast.ImportFrom):
            src = _resolve(name, is_package, node)
            if not _owner(src):
                continue
            for a in node.names:
                full = f"{src}.{a.name}"
                # `from pkg import mod` imports mod; `from mod import name` imports mod
                m.imports.add(full if full in MODULES else _owner(src)[0])
                bound[a.asname or a.name] = full
                use = _private_use(full)
                if use and _owner(use)[0] != name:
                    m.private_uses.add((node.lineno, use))
    for node in ast.walk(m.tree):
        path_ = None
        if isinstance(node, ast.Attribute):
            d = _dotted(node)
            if d and d[0] in bound:
                path_ = ".".join([bound[d[0]]] + d[1:])
        elif isinstance(node, ast.Call) and node.args:
            # getattr(mod, "_x"), setattr(mod, "_x", v), monkeypatch.setattr(mod, "_x", v),
            # monkeypatch.setattr("stcp.mod._x", v), mock.patch("stcp.mod._x")
            first = node.args[0]
            if isinstance(first, ast.Constant) and isinstance(first.value, str) and "." in first.value:
                path_ = first.value
            elif len(node.args) >= 2 and isinstance(node.args[1], ast.Constant) \
                    and isinstance(node.args[1].value, str):
                d = _dotted(first)
                if d and d[0] in bound:
                    path_ = ".".join([bound[d[0]]] + d[1:] + [node.args[1].value])
        if path_:
            use = _private_use(path_)
            if use and _owner(use)[0] != name:
                m.private_uses.add((node.lineno, use))
    return m


SCANNED: Dict[str, Module] = {m.name: m for m in map(_scan, _sources())}


def test_the_scanner_sees_what_it_must():
    """The checks below are only as good as the scan: it resolves relative imports, aliases,
    lazy imports, attribute chains and monkeypatched names (a scan that saw nothing would
    pass everything)."""
    src = '''
from . import wire
from .datapath import xdp as x
import stcp.crypto
from ._aead import RecordCipher
def f(monkeypatch):
    from .metrics import exporter
    wire._private_helper
    x._hidden.attr
    stcp.crypto._pure_aead(1)
    monkeypatch.setattr(wire, "_other", 1)
    monkeypatch.setattr("stcp.endpoint._group", 1)
    wire.public_name
    wire.__name__
'''
    m = _scan(ROOT / "stcp" / "probe.py", src)
    assert {"stcp.wire", "stcp.datapath.xdp", "stcp.crypto", "stcp._aead", "stcp.metrics.exporter"} <= m.imports
    assert sorted(u for _, u in m.private_uses) == sorted([
        "stcp.wire._private_helper", "stcp.datapath.xdp._hidden", "stcp.crypto._pure_aead",
        "stcp.wire._other", "stcp.endpoint._group"])


def test_no_module_reaches_into_another_modules_private_names():
    """Underscores are for what other modules must not touch (BRIEF: public names for what
    other modules use). A test or a benchmark that needs a name makes it public, or goes
    through the public API; the few exceptions are listed with their reason above."""
    found = []
    used_allowances = set()
    for m in SCANNED.values():
        for line, use in m.private_uses:
            if (m.name, use) in ALLOWED_PRIVATE:
                used_allowances.add((m.name, use))
                continue
            found.append(f"{m.path.relative_to(ROOT)}:{line}: {use}")
    assert not found, "private names used across modules:\n" + "\n".join(sorted(set(found)))
    assert used_allowances == set(ALLOWED_PRIVATE), \
        f"allowances nothing needs any more: {set(ALLOWED_PRIVATE) - used_allowances}"


def _layer(module: str) -> Optional[str]:
    parts = module.split(".")
    if parts[0] != "stcp":
        return None
    if len(parts) == 1:
        return "package"                 # stcp/__init__.py: the public API's front door
    if parts[1] in ("datapath", "cli", "metrics"):
        return parts[1]
    if parts[1] in ("api", "blocking", "server", "supervisor"):
        return "server"                  # assemble servers and clients from core + datapath
    return "core"                        # the sans-IO protocol and its C fast paths


# what each layer must never import
FORBIDDEN = {
    "core": {"datapath", "server", "cli", "metrics", "package"},
    "datapath": {"server", "cli", "metrics", "package"},
    "server": {"cli", "package"},
    "metrics": {"cli"},
}                                        # and the CLI sits on top: it may import anything
# metrics observe: besides metrics itself, only the server assembly and the CLI import it
METRICS_IMPORTERS = {"stcp.server", "stcp.cli"}


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_layers_point_one_way(layer):
    found = []
    for m in SCANNED.values():
        if _layer(m.name) != layer:
            continue
        for imp in sorted(m.imports):
            if _layer(imp) in FORBIDDEN[layer]:
                found.append(f"{m.path.relative_to(ROOT)} ({layer}) imports {imp} ({_layer(imp)})")
    assert not found, "\n".join(found)


def test_only_the_server_and_the_cli_import_metrics():
    found = [f"{m.path.relative_to(ROOT)} imports {imp}"
             for m in SCANNED.values() if m.name.startswith("stcp") and _layer(m.name) != "metrics"
             and not any(m.name == p or m.name.startswith(p + ".") for p in METRICS_IMPORTERS)
             for imp in sorted(m.imports) if _layer(imp) == "metrics"]
    assert not found, "\n".join(found)


def test_every_stcp_module_has_a_layer_and_the_layers_are_seen():
    """A new top-level package under stcp/ needs a place in the layering above."""
    layers = {_layer(n) for n in SCANNED if n.startswith("stcp")}
    assert layers == {"package", "core", "datapath", "server", "cli", "metrics"}
    assert {p.name for p in (ROOT / "stcp").iterdir() if p.is_dir() and (p / "__init__.py").exists()} \
        == {"datapath", "cli", "metrics"}


def test_python_modules_stay_small():
    big = [f"{m.path.relative_to(ROOT)}: {m.lines} lines" for m in SCANNED.values()
           if m.name.startswith("stcp") and m.lines > MAX_PY_LINES]
    assert not big, f"over {MAX_PY_LINES} lines (split by concern):\n" + "\n".join(big)


def test_c_files_stay_small():
    files = sorted((ROOT / "stcp" / "_ext").glob("*.[ch]")) + sorted((ROOT / "bpf").glob("*.[ch]"))
    assert any(f.suffix == ".c" for f in files)
    big = [f"{f.relative_to(ROOT)}: {n} lines" for f in files if (n := f.read_text().count("\n")) > MAX_C_LINES]
    assert not big, f"over {MAX_C_LINES} lines (split by concern):\n" + "\n".join(big)
