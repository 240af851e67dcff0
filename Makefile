# Two commands do all set-up on a fresh machine:
#   make bench   create .venv if missing, install, run the default benchmark (MovieLens-100K)
#   make test    same set-up, then the whole test suite and the linter
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.malloc-installed

.PHONY: setup test bench lint clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is a local CPU build here
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,parquet,plots]'
	@# MovieLens-100K ships inside the RecBole wheel; no dependencies of RecBole are needed
	$(PY) -m pip install -q --no-deps recbole==1.2.1
	@touch $(STAMP)

setup: $(STAMP)

test: setup
	$(PY) -m pytest -q
	$(VENV)/bin/ruff check src tests benchmarks

bench: setup
	$(VENV)/bin/malloc bench

lint: setup
	$(VENV)/bin/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) results report .pytest_cache .ruff_cache
