# The whole set-up on a fresh machine: `make demo` (installs, then runs a demo conversion) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# CPU wheel of torch first: otherwise the torch requirement pulls the CUDA build.
TORCH ?= torch==2.13.0

.PHONY: install test test-fast demo bench lint clean

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

# Reduced benchmarks, about 6 minutes on 2 cores (see README, Benchmarks; `--full` variants there).
bench: install
	$(PY) tools/bench_convert.py
	$(PY) tools/bench_svd.py --quick
	$(PY) tools/bench_layer.py --quick


lint: install
	$(VENV)/bin/ruff check smile_stream tests tools
	$(VENV)/bin/ruff format --check smile_stream tests tools

clean:
	rm -rf build demo-out .pytest_cache
