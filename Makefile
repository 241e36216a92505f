# The two commands a new user runs: `make demo` (main job on digits) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= dev

.PHONY: install test test-all demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned first: a bare `torch` requirement would pull the CUDA build.
install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[$(EXTRAS)]'

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-all: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m ''

demo: install
	$(BIN)/python -m fastsparse.demo

bench: install
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
