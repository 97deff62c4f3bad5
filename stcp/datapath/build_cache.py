"""A content-addressed cache of built files (the clang build of the XDP program).

An entry is named by the hash of everything its build reads (its key, made by the
caller) and holds the build's bytes behind a header with their SHA-256: a torn, truncated
or otherwise damaged entry fails that check and is built again, never loaded. Entries are
written to a temporary file and renamed into place, so a reader sees a whole entry or
none. The directory is $STCP_CACHE_DIR, else /var/cache/stcp for root, else
$XDG_CACHE_HOME/stcp (~/.cache/stcp). What is loaded from it goes into the kernel, so it
is used only if this user owns it and nobody else may write to it; otherwise, and where it
cannot be made or written, the build runs as if there were no cache (a warning says why).
Clearing it (rm -r the directory) only costs the next attach its build.
"""
from __future__ import annotations

import hashlib
import logging
import os
import stat
import tempfile
from pathlib import Path
from typing import Optional

log = logging.getLogger("stcp.datapath.cache")

CACHE_ENV = "STCP_CACHE_DIR"
MAGIC = b"STCPCACHE1\n"
_DIGEST = 32                       # SHA-256 of the payload, after MAGIC
_warned: set = set()


def cache_dir() -> Path:
    """Where entries live (see the module's docstring); not created here."""
    override = os.environ.get(CACHE_ENV)
    if override:
        return Path(override)
    if os.geteuid() == 0:
        return Path("/var/cache/stcp")
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "stcp"


def _warn_once(what: str) -> None:
    if what not in _warned:
        _warned.add(what)
        log.warning("%s; building without the cache (set %s to a directory of this user's; under "
                    "systemd, CacheDirectory=stcp)", what, CACHE_ENV)


def _usable(d: Path, create: bool) -> bool:
    """d is a directory this user owns and no one else may write to (created 0700 if
    create and missing)."""
    try:
        if create:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
        st = d.lstat()
    except FileNotFoundError:
        return False
    except OSError as e:
        _warn_once(f"cannot use the build cache {d}: {e.strerror or e}")
        return False
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        _warn_once(f"not using the build cache {d}: it must be a directory owned by uid {os.geteuid()} "
                   "that only its owner may write to")
        return False
    return True


def _entry(d: Path, key: str, suffix: str) -> Path:
    return d / f"{key}{suffix}"


def load(key: str, suffix: str = "") -> Optional[bytes]:
    """The bytes stored under key, or None (missing, damaged, or no usable cache)."""
    d = cache_dir()
    if not _usable(d, create=False):
        return None
    path = _entry(d, key, suffix)
    try:
        with open(path, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW)) as f:
            if os.fstat(f.fileno()).st_uid != os.geteuid():
                return None
            raw = f.read()
    except OSError:
        return None
    head, digest, payload = raw[:len(MAGIC)], raw[len(MAGIC):len(MAGIC) + _DIGEST], raw[len(MAGIC) + _DIGEST:]
    if head != MAGIC or hashlib.sha256(payload).digest() != digest:
        log.warning("build cache entry %s is damaged; building it again", path)
        return None
    return payload


def store(key: str, payload: bytes, suffix: str = "") -> Optional[Path]:
    """Store payload under key (atomically); its path, or None where the cache is not
    usable (the caller has its build anyway)."""
    d = cache_dir()
    if not _usable(d, create=True):
        return None
    path = _entry(d, key, suffix)
    try:
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(MAGIC + hashlib.sha256(payload).digest() + payload)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
    except OSError as e:
        _warn_once(f"cannot write to the build cache {d}: {e.strerror or e}")
        return None
    return path
