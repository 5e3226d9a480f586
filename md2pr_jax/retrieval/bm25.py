"""BM25 (bm25s, Lucene variant) with English stopwords and the Snowball English stemmer.

The baseline row of every results table and the first round's negatives. At MS MARCO size
(8.8M passages, 503k training queries) three things matter: the search is multi-threaded
(`threads`: the host's cores unless configured), the queries are split across JAX processes
and the top-k gathered (`search_processes`), and the index is built once per host and reused
from a local folder (`BM25Retriever.cached`) by every stage that needs it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Sequence

import numpy as np

INDEX_VERSION = 1  # bumped when the saved index's layout or tokenization changes


def _tokenizer():
    import bm25s
    import Stemmer

    return bm25s.tokenization.Tokenizer(lower=True, stopwords="en", stemmer=Stemmer.Stemmer("english"))


class BM25Retriever:
    """`BM25Retriever.build(doc_texts)` then `.search(query_texts, k) -> (idx [M, k], scores [M, k])`.

    Indices are positions in `doc_texts`; rows are best first; where fewer than k documents
    match a query (or the corpus is smaller than k) the row ends in index -1, score -inf.
    """

    def __init__(self, model, tokenizer, num_docs: int, n_threads: int = 0):
        self.model, self.tokenizer, self.num_docs = model, tokenizer, num_docs
        self.n_threads = threads(n_threads)

    @classmethod
    def build(cls, doc_texts: Sequence[str], k1: float = 1.5, b: float = 0.75, progress: bool = True,
              n_threads: int = 0) -> "BM25Retriever":
        """Indexes `doc_texts` (for BEIR: title + ' ' + text); searches on `threads(n_threads)`."""
        import bm25s

        if len(doc_texts) == 0:
            raise ValueError("BM25Retriever.build: the corpus is empty")
        tok = _tokenizer()
        corpus_tokens = tok.tokenize(list(doc_texts), update_vocab=True, return_as="tuple", show_progress=progress)
        model = bm25s.BM25(k1=k1, b=b, method="lucene")
        model.index(corpus_tokens, show_progress=progress)
        return cls(model, tok, len(doc_texts), n_threads)

    def save(self, folder: str) -> None:
        """Writes the index and the tokenizer's vocabulary into the local folder `folder`."""
        os.makedirs(folder, exist_ok=True)
        self.model.save(folder, show_progress=False)
        self.tokenizer.save_vocab(folder)
        with open(os.path.join(folder, "md2pr_bm25.json"), "w") as f:
            json.dump({"num_docs": self.num_docs, "version": INDEX_VERSION}, f)

    @classmethod
    def load(cls, folder: str, n_threads: int = 0) -> "BM25Retriever":
        """An index written by `save`, its arrays memory-mapped."""
        import bm25s

        with open(os.path.join(folder, "md2pr_bm25.json")) as f:
            meta = json.load(f)
        model = bm25s.BM25.load(folder, mmap=True, show_progress=False, verbosity=0)
        tok = _tokenizer()
        tok.load_vocab(folder)
        return cls(model, tok, int(meta["num_docs"]), n_threads)

    @classmethod
    def cached(cls, doc_texts: Sequence[str], folder: str, k1: float = 1.5, b: float = 0.75,
               progress: bool = True, n_threads: int = 0) -> "BM25Retriever":
        """The index of `doc_texts` kept in the local folder `folder` (one per corpus and k1, b:
        name it after the prepared dataset): loaded when there, else built once and saved
        (into a temporary sibling renamed into place, so concurrent processes of one host and
        a killed build never leave half an index)."""
        target = os.path.join(folder, f"k1_{k1:g}-b_{b:g}-v{INDEX_VERSION}")
        if os.path.exists(os.path.join(target, "md2pr_bm25.json")):
            index = cls.load(target, n_threads)
            if index.num_docs == len(doc_texts):
                return index
            shutil.rmtree(target, ignore_errors=True)  # another corpus under the same name: rebuild
        index = cls.build(doc_texts, k1, b, progress, n_threads)
        os.makedirs(folder, exist_ok=True)
        tmp = tempfile.mkdtemp(prefix=".incomplete-", dir=folder)
        try:
            index.save(tmp)
            os.replace(tmp, target)
        except OSError:
            if not os.path.exists(os.path.join(target, "md2pr_bm25.json")):  # not another process first
                raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return index

    def search_processes(self, query_texts: Sequence[str], k: int, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """`search` with the queries split across JAX processes (contiguous slices,
        `encode.process_slice`) and the rows gathered: every process gets all [M, k] rows.
        Every process must call it with the same queries."""
        from md2pr_jax.retrieval.encode import process_slice
        from md2pr_jax.retrieval.mining import gather_rows

        a, b = process_slice(len(query_texts))
        idx, scores = self.search(list(query_texts[a:b]), k, progress)
        return gather_rows(idx, len(query_texts), np.int64), gather_rows(scores, len(query_texts), np.float32)

    def search(self, query_texts: Sequence[str], k: int, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """query_texts [M] -> (idx [M, k] int64, scores [M, k] float32), on `self.n_threads` threads."""
        m = len(query_texts)
        idx = np.full((m, k), -1, np.int64)
        scores = np.full((m, k), -np.inf, np.float32)
        if m == 0:
            return idx, scores
        # Query words outside the corpus vocabulary score nothing: drop them rather than grow the vocab.
        q_tokens = self.tokenizer.tokenize(list(query_texts), update_vocab=False, return_as="string", show_progress=False)
        keep = [i for i, t in enumerate(q_tokens) if t]
        if not keep:
            return idx, scores
        k_eff = min(k, self.num_docs)
        got, sc = self.model.retrieve([q_tokens[i] for i in keep], k=k_eff, show_progress=progress,
                                      n_threads=self.n_threads if self.n_threads > 1 else 0)
        got, sc = np.asarray(got, np.int64), np.asarray(sc, np.float32)
        # A zero BM25 score means no query term occurs in the document: not retrieved.
        got = np.where(sc > 0, got, -1)
        sc = np.where(sc > 0, sc, -np.inf)
        idx[keep, :k_eff], scores[keep, :k_eff] = got, sc
        return idx, scores

    def pair_scores(self, query_texts: Sequence[str], pairs_q: np.ndarray, pairs_d: np.ndarray) -> np.ndarray:
        """BM25(q, d) / max_d' BM25(q, d') for each pair (query_texts[pairs_q[i]], doc pairs_d[i]):
        float32 [N] in [0, 1], 0 where the query matches nothing (or d is -1). Scale-free per
        query, so it can be added to another ranker's logits (the hybrid teacher)."""
        pairs_q, pairs_d = np.asarray(pairs_q, np.int64), np.asarray(pairs_d, np.int64)
        out = np.zeros(len(pairs_q), np.float32)
        if len(pairs_q) == 0:
            return out
        order = np.argsort(pairs_q, kind="stable")
        bounds = np.flatnonzero(np.diff(pairs_q[order])) + 1
        for group in np.split(order, bounds):
            q = int(pairs_q[group[0]])
            tokens = self.tokenizer.tokenize([query_texts[q]], update_vocab=False, return_as="string",
                                             show_progress=False)[0]
            if not tokens:
                continue
            all_scores = np.asarray(self.model.get_scores(tokens), np.float32)
            top = float(all_scores.max())
            if top <= 0:
                continue
            d = pairs_d[group]
            out[group] = np.where(d >= 0, all_scores[np.maximum(d, 0)] / top, 0.0)
        return out


def threads(n: int = 0) -> int:
    """Search threads: n when positive, else the cores this process may run on."""
    if n > 0:
        return int(n)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def to_run(
    query_ids: Sequence[str], doc_ids: Sequence[str], idx: np.ndarray, scores: np.ndarray
) -> dict[str, dict[str, float]]:
    """(idx [M, k], scores [M, k]) -> {qid: {docid: score}} for `metrics.evaluate` (skips -1 slots).

    Serves every retriever (BM25, dense, reranked): indices are positions in `doc_ids`.
    """
    if len(query_ids) != len(idx):
        raise ValueError(f"to_run: {len(query_ids)} query ids for {len(idx)} result rows")
    run = {}
    for qid, row_i, row_s in zip(query_ids, idx, scores):
        run[qid] = {doc_ids[i]: float(s) for i, s in zip(row_i, row_s) if i >= 0}
    return run
