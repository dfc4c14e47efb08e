# kubellm — the two commands a newcomer types:
#   make demo   create .venv, install, run the whole pipeline locally (kfp.local) on the demo world
#   make test   create .venv, install, run the default test suite
# Everything else here is a helper those two call.
PY      ?= python3.11
VENV    ?= .venv
BIN     := $(VENV)/bin
# DeepSpeed JIT-compiles its CPU ops (shm comm, fused_adam, cpu_adam) on first use; build them once here.
export TORCH_EXTENSIONS_DIR ?= $(CURDIR)/.cache/torch_extensions
PYTEST_ARGS ?=
# The venv's tools (its pinned ninja above all) come first for everything make runs.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: setup demo test test-unit lint bench compile images clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements/constraints.txt
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade -c images/build-constraints.txt pip setuptools wheel
	# torch first and pinned: any other spec pulls GBs of CUDA wheels.
	$(BIN)/pip install -q -c requirements/constraints.txt torch==2.13.0
	$(BIN)/pip install -q -c requirements/constraints.txt -e '.[dev]'
	$(BIN)/pip check
	$(BIN)/python -m kubellm.training.ops --build
	touch $@

demo: setup
	$(BIN)/kubellm run --local --preset debug --workdir .kubellm/demo

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-unit: setup
	$(BIN)/python -m pytest -m "not integration and not e2e" $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check components pipelines tests bench
	$(BIN)/mypy components pipelines

bench: setup
	$(BIN)/python -m bench.run_all --with-demo

compile: setup
	$(BIN)/kubellm compile --output pipelines/compiled

images:
	@command -v docker >/dev/null || { echo "docker not found: 'make images' needs a Docker engine"; exit 1; }
	bash images/build.sh

clean:
	rm -rf $(VENV) .cache .kubellm build *.egg-info
