# The README's two commands: `make demo` (end-to-end demo) and `make test` (test suite).
# Each creates .venv and installs pinned dependencies on first use (torch from the local CPU wheel when present).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mergejax-installed
WHEELS := $(wildcard /opt/wheels)
FIND   := $(if $(WHEELS),--find-links $(WHEELS),)

.PHONY: demo test test-all bench setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(FIND) torch==2.13.0
	$(BIN)/pip install -q $(FIND) -e '.[dev,experiments,torch]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python experiments/demo.py

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python experiments/bench_merge.py
	$(BIN)/python experiments/bench_ternary.py
	$(BIN)/python experiments/bench_data_informed.py
