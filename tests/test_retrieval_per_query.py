"""md2pr_jax.retrieval.per_query: run files and per-query metrics whose means are the reported
means, and the TREC format read back (the evaluation that writes them: test_retrieval_evaluate)."""

import gzip
import json

import numpy as np
import pytest

from md2pr_jax.retrieval import metrics, per_query

KS = {"ndcg": (10,), "mrr": (10,), "recall": (2,)}


def _run_and_qrels():
    run = {"q1": {"a": 3.0, "b": 2.5, "c": 2.5, "d": 0.125}, "q2": {"c": 1.0, "a": 0.5}, "q3": {"b": -0.25}}
    qrels = {"q1": {"b": 2, "d": 1}, "q2": {"x": 1}, "q3": {"b": 1}, "q4": {"a": 1}}  # q4 not in the run: 0
    return run, qrels


def test_per_query_values_average_to_the_reported_means(tmp_path):
    run, qrels = _run_and_qrels()
    means = per_query.write(tmp_path, "bm25", "test", run, qrels, KS)
    assert means == metrics.evaluate(run, qrels, KS)  # the same floats, not approximately
    saved = per_query.read_metrics(per_query.metrics_path(tmp_path, "bm25", "test"))
    assert saved["queries"] == 4 and saved["mean"] == means and list(saved["metrics"]["ndcg@10"]) == list(qrels)
    for name, by_q in saved["metrics"].items():
        assert sum(by_q.values()) / len(by_q) == means[name]
    assert saved["metrics"]["mrr@10"] == {"q1": 1 / 3, "q2": 0.0, "q3": 1.0, "q4": 0.0}
    assert per_query.write(tmp_path / "none", "x", "test", run, qrels, KS, save=False) == means
    assert not (tmp_path / "none").exists()


def test_run_file_is_trec_ranked_as_evaluated_and_reads_back(tmp_path):
    run, qrels = _run_and_qrels()
    per_query.write(tmp_path, "student", "dev", run, qrels, KS)
    path = per_query.run_path(tmp_path, "student", "dev")
    lines = gzip.decompress(path.read_bytes()).decode().splitlines()
    # Ties (b and c at 2.5) ranked as trec_eval ranks them: docid descending.
    assert lines[:3] == ["q1 Q0 a 1 3.0 student", "q1 Q0 c 2 2.5 student", "q1 Q0 b 3 2.5 student"]
    assert len(lines) == 7 and lines[-1] == "q3 Q0 b 1 -0.25 student"
    back = per_query.read_run(path)
    assert back == run
    # Scores are written as float32 (every scorer's dtype) in their shortest digits.
    np32 = float(np.float32(0.1))
    assert per_query.run_text({"q": {"a": np32}}, "t") == "q Q0 a 1 0.1 t\n"
    assert per_query.parse_run("q Q0 a 1 0.1 t\n") == {"q": {"a": np32}}
    assert metrics.per_query(back, qrels, KS) == metrics.per_query(run, qrels, KS)
    with pytest.raises(ValueError, match="line 1"):
        per_query.parse_run("q1 Q0 a 1\n")
    with pytest.raises(ValueError, match="qrels is empty"):
        per_query.write(tmp_path, "x", "test", run, {}, KS)
    assert json.loads(per_query.metrics_path(tmp_path, "student", "dev").read_text())["system"] == "student"
