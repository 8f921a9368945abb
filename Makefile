# The two set-up commands: `make demo` and `make test`. Both create .venv on first use.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install demo lint test test-slow test-all bench clean lock

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/pdao demo

# The layers (import-linter contracts in pyproject.toml), lint (ruff) and the type check (mypy);
# .ci/run runs this before the tests.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/mypy pdao api catalog policies sandbox

test: $(STAMP)
	$(BIN)/python -m pytest

test-slow: $(STAMP)
	$(BIN)/python -m pytest -m slow

test-all: $(STAMP)
	$(BIN)/python -m pytest -m ''

bench: $(STAMP)
	$(BIN)/python bench/synth_bench.py --scales 1000000 10000000
	$(BIN)/python bench/casbin_bench.py
	$(BIN)/python bench/pii_bench.py
	$(BIN)/python bench/query_bench.py --scales 10000000 100000000
	$(BIN)/python bench/audit_bench.py --verify-events 1000000
	$(BIN)/python bench/underwriting_bench.py --visits 10000000 --applicants 100000

# Refresh the pinned versions after changing dependencies in pyproject.toml.
lock:
	$(BIN)/python -m pip freeze --exclude-editable | grep -v '^-e' > constraints.txt

clean:
	rm -rf $(VENV) .pytest_cache
