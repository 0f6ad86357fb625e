# megatron-lite developer commands. `make demo` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
# NOTE: torch first, pinned: on our machines torch==2.13.0 is a CPU build on local disk;
# a bare `torch` (or an open range) would pull a multi-GB CUDA build. On a GPU cluster,
# override: make setup TORCH_SPEC="torch==2.13.0 --index-url <your CUDA index>"
# Empty TORCH_SPEC: use the torch already installed (e.g. an NGC image, with VENV_FLAGS
# =--system-site-packages so the venv sees it).
TORCH_SPEC ?= torch==2.13.0
VENV_FLAGS ?=
EXTRAS ?= dev,hf,deepspeed
PYTEST_ARGS ?=
IMAGE ?= megatron-lite
DOCKER_RUN_ARGS ?= --gpus all --ipc=host
CMD ?= python -m megatron_lite.train --help

.PHONY: help setup demo demo-bert test test-slow lint bench gpu-check results results-quick docker-build docker-run slurm-test clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-13s %s\n", $$1, $$2}'

$(VENV)/.ready: pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(if $(strip $(TORCH_SPEC)),$(PY) -m pip install --quiet $(TORCH_SPEC))
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	# megatron-core is a test reference only (shard format interop); --no-deps keeps it
	# from pulling another torch. It imports on CPU with numpy + packaging.
	$(if $(findstring dev,$(EXTRAS)),$(PY) -m pip install --quiet --no-deps "megatron-core==0.16.1" packaging)
	touch $@

setup: $(VENV)/.ready  ## create .venv: torch first, then megatron-lite and its extras

demo: setup  ## the whole pipeline on 2 CPU processes (~4.5 min): see launch/demo.sh
	bash launch/demo.sh runs/demo

demo-bert: setup  ## BERT (MLM + NSP) on 2 CPU processes (~5 min): see launch/demo_bert.sh
	bash launch/demo_bert.sh runs/demo-bert

test: setup  ## the test suite without the slow tests (CPU, gloo; see README, Development)
	$(PY) -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-slow: setup  ## only the slow tests: torchrun jobs, signals, kill -9, two nodes, compile
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

lint: setup  ## ruff, and hadolint on the Dockerfile
	$(VENV)/bin/ruff check .
	$(VENV)/bin/hadolint Dockerfile

bench: setup  ## benchmarks that print figures (training step, preprocessing)
	$(PY) bench/train_step.py
	$(PY) bench/preprocess.py
	$(PY) bench/zero.py
	$(PY) bench/tp_collectives.py
	$(PY) bench/generate.py
	$(PY) bench/layerdrop_speed.py
	$(PY) bench/xl_speed.py
	$(PY) bench/adaptive_span_speed.py
	$(PY) bench/par_search_speed.py
	$(PY) bench/plan_check.py
	$(PY) bench/distill_speed.py

gpu-check: setup  ## on a GPU machine: MFU, tokens/s, peak memory of GPT-2 124M/355M/1.5B (<= 8 min)
	PYTHON=$(PY) bash bench/gpu_check.sh

results: setup  ## every paper experiment, resumable (FORCE=1 reruns) -> docs/results.md, docs/results/, docs/img/
	$(PY) bench/experiments/run_all.py $(if $(FORCE),--force)

results-quick: setup  ## docs/results.md and its plots from the committed raw numbers, no training
	$(PY) bench/experiments/run_all.py --quick

docker-build:  ## build the GPU image (IMAGE=megatron-lite); see the Dockerfile for the CPU variant
	docker build -t $(IMAGE) .

docker-run:  ## run CMD in the image with ./data and ./runs mounted
	docker run --rm $(DOCKER_RUN_ARGS) -v $(CURDIR)/data:/workspace/data \
		-v $(CURDIR)/runs:/workspace/runs $(IMAGE) $(CMD)

slurm-test: setup  ## start a one-node SLURM cluster here (installs slurm-wlm) and run the sbatch test
	MEGATRON_LITE_SLURM_TEST=1 $(PY) -m pytest -q -s tests/launch/test_slurm.py

clean:  ## remove the venv and caches
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
