# Two entry points, both self-contained on a machine with Python 3.11+:
#   make run   - set everything up and start the workstation
#   make test  - set everything up and run the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-random test-reverse setup model lint tools serve clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

model: setup
	$(BIN)/semantic models pull

run: model
	$(BIN)/semantic tui

serve: model
	$(BIN)/semantic serve

# promtool checks and unit-tests the Prometheus alert rules (tests skip without it). As root with
# apt-get (CI, containers) it is installed from the distribution's `prometheus` package.
tools:
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null 2>&1)) || \
	    echo "promtool could not be installed: its tests will be skipped"; \
	  else echo "promtool not found: its tests will be skipped (install the prometheus package)"; fi; }

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# The suite runs in file order here (reproducible); test-random and test-reverse check that no test
# depends on another having run first (pytest-randomly prints its seed: rerun that order with
# `make test-random PYTEST_ARGS="--randomly-seed=N"`).
test: model lint tools
	$(BIN)/pytest -q -p no:randomly

test-random: model tools
	$(BIN)/pytest -q $(PYTEST_ARGS)

test-reverse: model tools
	$(BIN)/pytest -q -p no:randomly --reverse $(PYTEST_ARGS)

bench: model
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
