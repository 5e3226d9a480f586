"""Metrics against pytrec_eval (trec_eval) on random runs and qrels, graded and binary."""

import numpy as np
import pytest

from md2pr_jax.retrieval import metrics

pytrec_eval = pytest.importorskip("pytrec_eval")


def random_case(rng, graded: bool, n_q=30, n_docs=60, ties=True):
    docs = [f"d{i}" for i in range(n_docs)]
    qrels, run = {}, {}
    for q in range(n_q):
        qid = f"q{q}"
        judged = rng.choice(n_docs, size=rng.integers(1, 12), replace=False)
        hi = 3 if graded else 1
        qrels[qid] = {docs[j]: int(rng.integers(0, hi + 1)) for j in judged}
        if q % 7 == 3:  # a query the run lacks entirely
            continue
        got = rng.choice(n_docs, size=rng.integers(1, n_docs), replace=False)
        # Few distinct scores so ties are frequent: trec_eval breaks them by docid descending.
        scores = rng.integers(0, 5, size=len(got)) if ties else rng.normal(size=len(got))
        run[qid] = {docs[j]: float(s) for j, s in zip(got, scores)}
    return run, qrels


def reference(run, qrels, k_ndcg, k_mrr, k_rec):
    """pytrec_eval averaged over every qrels query (missing ones 0), MRR@k via a cut run."""
    measures = {f"ndcg_cut.{k_ndcg}", "map", f"recall.{','.join(map(str, k_rec))}"}
    res = pytrec_eval.RelevanceEvaluator(qrels, measures).evaluate(run)
    cut = {q: {d: docs[d] for d in metrics.rank(docs)[:k_mrr]} for q, docs in run.items()}
    rr = pytrec_eval.RelevanceEvaluator(qrels, {"recip_rank"}).evaluate(cut)
    n = len(qrels)
    out = {
        f"ndcg@{k_ndcg}": sum(r[f"ndcg_cut_{k_ndcg}"] for r in res.values()) / n,
        f"mrr@{k_mrr}": sum(r["recip_rank"] for r in rr.values()) / n,
        "map": sum(r["map"] for r in res.values()) / n,
    }
    for k in k_rec:
        out[f"recall@{k}"] = sum(r[f"recall_{k}"] for r in res.values()) / n
    return out


@pytest.mark.parametrize("graded", [False, True])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pytrec_eval(graded, ties, seed):
    rng = np.random.default_rng(seed)
    run, qrels = random_case(rng, graded, ties=ties)
    ks = {"ndcg": (5,), "mrr": (10,), "recall": (5, 20)}
    ours = metrics.evaluate(run, qrels, ks)
    ref = reference(run, qrels, 5, 10, (5, 20))
    assert ours.keys() == ref.keys()
    for name in ref:
        assert ours[name] == pytest.approx(ref[name], abs=1e-6), name


def test_default_keys_and_hand_case():
    qrels = {"q": {"a": 2, "b": 1, "c": 0}}
    run = {"q": {"c": 3.0, "a": 2.0, "x": 2.0, "b": 1.0}}  # tie a/x: x ranks first (docid desc)
    m = metrics.evaluate(run, qrels)
    assert set(m) == {"ndcg@10", "mrr@10", "recall@100", "recall@1000", "map"}
    # ranking c, x, a, b: relevant at ranks 3 and 4
    assert m["mrr@10"] == pytest.approx(1 / 3)
    assert m["map"] == pytest.approx((1 / 3 + 2 / 4) / 2)
    dcg = 2 / np.log2(4) + 1 / np.log2(5)
    idcg = 2 / np.log2(2) + 1 / np.log2(3)
    assert m["ndcg@10"] == pytest.approx(dcg / idcg)


def test_parse_ks():
    assert metrics.parse_ks(["ndcg@10", "recall@5", "recall@100", "map"]) == {"ndcg": (10,), "recall": (5, 100)}
    with pytest.raises(ValueError, match="unknown metric"):
        metrics.parse_ks(["p@10"])
