# Two commands for a fresh machine: `make run` and `make test`.
# `make test-fast` is for the edit loop: the tests not marked slow (no child processes,
# kill -9, large corpora or multi-second waits); `make test` still runs everything.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP_RUN := $(VENV)/.installed-run
STAMP_DEV := $(VENV)/.installed-dev

.PHONY: chromium run test test-fast security lint typecheck pytest bench bench-translate bench-audit bench-fhir bench-forward bench-agent bench-postgres clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP_RUN): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(STAMP_DEV): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@ $(STAMP_RUN)

run: $(STAMP_RUN)
	$(BIN)/isthmus serve

lint: $(STAMP_DEV)
	$(BIN)/ruff check gateway tests bench

typecheck: $(STAMP_DEV)
	$(BIN)/mypy

pytest: $(STAMP_DEV) chromium
	$(BIN)/python -m pytest -q

# The console's browser tests drive Debian's Chromium (Playwright from PyPI, no browser
# download): installed with apt when missing (as root, or with sudo).
chromium:
	@command -v chromium >/dev/null 2>&1 || { \
		sudo=""; [ "$$(id -u)" -eq 0 ] || sudo=sudo; \
		$$sudo apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq chromium >/dev/null; }

test: lint typecheck pytest

test-fast: $(STAMP_DEV)
	$(BIN)/python -m pytest -q -m "not slow"

# The security review's reproductions (issue 13), one test each; `make test` runs them too.
security: $(STAMP_DEV)
	$(BIN)/python -m pytest -q tests/security

bench: $(STAMP_RUN)
	$(BIN)/python bench/mllp_ingest.py

bench-translate: $(STAMP_RUN)
	$(BIN)/python bench/translate.py

bench-audit: $(STAMP_RUN)
	$(BIN)/python bench/audit.py

bench-fhir: $(STAMP_RUN)
	$(BIN)/python bench/fhir_rest.py

bench-forward: $(STAMP_RUN)
	$(BIN)/python bench/forward.py

bench-agent: $(STAMP_RUN)
	$(BIN)/python bench/agent.py

bench-postgres: $(STAMP_RUN)
	$(BIN)/python bench/postgres.py

clean:
	rm -rf $(VENV) var .pytest_cache .mypy_cache .ruff_cache
