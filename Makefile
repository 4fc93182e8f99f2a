# Fresh machine: `make demo` trains the debug model on the bundled corpus; `make test` runs the
# test suite; `make lint` checks the style. Each creates .venv and installs into it first, with
# the exact versions of constraints.txt.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PIP_INSTALL := $(BIN)/pip install --quiet -c constraints.txt
# Tests and the demo run on CPU with 8 simulated devices: the mesh code paths are real.
SIMULATED := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu

.PHONY: demo rehearsal test test-fast lint format install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.core: setup.py constraints.txt | $(BIN)/python
	$(PIP_INSTALL) -e .
	touch $@

$(VENV)/.dev: setup.py constraints.txt | $(BIN)/python
	$(PIP_INSTALL) -e '.[dev]'
	touch $(VENV)/.core $@

install: $(VENV)/.core
install-dev: $(VENV)/.dev

demo: $(VENV)/.core
	$(SIMULATED) $(BIN)/python -m k2jax.train --config=configs/pretrain.py:debug --workdir=runs/demo

# The demo as a 2-host job on this machine: two processes of 4 simulated devices each, started
# through launch/ as a scheduler would (docs/multihost.md).
rehearsal: $(VENV)/.core
	$(BIN)/python -m launch.local --processes=2 --cpu_devices=4 -- \
		--config=configs/pretrain.py:debug --workdir=runs/rehearsal

# Test files run on TEST_WORKERS processes (pytest-xdist), a file per worker at a time, so a
# file's module fixtures are built once; the suite shares a compilation cache and one trained
# demo run (tests/conftest.py).
TEST_WORKERS ?= 2

test: $(VENV)/.dev
	$(SIMULATED) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 tests

# The local loop: everything but the end-to-end cases marked `slow` (CI runs them all).
test-fast: $(VENV)/.dev
	$(SIMULATED) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m 'not slow' tests

lint: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(VENV)/.dev
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

clean:
	rm -rf $(VENV) runs .cache
