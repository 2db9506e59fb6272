# bridgepool: two commands do all the set-up on a fresh machine.
#   make demo   venv + install + Debian text corpora, then a real 3-centre Flower federation
#   make test   venv + install + test dependencies, then the whole test suite
PY ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
# Flower's processes start each other by name (flower-superexec): the venv goes first on PATH.
export PATH := $(abspath $(BIN)):$(PATH)

.PHONY: demo test system-packages lint clean

$(BIN)/bridgepool: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	touch $@

system-packages:
	sh deploy/install-system-packages.sh

demo: system-packages $(BIN)/bridgepool
	$(BIN)/bridgepool demo $(ARGS)

# The suite includes the real compose bring-up (tests/test_compose_up.py): the engine comes with it.
test: $(BIN)/bridgepool
	sh deploy/install-system-packages.sh docker
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q --durations=40 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .ruff_cache .hypothesis
