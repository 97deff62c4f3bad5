# One command each: `make run` (loopback demo), `make test` (lint, then the whole suite), `make bench`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test lint bench system-deps clean fuzz fuzz-xdp

$(STAMP): pyproject.toml $(wildcard setup.py) $(wildcard stcp/_ext/*.c) $(wildcard stcp/_ext/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,bench,lint,fuzz,uvloop]'
	$(PY) -c 'import stcp._aead, stcp._udpio, stcp._demux, stcp._siphash, stcp._frames'  # the C extensions built (setup.py, stcp/_ext/)
	touch $@

# System packages for the kernel datapath (bcc, kernel headers, libxdp). Root only;
# without root the BPF tests skip and say why.
system-deps:
	sh scripts/system-deps.sh

run: $(STAMP)
	$(VENV)/bin/stcp demo

# ruff (rules in pyproject.toml) over the Python trees, mypy over the package and its .pyi stubs.
lint: $(STAMP)
	$(VENV)/bin/ruff check stcp tests bench scripts
	$(VENV)/bin/mypy

# A venv built before `make system-deps` lacks stcp._xsk: rebuild once the headers exist.
test: system-deps $(STAMP) lint
	@if [ -e /usr/include/xdp/xsk.h ] && ! $(PY) -c 'import stcp._xsk' 2>/dev/null; then \
		echo "rebuilding the C extensions: the libxdp headers are installed now"; \
		$(PY) -m pip install -q --no-deps -e .; fi
	$(PY) -m pytest -q

bench: system-deps $(STAMP)
	$(PY) -m bench.run
	$(PY) -m bench.xdp_flood

# The XDP program against its model (tests/support/xdp_model.py) on many more random and mutated
# frames than the suite's short run; root and bcc. STCP_XDP_FUZZ_EXAMPLES=N to change.
fuzz-xdp: $(STAMP)
	STCP_XDP_FUZZ_EXAMPLES=$${STCP_XDP_FUZZ_EXAMPLES:-20000} $(PY) -m pytest -q tests/test_xdp_fuzz.py

# The C extensions built with ASAN and UBSan (build/fuzz/) and fuzzed with atheris against
# their pure-Python references, FUZZ_SECONDS per target; new inputs go into tests/corpus/TARGET/
# (commit the ones worth keeping), a failing input into build/fuzz/crashes/.
FUZZ_SECONDS ?= 60
FUZZ_TARGETS ?= open_records seal_stream group_by_cid siphash xsk_frame
fuzz: $(STAMP)
	$(PY) -m tests.fuzz.build
	for t in $(FUZZ_TARGETS); do $(PY) -m tests.fuzz $$t --seconds $(FUZZ_SECONDS) || exit 1; done

clean:
	rm -rf $(VENV) build *.egg-info
