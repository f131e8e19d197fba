# Two commands on a fresh clone: `make run` (the service on embedded defaults) and `make test` (the suite).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 8000

.PHONY: run test lint install clean

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[model,dev]'
	touch $@

install: $(VENV)/.installed

run: $(VENV)/.installed
	PORT=$(PORT) $(PY) ops/run_local.py

test: $(VENV)/.installed
	$(VENV)/bin/ruff check api worker model ops tests
	$(VENV)/bin/bandit -q -c pyproject.toml -r api worker model ops
	$(PY) -m pytest

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check api worker model ops tests
	$(VENV)/bin/bandit -q -c pyproject.toml -r api worker model ops
	$(VENV)/bin/mypy

clean:
	rm -rf var
