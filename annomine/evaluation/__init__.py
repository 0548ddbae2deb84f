"""Evaluation of retrievers against human labels: FAISS retrieval, NDCG@10 (ranx), reports.

- `metrics`: label merging (the one pandas version of ingest's duplicate rule), per-query metrics
  through ranx, query segments, bootstrap confidence intervals.
- `index`: FAISS flat / HNSW / IVF indexes and the recall of an approximate index against flat.
- `retrievers`: a model spec (`bm25`, `minilm`, a folder, `best`, a variant, an MLflow URI) -> top-k ids.
- `report`: the JSON report, markdown, PNG plots, MLflow logging and model registration.
"""
