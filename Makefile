# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Both run `setup` first; a second run reuses .venv (the stamp file tracks pyproject.toml).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-fast test-torch-min demo bench bench-speed gpu-check lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	# DeepSpeed compiles its CPU shared-memory collective op and, for optimizer offload, its CPU Adam on first
	# use (minutes, then cached in ~/.cache/torch_extensions); build them here so the first training run or
	# test does not pay for them inside a time limit.
	$(PY) -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" 2>&1 | tail -1
	$(PY) -c "from deepspeed.ops.op_builder import CPUAdamBuilder; CPUAdamBuilder().load()" 2>&1 | tail -1
	touch $(STAMP)

test: setup
	$(PY) -m pytest -q --durations=25 tests

# The model and config tests alone (no Ray, no multi-rank launches): a quick check while editing.
test-fast: setup
	$(PY) -m pytest -q tests -m "not slow"

# The lent GPU machines run torch 2.11 / torchvision 0.26: the model, attention, compile and no-sync tests on
# that torch, in a second venv (not part of `make test`). Only PyPI is reachable, and its Linux torch wheel is
# the CUDA build whose nvidia-* dependencies are ~3 GB; torch loads those through sys.path (its
# _load_global_deps), so the wheel goes in with --no-deps and a .pth shares the main venv's nvidia libraries
# (same sonames; nothing of CUDA runs on CPU). Every other package: constraints.txt's pins, without torch's.
MIN_VENV := .venv-torch-min
MIN_PY   := $(MIN_VENV)/bin/python
MIN_TEST := tests/test_model.py tests/test_attention.py tests/test_compile.py tests/test_no_sync.py

$(MIN_VENV)/.installed: constraints.txt $(STAMP)
	test -x $(MIN_PY) || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_PY) -m pip install -q --upgrade pip
	$(MIN_PY) -m pip install -q --no-deps torch==2.11.0 torchvision==0.26.0
	grep -v -E '^(torch|torchvision|triton|nvidia-|cuda-)' constraints.txt > $(MIN_VENV)/requirements.txt
	$(MIN_PY) -m pip install -q --no-deps -r $(MIN_VENV)/requirements.txt
	mkdir -p $(MIN_VENV)/shared && ln -sfn $$(cd $(VENV) && pwd)/lib/python3*/site-packages/nvidia $(MIN_VENV)/shared/nvidia
	$(MIN_PY) -c "import site; open(site.getsitepackages()[0] + '/zz-main-venv-nvidia.pth', 'w').write('$$(pwd)/$(MIN_VENV)/shared\n')"
	$(MIN_PY) -c "import torch, torchvision; assert torch.__version__.startswith('2.11'), torch.__version__"
	touch $@

# TORCH_EXTENSIONS_DIR: DeepSpeed's CPU op is built against this torch, apart from the main venv's build.
test-torch-min: $(MIN_VENV)/.installed
	PYTHONPATH=$$(pwd) TORCH_EXTENSIONS_DIR=$$(pwd)/$(MIN_VENV)/torch_extensions $(MIN_PY) -m pytest -q -p no:cacheprovider $(MIN_TEST)

demo: setup
	$(PY) -m pipeline.demo --out runs/demo

# Every benchmark that runs without a GPU, at its default (quick) size: the four side-by-side speed
# comparisons (bench-speed), then memory per rank, planner driver memory, the SIGKILL chaos harness and the
# hostile-source fuzzer, and the near-duplicate hash's recall vs false matches.
# Skipped: benchmarks/gpu_check.py (needs CUDA: `make gpu-check`; its CPU smoke run is in the tests).
# benchmarks/chaos_{launch,sharding,training}.py are chaos.py's modules, not benchmarks of their own.
# docs/benchmarks.md has each figure with the command, machine, commit and date that measured it.
bench: bench-speed
	$(PY) benchmarks/memory_scale.py
	$(PY) benchmarks/checkpoint_speed.py
	$(PY) benchmarks/plan_scale.py
	$(PY) benchmarks/chaos.py
	$(PY) benchmarks/fuzz_sources.py
	$(PY) benchmarks/near_dup_quality.py --tiles 4

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
