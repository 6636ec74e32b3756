# The two set-up commands of the README: `make demo` and `make test`. Each creates .venv when needed.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test test-slow lint format perf clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,ray,service]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/medsynbench demo $(ARGS)

test: $(STAMP)
	$(BIN)/pytest -q $(ARGS)

test-slow: $(STAMP)
	$(BIN)/pytest -q -m slow $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

perf: $(STAMP)
	$(BIN)/python scripts/perf_loader.py
	$(BIN)/python scripts/perf_metrics.py
	$(BIN)/python scripts/perf_privacy.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
