# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both run `setup` first; a second run reuses .venv (the stamp file tracks pyproject.toml).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast demo bench bench-speed gpu-check lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# DeepSpeed compiles its CPU shared-memory collective op on first use (~1.5 min, then cached in
	# ~/.cache/torch_extensions); build it here so the first training run or test does not pay for it.
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" 2>&1 | tail -1
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q tests

# The model and config tests alone (no Ray, no multi-rank launches): a quick check while editing.
test-fast: setup
	$(PY) -m pytest -q tests -m "not slow"

demo: setup
	$(PY) -m pipeline.demo --out runs/demo

# Every benchmark that runs without a GPU, at its default (quick) size: the four side-by-side speed
# comparisons (bench-speed), then memory per rank, planner driver memory and the SIGKILL chaos harness.
# Skipped: benchmarks/gpu_check.py (needs CUDA: `make gpu-check`; its CPU smoke run is in the tests).
# benchmarks/chaos_{launch,sharding,training}.py are chaos.py's modules, not benchmarks of their own.
# docs/benchmarks.md has each figure with the command, machine, commit and date that measured it.
bench: bench-speed
	$(PY) benchmarks/memory_scale.py
	$(PY) benchmarks/plan_scale.py
	$(PY) benchmarks/chaos.py

bench-speed: setup
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) benchmarks/model_speed.py
	$(PY) benchmarks/shard_speed.py
	$(PY) benchmarks/loader_speed.py
	$(PY) benchmarks/ema_speed.py

# Every GPU figure the project tracks in one budgeted run (needs CUDA and timm; see the script's docstring for the
# lent-device command); `$(PY) benchmarks/gpu_check.py --tiny` is the CPU smoke run CI does.
gpu-check: setup
	$(PY) -m pip install -q -c constraints.txt -e '.[bench]'
	$(PY) benchmarks/gpu_check.py

lint: setup
	$(VENV)/bin/shellcheck launch/*.sh launch/slurm/*.sbatch .ci/run

clean:
	rm -rf runs/demo .pytest_cache
