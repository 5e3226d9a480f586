"""dense_run / evaluate_student on a tiny random student and a synthetic RetrievalDataset;
ScaNN recall and the zero-shot figure on real SciFact under the data marker."""

import os
import tempfile

import numpy as np
import pytest

from md2pr_jax.config import base_config, bert_shape
from md2pr_jax.retrieval import evaluate as ev
from md2pr_jax.retrieval import metrics


def tiny_config():
    cfg = base_config()
    cfg.student.bert = bert_shape(vocab_size=110, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    cfg.data.max_query_len, cfg.data.max_passage_len = 12, 40
    cfg.retrieval.encode_batch_size = 16
    cfg.retrieval.eval_depth = 20
    return cfg


def synthetic_dataset(rng, n_docs=50, n_q=9):
    from md2pr_jax.data.prepare import RetrievalDataset, TokenTable

    def table(n, lo, hi):
        seqs = [[101, *rng.integers(1, 100, size=rng.integers(lo, hi)).tolist(), 102] for _ in range(n)]
        offsets = np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64)
        return TokenTable(np.concatenate(seqs).astype(np.int32), offsets, 102, 0)

    words = ["alpha", "beta", "gamma", "delta", "omega"]
    doc_ids = [f"d{i}" for i in range(n_docs)]
    query_ids = [f"q{i}" for i in range(n_q)]
    qrels = {q: {doc_ids[int(rng.integers(n_docs))]: int(rng.integers(1, 3))} for q in query_ids[:6]}
    return RetrievalDataset(
        name="synthetic", path="", doc_ids=doc_ids,
        doc_texts=[" ".join(rng.choice(words, 6)) for _ in doc_ids], query_ids=query_ids,
        query_texts=[" ".join(rng.choice(words, 2)) for _ in query_ids],
        qrels={"test": qrels}, split_queries={"test": query_ids[:6], "train": query_ids[6:]},
        answers={}, hard_negatives={}, query_table=table(n_q, 2, 10),
        doc_table=table(n_docs, 3, 38), max_query_len=12,
        max_passage_len=40, bad_records={},
    )


def test_dense_run_matches_bruteforce_and_metrics():
    import flax.linen as nn
    import jax

    from md2pr_jax.models import DualEncoder, student_from_config

    cfg = tiny_config()
    ds = synthetic_dataset(np.random.default_rng(0))
    student = student_from_config(cfg)
    x = np.ones((1, 8), np.int32)
    params = nn.unbox(student.init(jax.random.PRNGKey(0), x, x, x, x)["params"])
    run = ev.dense_run(cfg, params, ds, "test", progress=False)
    assert set(run) == set(ds.split_queries["test"]) and all(len(r) == 20 for r in run.values())
    # Reference: every text at full width in one forward, scores by numpy.
    p_ids, p_mask = ds.doc_tokens(np.arange(ds.num_docs))
    rows = ds.query_indices("test")
    q_ids, q_mask = ds.query_tokens(rows)
    apply = lambda ids, m, meth: np.asarray(student.apply({"params": params}, ids, m, method=meth)[0])
    scores = apply(q_ids, q_mask, DualEncoder.encode_query) @ apply(p_ids, p_mask, DualEncoder.encode_passage).T
    for r, qi in zip(scores, rows):
        top = np.argsort(-r, kind="stable")[:20]
        got = run[ds.query_ids[qi]]
        assert list(got) == [ds.doc_ids[i] for i in top]
        np.testing.assert_allclose(list(got.values()), r[top], atol=1e-4)
    m = ev.evaluate_student(cfg, params, ds, "test", progress=False)
    assert m == pytest.approx(metrics.evaluate(run, ds.qrels["test"], ev.EVAL_KS))
    assert {"ndcg@10", "mrr@10", "recall@100", "recall@1000", "map"} <= set(m)
    bm = metrics.evaluate(ev.bm25_run(ds, "test", 20, progress=False), ds.qrels["test"], ev.EVAL_KS)
    assert "| bm25 |" in ev.format_table({"student": m, "bm25": bm})
    with pytest.raises(ValueError, match="no judgements"):
        ev.evaluate_student(cfg, params, ds, "train", progress=False)


