# Set-up and entry points. `make run` reproduces the pipeline, `make test` lints and tests.
# Both create .venv (python3 -m venv) and `pip install -e '.[dev]'` when the install is
# missing or pyproject.toml changed since the last install (the stamp file).

SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.install-stamp
# Stage commands call `python`: make it the project's interpreter.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.DEFAULT_GOAL := help
.PHONY: help install run test ui browser-check

help:
	@echo "make run   - set up .venv and reproduce the pipeline (dvc repro)"
	@echo "make test  - set up .venv, ruff check and pytest (two workers, one per core)"
	@echo "make ui    - MLflow UI on this repo's store (http://127.0.0.1:5000, runs table)"
	@echo "make browser-check - check dvc plots + MLflow UI in headless Chromium, README screenshots"

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(BIN)/python -m pipeline check-params
	$(BIN)/dvc repro

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/pytest -q -p no:cacheprovider -n 2 --dist loadfile

# The MLflow UI opens on the runs table of the first experiment with this URL.
ui: $(STAMP)
	@echo "runs table:   http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning"
	@echo "methods view: http://127.0.0.1:5000/#/experiments/1/runs?workflowType=machine_learning&viewStateShareKey=methods"
	$(BIN)/mlflow server --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(CURDIR)/mlflow.db

browser-check: $(STAMP)
	$(BIN)/python docs/tools/browser_check.py --repo . --screenshots docs/img
