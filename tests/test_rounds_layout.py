"""The workdir layout and its file I/O (md2pr_jax.layout, md2pr_jax.artifacts) on a local
folder and on a gs:// workdir (epath's gs backend mapped onto a temporary folder), and the
ablation's links between workdirs."""

import contextlib
import os

import numpy as np
import pytest
from etils.epath import testing as epath_testing

from md2pr_jax import ablation, artifacts, report
from md2pr_jax.layout import SHARED_STAGES, Layout, round_stage


@contextlib.contextmanager
def fake_gcs(folder):
    """gs://BUCKET/... served from folder/BUCKET/... through epath (no network, no credentials)."""

    def local(p):
        s = os.fspath(p)
        return os.path.join(str(folder), s[len("gs://"):]) if s.startswith("gs://") else s

    def one(fn, path, *a, **k):
        return fn(local(path), *a, **k)

    def two(fn, path, dst, *a, **k):
        return fn(local(path), local(dst), *a, **k)

    fns = {name: one for name in ("exists", "isdir", "listdir", "makedirs", "mkdir", "open", "remove", "rmtree",
                                  "stat", "glob", "walk")}
    with epath_testing.mock_epath(copy=two, rename=two, replace=two, **fns):
        yield


def test_paths_of_a_local_and_a_bucket_workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    local = Layout.at("runs/x")
    assert local.local and str(local.root) == os.path.join(str(tmp_path), "runs", "x")
    gcs = Layout.at("gs://bucket/run")
    assert not gcs.local
    paths = [gcs.config_json, gcs.timings, gcs.params("teacher"), gcs.student(2), gcs.ckpt(round_stage(1, "train")),
             gcs.candidates(1), gcs.attention(1), gcs.examples(2), gcs.history(1), gcs.corpus_emb(0), gcs.corpus_emb(3),
             gcs.eval_json("test"), gcs.hf("student"), gcs.report, gcs.plot("losses"), gcs.row("md2pr", 1).result_file(
                 round_stage(1, "eval")), gcs.shared.done_file("teacher"), gcs.ablation_json]
    assert all(str(p).startswith("gs://bucket/run/") for p in paths), paths
    assert str(gcs.student(2)) == "gs://bucket/run/rounds/r02/student"
    assert str(gcs.corpus_emb(0)) == "gs://bucket/run/baselines/corpus_emb"
    assert str(gcs.corpus_emb(3)) == "gs://bucket/run/rounds/r03/eval/corpus_emb"
    assert str(gcs.row("de", 0).root) == "gs://bucket/run/rows/de_s0"
    assert not os.path.exists(tmp_path / "gs:")


def test_files_and_report_in_a_bucket_workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    bucket = tmp_path / "bucket_store"
    bucket.mkdir()
    with fake_gcs(bucket):
        lay = Layout.at("gs://b/run")
        artifacts.write_json(lay.result_file("baselines"), {"x": 1})
        artifacts.write_text(lay.done_file("baselines"), "now\n")
        assert lay.done("baselines") and lay.result("baselines") == {"x": 1}
        artifacts.save_arrays(lay.candidates(1), q_rows=np.arange(3), cand=np.ones((3, 2), np.int64))
        assert artifacts.load_arrays(lay.candidates(1))["cand"].shape == (3, 2)
        artifacts.save_array(lay.attention(1), np.arange(4, dtype=np.uint16))
        np.testing.assert_array_equal(artifacts.load_array(lay.attention(1), mmap=True), np.arange(4))
        with artifacts.local_folder(lay.examples(1)) as folder:
            assert not folder.startswith("gs:")
            np.save(os.path.join(folder, "query_idx.npy"), np.arange(5))
        copied = artifacts.local_path(lay.examples(1))
        np.testing.assert_array_equal(np.load(os.path.join(copied, "query_idx.npy")), np.arange(5))
        rounds = [{"round": 1, "tau": 0.8, "tau_hat": 0.7, "flagged": 3, "loss": {"loss": 1.0},
                   "metrics": {"test": {"ndcg@10": 0.5, "mrr@10": 0.4, "recall@100": 0.9}}}]
        results = {"split": "test", "rows": {"md2pr": rounds[0]["metrics"]["test"]}, "rounds": rounds}
        path = report.write(lay, results, {1: [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]})
        assert str(path) == "gs://b/run/REPORT.md" and "| MD2PR (+ dynamic filter) (`md2pr`)" in path.read_text()
    stored = bucket / "b" / "run"
    assert (stored / "REPORT.md").exists() and (stored / "losses.png").stat().st_size > 1000
    assert (stored / "rounds" / "r01" / "filter" / "examples" / "query_idx.npy").exists()
    assert (stored / "baselines" / "DONE").exists()
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith("gs:")]  # no local 'gs:' folder
    assert not [p for p in stored.rglob("*.tmp*")]  # atomic writes leave no temp files


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
