# Everything a fresh clone needs: `make demo`, `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE ?= $(HOME)/.cache/mlx-abliteration
DEMO_OUT ?= outputs/qwen2.5-coder-1.5b-abliterated
OPENBLAS := /usr/lib/$(shell uname -m)-linux-gnu/openblas-pthread/libopenblas.so.0

.PHONY: demo test test-fast models bench blas venv clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# Debian's OpenBLAS makes MLX's CPU float32 matmul ~27x faster (see README).
blas:
	@if [ "$$(uname -s)" = Linux ] && [ ! -e "$(OPENBLAS)" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    (apt-get install -y -qq libopenblas0-pthread >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq libopenblas0-pthread >/dev/null)) \
	     && echo "installed OpenBLAS"; \
	  else echo "note: install libopenblas0-pthread for a much faster CPU backend"; fi; \
	fi

models: venv
	$(PY) -m mlx_abliteration.real_models --cache-dir $(CACHE) all

demo: venv blas
	$(PY) -m mlx_abliteration.real_models --cache-dir $(CACHE) qwen
	$(VENV)/bin/mlx-abliterate run -m "$$($(PY) -m mlx_abliteration.real_models --cache-dir $(CACHE) --print-path qwen)" \
	  -o $(DEMO_OUT) --overwrite

test: venv blas
	$(PY) -m playwright --version >/dev/null 2>&1 || true
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow and not browser"

bench: venv blas
	$(PY) bench/run_all.py --cache-dir $(CACHE)

clean:
	rm -rf $(VENV) build *.egg-info
