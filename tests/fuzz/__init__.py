"""Fuzzing the C extensions under AddressSanitizer and UBSan against their pure-Python
references: build.py (the instrumented build in build/fuzz/), targets.py (one target per
C entry point), __main__.py (`python -m tests.fuzz TARGET`, atheris or corpus replay).
tests/test_fuzz_ext.py runs each briefly; `make fuzz FUZZ_SECONDS=600` runs them longer.
"""
