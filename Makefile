# Everything a fresh clone needs: `make demo`, `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
CACHE ?= $(HOME)/.cache/mlx-abliteration
DEMO_OUT ?= outputs/qwen2.5-coder-1.5b-abliterated
OPENBLAS := /usr/lib/$(shell uname -m)-linux-gnu/openblas-pthread/libopenblas.so.0

.PHONY: demo test test-fast lint models bench bench-versus blas system-deps venv venv-versus clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

# Debian packages: OpenBLAS makes MLX's CPU float32 matmul ~27x faster (see
# README); Chromium runs the GUI browser tests. Installed when we can (root + apt).
SYSTEM_PACKAGES := libopenblas0-pthread chromium
system-deps:
	@missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ] && [ "$$(uname -s)" = Linux ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing$$missing"; \
	    (apt-get install -y -qq $$missing >/dev/null 2>&1 || \
	     (apt-get update -qq && apt-get install -y -qq $$missing >/dev/null)) || echo "warning: could not install$$missing"; \
	  else echo "note: install$$missing (apt) for a fast CPU backend and the browser tests"; fi; \
	fi

blas: system-deps

models: venv
	$(PY) -m tests.support.real_models --cache-dir $(CACHE) all

demo: venv blas
	$(PY) -m tests.support.real_models --cache-dir $(CACHE) qwen
	$(VENV)/bin/mlx-abliterate run -m "$$($(PY) -m tests.support.real_models --cache-dir $(CACHE) --print-path qwen)" \
	  -o $(DEMO_OUT) --overwrite

# Lint and format check (ruff) and types (mypy, configured in pyproject.toml).
lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

test: venv system-deps lint
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not slow and not browser"

bench: venv blas
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) bench/run_all.py --cache-dir $(CACHE)

# Head-to-head vs Heretic 1.4 (bench/versus.py, bench/README.md section 7): Heretic
# lives in its own venv (bench/requirements-versus.txt says why). ~2 h on 2 cores.
VERSUS_VENV ?= .venv-versus
VERSUS_ARGS ?=
$(VERSUS_VENV)/.installed: bench/requirements-versus.txt
	test -x $(VERSUS_VENV)/bin/python || $(PYTHON) -m venv $(VERSUS_VENV)
	$(VERSUS_VENV)/bin/python -m pip install -q --upgrade pip
	$(VERSUS_VENV)/bin/python -m pip install -q -r bench/requirements-versus.txt
	touch $@

venv-versus: $(VERSUS_VENV)/.installed

bench-versus: venv blas venv-versus
	nice -n 10 $(PY) bench/versus.py --cache-dir $(CACHE) --heretic $(VERSUS_VENV)/bin/heretic $(VERSUS_ARGS)

clean:
	rm -rf $(VENV) $(VERSUS_VENV) build *.egg-info
