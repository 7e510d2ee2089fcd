# `make run` and `make test` create .venv on first use (or when pyproject.toml changes),
# install the project into it, then run.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: run test lint scale clean

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

scale: $(STAMP)        ## wall time, events/s and peak memory per host size (docs/scaling.md)
	$(BIN)/python -m benchmarks.scale $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun mlruns mlartifacts mlflow.db mlflow.db.lock
