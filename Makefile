# `make run` and `make test` create .venv on first use (or when pyproject.toml changes),
# install the project into it, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test test-all lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)          ## the default scenario (make run ARGS="strategy=active_roots")
	$(BIN)/hvbench $(ARGS)

test: $(STAMP)         ## the test suite (what CI runs)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)        ## engine benchmarks (ratios measured in one run)
	$(BIN)/python -m benchmarks.engine_speed

clean:
	rm -rf $(VENV) outputs multirun mlruns mlartifacts mlflow.db mlflow.db.lock
