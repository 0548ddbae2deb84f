# Two commands on a fresh machine:
#   make demo   - create .venv, install, run the whole pipeline on the synthetic shop (embedded engine)
#   make test   - create .venv, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install crowdflower bench clean

$(BIN)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[all]'
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/annomine pipeline --conf conf/local.yaml

crowdflower: install
	$(BIN)/annomine pipeline --conf conf/crowdflower.yaml

test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: install
	$(BIN)/python benchmarks/run.py --quick

clean:
	rm -rf warehouse data/demo runs reports
