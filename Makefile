# Quick start: `make demo` and `make test` (each sets up .venv on first use).
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo test lint test-slow bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/python -m flows.demo

# one pytest worker per core, a test file per worker at a time (module fixtures are shared)
PYTEST_WORKERS ?= auto

test: setup lint
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

# the layer contract, types of the core wings, and lint (part of `make test`)
lint: setup
	$(BIN)/ruff check pipeline dptab flows tests benchmarks data
	$(BIN)/lint-imports
	$(BIN)/mypy pipeline/model pipeline/privacy pipeline/postprocess pipeline/errors.py pipeline/files.py pipeline/runtime.py

test-slow: setup
	$(BIN)/python -m pytest -q -m slow -n $(PYTEST_WORKERS) --dist loadfile

bench: setup
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf $(VENV) runs releases .pytest_cache
