# Two commands on a fresh clone: `make run` (the service on embedded defaults) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000

.PHONY: run test lint install clean bench bench-api

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[model,dev]'
	touch $@

# The web viewer's NiiVue bundle (docs/ui.md): npm ci from the lockfile, only dist/index.js kept (as niivue.js),
# checked against the recorded sha256; nothing else from node_modules is served or kept.
UI_VENDOR := api/ui/vendor
$(UI_VENDOR)/niivue.js: $(UI_VENDOR)/package-lock.json $(UI_VENDOR)/niivue.sha256
	cd $(UI_VENDOR) && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error
	cp $(UI_VENDOR)/node_modules/@niivue/niivue/dist/index.js $@.tmp
	rm -rf $(UI_VENDOR)/node_modules
	echo "$$(cat $(UI_VENDOR)/niivue.sha256)  $@.tmp" | sha256sum -c --quiet
	mv $@.tmp $@

install: $(VENV)/.installed $(UI_VENDOR)/niivue.js

run: install
	PORT=$(PORT) $(PY) ops/run_local.py

test: install
	$(VENV)/bin/ruff check api worker model ops tests
	$(VENV)/bin/bandit -q -c pyproject.toml -r api worker model ops
	$(PY) -m pytest

# Benchmarks (docs/benchmarks.md): results in var/bench/
bench: $(VENV)/.installed
	$(PY) ops/bench_inference.py --quality

bench-api: $(VENV)/.installed
	@command -v wrk >/dev/null || { [ "$$(id -u)" = 0 ] && apt-get install -y -qq wrk >/dev/null; } || \
		{ echo "make bench-api needs wrk (Debian: apt-get install wrk)" >&2; exit 1; }
	$(PY) ops/bench_api.py

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check api worker model ops tests
	$(VENV)/bin/bandit -q -c pyproject.toml -r api worker model ops
	$(VENV)/bin/mypy

clean:
	rm -rf var