def test_evaluation_keeps_its_run_file_and_per_query_metrics(tmp_path):
    """An evaluation with a folder writes the TREC run (top eval_depth, as evaluated) and the
    per-query metrics, whose means are the means it returns."""
    import flax.linen as nn
    import jax

    from md2pr_jax.layout import Layout, round_stage
    from md2pr_jax.models import student_from_config
    from md2pr_jax.retrieval import per_query

    cfg = tiny_config()
    ds = synthetic_dataset(np.random.default_rng(3))
    student = student_from_config(cfg)
    x = np.ones((1, 8), np.int32)
    params = nn.unbox(student.init(jax.random.PRNGKey(1), x, x, x, x)["params"])
    folder = Layout.at(tmp_path).per_query_dir(round_stage(1, "eval"))
    means = ev.evaluate_student(cfg, params, ds, "test", progress=False, folder=folder)
    saved = per_query.read_metrics(per_query.metrics_path(folder, "student", "test"))
    assert set(saved["metrics"]) == set(means) and saved["queries"] == 6
    for name, by_q in saved["metrics"].items():
        assert sorted(by_q) == sorted(ds.qrels["test"])
        assert float(np.mean(list(by_q.values()))) == pytest.approx(means[name], abs=1e-12)
        assert saved["mean"][name] == means[name]
    run = per_query.read_run(per_query.run_path(folder, "student", "test"))
    assert run == ev.dense_run(cfg, params, ds, "test", progress=False)
    assert all(len(r) == cfg.retrieval.eval_depth for r in run.values())
    assert str(folder).endswith("rounds/r01/eval/per_query")
    bm = ev.score_run(ev.bm25_run(ds, "test", 20, progress=False), ds, "test", folder, "bm25")
    assert per_query.read_metrics(per_query.metrics_path(folder, "bm25", "test"))["mean"] == bm


# --- real data ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def scifact_minilm():
    """(dataset, config, corpus emb [N, 384], query emb [Q, 384]) for zero-shot all-MiniLM-L6-v2.

    Encoding the corpus takes minutes on 2 cores, so embeddings are cached under the temp dir.
    """
    if not os.environ.get("MD2PR_DATA_DIR"):
        pytest.skip("MD2PR_DATA_DIR is not set")
    from md2pr_jax.config import MINILM_ID
    from md2pr_jax.data import prepare_dataset
    from md2pr_jax.params import init_student_params

    cache = os.path.join(tempfile.gettempdir(), "md2pr_test_cache")
    cfg = base_config()
    cfg.data.dir = os.environ["MD2PR_DATA_DIR"]
    cfg.student.init = MINILM_ID
    cfg.data.max_query_len = 64  # no SciFact claim is longer: queries are never cut
    ds = prepare_dataset(cfg, cache)
    path = os.path.join(cache, f"scifact_minilm_{cfg.data.max_passage_len}_{cfg.data.max_query_len}.npz")
    if os.path.exists(path):
        z = np.load(path)
        return ds, cfg, z["docs"], z["queries"]
    params = init_student_params(cfg)
    docs, _ = ev.encode_corpus(cfg, params, ds)
    queries = ev.encode_queries(cfg, params, ds, np.arange(ds.num_queries))
    np.savez(path, docs=docs, queries=queries)
    return ds, cfg, docs, queries


@pytest.mark.data
def test_scann_recall_on_scifact(scifact_minilm):
    from md2pr_jax.retrieval.index import ann_recall, build_index

    _, cfg, docs, queries = scifact_minilm
    # 32 of the 72 leaves: on this small corpus, whose queries (claims) sit away from the
    # documents' clusters, the default 8 leaves give recall@10 0.94. The tree's k-means is not
    # deterministic: over repeated builds 24 leaves gave 0.990-0.994 (one CI run 0.9898), 32
    # leaves 0.9965-0.9981, so 32 keeps the bar below from failing by chance.
    cfg.retrieval.scann_leaves_to_search = 32
    index = build_index(docs, cfg.retrieval, depth=10, force="scann")
    recall = ann_recall(index, queries, docs, 10)
    assert recall >= 0.99, (recall, index.params)


@pytest.mark.data
def test_zero_shot_minilm_scifact(scifact_minilm):
    """Zero-shot all-MiniLM-L6-v2 at max passage length 128: nDCG@10 0.624 measured here (the
    published 0.645 uses length 256, which this stack reproduces: 0.6451, benchmarks/encode.py)."""
    from md2pr_jax.retrieval.index import exact_search
    from md2pr_jax.retrieval.bm25 import to_run

    ds, _, docs, queries = scifact_minilm
    rows = ds.query_indices("test")
    scores, idx = exact_search(queries[rows], docs, 100)
    m = metrics.evaluate(to_run([ds.query_ids[r] for r in rows], ds.doc_ids, idx, scores), ds.qrels["test"])
    assert m["ndcg@10"] == pytest.approx(0.624, abs=0.005), m
