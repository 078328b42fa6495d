# Two entry points for a fresh machine; both create .venv and install what they need.
#   make train   train configs/small.yaml on the Python standard-library sources
#   make test    run the whole test suite (CPU, 8 simulated devices per worker, one worker per core)
#   make check   the fast subset for the edit loop (no multi-run or subprocess tests)
#   make compile-venv  the TPU and H100 compilers in .venv-compile, for dry-run --compile --target
#   make data    tokenize the default corpus (bytes, BPE 8k) and a second corpus into data/cache/
PYTHON ?= python3
VENV ?= .venv
WORKDIR ?= runs/small
CONFIG ?= configs/small.yaml
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: train test check venv compile-venv clean data train-bpe data-bench

venv: $(STAMP)

# jaxtrain with the figures' matplotlib: what train and every other command need
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[plot]'
	touch $(STAMP)

# and what only the tests use (pytest, the notebook kernel, transformers + a CPU PyTorch)
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(TEST_STAMP)

# the accelerator compilers, in a venv of their own: `make train`'s jax never finds them
COMPILE_VENV ?= .venv-compile
COMPILE_STAMP := $(COMPILE_VENV)/.installed
$(COMPILE_STAMP): pyproject.toml
	test -x $(COMPILE_VENV)/bin/python || $(PYTHON) -m venv $(COMPILE_VENV)
	$(COMPILE_VENV)/bin/python -m pip install -q --upgrade pip
	$(COMPILE_VENV)/bin/python -m pip install -q -e '.[tpu-compile,gpu-compile]'
	touch $(COMPILE_STAMP)

compile-venv: $(COMPILE_STAMP)

train: $(STAMP)
	$(BIN)/jaxtrain train $(CONFIG) --workdir $(WORKDIR)

# Prepared token stores (jaxtrain data prepare); each is made once, atomically.
CACHE := data/cache
$(CACHE)/stdlib/metadata.json: | $(STAMP)
	$(BIN)/jaxtrain data prepare --input '{stdlib}/**/*.py' --out $(CACHE)/stdlib
$(CACHE)/stdlib-bpe8k/metadata.json: | $(STAMP)
	$(BIN)/jaxtrain data prepare --input '{stdlib}/**/*.py' --out $(CACHE)/stdlib-bpe8k --tokenizer bpe:8192
# the second corpus: this machine's Debian package copyright texts, with the stdlib's BPE
$(CACHE)/copyright-bpe8k/metadata.json: $(CACHE)/stdlib-bpe8k/metadata.json
	$(BIN)/jaxtrain data prepare --input '/usr/share/doc/*/copyright' --out $(CACHE)/copyright-bpe8k \
		--tokenizer $(CACHE)/stdlib-bpe8k/tokenizer.json

data: $(CACHE)/stdlib/metadata.json $(CACHE)/stdlib-bpe8k/metadata.json $(CACHE)/copyright-bpe8k/metadata.json

train-bpe: data
	$(BIN)/jaxtrain train configs/small_bpe.yaml --workdir runs/small_bpe

data-bench: $(CACHE)/stdlib/metadata.json
	$(BIN)/jaxtrain data bench $(CACHE)/stdlib --config configs/small.yaml

# one pytest worker per core (a third worker on 2 cores measured slower: 11m57s vs 11m05s);
# a test file stays on one worker, so module fixtures are shared
test: $(TEST_STAMP) $(COMPILE_STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile

check: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -n auto --dist loadfile -m "not slow"

clean:
	rm -rf runs .pytest_cache
