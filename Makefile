# Fresh machine: `make test` or `make demo` creates .venv, installs rockcls and runs.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DATA   ?=
BACKBONE ?= davit_base
TRIALS ?= 50

.PHONY: setup test demo train tune ui clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $@

test: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m pytest -q

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m rockcls demo

# `make train DATA=path/to/train BACKBONE=davit_base`: the MLproject entry point without conda.
train: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mlflow run . -e train -P data=$(abspath $(DATA)) -P backbone=$(BACKBONE) --env-manager local

# `make tune DATA=path/to/train TRIALS=50`: the Optuna study through MLproject, without conda.
tune: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/mlflow run . -e tune -P data=$(abspath $(DATA)) -P backbone=$(BACKBONE) -P trials=$(TRIALS) --env-manager local

ui: setup
	$(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db

clean:
	rm -rf outputs demo_data demo_out .pytest_cache
