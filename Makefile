# Everything the project needs is installed from here: a virtualenv from PyPI and, from the npm
# registry, anvil (local EVM node) and solc (Solidity compiler). No global installs.
PYTHON ?= python3
VENV ?= .venv
BIN = $(VENV)/bin

.PHONY: setup demo test bench fuzz lint contracts clean

setup: .setup-python .setup-node

.setup-python: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

.setup-node: package.json package-lock.json
	npm ci --no-audit --no-fund
	touch $@

demo: setup
	$(BIN)/python example_project/run_demo.py

test: setup
	$(BIN)/pytest

# Benchmarks (not tests): each prints its figures and ends with `RESULT <name> <value>` lines.
bench: setup
	$(BIN)/python -m bench.signing
	$(BIN)/python -m bench.ledger
	$(BIN)/python -m bench.refusal
	$(BIN)/python -m bench.settlement
	$(BIN)/python -m bench.reconcile
	$(BIN)/python -m bench.throughput
	$(BIN)/python -m bench.reactor

# Fuzzing (not tests): each atheris harness in fuzz/ for FUZZ_SECONDS; see fuzz/README.md.
FUZZ_SECONDS ?= 60
FUZZ_HARNESSES ?= challenge receipt cloudflare signing verifier botauth
fuzz: setup
	$(BIN)/pip install --quiet -e '.[fuzz]'
	status=0; for harness in $(FUZZ_HARNESSES); do \
		PYTHONPATH=. $(BIN)/python -m fuzz.$$harness -max_total_time=$(FUZZ_SECONDS) || status=1; \
	done; exit $$status

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

contracts: .setup-node
	node contracts/compile.mjs

clean:
	rm -rf $(VENV) node_modules .setup-python .setup-node
