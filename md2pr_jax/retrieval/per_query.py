"""Per-query results of an evaluation, kept beside its means: the TREC run file and every
query's metrics, so that comparisons can be paired tests over queries (md2pr_jax.compare).

    <folder>/<system>.<split>.run.gz   the run as evaluated (top eval_depth), gzipped TREC lines
                                       `qid Q0 docid rank score tag`, ranked as trec_eval ranks
    <folder>/<system>.<split>.json     {"system", "split", "queries", "mean": {metric: value},
                                        "metrics": {metric: {qid: value}}}

The means are computed from the per-query values by `metrics.mean_of`, the same arithmetic
`metrics.evaluate` uses, so a mean in a result.json and the mean of its per-query file agree
exactly. Folders come from the workdir layout (`Layout.per_query_dir`); files go through
`artifacts` (local or gs://).
"""

from __future__ import annotations

import gzip
import json
from typing import Iterable, Mapping

import numpy as np

from md2pr_jax import artifacts
from md2pr_jax.retrieval import metrics


def run_text(run: metrics.Run, tag: str) -> str:
    """The run as TREC lines `qid Q0 docid rank score tag`, rank from 1 in trec_eval's order
    (score descending, ties by docid descending); scores as float32 (`_score`), so the file
    re-evaluates to the same ranking and metrics."""
    lines = []
    for qid in sorted(run):
        scores = run[qid]
        for i, doc in enumerate(metrics.rank(scores), start=1):
            lines.append(f"{qid} Q0 {doc} {i} {_score(scores[doc])} {tag}\n")
    return "".join(lines)


def _score(x: float) -> str:
    """A score in the shortest digits of its float32 value: every scorer here (student, teacher,
    BM25, hybrid) scores in float32, so this is exact, and a quarter smaller gzipped than float64
    digits; `parse_run` reads it back to the same float32 value."""
    return str(np.float32(x))


def parse_run(text: str) -> dict[str, dict[str, float]]:
    """TREC run lines -> {qid: {docid: score}} (scores as float32 values, as written); a
    malformed line is an error naming it."""
    run: dict[str, dict[str, float]] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 6:
            raise ValueError(f"run file line {n}: expected 'qid Q0 docid rank score tag', got {line!r}")
        run.setdefault(parts[0], {})[parts[2]] = float(np.float32(parts[4]))
    return run


def table(run: metrics.Run, qrels: metrics.Qrels, ks: Mapping[str, Iterable[int]]) -> dict[str, dict[str, float]]:
    """{metric: {qid: value}} over the queries of `qrels`, in qrels order (`metrics.per_query`)."""
    by_query = metrics.per_query(run, qrels, ks)
    names = next(iter(by_query.values())).keys()
    return {name: {qid: m[name] for qid, m in by_query.items()} for name in names}


def write(folder, system: str, split: str, run: metrics.Run, qrels: metrics.Qrels,
          ks: Mapping[str, Iterable[int]], save: bool = True) -> dict[str, float]:
    """Evaluates `run` against `qrels` and returns the means ({metric: value}, as
    `metrics.evaluate`); with `save` (process 0), also writes the run file and the per-query
    metrics of `system` on `split` into `folder`."""
    if not qrels:
        raise ValueError(f"per_query.write({system!r}, {split!r}): qrels is empty; pass the split's judgements")
    values = table(run, qrels, ks)
    means = metrics.mean_of(values)
    if save:
        artifacts.write_bytes(run_path(folder, system, split), gzip.compress(run_text(run, system).encode(), mtime=0))
        artifacts.write_text(metrics_path(folder, system, split), json.dumps(
            {"system": system, "split": split, "queries": len(qrels), "mean": means, "metrics": values},
            separators=(",", ":")))
    return means


def run_path(folder, system: str, split: str):
    return artifacts.as_path(folder) / f"{system}.{split}.run.gz"


def metrics_path(folder, system: str, split: str):
    return artifacts.as_path(folder) / f"{system}.{split}.json"


def read_metrics(path) -> dict:
    """A per-query file written by `write` ({"mean", "metrics": {metric: {qid: value}}, ...})."""
    return json.loads(artifacts.as_path(path).read_text())


def read_run(path) -> dict[str, dict[str, float]]:
    """A run file written by `write` -> {qid: {docid: score}}."""
    return parse_run(gzip.decompress(artifacts.read_bytes(path)).decode())
