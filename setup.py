"""C extensions of the stcp package; everything else is declared in pyproject.toml.

stcp._aead links OpenSSL's libcrypto (Debian: libssl-dev, installed by
scripts/system-deps.sh); stcp._udpio is plain Linux (sendmmsg/recvmmsg, UDP GSO/GRO);
stcp._demux (a receive batch grouped by connection ID) and stcp._siphash (the handshake
cookie's SipHash-2-4-128) and stcp._frames (the ACK and STREAM frames of a request/response
record) are plain C.
stcp._xsk (the AF_XDP sockets of `--datapath afxdp`) links libxdp and libbpf (Debian:
libxdp-dev, libbpf-dev); it is optional: without those headers the build skips it with a
warning and everything else (the socket and xdp datapaths) still works.
`pip install -e .` builds them in place; tests/fuzz/build.py builds sanitizer copies
(`make fuzz`).
"""
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

# -fvisibility=hidden: a module built from several files shares functions between them,
# and only PyInit_* (which Python marks visible itself) leaves the shared object.
CFLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers",
          "-Wno-cast-function-type", "-fvisibility=hidden"]
OPTIONAL = {"stcp._xsk"}


class optional_build_ext(build_ext):
    """Builds every extension; a failure of an OPTIONAL one is a warning, not an error.

    A skipped extension is also dropped from `self.extensions`: setuptools lists the
    outputs to install (and an editable install copies them into the source tree) from
    that list after the build, and a listed `.so` that was never built fails the whole
    install.
    """

    def build_extensions(self):
        self.check_extensions_list(self.extensions)
        for ext in list(self.extensions):
            if ext.name not in OPTIONAL:
                self.build_extension(ext)
                continue
            try:
                self.build_extension(ext)
            except Exception as exc:  # CompileError, LinkError, DistutilsExecError
                self.extensions.remove(ext)
                print(f"WARNING: not building {ext.name} ({exc}); the afxdp datapath will be "
                      "unavailable. Install libxdp-dev and libbpf-dev ('sudo make system-deps') "
                      "and reinstall to get it.", file=sys.stderr)

EXTENSIONS = [
    Extension(
        "stcp._aead",
        sources=["stcp/_ext/aead.c", "stcp/_ext/aead_send.c", "stcp/_ext/aead_receive.c"],
        depends=["stcp/_ext/aead.h", "stcp/_ext/record.h", "stcp/_ext/scratch.h"],
        libraries=["crypto"],
        extra_compile_args=CFLAGS,
    ),
    Extension("stcp._udpio", sources=["stcp/_ext/udpio.c"], depends=["stcp/_ext/scratch.h"],
              extra_compile_args=CFLAGS),
    Extension("stcp._demux", sources=["stcp/_ext/demux.c"], depends=["stcp/_ext/record.h"],
              extra_compile_args=CFLAGS),
    Extension("stcp._siphash", sources=["stcp/_ext/siphash.c"], extra_compile_args=CFLAGS),
    Extension("stcp._frames", sources=["stcp/_ext/frames.c"], extra_compile_args=CFLAGS),
    Extension("stcp._xsk", sources=["stcp/_ext/xsk.c", "stcp/_ext/xsk_frame.c", "stcp/_ext/xsk_gro.c"],
              depends=["stcp/_ext/xsk_frame.h", "stcp/_ext/xsk_gro.h"], libraries=["xdp", "bpf"],
              extra_compile_args=CFLAGS),
]

# tests/fuzz/build.py builds sanitizer copies of the same EXTENSIONS, importing this file
if __name__ == "__main__":
    setup(cmdclass={"build_ext": optional_build_ext}, ext_modules=EXTENSIONS)
