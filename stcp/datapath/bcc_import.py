"""Importing bcc, which no wheel carries: it comes with the distribution.

bcc's Python module is pure Python over libbcc (ctypes) and is not on PyPI in a usable
form; Debian and Ubuntu ship it as python3-bpfcc in /usr/lib/python3/dist-packages, which
a virtual environment does not see. When `import bcc` fails, import_bcc() loads that one
package from the distribution's directory (and only it: the rest of dist-packages stays
out of sys.path, so nothing else the environment pinned is shadowed). STCP_BCC_DIR names
the directory holding a bcc/ package to use instead of the distribution's. `stcp-loader
doctor` reports where bcc came from.
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from typing import Any, List, Optional

from .errors import XdpSetupError

BCC_DIR_ENV = "STCP_BCC_DIR"
INSTALL_HINT = ("install the toolchain with 'sudo make system-deps' (python3-bpfcc libbpfcc linux-headers-amd64), "
                f"or set {BCC_DIR_ENV} to the directory holding bcc/")


def system_dirs() -> List[Path]:
    """Where distributions put bcc's Python package; only $STCP_BCC_DIR if it is set."""
    if BCC_DIR_ENV in os.environ:
        return [Path(os.environ[BCC_DIR_ENV])]
    v = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return [Path("/usr/lib/python3/dist-packages"),                                       # Debian, Ubuntu
            Path(f"/usr/lib/{v}/site-packages"), Path(f"/usr/lib64/{v}/site-packages")]   # Fedora, Arch


def find_system_bcc() -> Optional[Path]:
    """The bcc/ package directory outside this environment, or None."""
    for d in system_dirs():
        if (d / "bcc" / "__init__.py").is_file():
            return d / "bcc"
    return None


def _load_from(pkg: Path) -> Any:
    spec = importlib.util.spec_from_file_location("bcc", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bcc"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        for name in [n for n in sys.modules if n == "bcc" or n.startswith("bcc.")]:
            del sys.modules[name]
        raise
    return module


def import_bcc() -> Any:
    """bcc's BPF class: from this environment, else from the distribution's package.
    XdpSetupError (one line, what to do) if neither works."""
    try:
        from bcc import BPF
        return BPF
    except ImportError as e:
        first: Exception = e
    except Exception as e:  # libbcc.so missing (OSError) or broken
        raise XdpSetupError(f"bcc is not available ({type(e).__name__}: {e}); {INSTALL_HINT}") from None
    pkg = find_system_bcc()
    if pkg is None:
        raise XdpSetupError(f"bcc is not available ({type(first).__name__}: {first}; none in "
                            f"{', '.join(map(str, system_dirs()))}); {INSTALL_HINT}") from None
    try:
        return _load_from(pkg).BPF
    except Exception as e:
        raise XdpSetupError(f"bcc is not available (found {pkg}, but importing it failed: "
                            f"{type(e).__name__}: {e}); {INSTALL_HINT}") from None


def bcc_origin() -> str:
    """Where `import bcc` resolves now (for doctor): a path, or why it does not."""
    try:
        import_bcc()
    except XdpSetupError as e:
        return f"missing: {e}"
    mod = sys.modules.get("bcc")
    return str(Path(getattr(mod, "__file__", "?")).parent)
