# Developer and CI entry points. Everything runs from .venv; services come from
# server/devenv.py (PostgreSQL 15 and moto's S3 server), never from Docker.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# Rebuilt whenever setup.py changes, so a new dependency lands on the next make.
STAMP := $(VENV)/.installed

.PHONY: venv run test lint bench fuzz clean

venv: $(STAMP)

$(STAMP): setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -e '.[dev]'
	touch $@

run: $(STAMP)
	$(BIN)/python -m server.devenv run

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest --cov --cov-report=term-missing

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python -m bench

# Schemathesis against a live server's /openapi.json, 1,000 cases per endpoint (CI runs 50).
fuzz: $(STAMP)
	$(BIN)/python tests/fuzz/run.py --max-examples 1000

clean:
	rm -rf .data
