# Quickstart: `make demo` and `make test` each create .venv on first use.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test lint bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(BIN)/.installed-test: $(BIN)/.installed pyproject.toml
	$(BIN)/pip install --quiet -e '.[test]'
	touch $@

demo: $(BIN)/.installed
	$(BIN)/llama4-jax demo

test: $(BIN)/.installed-test
	$(BIN)/ruff check llama4_jax tests tools experiments
	$(BIN)/python -m pytest -q tests

lint: $(BIN)/.installed-test
	$(BIN)/ruff check llama4_jax tests tools experiments

bench: $(BIN)/.installed-test
	$(BIN)/python tools/bench_model.py

clean:
	rm -rf $(VENV) build *.egg-info
