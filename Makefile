# voxtui: `make demo` sets everything up and runs the demo; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.voxtui-installed

.PHONY: setup demo test test-gpu lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# CPU build of torch first (a bare `torch` would pull a multi-GB CUDA build)
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: setup
	$(VENV)/bin/voxtui demo

# the tests side by side (pytest-xdist), one process more than the cores: many wait on engines, sockets,
# SIGSTOPped processes and timeouts rather than compute (on 2 cores: 15:41 against 17:16 with one process a
# core, the same commit); `$(PY) -m pytest -q` runs them one after the other. The slowest start first
# (tests/slowest.txt) and an idle process takes work from a busy one (worksteal): all end together
TEST_JOBS ?= $(shell $(PYTHON) -c 'import os; print((os.cpu_count() or 1) + 1)')

test: setup
	$(VENV)/bin/ruff check engine app tests bench scripts
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist worksteal

# on a CUDA machine: the GPU equivalence tests (tests/gpu; skipped elsewhere), with the system's python
test-gpu:
	python3 -m pytest -q -s tests/gpu

lint: setup
	$(VENV)/bin/ruff check engine app tests bench scripts

bench: setup
	$(PY) bench/data_tools.py

clean:
	rm -rf $(VENV) .pytest_cache
