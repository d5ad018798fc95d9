# Two entry points, both self-contained on a machine with Python 3.11+:
#   make run   - set everything up and start the workstation
#   make test  - set everything up and run the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test setup model lint serve clean bench

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

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: model lint
	$(BIN)/pytest -q

bench: model
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
