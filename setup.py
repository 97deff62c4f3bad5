"""C extensions of the stcp package; everything else is declared in pyproject.toml.

stcp._aead links OpenSSL's libcrypto (Debian: libssl-dev, installed by
scripts/system-deps.sh); stcp._udpio is plain Linux (sendmmsg/recvmmsg, UDP GSO/GRO).
`pip install -e .` builds them in place.
"""
from setuptools import Extension, setup

CFLAGS = ["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-missing-field-initializers",
          "-Wno-cast-function-type"]

setup(
    ext_modules=[
        Extension(
            "stcp._aead",
            sources=["stcp/_ext/aead.c"],
            libraries=["crypto"],
            extra_compile_args=CFLAGS,
        ),
        Extension("stcp._udpio", sources=["stcp/_ext/udpio.c"], extra_compile_args=CFLAGS),
    ],
)
