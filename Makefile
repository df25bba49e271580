# imagegen: `make serve` runs the service, `make test` runs the tests. Each sets up what it
# needs on first use: a .venv with the pinned dependencies and the embedded tiny models.
# Needs only python3 (3.11+) and make. `make help` lists the targets.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
PORT ?= 3003
export PORT
# Stamps: the install is redone when pyproject.toml changes, the models are built once.
INSTALLED := $(VENV)/.installed
MODELS := $(VENV)/.tiny-models

.DEFAULT_GOAL := help
.PHONY: help setup serve test check lint bench clean

help: ## list the targets
	@echo "usage: make TARGET"
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-8s %s\n", $$1, $$2}'

setup: $(MODELS) ## create .venv, install the pinned dependencies, build the tiny models

$(INSTALLED): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "imagegen needs Python 3.11 or newer; run: make PYTHON=python3.11 ...")'
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV) || { \
	  echo "could not create $(VENV): on Debian/Ubuntu install python3-venv"; exit 1; }
	@echo "installing the pinned dependencies into $(VENV) (a few minutes the first time)"
	$(BIN)/pip install -q -e ".[test]"
	@touch $@

$(MODELS): $(INSTALLED)
	$(BIN)/imagegen build-tiny-models
	@touch $@

serve: setup ## run the service on http://localhost:3003 (PORT=... for another; Ctrl-C stops it)
	@echo "starting imagegen; the playground will be at http://localhost:$(PORT)/"
	$(BIN)/imagegen serve

test: setup ## run every test: the unit tier, then end to end (ARGS="tests/unit/test_cli.py -x")
	$(BIN)/python -m pytest $(ARGS)

check: setup ## lint and the fast tier (tests/unit: in process, no Ray; ~2-3 minutes)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests/unit $(ARGS)

lint: $(INSTALLED) ## ruff over the project
	$(BIN)/ruff check .

bench: setup ## run the benchmarks (bench/README.md)
	$(BIN)/python -m bench.run

clean: ## remove .venv and caches (built models stay in ~/.local/share/imagegen)
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
