"""Exact search against numpy; ScaNN build, search, save/load and recall against exact."""

import numpy as np
import pytest

from md2pr_jax.config import base_config
from md2pr_jax.retrieval import index as I


def clustered(rng, n, d, centers=20, noise=0.3):
    c = rng.normal(size=(centers, d))
    x = c[rng.integers(0, centers, size=n)] + noise * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_exact_search_matches_numpy():
    rng = np.random.default_rng(0)
    db, q = clustered(rng, 1003, 16), clustered(rng, 37, 16)
    s, i = I.exact_search(q, db, 7, chunk=100, query_chunk=16)
    full = q @ db.T
    want = np.argsort(-full, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(i, want)
    np.testing.assert_allclose(s, np.take_along_axis(full, want, 1), atol=1e-5)


def test_exact_search_ties_and_short_corpus():
    db = np.array([[1.0, 0], [1.0, 0], [0, 1.0]], np.float32)
    s, i = I.exact_search(np.array([[1.0, 0]], np.float32), db, 5, chunk=1)
    np.testing.assert_array_equal(i, [[0, 1, 2, -1, -1]])
    assert np.isneginf(s[0, 3:]).all()
    with pytest.raises(ValueError, match=r"shape \[n, 3\]"):
        I.exact_search(np.zeros((1, 3), np.float32), db, 1)


def test_build_index_exact_and_scann(tmp_path):
    rng = np.random.default_rng(1)
    db, q = clustered(rng, 4000, 32), clustered(rng, 50, 32)
    rc = base_config().retrieval
    small = I.build_index(db, rc, depth=10)
    assert small.kind == "exact"
    assert I.ann_recall(small, q, db, 10) == 1.0
    scann_idx = I.build_index(db, rc, depth=10, force="scann")
    assert scann_idx.kind == "scann" and scann_idx.params["num_leaves"] == 63
    r = I.ann_recall(scann_idx, q, db, 10)
    assert r >= 0.9, r
    scann_idx.save(str(tmp_path / "scann"))
    back = I.load_index(str(tmp_path / "scann"))
    np.testing.assert_array_equal(back.search(q, 10)[1], scann_idx.search(q, 10)[1])
    small.save(str(tmp_path / "exact"))
    np.testing.assert_array_equal(I.load_index(str(tmp_path / "exact")).search(q, 5)[1], small.search(q, 5)[1])
    with pytest.raises(FileNotFoundError, match="no index"):
        I.load_index(str(tmp_path))
