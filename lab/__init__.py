"""The research lab beside the product: the protocols and variants behind docs/experiments.md.

Merged variants and seed soups (`lab.merging`, `python -m lab.train_merges`), the fold and rotation pools
(`lab.folds`, `python -m lab.pool`), the research configs (lab/conf/: the variants that did not win, the
merges, soups and interpolation fractions) and their make targets (lab/lab.mk). The lab imports the product
(annomine, training, jobs); nothing in the product imports the lab, and the product's wheel does not hold it.
"""
