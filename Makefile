# Fresh machine: `make demo` trains the debug model on the bundled corpus; `make test` runs the
# test suite. Both create .venv and install into it first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Tests and the demo run on CPU with 8 simulated devices: the mesh code paths are real.
SIMULATED := XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu

.PHONY: demo test install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(VENV)/.core: setup.py | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.dev: setup.py | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(VENV)/.core $@

install: $(VENV)/.core
install-dev: $(VENV)/.dev

demo: $(VENV)/.core
	$(SIMULATED) $(BIN)/python -m k2jax.train --config=configs/pretrain.py:debug --workdir=runs/demo

# Test files run on TEST_WORKERS processes (pytest-xdist), a file per worker at a time, so a
# file's module fixtures are built once.
TEST_WORKERS ?= 2

test: $(VENV)/.dev
	$(SIMULATED) $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile tests

clean:
	rm -rf $(VENV) runs
