# megatron-lite developer commands. `make demo` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# NOTE: torch first, pinned: on our machines torch==2.13.0 is a CPU build on local disk;
# a bare `torch` (or an open range) would pull a multi-GB CUDA build. On a GPU cluster,
# override: make setup TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>"
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= dev,hf
PYTEST_ARGS ?=

.PHONY: setup demo test lint bench clean

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	# megatron-core is a test reference only (shard format interop); --no-deps keeps it
	# from pulling another torch. It imports on CPU with numpy + packaging.
	$(PY) -m pip install --quiet --no-deps "megatron-core==0.16.1" packaging
	touch $@

setup: $(VENV)/.ready

demo: setup
	bash launch/demo.sh runs/demo

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check .

bench: setup
	$(PY) bench/train_step.py
	$(PY) bench/preprocess.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
