# The two commands a new user runs: `make demo` (main job on digits) and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
EXTRAS ?= dev,fastai,lightning

.PHONY: install test test-all demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)

# torch is pinned first and held by constraints.txt: a bare `torch` requirement (fastai's
# torchvision, lightning) would otherwise pull a newer CUDA build. torchvision is removed
# afterwards: only CUDA builds of it exist for this CPU torch, and importing a broken
# torchvision breaks torchmetrics (lightning); fastai.basics does not need it.
install: $(VENV)/.installed

$(VENV)/.installed: $(BIN)/python pyproject.toml constraints.txt
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[$(EXTRAS)]'
	$(BIN)/pip uninstall -q -y torchvision 2>/dev/null || true
	touch $@

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider

test-all: install
	$(BIN)/python -m pytest -q -p no:cacheprovider -m ''

demo: install
	$(BIN)/python -m fastsparse.experiments.demo

bench: install
	$(BIN)/python benchmarks/overhead.py

clean:
	rm -rf $(VENV) runs .pytest_cache
