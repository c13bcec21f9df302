# flawscope: `make demo` sets up and runs the demo; `make test` sets up and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flawscope-installed

.PHONY: setup demo test test-fast lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[serve,station,export,dev,backbones,ray]"
	touch $(STAMP)

demo: setup
	$(BIN)/flawscope demo -o demo-output

test: setup
	$(BIN)/python -m pytest

# the inner loop: everything but the slow, real-data, browser and Ray tests (CI runs `make test`)
test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not data and not browser and not ray"

lint: setup
	$(BIN)/ruff check .

clean:
	rm -rf demo-output .pytest_cache
