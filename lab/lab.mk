# The lab's protocols (included by the Makefile): the figures of docs/experiments.md that need more than the
# pipeline. Config: lab/conf/crowdflower.yaml (conf/crowdflower.yaml plus the research variants, merges, soups).
#   make lab-folds            the variants a user with labels would compare, selected and reported on both halves
#                             of the held-out queries, then both folds' test reports pooled
#   make lab-rotation ROTATION=r   the same for another held-out block (rotation r, its own judge and training sets)
#   make lab-rotations        rotations 1-3 after lab-folds, every rotation pooled
#   make lab-rank-rotations   the rank stage's lists (and their ablations) in both folds of rotations 0-3, pooled
LAB_CF := --conf lab/conf/crowdflower.yaml
LAB_TRAINED := human_plus_curriculum curriculum_with_human
# Not trained: merged from trained variants, or a variant trained once per seed and averaged (lab/train_merges.py).
LAB_MERGED := curriculum_merged_human curriculum_soup_uniform
# Every evaluation lists the trained variants beside the free baselines and the rank stage's lists (its ablations too).
LAB_MODELS := bm25,minilm,minilm+bm25,variants,best+ce,ranked,ranked-raw,ranked-no-ce

.PHONY: lab-folds lab-rotation lab-rotations lab-rank-rotation lab-rank-rotations

# After `make crowdflower` (fold 0: curriculum and human trained, the closing report written): the research
# variants' training sets, their trainings and merges in fold 0, then the same with the halves swapped
# (project.fold=1, annomine/splits.py), both folds' test reports pooled into
# <warehouse>/evaluation/report_test_folds.md: every held-out query once.
lab-folds: crowdflower
	$(BIN)/annomine curriculum $(LAB_CF)
	for v in $(LAB_TRAINED); do $(BIN)/annomine train $(LAB_CF) --set train.variant=$$v || exit 1; done
	for m in $(LAB_MERGED); do $(BIN)/python -m lab.train_merges $(LAB_CF) $$m || exit 1; done
	$(BIN)/annomine rank $(LAB_CF)
	$(BIN)/annomine evaluate $(LAB_CF) --models $(LAB_MODELS) --set evaluate.register=false
	$(BIN)/annomine curriculum $(LAB_CF) --set project.fold=1
	for v in curriculum human $(LAB_TRAINED); do $(BIN)/annomine train $(LAB_CF) --set project.fold=1 --set train.variant=$$v || exit 1; done
	for m in $(LAB_MERGED); do $(BIN)/python -m lab.train_merges $(LAB_CF) --set project.fold=1 $$m || exit 1; done
	$(BIN)/annomine rank $(LAB_CF) --set project.fold=1
	$(BIN)/annomine evaluate $(LAB_CF) --models $(LAB_MODELS) --set project.fold=1
	$(BIN)/python -m lab.pool $(LAB_CF)

# Another rotation (annomine/splits.py): another block of the open labelled queries held out, the judge, its
# grades and every training set made again without that block's labels, in <warehouse>/rotations/rotation$(ROTATION)/;
# both folds of curriculum, human and the uniform seed soup, then every rotation run so far pooled into
# <warehouse>/evaluation/report_test_rotations.md (about an hour a rotation on 2 cores, docs/benchmarks.md).
# Rotation 0 is `make lab-folds`.
ROTATION ?= 1
LAB_RCF = $(LAB_CF) --set project.rotation=$(ROTATION)
lab-rotation: install crowdflower-models
	$(BIN)/annomine pipeline $(LAB_RCF)
	$(BIN)/annomine train $(LAB_RCF) --set train.variant=human
	$(BIN)/python -m lab.train_merges $(LAB_RCF) curriculum_soup_uniform
	$(BIN)/annomine evaluate $(LAB_RCF) --models $(LAB_MODELS)
	$(BIN)/annomine curriculum $(LAB_RCF) --set project.fold=1
	for v in curriculum human; do $(BIN)/annomine train $(LAB_RCF) --set project.fold=1 --set train.variant=$$v || exit 1; done
	$(BIN)/python -m lab.train_merges $(LAB_RCF) --set project.fold=1 curriculum_soup_uniform
	$(BIN)/annomine rank $(LAB_RCF) --set project.fold=1
	$(BIN)/annomine evaluate $(LAB_RCF) --models $(LAB_MODELS) --set project.fold=1
	$(BIN)/python -m lab.pool $(LAB_RCF)
	$(BIN)/python -m lab.pool $(LAB_CF) --rotations

lab-rotations: lab-folds
	for r in 1 2 3; do $(MAKE) lab-rotation ROTATION=$$r || exit 1; done

# The rank stage's lists over every open query (docs/experiments.md, "the rank stage's lists in both halves of rotation 0"):
# rotation r's pipeline (its own judge, grades, curriculum and rankers with their ablations), `human` beside the
# curriculum, both folds evaluated with every list and pooled, then every rotation run so far pooled into
# <warehouse>/evaluation/report_test_rotations.md. ROTATION=0 continues from `make crowdflower`'s warehouse (its
# stages up to annotate stay current: the same project and judge settings); rotations 1-3 skip the pilot (a report
# that changes nothing). Measured on 2 cores: 31 minutes for rotation 0 after `make crowdflower`, 62 for rotation 1.
LAB_RANK_RCF = $(LAB_CF)$(if $(filter-out 0,$(ROTATION)), --set project.rotation=$(ROTATION) --set judge.pilot_in_pipeline=false)
lab-rank-rotation: install crowdflower-models
	$(BIN)/annomine pipeline $(LAB_RANK_RCF)
	$(BIN)/annomine train $(LAB_RANK_RCF) --set train.variant=human
	$(BIN)/annomine evaluate $(LAB_RANK_RCF) --models $(LAB_MODELS) --set evaluate.register=false
	$(BIN)/annomine curriculum $(LAB_RANK_RCF) --set project.fold=1
	for v in curriculum human; do $(BIN)/annomine train $(LAB_RANK_RCF) --set project.fold=1 --set train.variant=$$v || exit 1; done
	$(BIN)/annomine rank $(LAB_RANK_RCF) --set project.fold=1
	$(BIN)/annomine evaluate $(LAB_RANK_RCF) --models $(LAB_MODELS) --set project.fold=1 --set evaluate.register=false
	$(BIN)/python -m lab.pool $(LAB_RCF)
	$(BIN)/python -m lab.pool $(LAB_CF) --rotations

lab-rank-rotations: crowdflower
	for r in 0 1 2 3; do $(MAKE) lab-rank-rotation ROTATION=$$r || exit 1; done
