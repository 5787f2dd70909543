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
