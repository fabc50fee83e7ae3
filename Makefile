# Two commands for a newcomer: `make demo` and `make test`. Both create .venv,
# install the pinned dependencies, build selflabel._C from source, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEPS := $(VENV)/.deps-installed
BUILT := $(VENV)/.selflabel-built
SOURCES := setup.py $(wildcard csrc/*.cpp csrc/*.h)

.PHONY: demo test bench lint build clean

demo: $(BUILT)
	$(PY) -m selflabel train --method sela --data digits --out runs/demo

test: $(BUILT)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

bench: $(BUILT)
	env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE $(PY) benchmarks/bench_cpu.py

lint: $(DEPS)
	$(VENV)/bin/ruff check .

build: $(BUILT)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(DEPS): requirements-dev.txt | $(PY)
	$(PIP) install --quiet -r requirements-dev.txt
	touch $@

$(BUILT): $(DEPS) $(SOURCES)
	$(PIP) install --quiet --no-build-isolation --no-deps -e .
	touch $@

clean:
	rm -rf build *.egg-info selflabel/_C*.so
