"""Channel overlap report: how much the retrieval channels (lexical, BM25, ANN, ...) disagree.

Per query, over each channel's top-k: the size of each set, the Jaccard similarity of every pair
of channels and of all of them, the union, and how many products only one channel finds (in total
and per channel). `summarise` reduces that to means/medians; `format_summary` prints it. Pairs are
every pair of the channels in registry order (`annomine.retrievers.registry.pairs`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from pyspark.sql import DataFrame
from pyspark.sql import functions as F

from annomine.retrievers import registry
from annomine.vocabulary import CHANNELS

PAIRS = registry.pairs(CHANNELS)  # the built-in channels' pairs


def overlap_per_query(logs: DataFrame, k: int, channels: tuple[str, ...] = CHANNELS) -> pd.DataFrame:
    """logs: rows with query_id, channel, product_id, rank (one run). Returns one row per query."""
    pairs = registry.pairs(channels)
    top = logs.where(F.col("rank") <= k).where(F.col("channel").isin(*channels))
    flags = top.groupBy("query_id", "product_id").agg(
        *[F.max(F.when(F.col("channel") == c, 1).otherwise(0)).alias(f"in_{c}") for c in channels])
    n_in = sum(F.col(f"in_{c}") for c in channels)
    aggs = [F.count(F.lit(1)).alias("union")]
    aggs += [F.sum(f"in_{c}").alias(f"n_{c}") for c in channels]
    aggs += [F.sum(F.col(f"in_{a}") * F.col(f"in_{b}")).alias(f"inter_{a}_{b}") for a, b in pairs]
    aggs.append(F.sum(F.when(n_in == len(channels), 1).otherwise(0)).alias("in_all"))
    aggs.append(F.sum(F.when(n_in == 1, 1).otherwise(0)).alias("only_one"))
    aggs += [F.sum(F.when((n_in == 1) & (F.col(f"in_{c}") == 1), 1).otherwise(0)).alias(f"only_{c}") for c in channels]
    pdf = flags.groupBy("query_id").agg(*aggs).toPandas()
    for a, b in pairs:
        if f"inter_{a}_{b}" in pdf:
            denom = pdf[f"n_{a}"] + pdf[f"n_{b}"] - pdf[f"inter_{a}_{b}"]
            pdf[f"jaccard_{a}_{b}"] = np.where(denom > 0, pdf[f"inter_{a}_{b}"] / denom.clip(lower=1), np.nan)
    pdf["jaccard_all"] = np.where(pdf["union"] > 0, pdf["in_all"] / pdf["union"].clip(lower=1), np.nan)
    pdf["only_one_share"] = np.where(pdf["union"] > 0, pdf["only_one"] / pdf["union"].clip(lower=1), np.nan)
    return pdf.sort_values("query_id").reset_index(drop=True)


def summarise(per_query: pd.DataFrame, k: int) -> dict:
    out: dict = {"k": k, "queries": int(len(per_query))}
    if per_query.empty:
        return out
    for col in [c for c in per_query.columns if c.startswith("jaccard_")] + ["only_one_share"]:
        out[f"mean_{col}"] = round(float(per_query[col].mean()), 4)
        out[f"median_{col}"] = round(float(per_query[col].median()), 4)
    for col in ["union", "only_one", "in_all"] + [c for c in per_query.columns if c.startswith(("n_", "only_")) and c != "only_one_share"]:
        out[f"mean_{col}"] = round(float(per_query[col].mean()), 2)
    out["queries_all_channels_nonempty"] = int((per_query[[c for c in per_query.columns if c.startswith("n_")]] > 0).all(axis=1).sum())
    return out


def format_summary(summary: dict, title: str = "channel overlap") -> str:
    k = summary.get("k")
    lines = [f"{title} (top-{k} per channel, {summary.get('queries', 0)} queries)"]
    if summary.get("queries", 0) == 0:
        return lines[0] + ": no results"
    for a, b in registry.pairs():
        key = f"mean_jaccard_{a}_{b}"
        if key in summary:
            lines.append(f"  Jaccard {a:>7} vs {b:<7}: mean {summary[key]:.3f}  median {summary[f'median_jaccard_{a}_{b}']:.3f}")
    lines.append(f"  Jaccard all channels   : mean {summary['mean_jaccard_all']:.3f}  median {summary['median_jaccard_all']:.3f}")
    lines.append(f"  union per query        : mean {summary['mean_union']:.1f} products, found by all {summary['mean_in_all']:.1f}")
    lines.append(f"  found by only one      : mean {summary['mean_only_one']:.1f} per query ({summary['mean_only_one_share']:.1%} of the union)"
                 + "".join(f"; only {c} {summary[f'mean_only_{c}']:.1f}" for c in registry.names() if f"mean_only_{c}" in summary))
    return "\n".join(lines)


def save_report(per_query: pd.DataFrame, summary: dict, folder: str | Path, name: str) -> list[Path]:
    """CSV per query, JSON summary and a PNG histogram of the pairwise Jaccards."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    csv_path = folder / f"{name}.csv"
    json_path = folder / f"{name}.json"
    per_query.to_csv(csv_path, index=False)
    json_path.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    paths = [csv_path, json_path]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4))
        bins = np.linspace(0, 1, 21)
        for a, b in registry.pairs():
            col = f"jaccard_{a}_{b}"
            if col in per_query:
                ax.hist(per_query[col].dropna(), bins=bins, alpha=0.5, label=f"{a} vs {b}")
        ax.set_xlabel(f"Jaccard of top-{summary.get('k')} sets")
        ax.set_ylabel("queries")
        ax.set_title("Retrieval channel overlap per query")
        ax.legend()
        png = folder / f"{name}.png"
        fig.tight_layout()
        fig.savefig(png, dpi=110)
        plt.close(fig)
        paths.append(png)
    except ImportError:  # pragma: no cover - matplotlib is part of the training extra
        pass
    return paths
