# One command per chore. Every target creates and uses .venv itself.
# The distribution's interpreter when it is 3.11 or newer: distributions build it with PGO
# and LTO, and here it costs 20 % less CPU per proxied request than an unoptimized source
# build such as pyenv's (docs/performance.md). Any other: make PYTHON=/path/to/python3.
PYTHON ?= $(shell /usr/bin/python3 -c 'import sys, venv, ensurepip; sys.exit(sys.version_info < (3, 11))' 2>/dev/null && echo /usr/bin/python3 || echo python3)
VENV := .venv
BIN := $(VENV)/bin
# One stamp per interpreter: switching PYTHON rebuilds the venv instead of reusing it.
STAMP := $(VENV)/.installed$(subst /,_,$(PYTHON))
# The package is installed built, not editable: setup.py compiles the per-request modules
# with mypyc (about a minute), again whenever a source changes. DEMUX_PROXY_COMPILE=0
# installs the same source uncompiled.
BUILT := $(VENV)/.built
SOURCES := $(shell find src -name '*.py' -o -name '*.html' -o -name py.typed) setup.py

.PHONY: install run test lint typecheck unit pure fmt clean bench

# First the dependencies and tools (with the package pure), then the compiled build in the
# venv itself: mypyc type-checks against the installed dependencies, as `make typecheck`.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv --clear $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel
	DEMUX_PROXY_COMPILE=0 $(BIN)/pip install -q '.[dev]'
	touch $(STAMP)

$(BUILT): $(STAMP) $(SOURCES)
	rm -rf build  # setuptools would reuse objects built with other flags
	$(BIN)/pip install -q --no-build-isolation --no-deps --force-reinstall .
	touch $(BUILT)

install: $(BUILT)

run: install
	$(BIN)/demux-proxy start $(ARGS)

lint: install
	$(BIN)/ruff check src tests setup.py
	$(BIN)/ruff format --check src tests setup.py

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

# The same source uncompiled (DEMUX_PROXY_COMPILE=0 installs it so): src/ first on the
# path, for the tests here and the proxies they start.
pure: install
	PYTHONPATH=src $(BIN)/pytest -m "not slow" -q tests/unit tests/integration/test_smoke.py tests/integration/test_proxy_http.py

test: lint typecheck unit pure

# Throughput and CPU per request, side by side with the direct baseline (and peers in
# BENCH_PEERS) in one run; installs nginx, wrk and Go from Debian on first use (root).
bench: install
	sh bench/demux.sh

fmt: install
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

clean:
	rm -rf $(VENV) build dist *.egg-info src/*.egg-info .pytest_cache .mypy_cache .ruff_cache .mypyc_cache
