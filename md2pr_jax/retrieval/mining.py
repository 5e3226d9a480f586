"""Top-K candidates for every query across corpus shards and processes, positives removed.

Each process holds one contiguous shard of the corpus (`encode.process_slice`) in an index
and searches it for all queries; the per-shard top lists, in global corpus indices, are
gathered from every process (`multihost_utils.process_allgather`) and merged into the
global top-K — the same list one process searching the whole corpus returns (exactly so
with exact search; equal scores keep the lower corpus index).
"""

from __future__ import annotations

from typing import Iterable, Sequence, Union

import jax
import numpy as np

from md2pr_jax.retrieval.index import Index

Shards = Union[Index, Sequence[tuple[Index, int]]]


def _as_shards(index_or_shards: Shards, offset: int) -> list[tuple[Index, int]]:
    if isinstance(index_or_shards, Index):
        return [(index_or_shards, offset)]
    shards = list(index_or_shards)
    if not shards or not all(isinstance(s, tuple) and isinstance(s[0], Index) for s in shards):
        raise TypeError("mine()/search(): pass an Index or a list of (Index, global offset) pairs")
    return shards


def merge_topk(scores: np.ndarray, idx: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Merges candidate lists scores/idx [M, C] (any order, -1 = empty) into the top-k [M, k].

    Order: score descending, then global index ascending; empty slots (-1, -inf) go last.
    """
    s = np.where(idx >= 0, scores, -np.inf).astype(np.float32)
    key_idx = np.where(idx >= 0, idx, np.iinfo(np.int64).max)
    order = np.lexsort((key_idx, -s), axis=1)[:, :k]
    top_s = np.take_along_axis(s, order, 1)
    top_i = np.take_along_axis(idx, order, 1).astype(np.int64)
    top_i[~np.isfinite(top_s)] = -1
    if top_s.shape[1] < k:  # fewer candidates than k in all shards together
        pad = k - top_s.shape[1]
        top_s = np.pad(top_s, ((0, 0), (0, pad)), constant_values=-np.inf)
        top_i = np.pad(top_i, ((0, 0), (0, pad)), constant_values=-1)
    return top_s, top_i


def excluded_mask(idx: np.ndarray, exclude: Sequence[Iterable[int]]) -> np.ndarray:
    """bool [M, C]: idx[m, c] is one of exclude[m] (-1 never is). One sorted membership test
    over (row, index) keys: a per-row np.isin took 23 s for 125k queries x 51 candidates (one
    pod host's share of MS MARCO), this well under a second."""
    idx = np.asarray(idx, np.int64)
    sizes = np.fromiter((len(e) for e in exclude), np.int64, count=len(exclude))
    if not sizes.sum() or idx.size == 0:
        return np.zeros(idx.shape, bool)
    ex = np.fromiter((int(d) for e in exclude for d in e), np.int64, count=int(sizes.sum()))
    width = int(max(idx.max(), ex.max())) + 2  # keys row * width + (index + 1): distinct per (row, index)
    rows = np.arange(len(idx), dtype=np.int64)
    keys = rows[:, None] * width + (idx + 1)
    ex_keys = np.sort(np.repeat(rows, sizes) * width + (ex + 1))
    at = np.minimum(np.searchsorted(ex_keys, keys), len(ex_keys) - 1)
    return (ex_keys[at] == keys) & (idx >= 0)


def _drop_excluded(idx: np.ndarray, scores: np.ndarray, exclude: Sequence[Iterable[int]]) -> None:
    hit = excluded_mask(idx, exclude)
    idx[hit], scores[hit] = -1, -np.inf


def allgather(x: np.ndarray) -> np.ndarray:
    """Stacks `x` from every JAX process: [P, ...] (a no-op [1, ...] with one process)."""
    if jax.process_count() == 1:
        return np.asarray(x)[None]
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=False))


def search(
    q_emb: np.ndarray,
    index_or_shards: Shards,
    k: int,
    exclude: Sequence[Iterable[int]] | None = None,
    offset: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Global top-k over every process's shards: q_emb [M, D] -> (scores [M, k], idx [M, k]).

    Args:
      q_emb: all query embeddings, the same on every process.
      index_or_shards: this process's Index (whose row 0 is global corpus row `offset`),
        or a list of (Index, global offset) pairs.
      k: candidates per query.
      exclude: per query, global corpus indices to leave out (the labelled positives).
    Returns scores float32 and global corpus indices int64, best first; -1 / -inf where
    fewer than k documents remain.
    """
    q_emb = np.asarray(q_emb, np.float32)
    if exclude is not None and len(exclude) != len(q_emb):
        raise ValueError(f"exclude has {len(exclude)} entries for {len(q_emb)} queries; give one set per query")
    # Per query, search deep enough that k survive the exclusion in every shard.
    extra = max((len(e) for e in exclude), default=0) if exclude is not None else 0
    all_s, all_i = [], []
    for index, off in _as_shards(index_or_shards, offset):
        depth = min(k + extra, index.size)
        s, i = index.search(q_emb, depth)
        i = np.where(i >= 0, i + off, -1)
        if exclude is not None:
            _drop_excluded(i, s, exclude)
        s, i = merge_topk(s, i, k)
        all_s.append(s)
        all_i.append(i)
    s, i = merge_topk(np.concatenate(all_s, 1), np.concatenate(all_i, 1), k)
    if jax.process_count() > 1:
        gs, gi = allgather(s), allgather(i)  # [P, M, k]
        s, i = merge_topk(np.concatenate(list(gs), 1), np.concatenate(list(gi), 1), k)
    return s, i


def mine(
    q_emb: np.ndarray,
    index_or_shards: Shards,
    k: int,
    exclude: Sequence[Iterable[int]],
    offset: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """Hard-negative candidates: the global top-k per query with its positives removed.

    Returns (idx [M, k] int64 global corpus indices, scores [M, k] float32), best first.
    """
    s, i = search(q_emb, index_or_shards, k, exclude=exclude, offset=offset)
    return i, s


def gather_rows(local: np.ndarray, total: int, dtype=np.float32) -> np.ndarray:
    """Concatenates each process's contiguous slice [n_p, D] (see `encode.process_slice`) into
    [total, D] of `dtype` (float32 embeddings by default; int64 for indices)."""
    local = np.asarray(local, dtype)
    if jax.process_count() == 1:
        if len(local) != total:
            raise ValueError(f"gather_rows: one process holds {len(local)} rows, expected {total}")
        return local
    from md2pr_jax.retrieval.encode import process_slice

    slices = [process_slice(total, p) for p in range(jax.process_count())]
    per = max(b - a for a, b in slices)
    dim = int(allgather(np.array([local.shape[1] if local.ndim == 2 else 0])).max())
    padded = np.zeros((per, dim), dtype)
    if len(local):
        padded[: len(local)] = local
    rows = allgather(padded)  # [P, per, D]
    # astype: the gather goes through devices, where int64 is int32 unless jax_enable_x64 is set
    return np.concatenate([rows[p, : b - a] for p, (a, b) in enumerate(slices)]).astype(dtype)
