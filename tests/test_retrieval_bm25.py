"""BM25: stemming and stopwords, -1 padding, run dicts; SciFact figure under the data marker."""

import json
import os

import numpy as np
import pytest

from md2pr_jax.retrieval.bm25 import BM25Retriever, to_run

DOCS = [
    "Cats are running across the garden.",
    "The stock market fell sharply today.",
    "A dog runs after the cat.",
    "Quantum computers use qubits.",
]


def test_search_stems_and_pads():
    r = BM25Retriever.build(DOCS, progress=False)
    idx, scores = r.search(["running cats", "the of and", "qubit", "zebra"], k=6, progress=False)
    assert idx.shape == (4, 6) and scores.dtype == np.float32
    assert set(idx[0, :2].tolist()) == {0, 2}  # 'running'~'runs', 'cats'~'cat' by stemming
    assert (idx[1] == -1).all() and np.isneginf(scores[1]).all()  # stopwords only
    assert idx[2, 0] == 3 and (idx[2, 1:] == -1).all()
    assert (idx[3] == -1).all()  # unknown word
    run = to_run(["a", "b", "c", "d"], ["d0", "d1", "d2", "d3"], idx, scores)
    assert set(run["a"]) == {"d0", "d2"} and run["b"] == {} and list(run["c"]) == ["d3"]


def test_pair_scores_are_bm25_over_the_querys_best():
    r = BM25Retriever.build(DOCS, progress=False)
    queries = ["running cats", "zebra", "qubit"]
    idx, scores = r.search(queries, k=4, progress=False)
    q = np.array([0, 0, 0, 1, 2, 2, 0])
    d = np.array([0, 2, 1, 0, 3, 0, -1])
    got = r.pair_scores(queries, q, d)
    best = scores[0, 0]
    want0 = {int(i): s / best for i, s in zip(idx[0], scores[0]) if i >= 0}
    np.testing.assert_allclose(got[:3], [want0[0], want0[2], 0.0], rtol=1e-6)
    assert got[3] == 0.0  # unknown word: the query matches nothing
    assert got[4] == 1.0 and got[5] == 0.0 and got[6] == 0.0  # the best doc; a non-match; padding
    assert max(got[:2]) == 1.0


def test_empty_corpus_error():
    with pytest.raises(ValueError, match="empty"):
        BM25Retriever.build([])


@pytest.mark.data
def test_scifact_bm25_ndcg():
    from md2pr_jax.retrieval.metrics import evaluate

    root = os.environ.get("MD2PR_DATA_DIR")
    if not root:
        pytest.skip("MD2PR_DATA_DIR is not set")
    d = os.path.join(root, "scifact")
    docs = [json.loads(line) for line in open(os.path.join(d, "corpus.jsonl"))]
    queries = {o["_id"]: o["text"] for o in map(json.loads, open(os.path.join(d, "queries.jsonl")))}
    qrels = {}
    for line in list(open(os.path.join(d, "qrels", "test.tsv")))[1:]:
        q, c, s = line.rstrip("\n").split("\t")
        qrels.setdefault(q, {})[c] = int(s)
    r = BM25Retriever.build([(x["title"] + " " + x["text"]).strip() for x in docs], progress=False)
    qids = list(qrels)
    idx, scores = r.search([queries[q] for q in qids], 100, progress=False)
    m = evaluate(to_run(qids, [x["_id"] for x in docs], idx, scores), qrels, {"ndcg": (10,)})
    assert m["ndcg@10"] == pytest.approx(0.686, abs=0.005)


def test_threads_save_load_and_cached_index(tmp_path, monkeypatch):
    """Threaded search equals one thread; an index saved and loaded (memory-mapped) searches
    alike; `cached` builds once and then loads from its folder."""
    from md2pr_jax.retrieval import bm25 as B

    docs = DOCS * 50 + ["cats and dogs in the garden", "qubits and cats"]
    queries = ["running cats", "qubit", "garden dog", "zebra", "stock"] * 7
    one = BM25Retriever.build(docs, progress=False, n_threads=1)
    two = BM25Retriever.build(docs, progress=False, n_threads=2)
    assert one.n_threads == 1 and two.n_threads == 2 and B.threads(0) >= 1
    want = one.search(queries, 5, progress=False)
    for got in (two.search(queries, 5, progress=False),):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_array_equal(got[1], want[1])

    first = BM25Retriever.cached(docs, str(tmp_path / "idx"), progress=False, n_threads=2)
    def rebuilt(*_a, **_k):
        raise RuntimeError("rebuilt the index")

    monkeypatch.setattr(BM25Retriever, "build", classmethod(rebuilt))
    again = BM25Retriever.cached(docs, str(tmp_path / "idx"), progress=False, n_threads=2)
    assert again is not first and again.num_docs == len(docs) and again.n_threads == 2
    for got in (first.search(queries, 5, progress=False), again.search(queries, 5, progress=False)):
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], rtol=1e-6)
    np.testing.assert_allclose(again.pair_scores(queries, [0, 1], [2, 3]), one.pair_scores(queries, [0, 1], [2, 3]))
    assert [p.name for p in (tmp_path / "idx").iterdir()] == ["k1_1.5-b_0.75-v1"]  # no temporary left
    with pytest.raises(RuntimeError, match="rebuilt"):  # another corpus under that name is rebuilt
        BM25Retriever.cached(docs[:10], str(tmp_path / "idx"), progress=False)


def test_search_processes_with_one_process_is_search():
    r = BM25Retriever.build(DOCS, progress=False)
    queries = ["running cats", "qubit", "zebra"]
    got, want = r.search_processes(queries, 3, progress=False), r.search(queries, 3, progress=False)
    assert got[0].dtype == np.int64 and got[1].dtype == np.float32
    np.testing.assert_array_equal(got[0], want[0])
    np.testing.assert_array_equal(got[1], want[1])
