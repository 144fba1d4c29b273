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

.PHONY: demo test lint install bench docs clean install312 test312

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

# The same package on Python 3.12, in its own virtual environment .venv312 (a plain `pip
# install` there resolves the wheels a 3.12 user gets, which may differ from .venv's). The
# interpreter: PYTHON312, else what .ci/python312 finds.
PYTHON312 ?= $(shell .ci/python312)
VENV312 ?= .venv312
STAMP312 := $(VENV312)/.installed
# The subset run on 3.12: what depends on the interpreter (dataclasses and typing in the
# configs, argparse in the flags, the built-in corpus pydoc_data, which each CPython ships in
# its own version) and on the wheels pip resolves for it (jax, flax, optax, chex, ml_dtypes,
# orbax, tfds, grain, tokenizers), one or two files per package, the cheapest that still
# compile and differentiate real models: ops (every scaling rule's scales), optim (u-muP
# factors, schedules, chex checks, composed transforms), nn (layers, config), precision
# (formats, quantisation, simulation, policies), data (all of it: sources, tfds builders, grain
# pipeline, tokenizers), train (config round trip, a 50-step run with its checkpoint, metrics,
# plot and a sample, and the path checks). Measured: 2 min 40 s on 2 busy cores (install: 2 min).
# Left to the full 3.11 run: the multi-device, chunked-attention, sharding and module-wide
# precision tests (up to 95 s each), analysis, experiments, examples, benchmarks and docs.
TEST312 ?= tests/ops/test_scales.py tests/optim/test_umup.py tests/optim/test_schedules.py \
	tests/optim/test_checks.py tests/optim/test_unit_scale_compose.py tests/nn/test_config.py \
	tests/nn/test_layers.py tests/precision/test_formats.py tests/precision/test_quantise.py \
	tests/precision/test_simulate.py tests/precision/test_policy.py tests/data \
	tests/train/test_config.py tests/test_bad_paths.py \
	tests/train/test_train_e2e.py::test_decoder_umup_trains_writes_outputs_and_samples

$(STAMP312): pyproject.toml
	@test -n "$(PYTHON312)" || { echo "make: no Python 3.12 found; pass PYTHON312=PATH" >&2; \
		exit 2; }
	$(PYTHON312) -m venv $(VENV312)
	$(VENV312)/bin/python -m pip install --quiet --upgrade pip
	$(VENV312)/bin/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP312)

install312: $(STAMP312)

test312: $(STAMP312)
	$(VENV312)/bin/python -m pytest -n 2 --dist loadfile -q $(TEST312)

bench: $(STAMP)
	$(BIN)/python benchmarks/run_all.py

# mkdocs + mkdocstrings (the `docs` extra, part of `dev`): API pages from the docstrings
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

clean:
	rm -rf $(VENV) $(VENV312) *.egg-info site
