# Two commands do all set-up on a fresh machine:
#   make bench   create .venv if missing, install, run the default suite (MovieLens-100K) and its report
#   make test    same set-up, then the linters (make lint) and the whole test suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.malloc-installed
# ml-latest-small: Debian's r-cran-dslabs package unpacked into the data cache (never committed; see
# src/malloc/data/sources/dslabs.py). Exported so that the tests and commands run by make find it.
DATA_CACHE ?= $(or $(MALLOC_DATA_CACHE),$(or $(XDG_CACHE_HOME),$(HOME)/.cache)/malloc)
export MALLOC_DATA_CACHE := $(DATA_CACHE)
DSLABS := $(DATA_CACHE)/dslabs/.unpacked

.PHONY: setup test bench results lint clean redis-server

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build; 2.13.0 is a local CPU build here
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,parquet,plots,dslabs,serve]'
	@# MovieLens-100K ships inside the RecBole wheel; no dependencies of RecBole are needed
	$(PY) -m pip install -q --no-deps recbole==1.2.1
	@touch $(STAMP)

# apt-get download needs no root, but finds the package only once the package lists exist (apt-get update).
# Without apt (not Debian) this warns and goes on: the ml-latest-small tests then skip, saying why.
$(DSLABS):
	@mkdir -p $(DATA_CACHE)/dslabs
	@if cd $(DATA_CACHE) && { apt-get download -q r-cran-dslabs >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get download -q r-cran-dslabs; }; } && \
	    dpkg -x "$$(ls -t r-cran-dslabs_*.deb | head -n 1)" dslabs; then \
	  touch $(DSLABS) && echo "ml-latest-small: r-cran-dslabs unpacked in $(DATA_CACHE)/dslabs"; \
	else echo "warning: could not fetch r-cran-dslabs (needs Debian's apt); ml-latest-small is unavailable"; fi

# redis-server and redis-cli (Debian's redis-tools; the Redis Cluster tests create their cluster with it) for the state
# store's Redis tests (they start their own servers on free loopback ports, tests/redis_server.py): installed with apt
# where missing (as root). Without apt this warns and goes on: the Redis tests then skip, saying why.
redis-server:
	@{ command -v redis-server && command -v redis-cli; } >/dev/null 2>&1 || { export DEBIAN_FRONTEND=noninteractive; \
	  { apt-get install -y -qq redis-server redis-tools >/dev/null 2>&1 || \
	    { apt-get update -qq && apt-get install -y -qq redis-server redis-tools >/dev/null; }; } && \
	  echo "redis-server and redis-cli installed"; } || \
	  echo "warning: could not install redis-server (needs Debian's apt, as root); the Redis store tests will skip"

setup: $(STAMP) $(DSLABS) redis-server

test: setup lint
	$(PY) -m pytest -q

# the default suite (configs/suites/default.yaml; 26 minutes on the idle 2-core VM; see
# docs/BENCHMARKS.md, "make bench"), then its report:
# results/default/report/index.html (and index.md, Pareto plots)
bench: setup
	$(VENV)/bin/malloc bench --suite default
	$(VENV)/bin/malloc report results/default

# docs/RESULTS.md and docs/report/ from the default and the long suite (the long suite takes hours on a CPU)
results: setup
	$(VENV)/bin/malloc bench --suite default
	$(VENV)/bin/malloc bench --suite long
	$(VENV)/bin/malloc report results/default results/long --out docs/report --markdown docs/RESULTS.md

# ruff, then the layers contract of pyproject.toml's [tool.importlinter] (which package may import which)
lint: setup
	$(VENV)/bin/ruff check src tests benchmarks experiments
	$(VENV)/bin/lint-imports --no-cache --no-logo

clean:
	rm -rf $(VENV) results report .pytest_cache .ruff_cache
