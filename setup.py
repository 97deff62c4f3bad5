"""C extensions of the stcp package; everything else is declared in pyproject.toml.

stcp._aead links OpenSSL's libcrypto (Debian: libssl-dev, installed by
scripts/system-deps.sh). `pip install -e .` builds them in place.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "stcp._aead",
            sources=["stcp/_ext/aead.c"],
            libraries=["crypto"],
            extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter",
                                "-Wno-missing-field-initializers", "-Wno-cast-function-type"],
        ),
    ],
)
