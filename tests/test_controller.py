"""The round controller (md2pr_jax.rounds): the whole debug pipeline with a SIGKILL in the
middle of a student round, the ablation and its --reuse_from. The filter's numerics are in
test_rounds_filtering.py, the layout in test_rounds_layout.py."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT

from md2pr_jax.config import base_config


def _pipeline(workdir, extra=()):
    cmd = [sys.executable, "-m", "md2pr_jax.main", "--config", os.path.join(ROOT, "configs/debug.py"),
           "--workdir", str(workdir), "--mode", "pipeline", "--config.filter.plant_fraction=0.2", *extra]
    return cmd


@pytest.mark.data
def test_debug_pipeline_survives_sigkill_mid_round(tmp_path):
    work = tmp_path / "w"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_pipeline(work), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    ckpt_dir = work / "rounds" / "r01" / "train" / "ckpt"
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if ckpt_dir.is_dir() and any(p.name.isdigit() for p in ckpt_dir.iterdir()):
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the pipeline ended before its first student checkpoint"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (work / "rounds" / "r01" / "train" / "DONE").exists()
    mined_at = (work / "rounds" / "r01" / "mine" / "DONE").read_text()

    out = subprocess.run(_pipeline(work), cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming training at step" in out.stderr
    assert (work / "rounds" / "r01" / "mine" / "DONE").read_text() == mined_at  # not redone

    results = json.loads((work / "results.json").read_text())
    for row in ("bm25", "zero_shot", "teacher_rerank", "md2pr"):
        assert set(results[row]) >= {"ndcg@10", "mrr@10", "recall@100"}
        assert 0.0 <= results[row]["ndcg@10"] <= 1.0
    assert [r["round"] for r in results["rounds"]] == [1, 2]
    for r in results["rounds"]:
        assert 0.5 <= r["tau"] <= 0.99
        assert set(r["planted"]) >= {"recall", "precision", "hidden_in_candidates"}
    history = [json.loads(line) for line in open(work / "rounds" / "r01" / "train" / "history.jsonl")]
    steps = sorted({h["step"] for h in history})
    assert steps == list(range(1, steps[-1] + 1))  # every step logged once resumed
    timings = json.loads((work / "timings.json").read_text())
    # Stage times survive the kill: round 1's mining ran in the first process, round 2 in the second.
    assert timings["rounds/r01/mine"] > 0 and timings["rounds/r02/train"] > 0 and timings["teacher"] > 0
    assert "estimated time left" in out.stderr
    report = (work / "REPORT.md").read_text()
    assert "Planted check" in report and "| BM25 (`bm25`)" in report
    for png in ("losses.png", "threshold.png", "metrics.png"):
        assert (work / png).stat().st_size > 1000


def test_row_names_follow_the_ablation_switches():
    from md2pr_jax.ablation import ROWS, row_config
    from md2pr_jax.report import row_name

    for row in ROWS:
        assert row_name(row_config(base_config(), row, 0)) == row


def test_a_key_added_later_keeps_the_archived_rows_digests():
    """ablation.DIGEST_LATER_KEYS: at the value every archived row ran under, the key leaves the
    digest as it was before the key existed; any other value changes it."""
    from md2pr_jax import row_archive
    from md2pr_jax.ablation import BOOKKEEPING_KEYS, DIGEST_LATER_KEYS, row_config, row_digest

    cfg = row_config(base_config(), "md2pr_pseudo", 0)
    before = json.loads(cfg.to_json_best_effort())
    before.pop("name")
    for key in ("dir", "cache_dir"):
        before["data"].pop(key, None)
    for key, archived in BOOKKEEPING_KEYS.items():  # the intervals the archived rows ran at
        section, name = key.split(".")
        before[section][name] = archived
    for key in DIGEST_LATER_KEYS:
        section, name = key.split(".")
        del before[section][name]
    assert row_digest(cfg) == row_archive.config_digest(before)
    assert row_digest(row_config(base_config(), "md2pr_pfilter_pseudo", 0)) != row_digest(cfg)


def test_checkpoint_and_log_intervals_change_neither_the_digest_nor_reuse():
    """ablation.BOOKKEEPING_KEYS: a row checkpointed or logged at other intervals is the same row
    for the archive and for --reuse_from; a key that changes training is not."""
    from md2pr_jax.ablation import _comparable, _differences, row_config, row_digest

    cfg = row_config(base_config(), "md2pr", 0)
    other = row_config(base_config(), "md2pr", 0)
    other.train.checkpoint_every, other.train.keep_checkpoints, other.train.log_every = 7, 5, 1
    other.teacher_train.score_chunk_size = 123
    assert row_digest(other) == row_digest(cfg)
    a, b = (json.loads(c.to_json_best_effort()) for c in (cfg, other))
    assert _differences(_comparable(a), _comparable(b)) == []
    other.train.lr = cfg.train.lr * 2
    assert row_digest(other) != row_digest(cfg)
    assert _differences(_comparable(a), _comparable(json.loads(other.to_json_best_effort()))) == ["train.lr"]


@pytest.mark.data
def test_ablation_writes_every_row(tmp_path):
    work = tmp_path / "abl"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    out = subprocess.run(
        [sys.executable, "-m", "md2pr_jax.ablation", "--config", os.path.join(ROOT, "configs/debug.py"),
         "--workdir", str(work), "--seeds", "0,1", "--config.rounds.num_rounds=1", "--config.data.dev_fraction=0.25"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    table = json.loads((work / "ablation.json").read_text())
    # Each row also carries the dev split (where choices are made) and its last round's filter.
    per_row = table["per_row"]
    assert per_row["md2pr"]["dev"]["seeds"] == 2 and 0.0 <= per_row["md2pr"]["dev"]["ndcg@10"] <= 1.0
    assert [s["flagged"] for s in per_row["de"]["per_seed"]] == [0, 0]  # DE has no filter
    assert per_row["static_filter"]["per_seed"][0]["tau"] == pytest.approx(0.9)  # filter.tau0, never moved
    rows = ("bm25", "zero_shot", "teacher_rerank", "de", "de_sent", "de_sent_word", "md2pr", "static_filter")
    for row in rows:
        assert 0.0 <= table[row]["ndcg@10"] <= 1.0
    assert table["de"]["seeds"] == table["md2pr"]["seeds"] == 2
    # Seed-major: every row's first seed finished before any row's second (a run cut off has
    # all its rows on the same seeds).
    finished = lambda name: (work / "rows" / name / "results.json").stat().st_mtime_ns  # noqa: E731
    assert max(finished(f"{r}_s0") for r in rows[3:]) < finished("de_s1") < finished("md2pr_s1")
    assert len({r["ndcg@10"] for r in table["per_row"]["de"]["per_seed"]}) == 2  # seeds differ
    # md2pr - de, paired by seed, on both splits.
    delta = table["paired_vs_de"]["rows"]["md2pr"]["test"]["delta"]["ndcg@10"]
    de_s, md_s = table["per_row"]["de"]["per_seed"], table["per_row"]["md2pr"]["per_seed"]
    assert delta["n"] == 2 and delta["mean"] == pytest.approx(
        sum(m["ndcg@10"] - d["ndcg@10"] for m, d in zip(md_s, de_s)) / 2)
    assert "dev" in table["paired_vs_de"]["rows"]["md2pr"] and "Paired comparison" in (work / "REPORT.md").read_text()
    # Every evaluation kept its run file and per-query metrics, whose means are the reported means;
    # the ablation's compare.json tests every row against DE over queries from them.
    for stage, system in (("baselines", "bm25"), ("baselines", "zero_shot"), ("rerank", "teacher_rerank")):
        assert (work / "shared" / stage / "per_query" / f"{system}.test.run.gz").stat().st_size > 0
        saved = json.loads((work / "shared" / stage / "per_query" / f"{system}.test.json").read_text())
        assert saved["mean"]["ndcg@10"] == table[system]["ndcg@10"]
    pq = work / "rows" / "md2pr_s1" / "rounds" / "r01" / "eval" / "per_query"
    saved = json.loads((pq / "student.test.json").read_text())
    assert saved["mean"]["ndcg@10"] == md_s[1]["ndcg@10"]
    assert sum(saved["metrics"]["ndcg@10"].values()) / saved["queries"] == pytest.approx(md_s[1]["ndcg@10"], abs=1e-12)
    assert (pq / "student.dev.run.gz").exists()
    cmp = json.loads((work / "compare.json").read_text())
    test = cmp["query_level"]["tests"]["test"]["ndcg@10"][cmp["datasets"][0]]["md2pr"]
    assert test["seeds"] == [0, 1] and test["n"] == saved["queries"] and 0 < test["p_randomization"] <= 1
    assert not cmp["query_level"]["missing"] and "Query level: test, ndcg@10" in (work / "REPORT.md").read_text()
    # Rows share round 0 and round 1's mining: one teacher, linked into every row.
    assert os.path.islink(work / "rows" / "md2pr_s1" / "teacher")
    assert "| MD2PR (+ dynamic filter) (`md2pr`)" in (work / "REPORT.md").read_text()


@pytest.mark.data
def test_ablation_reuses_a_finished_run(tmp_path):
    """--reuse_from links a finished run's round 0, round-1 mining and teacher pass, and the
    rounds of the row that is the run's own config; nothing of those is recomputed. A run of
    another config is refused. An ablation workdir can be the source too, its rows' rounds
    linked row by row."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    base = [sys.executable, "-m", "md2pr_jax.ablation", "--config", os.path.join(ROOT, "configs/debug.py"),
            "--config.rounds.num_rounds=1", "--seeds", "0"]
    first = tmp_path / "first"
    out = subprocess.run([*base, "--workdir", str(first), "--rows", "md2pr"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    run = first / "rows" / "md2pr_s0"  # a finished single-config workdir, as --mode pipeline leaves
    second = tmp_path / "second"
    out = subprocess.run([*base, "--workdir", str(second), "--rows", "md2pr", "--reuse_from", str(run),
                          "--config.train.checkpoint_every=1"],  # bookkeeping only: everything still linked
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert os.path.islink(second / "shared" / "teacher") and os.path.islink(second / "shared" / "rounds" / "r01" / "score")
    assert os.path.islink(second / "rows" / "md2pr_s0" / "rounds" / "r01" / "train")
    assert not (second / "rows" / "md2pr_s0" / "timings.json").exists()  # no stage of the row ran
    a = json.loads((first / "ablation.json").read_text())["md2pr"]
    b = json.loads((second / "ablation.json").read_text())["md2pr"]
    assert a["ndcg@10"] == b["ndcg@10"]

    out = subprocess.run([*base, "--workdir", str(tmp_path / "third"), "--rows", "md2pr", "--reuse_from", str(run),
                          "--config.teacher_train.lr=0.5"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode != 0 and "teacher_train.lr" in out.stderr and "may differ" in out.stderr

    # A row key (loss.alpha) differs: round 0 and round 1's teacher pass are linked, the row's round runs.
    fifth = tmp_path / "fifth"
    out = subprocess.run([*base, "--workdir", str(fifth), "--rows", "md2pr", "--reuse_from", str(run),
                          "--config.loss.alpha=2.0"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert os.path.islink(fifth / "shared" / "rerank") and os.path.islink(fifth / "shared" / "rounds" / "r01" / "score")
    row = fifth / "rows" / "md2pr_s0"
    assert not os.path.islink(row / "rounds" / "r01" / "train")
    assert "rounds/r01/train" in json.loads((row / "timings.json").read_text())

    # Pseudo-queries differ: round 0 is linked, round 1's mining and teacher pass run anew over the
    # training queries and the pseudo-queries; the *_pseudo rows train on both, the others on the labelled.
    # Kind 'title': each positive is its document's body, a passage after the corpus rows that no
    # mining returns, and the source document is no negative; the hybrid labels score it too.
    sixth = tmp_path / "sixth"
    out = subprocess.run([*base, "--workdir", str(sixth), "--rows", "md2pr,de_pseudo,md2pr_pseudo,md2pr_pfilter_pseudo,md2pr_rfilter_pseudo,md2pr_pdropall_pseudo",
                          "--reuse_from",
                          str(run), "--config.data.pseudo_queries=12", "--config.data.pseudo_kind=title",
                          "--config.filter.keep_flagged=True", "--config.filter.tau_source=pseudo",
                          "--config.teacher.bm25_weight=1.0"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    shared = sixth / "shared"
    assert os.path.islink(shared / "teacher") and not os.path.islink(shared / "rounds" / "r01" / "score")
    pseudo = json.loads((shared / "pseudo.json").read_text())
    assert pseudo["count"] == len(pseudo["queries"]) == 12 and pseudo["kind"] == "title"
    for q in pseudo["queries"]:
        assert q["positive"] and q["text"] not in q["positive"]
    mined = json.loads((shared / "rounds" / "r01" / "mine" / "result.json").read_text())["queries"]
    assert mined == json.loads((run / "rounds" / "r01" / "mine" / "result.json").read_text())["queries"] + 12
    cand = np.load(shared / "rounds" / "r01" / "mine" / "candidates.npz")
    scores = np.load(shared / "rounds" / "r01" / "score" / "scores.npz")
    bodies = []
    for q, row in zip(cand["q_rows"][-12:], cand["cand"][-12:]):
        (body,) = set(scores["d"][scores["q"] == q].tolist()) - set(row.tolist())
        bodies.append(body)
    # The bodies are 12 new rows after every row mining can return, one per pseudo-query.
    assert sorted(bodies) == list(range(min(bodies), min(bodies) + 12)) and min(bodies) > cand["cand"].max()
    filt = {r: json.loads((sixth / "rows" / f"{r}_s0" / "rounds" / "r01" / "filter" / "result.json").read_text())
            for r in ("md2pr", "de_pseudo", "md2pr_pseudo", "md2pr_pfilter_pseudo", "md2pr_rfilter_pseudo",
                      "md2pr_pdropall_pseudo")}
    assert filt["md2pr"]["pseudo"]["examples"] == 0 and filt["md2pr_pseudo"]["pseudo"]["examples"] == 12
    assert filt["md2pr_pseudo"]["examples"] == filt["md2pr"]["examples"] + 12 == filt["de_pseudo"]["examples"]
    assert filt["md2pr_pseudo"]["tau_source"] == "pseudo" and filt["md2pr_pseudo"]["positives_for_tau"] == 12
    # The filter on the pseudo-queries' lists only: the same threshold, the same flags there, none elsewhere.
    only = filt["md2pr_pfilter_pseudo"]
    assert only["pseudo_only"] and only["tau"] == filt["md2pr_pseudo"]["tau"]
    assert only["flagged"] == only["pseudo"]["flagged"] == filt["md2pr_pseudo"]["pseudo"]["flagged"]
    # Its control drops as many candidates per list, at random.
    rand = filt["md2pr_rfilter_pseudo"]
    assert rand["random_flags"] and rand["flagged"] == filt["md2pr_pseudo"]["flagged"]
    assert rand["pseudo"]["flagged"] == filt["md2pr_pseudo"]["pseudo"]["flagged"]
    assert (sixth / "rows" / "md2pr_pseudo_s0" / "rounds" / "r01" / "filter" / "examples" / "kd_mask.npy").exists()
    # Every mined candidate of the pseudo lists dropped, none of the labelled lists': the pseudo
    # lists' contrastive masks hold their positive alone, the labelled ones keep negatives.
    drop = filt["md2pr_pdropall_pseudo"]
    pseudo_rows = np.isin(cand["q_rows"], cand["q_rows"][-12:])
    assert drop["flagged"] == drop["pseudo"]["flagged"] == int((cand["cand"][pseudo_rows] >= 0).sum()) > 0
    lists = sixth / "rows" / "md2pr_pdropall_pseudo_s0" / "rounds" / "r01" / "filter" / "examples"
    query, mask = np.load(lists / "query_idx.npy"), np.load(lists / "cand_mask.npy")
    on_pseudo = np.isin(query, cand["q_rows"][-12:])
    assert on_pseudo.sum() == 12 and (mask[on_pseudo, 1:] == 0).all() and mask[~on_pseudo, 1:].sum() > 0

    # An ablation workdir as the source: a 2-round ablation extends the 1-round one, running round 2 only.
    fourth = tmp_path / "fourth"
    out = subprocess.run([*base, "--workdir", str(fourth), "--rows", "md2pr", "--reuse_from", str(first),
                          "--config.rounds.num_rounds=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    row = fourth / "rows" / "md2pr_s0"
    assert os.path.islink(row / "rounds" / "r01" / "train") and os.path.islink(fourth / "shared" / "teacher")
    ran = json.loads((row / "timings.json").read_text())
    assert "rounds/r02/train" in ran and "rounds/r01/train" not in ran
    assert json.loads((fourth / "ablation.json").read_text())["md2pr"]["ndcg@10"] != a["ndcg@10"]  # round 2's metric


@pytest.mark.data
def test_cross_fitted_teachers_and_hybrid_soft_labels(tmp_path):
    """teacher_train.folds=2: two fold teachers, each training query scored by the one that
    never saw it; teacher.bm25_weight: the soft labels are the logits plus the weighted BM25
    share, while the filter reads the cross-encoder alone."""
    import numpy as np

    from md2pr_jax.config import validate
    from md2pr_jax.data.pipeline import TrainExamples
    from md2pr_jax.retrieval.bm25 import BM25Retriever
    from md2pr_jax.rounds import stages
    from md2pr_jax.teacher import PairScorer

    work = tmp_path / "w"
    extra = ["--config.teacher_train.folds=2", "--config.teacher.bm25_weight=2.0", "--config.rounds.num_rounds=1",
             "--config.filter.plant_fraction=0.0"]
    out = subprocess.run(_pipeline(work, extra), cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (work / "params" / "teacher" / "fold0").is_dir() and (work / "params" / "teacher" / "fold1").is_dir()
    rerank = json.loads((work / "rerank" / "result.json").read_text())
    assert rerank["hybrid_sweep"]["test"]["0.0"] == rerank["teacher_rerank"]["test"]["ndcg@10"]
    assert "hybrid_rerank" in json.loads((work / "results.json").read_text())

    import importlib.util
    spec = importlib.util.spec_from_file_location("debug_cfg", os.path.join(ROOT, "configs/debug.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    config = mod.get_config()
    config.teacher_train.folds, config.teacher.bm25_weight, config.rounds.num_rounds = 2, 2.0, 1
    config.filter.plant_fraction = 0.0
    ctx = stages.open_context(validate(config), str(work))
    folds = stages.teacher_folds(ctx)
    assert set(folds.values()) == {0, 1}
    s = np.load(work / "rounds" / "r01" / "score" / "scores.npz")
    valid = s["d"] >= 0
    for k in (0, 1):
        sel = np.flatnonzero(valid & np.array([folds[int(q)] == k for q in s["q"]]))[:6]
        mine = PairScorer(ctx.config, ctx.teacher, stages.teacher_params(ctx, k), ctx.dataset, ctx.mesh, 8)
        other = PairScorer(ctx.config, ctx.teacher, stages.teacher_params(ctx, 1 - k), ctx.dataset, ctx.mesh, 8)
        # The debug teacher barely moves from its init: compare the gaps, not absolute values.
        gap_mine = np.abs(mine.score(s["q"][sel], s["d"][sel]) - s["logits"][sel]).max()
        gap_other = np.abs(other.score(s["q"][sel], s["d"][sel]) - s["logits"][sel]).max()
        assert gap_mine * 10 < gap_other, (gap_mine, gap_other)

    ex = TrainExamples.load(str(work / "rounds" / "r01" / "filter" / "examples"))
    bm25 = BM25Retriever.build(ctx.dataset.doc_texts, progress=False)
    first = ex.cand_idx[:, 0]  # the positives, with their soft label
    flat = {(int(q), int(d)): float(v) for q, d, v in zip(s["q"], s["d"], s["logits"])}
    ce = np.array([flat[(int(q), int(d))] for q, d in zip(ex.query_idx, first)])
    lexical = bm25.pair_scores(ctx.dataset.query_texts, ex.query_idx, first)
    assert lexical.max() > 0
    np.testing.assert_allclose(ex.teacher_scores[:, 0], ce + 2.0 * lexical, rtol=1e-5, atol=1e-5)


@pytest.mark.data
def test_filter_only_rows_give_the_planted_check_without_training(tmp_path):
    work = tmp_path / "planted"
    out = subprocess.run(
        [sys.executable, "-m", "md2pr_jax.ablation", "--config", os.path.join(ROOT, "configs/debug.py"),
         "--workdir", str(work), "--seeds", "3", "--rows", "md2pr,static_filter", "--upto", "filter",
         "--config.rounds.num_rounds=1", "--config.filter.plant_fraction=0.3"],
        cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads((work / "filter_only.json").read_text())
    assert got["static_filter"]["tau"] == pytest.approx(0.9) and got["md2pr"]["tau"] < 0.9
    for row in ("md2pr", "static_filter"):
        p = got[row]["planted"]
        assert p["hidden_positives"] > 0 and p["flagged"] == got[row]["flagged"]
        assert not (work / "rows" / f"{row}_s3" / "rounds" / "r01" / "train").exists()  # nothing trained
    assert "| `md2pr` |" in (work / "REPORT.md").read_text()


def test_hybrid_weight_from_dev_takes_the_sweeps_best_and_labels_with_it(tmp_path):
    """teacher.bm25_weight_from_dev: w is the rerank sweep's best on dev (ties: the smaller),
    and the soft labels are the cross-encoder's logits plus that w times normalised BM25."""
    import types

    import numpy as np

    from md2pr_jax import artifacts
    from md2pr_jax.config import ConfigError, base_config, validate
    from md2pr_jax.layout import Layout
    from md2pr_jax.retrieval.bm25 import BM25Retriever
    from md2pr_jax.rounds import stages

    assert stages.best_dev_weight({"0.0": 0.70, "2.0": 0.75, "4.0": 0.75, "8.0": 0.74}) == 2.0
    config = base_config()
    config.teacher.bm25_weight = 1.0
    sweep = {"hybrid_sweep": {"test": {"0.0": 0.1, "8.0": 0.9}, "dev": {"0.0": 0.5, "3.0": 0.6, "8.0": 0.55}}}
    assert stages.hybrid_weight(config, sweep) == 1.0  # the fixed weight unless asked
    config.teacher.bm25_weight_from_dev = True
    assert stages.hybrid_weight(config, sweep) == 3.0  # dev's best, not test's
    edge = {"hybrid_sweep": {"dev": {str(w): w / 100 for w in stages.HYBRID_SWEEP}}}
    assert stages.weight_at_edge(config, stages.hybrid_weight(config, edge))  # dev wants more BM25 than swept
    assert not stages.weight_at_edge(config, 3.0)
    with pytest.raises(ValueError, match="bm25_weight_from_dev needs the rerank stage's sweep on a 'dev' split"):
        stages.hybrid_weight(config, {"hybrid_sweep": {"test": {"0.0": 0.1}}})
    with pytest.raises(ConfigError, match="rerank_depth > 0"):
        validate(_with(base_config(), rerank_depth=0))

    layout = Layout.at(str(tmp_path / "w"))
    artifacts.write_json(layout.result_file("rerank"), sweep)
    docs = ["vitamin d and bone fractures", "aspirin after stroke", "yeast heat shock genes", "bone density in adults"]
    queries = ["vitamin d bone", "stroke aspirin"]
    # Row 4 is a training-only passage cut from document 0 (a pseudo-query's positive): in no
    # BM25 index, it is scored as its source document.
    source = lambda rows: np.where(np.asarray(rows) >= len(docs), 0, rows)  # noqa: E731
    ctx = types.SimpleNamespace(config=config, layout=layout, main=False,
                                dataset=types.SimpleNamespace(doc_texts=docs, query_texts=queries, corpus_rows=source))
    q, d = np.array([0, 0, 0, 1, 1, 0]), np.array([0, 3, 2, 1, 0, 4])
    logits = np.array([0.5, -0.2, 0.1, 1.0, -1.0, 0.3], np.float32)
    lexical = BM25Retriever.build(docs, progress=False).pair_scores(queries, q, source(d))
    assert lexical.max() > 0 and lexical[5] == lexical[0] > 0
    np.testing.assert_allclose(stages.hybrid_logits(ctx, logits, q, d), logits + 3.0 * lexical, rtol=1e-6)


def _with(config, rerank_depth):
    config.teacher.bm25_weight_from_dev = True
    config.teacher_train.rerank_depth = rerank_depth
    return config


@pytest.mark.data
def test_a_rerun_in_a_new_workdir_trains_only_the_rows_its_archive_lacks(tmp_path):
    """--archive keeps each finished row (per-query files, cost, result): a rerun whose workdir is
    gone recomputes the shared stages, reads the kept rows and trains only the missing ones, with
    the same table. A row whose config changed is trained again; an archive whose shared
    evaluations differ from the run's is not used."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    archive = tmp_path / "per_query"
    base = [sys.executable, "-m", "md2pr_jax.ablation", "--config", os.path.join(ROOT, "configs/debug.py"),
            "--config.rounds.num_rounds=1", "--seeds", "0", "--multi_seed_rows", "de", "--archive", str(archive)]

    def ablation(workdir, *extra):
        out = subprocess.run([*base, "--workdir", str(workdir), *extra], cwd=ROOT, env=env, capture_output=True,
                             text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads((workdir / "ablation.json").read_text()), out.stderr

    first, _ = ablation(tmp_path / "first", "--rows", "de")
    assert sorted(os.listdir(archive)) == sorted(
        ["costs.json", "scifact.de_s0.test.json"] + [f"scifact.{s}.test.json" for s in ("bm25", "zero_shot", "teacher_rerank")])
    costs = json.loads((archive / "costs.json").read_text())["scifact"]
    assert costs["rows"]["de"]["0"]["rounds/r01/train"] > 0 and costs["shared"]["teacher"] > 0
    # The session ends, its workdir with it; the next one asks for two rows.
    shutil.rmtree(tmp_path / "first")
    second, log = ablation(tmp_path / "second", "--rows", "de,md2pr")
    assert "row de seed 0: kept in the archive" in log
    assert not (tmp_path / "second" / "rows" / "de_s0").exists()  # not retrained
    assert (tmp_path / "second" / "rows" / "md2pr_s0" / "results.json").exists()
    assert second["de"] == first["de"] and second["per_row"]["de"]["per_seed"] == first["per_row"]["de"]["per_seed"]
    assert (archive / "scifact.md2pr_s0.test.json").exists()
    cmp = json.loads((tmp_path / "second" / "compare.json").read_text())  # DE's per-query file read from the archive
    assert cmp["datasets"] == ["scifact"] and cmp["query_level"]["tests"]["test"]["ndcg@10"]["scifact"]["md2pr"]["n"] > 0
    # A row key changed: DE trains again, under the new config.
    third, log = ablation(tmp_path / "third", "--rows", "de", "--config.train.lr=0.01")
    assert "kept in the archive" not in log and third["de"]["ndcg@10"] != first["de"]["ndcg@10"]
    # An archive from other shared stages (here: a planted change in its zero-shot evaluation) is refused.
    path = archive / "scifact.zero_shot.test.json"
    saved = json.loads(path.read_text())
    qid = next(iter(saved["metrics"]["ndcg@10"]))
    saved["metrics"]["ndcg@10"][qid] += 0.5
    path.write_text(json.dumps(saved))
    before = (archive / "costs.json").read_text()
    _, log = ablation(tmp_path / "fourth", "--rows", "de")
    assert "is not used" in log and "differ from this run's" in log and "kept in the archive" not in log
    assert (archive / "costs.json").read_text() == before  # nothing written


def test_the_archive_check_tolerates_float_noise_and_nothing_else(tmp_path):
    """Shared evaluations count as the same within 1e-6 per query and metric (MAP within 1e-3); a
    query more or less, another metric or a larger difference does not."""
    from md2pr_jax.row_archive import _same_metrics

    def saved(name, metrics):
        path = tmp_path / f"{name}.json"
        path.write_text(json.dumps({"metrics": metrics}))
        return {"bm25.test": str(path)}

    ours = saved("ours", {"ndcg@10": {"q1": 0.5, "q2": 0.25}})
    assert _same_metrics(ours, saved("noise", {"ndcg@10": {"q1": 0.5 + 1e-9, "q2": 0.25}}))
    assert not _same_metrics(ours, saved("moved", {"ndcg@10": {"q1": 0.5 + 1e-4, "q2": 0.25}}))
    # MAP reads the whole 1,000-deep ranking, where a float tie between two runs swaps passages.
    whole = saved("whole", {"ndcg@10": {"q1": 0.5, "q2": 0.25}, "map": {"q1": 0.3, "q2": 0.1}})
    assert _same_metrics(whole, saved("tie", {"ndcg@10": {"q1": 0.5, "q2": 0.25}, "map": {"q1": 0.3 + 2.4e-5, "q2": 0.1}}))
    assert not _same_metrics(whole, saved("map_moved", {"ndcg@10": {"q1": 0.5, "q2": 0.25}, "map": {"q1": 0.31, "q2": 0.1}}))
    assert not _same_metrics(ours, saved("fewer", {"ndcg@10": {"q1": 0.5}}))
    assert not _same_metrics(ours, saved("other", {"mrr@10": {"q1": 0.5, "q2": 0.25}}))
    assert not _same_metrics(ours, {"zero_shot.test": ours["bm25.test"]})


def test_the_archive_keeps_the_shared_costs_of_every_workdir_of_a_dataset(tmp_path):
    """Several workdirs archive one dataset (its labelled ablation, its pseudo-query run, a run
    linked from one of them): each one's shared stage times are kept under its name, `shared`
    holds each stage's latest time, and a run that timed no shared stage erases nothing (it used
    to write `shared: {}` over the dataset's recorded costs)."""
    from md2pr_jax import row_archive
    from md2pr_jax.layout import Layout

    def workdir(name, timings):
        layout = Layout.at(str(tmp_path / name))
        folder = layout.shared.per_query_dir("baselines")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "bm25.test.json").write_text(json.dumps({"metrics": {"ndcg@10": {"q1": 0.5}}}))
        if timings is not None:
            (tmp_path / name / "shared" / "timings.json").write_text(json.dumps(timings))
        return layout

    folder = str(tmp_path / "per_query")
    row_archive.RowArchive(folder, "nf", workdir("nf", {"rerank": 773.0, "rounds/r01/score": 905.0}))
    row_archive.RowArchive(folder, "nf", workdir("nf_title", {"rounds/r01/score": 3349.6}))
    archive = row_archive.RowArchive(folder, "nf", workdir("nf_title_linked", None))
    assert archive.usable
    costs = json.loads((tmp_path / "per_query" / "costs.json").read_text())["nf"]
    assert costs["shared"] == {"rerank": 773.0, "rounds/r01/score": 3349.6}
    assert costs["shared_by_workdir"] == {"nf": {"rerank": 773.0, "rounds/r01/score": 905.0},
                                          "nf_title": {"rounds/r01/score": 3349.6}}
