# The README's two commands: `make demo` (the main job: train a small u-muP decoder on the
# built-in corpus, then sample from it) and `make test` (the linters, then the test suite);
# `make docs` builds the documentation site into site/ (offline; warnings are errors).
# Each creates the virtual environment .venv (with this package installed in editable mode)
# when it is missing or older than pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: demo test lint install bench docs clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

DEMO_RUN ?= runs/demo

demo: $(STAMP)
	$(BIN)/unitscale-jax train --preset demo --run-dir $(DEMO_RUN) $(DEMO_ARGS)
	$(BIN)/unitscale-jax sample --run-dir $(DEMO_RUN) --prompt "The " --max-new-tokens 200 --temperature 0.5 --report-words

# style (ruff) and the layer contracts (import-linter, pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# mkdocs + mkdocstrings (the `docs` extra, part of `dev`): API pages from the docstrings
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) *.egg-info site
