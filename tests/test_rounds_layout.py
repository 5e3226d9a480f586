"""The workdir layout (md2pr_jax.layout): the paths of a local and a gs:// workdir, and the
ablation's links between workdirs. Files in a bucket, against a GCS server, are test_gcs.py's."""

import os

import pytest

from md2pr_jax import ablation, artifacts, report
from md2pr_jax.layout import SHARED_STAGES, Layout, round_stage


def test_paths_of_a_local_and_a_bucket_workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = Layout.at("runs/x")
    assert local.local and str(local.root) == os.path.join(str(tmp_path), "runs", "x")
    gcs = Layout.at("gs://bucket/run")
    assert not gcs.local
    paths = [gcs.config_json, gcs.timings, gcs.params("teacher"), gcs.student(2), gcs.ckpt(round_stage(1, "train")),
             gcs.candidates(1), gcs.attention(1), gcs.examples(2), gcs.history(1), gcs.corpus_emb(0), gcs.corpus_emb(3),
             gcs.eval_json("test"), gcs.per_query_dir(round_stage(1, "eval")), gcs.hf("student"), gcs.report, gcs.plot("losses"), gcs.row("md2pr", 1).result_file(
                 round_stage(1, "eval")), gcs.shared.done_file("teacher"), gcs.ablation_json]
    assert all(str(p).startswith("gs://bucket/run/") for p in paths), paths
    assert str(gcs.student(2)) == "gs://bucket/run/rounds/r02/student"
    assert str(gcs.corpus_emb(0)) == "gs://bucket/run/baselines/corpus_emb"
    assert str(gcs.corpus_emb(3)) == "gs://bucket/run/rounds/r03/eval/corpus_emb"
    assert str(gcs.per_query_dir("baselines")) == "gs://bucket/run/baselines/per_query"
    assert str(gcs.row("de", 0).root) == "gs://bucket/run/rows/de_s0"
    assert not os.path.exists(tmp_path / "gs:")


def test_ablation_links_refuse_missing_and_moved_sources(tmp_path):
    source, target = Layout.at(tmp_path / "src"), Layout.at(tmp_path / "dst")
    for stage in SHARED_STAGES:
        source.stage(stage).mkdir(parents=True)
        artifacts.write_text(source.done_file(stage), "done\n")
    ablation.link_shared(source, target)
    assert all(os.path.islink(target.stage(s)) and target.done(s) for s in SHARED_STAGES if s != "data")
    os.rename(tmp_path / "src", tmp_path / "moved")
    with pytest.raises(SystemExit, match="no longer exists"):
        ablation.link_shared(source, target)
    with pytest.raises(SystemExit, match="does not exist"):
        ablation.link_shared(source, Layout.at(tmp_path / "other"))
    with pytest.raises(SystemExit, match="local"):
        ablation.link_shared(Layout.at(tmp_path / "moved"), Layout.at("gs://b/run"))


def test_results_rows_are_defined_once():
    assert list(ablation.ROWS) == [k for k, row in report.ROWS.items() if row.switches]
    assert "| BM25 (`bm25`)" in report.rows_table({"bm25": {"ndcg@10": 0.5}})
