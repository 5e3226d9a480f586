"""benchmarks/scale_rehearsal.py end to end at a toy size: the synthetic MS MARCO files go
through the real builder, `prepare_dataset` and every stage of the Runner, and the JSON holds
every stage with its items, wall time, throughput and peak memory, and sensible metrics."""

import json
import os
import subprocess
import sys

from conftest import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "scale_rehearsal.py")


def _run(workdir, out):
    cmd = [sys.executable, SCRIPT, "--workdir", str(workdir), "--out", str(out), "--passages", "1500",
           "--train-queries", "150", "--dev-queries", "40", "--steps", "4", "--teacher-steps", "2",
           "--batch-size", "4", "--score-batch-size", "256", "--encode-batch-size", "256",
           "--mine-depth", "10", "--rerank-depth", "20"]
    env = {**os.environ, "PYTHONPATH": ROOT, "JAX_PLATFORMS": "cpu"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    with open(out) as f:
        return json.load(f)


def test_rehearsal_measures_every_stage_and_resumes(tmp_path):
    out = tmp_path / "rehearsal.json"
    d = _run(tmp_path / "work", out)
    import importlib.util

    spec = importlib.util.spec_from_file_location("scale_rehearsal", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert list(d["stages"]) == list(module.STAGES) or set(d["stages"]) == set(module.STAGES)
    for name, s in d["stages"].items():
        assert s["items"] > 0 and s["wall_s"] > 0 and s["items_per_s"] > 0, (name, s)
        assert 0 < s["peak_rss_gb"] < 20, (name, s)
    assert d["stages"]["score"]["items"] >= 150 * 10  # every training query's mined candidates (--mine-depth 10)
    assert d["stages"]["score"]["parts"]["teacher_scoring"]["items"] == d["stages"]["score"]["items"]
    assert d["stages"]["mine"]["items"] == 150 and d["stages"]["eval"]["items"] == 40
    assert {"corpus_encode", "bm25_index", "bm25_search", "dense_search"} <= set(d["stages"]["baselines"]["parts"])
    assert d["sizes"] == {"passages": 1500, "train_queries": 150, "dev_queries": 40,
                          "train_positives": d["sizes"]["train_positives"]}
    assert 150 <= d["sizes"]["train_positives"] <= 300
    assert 40 <= d["synthetic"]["mean_passage_words"] <= 75 and 4 <= d["synthetic"]["mean_query_words"] <= 8
    bm25 = d["metrics"]["bm25"]
    assert bm25["recall@100"] > 0.5  # queries share words with their positives: BM25 finds them
    assert 0 <= d["metrics"]["student"]["ndcg@10"] <= 1
    assert d["complete"] and d["machine"]["cores"] >= 1 and d["goal"]["memory_ok"]
    # A second run resumes: the data and every stage are reused, the figures kept.
    again = _run(tmp_path / "work", out)
    assert again["stages"] == d["stages"]
