# `make run` and `make test` create .venv on first use (or when pyproject.toml changes),
# install the project into it (which compiles the C++ engine), then run. The engine is
# rebuilt whenever its sources change.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp
ENGINE := $(VENV)/.engine-stamp
ENGINE_SRC := setup.py hvmodel/fast/digest.py $(wildcard hvmodel/fast/src/*.h hvmodel/fast/src/*.cpp hvmodel/fast/src/*/*.h)

.PHONY: run test lint bench scale results clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP) $(ENGINE)

$(ENGINE): $(STAMP) $(ENGINE_SRC)
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(ENGINE)

run: $(ENGINE)         ## the default scenario (make run ARGS="strategy=active_roots")
	$(BIN)/hvbench $(ARGS)

test: $(ENGINE)        ## the test suite (what CI runs)
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(ENGINE)       ## engine, generator, shards and sweeps: one table, as ratios (docs/performance.md)
	$(BIN)/python -m benchmarks.perf $(ARGS)

scale: $(ENGINE)       ## sweep wall time, events/s and peak memory per host size (docs/performance.md)
	$(BIN)/python -m benchmarks.scale $(ARGS)

results: $(ENGINE)     ## run experiments/ and regenerate docs/results.md from MLflow (ARGS=--quick: tiny, into results/quick/)
	$(BIN)/python -m orchestrator.results $(ARGS)

clean:
	rm -rf $(VENV) outputs multirun results mlruns mlartifacts mlflow.db mlflow.db.lock hvmodel/fast/_engine*.so build
