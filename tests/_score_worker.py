"""Subprocess worker for the teacher-scoring tests (not collected by pytest).

    python tests/_score_worker.py chunks FOLDER OUT   score 12,800 pairs in chunks of 64 into FOLDER,
                                                      the logits to OUT.npy; 'chunk c' per chunk, then
                                                      'done {info}' on stdout
    python tests/_score_worker.py devices             the scorer on every local device against one device
    python tests/_score_worker.py processes FOLDER    one of 2 processes (MD2PR_* distributed variables):
                                                      chunked scoring and BM25 split across the processes

Set XLA_FLAGS (device count) before starting it: jax reads it on import.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

PAIRS, CHUNK, BATCH = 12800, 64, 16


class Tokens:
    """Query row q and doc row d as deterministic token rows inside the vocabulary."""

    def query_tokens(self, rows):
        rows = np.asarray(rows)[:, None]
        return ((rows * 7 + np.arange(8)) % 5000 + 1000).astype(np.int32), np.ones((len(rows), 8), np.int32)

    def doc_tokens(self, rows, max_len=None):
        rows, n = np.asarray(rows)[:, None], max_len or 16
        return ((rows * 13 + np.arange(n)) % 5000 + 1000).astype(np.int32), np.ones((len(rows), n), np.int32)


def setup():
    from conftest import make_tiny_config

    from md2pr_jax.models import teacher_from_config
    from md2pr_jax.params import init_teacher_params

    config = make_tiny_config(**{"teacher_train.score_batch_size": BATCH, "teacher_train.score_chunk_size": CHUNK})
    return config, teacher_from_config(config), init_teacher_params(config)


class Announced:
    """A scorer that prints 'chunk k' after each chunk it scores (the test kills on it)."""

    def __init__(self, scorer):
        self.scorer, self.batch_size, self.calls = scorer, scorer.batch_size, 0

    def score(self, q, d, attn_out=None, progress=True):
        out = self.scorer.score(q, d, attn_out=attn_out, progress=progress)
        print(f"chunk {self.calls}", flush=True)
        self.calls += 1
        return out


def chunks(folder: str, out: str) -> None:
    from md2pr_jax.teacher import TeacherScorer, chunk_size, score_in_chunks

    config, teacher, params = setup()
    rng = np.random.default_rng(0)
    q, d = rng.integers(0, 500, PAIRS), rng.integers(0, 3000, PAIRS)
    scorer = Announced(TeacherScorer(config, teacher, Tokens(), [params]))
    logits, info = score_in_chunks(scorer, q, d, folder, chunk_size(config, scorer.batch_size))
    np.save(out, logits)
    print("done " + json.dumps(info), flush=True)


def devices() -> None:
    from md2pr_jax.teacher import PairScorer, scoring_mesh

    config, teacher, params = setup()
    rng = np.random.default_rng(1)
    q, d = rng.integers(0, 500, 37), rng.integers(0, 3000, 37)
    every = PairScorer(config, teacher, params, Tokens(), batch_size=8)
    one = PairScorer(config, teacher, params, Tokens(), scoring_mesh(config, jax.local_devices()[:1]), batch_size=8)
    _, batch = next(every._batches(q, d))
    scores, _ = every._fn(every.params, batch)
    print(json.dumps({
        "devices": len(jax.local_devices()),
        "param_devices": min(len(x.sharding.device_set) for x in jax.tree.leaves(every.params)),
        "params_on_device": all(isinstance(x, jax.Array) for x in jax.tree.leaves(every.params)),
        "batch_shards": sorted(s.data.shape[0] for s in batch["q_ids"].addressable_shards),
        "score_shards": len(scores.addressable_shards),
        "max_diff": float(np.abs(every.score(q, d, progress=False) - one.score(q, d, progress=False)).max()),
    }), flush=True)


def processes(folder: str) -> None:
    """Chunks split across the processes (each scores its own), every process gets all the
    logits, equal to scoring them all here; BM25's split search equals the whole search."""
    from md2pr_jax.main import maybe_initialize_distributed

    maybe_initialize_distributed(None)
    from md2pr_jax.retrieval.bm25 import BM25Retriever
    from md2pr_jax.teacher import TeacherScorer, score_in_chunks

    config, teacher, params = setup()
    rng = np.random.default_rng(3)
    q, d = rng.integers(0, 500, 600), rng.integers(0, 3000, 600)
    scorer = TeacherScorer(config, teacher, Tokens(), [params])
    logits, info = score_in_chunks(scorer, q, d, folder, 64)
    alone = scorer.score(q, d, progress=False)
    docs = [f"doc {i} about {'cats' if i % 3 else 'dogs'} number {i % 17} and word{i % 29}" for i in range(400)]
    queries = [f"cats number {i % 17} word{i % 29}" for i in range(53)]
    bm25 = BM25Retriever.build(docs, progress=False, n_threads=2)
    split, whole = bm25.search_processes(queries, 7, progress=False), bm25.search(queries, 7, progress=False)
    print(json.dumps({
        "process": jax.process_index(), "processes": jax.process_count(), "info": info,
        "logits_diff": float(np.abs(logits - alone).max()),
        "bm25_idx_equal": bool((split[0] == whole[0]).all()), "bm25_idx_dtype": str(split[0].dtype),
        "bm25_scores_equal": bool((split[1] == whole[1]).all()), "bm25_shape": list(split[0].shape),
    }), flush=True)


if __name__ == "__main__":
    {"chunks": lambda: chunks(sys.argv[2], sys.argv[3]), "devices": devices,
     "processes": lambda: processes(sys.argv[2])}[sys.argv[1]]()
