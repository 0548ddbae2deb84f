"""The ranking stage: a LambdaMART ranker (LightGBM) that orders the retriever's top-K candidates.

- `features`: one feature builder for training and for unseen queries (the channels retrieve, tier 1 scores);
- `labels`: the label choices (the judge's raw grade, its sigmoid-polarized expected grade, human grades);
- `model`: the LightGBM ranker, saved and loaded with its feature columns;
- `store`: the published ranker folder and its pointer `<outputs>/rankers/current.json`;
- `apply`: the ranked list for any queries (what `annomine evaluate` calls for the `ranked` specs).
"""
