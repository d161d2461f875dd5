# Every target does its own set-up: a virtual environment with the CPU build of
# torch 2.13.0 (plain `torch` would pull a multi-GB CUDA build) and this package.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
PYTEST_ARGS ?=

.PHONY: setup conformance test matrix server bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $@

## The main job: the conformance suites against the bundled reference server.
conformance: setup
	$(BIN)/capture-conformance --report-dir reports

## The tests: the project's own and the conformance suites, two workers (worksteal: an idle
## worker takes queued tests from the busy one, so the run ends together), all but the matrix.
test: setup
	$(BIN)/python -m pytest -n 2 --dist worksteal -m "not matrix" $(PYTEST_ARGS)

## The matrix: one whole conformance run per case - every injected fault must be caught in its
## area (docs/kill-rate.md), every zoo family must conform. CI runs it after `make test`.
matrix: setup
	$(BIN)/python -m pytest -n 2 --dist worksteal -m matrix $(PYTEST_ARGS)

server: setup
	$(BIN)/capture-server --port 8006

bench: setup
	$(BIN)/python -m capture_conformance.bench

clean:
	rm -rf $(VENV) reports capture-storage .pytest_cache
