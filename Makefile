# Two entry points for a fresh machine; both create .venv and install what they need.
#   make train   train configs/small.yaml on the Python standard-library sources
#   make test    run the test suite (CPU, 8 simulated devices)
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= runs/small
CONFIG ?= configs/small.yaml
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: train test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/jaxtrain train $(CONFIG) --workdir $(WORKDIR)

test: $(STAMP)
	$(BIN)/python -m pytest -q

clean:
	rm -rf runs .pytest_cache
