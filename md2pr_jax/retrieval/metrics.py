"""Ranking metrics with trec_eval semantics: nDCG@k, MRR@k, Recall@k, MAP.

Conventions (those of `trec_eval -c`, which pytrec_eval wraps and BEIR reports):
- A run is `{qid: {docid: score}}`; each query's documents are ranked by score descending,
  ties broken by docid descending (string comparison), exactly as trec_eval sorts.
- Relevance is graded: a document is relevant when its qrel is >= 1 (trec_eval's default
  relevance level). nDCG uses the graded value as the gain (linear, like `ndcg_cut`) and
  1/log2(rank+1) as the discount; the ideal ranking is the judged documents by grade.
- Averages run over every query in the qrels: a query the run lacks, or with no relevant
  document, counts 0.
"""

from __future__ import annotations

import math
from typing import Iterable, Mapping

Run = Mapping[str, Mapping[str, float]]
Qrels = Mapping[str, Mapping[str, int]]

DEFAULT_KS = {"ndcg": (10,), "mrr": (10,), "recall": (100, 1000)}


def rank(scores: Mapping[str, float]) -> list[str]:
    """Docids of one query ranked as trec_eval does: score descending, then docid descending."""
    return [d for d, _ in sorted(scores.items(), key=lambda kv: (float(kv[1]), kv[0]), reverse=True)]


def query_metrics(ranked: list[str], rels: Mapping[str, int], ks: Mapping[str, Iterable[int]]) -> dict[str, float]:
    """All metrics of one query: `ranked` docids (best first) against its judgements `rels`."""
    num_rel = sum(1 for r in rels.values() if r >= 1)
    grades = [rels.get(d, 0) for d in ranked]
    out: dict[str, float] = {}
    for k in ks.get("ndcg", ()):
        dcg = sum(g / math.log2(i + 2) for i, g in enumerate(grades[:k]) if g > 0)
        ideal = sorted((r for r in rels.values() if r > 0), reverse=True)[:k]
        idcg = sum(g / math.log2(i + 2) for i, g in enumerate(ideal))
        out[f"ndcg@{k}"] = dcg / idcg if idcg > 0 else 0.0
    for k in ks.get("mrr", ()):
        out[f"mrr@{k}"] = next((1.0 / (i + 1) for i, g in enumerate(grades[:k]) if g >= 1), 0.0)
    for k in ks.get("recall", ()):
        hits = sum(1 for g in grades[:k] if g >= 1)
        out[f"recall@{k}"] = hits / num_rel if num_rel else 0.0
    hits, total = 0, 0.0
    for i, g in enumerate(grades):
        if g >= 1:
            hits += 1
            total += hits / (i + 1)
    out["map"] = total / num_rel if num_rel else 0.0
    return out


def per_query(run: Run, qrels: Qrels, ks: Mapping[str, Iterable[int]] | None = None) -> dict[str, dict[str, float]]:
    """{qid: {metric: value}} for every query in `qrels` (queries missing from `run` score 0)."""
    ks = DEFAULT_KS if ks is None else ks
    return {qid: query_metrics(rank(run.get(qid, {})), rels, ks) for qid, rels in qrels.items()}


def evaluate(run: Run, qrels: Qrels, ks: Mapping[str, Iterable[int]] | None = None) -> dict[str, float]:
    """Mean metrics over the queries of `qrels`.

    Args:
      run: {qid: {docid: score}}.
      qrels: {qid: {docid: grade}} (grade >= 1 is relevant; 0 or less is judged non-relevant).
      ks: cut-offs per metric family, e.g. {'ndcg': (10,), 'mrr': (10,), 'recall': (100, 1000)};
        MAP (uncut) is always included. Default: nDCG@10, MRR@10, Recall@100, Recall@1000.
    Returns:
      {'ndcg@10': ..., 'mrr@10': ..., 'recall@100': ..., 'recall@1000': ..., 'map': ...}.
    """
    if not qrels:
        raise ValueError("evaluate(): qrels is empty; pass the judgements of the split being evaluated")
    table = per_query(run, qrels, ks)
    names = next(iter(table.values())).keys()
    return mean_of({name: {qid: m[name] for qid, m in table.items()} for name in names})


def mean_of(values: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """{metric: {qid: value}} -> {metric: mean over the queries}: the one place means are taken,
    so that a reported mean and the mean of its per-query file are the same float."""
    return {name: sum(v.values()) / len(v) for name, v in values.items()}


def parse_ks(names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """['ndcg@10', 'recall@5', 'map'] -> {'ndcg': (10,), 'recall': (5,)} (the ks form above)."""
    out: dict[str, list[int]] = {}
    for name in names:
        fam, _, k = name.partition("@")
        if fam == "map" and not k:
            continue
        if fam not in ("ndcg", "mrr", "recall") or not k.isdigit():
            raise ValueError(f"unknown metric {name!r}; use ndcg@K, mrr@K, recall@K or map")
        out.setdefault(fam, []).append(int(k))
    return {f: tuple(v) for f, v in out.items()}
