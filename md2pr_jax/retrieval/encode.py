"""Jitted, batched encoding of tokenized queries and passages into embeddings.

Texts are sorted by length and each batch is padded only to the smallest *bucket* length
that holds it (multiples of `bucket_step` up to the maximum), so a corpus compiles a handful
of shapes and wastes little compute on padding. Each batch is split over the process's local
devices (`ShardedApply`: every local chip works, not device 0 alone). With several JAX
processes each encodes a contiguous slice of the corpus (`process_slice`), and mining/search
merge across processes.

Token sources follow a small protocol so plain arrays work in tests:
  `fetch(indices [n]) -> (ids [n, L] int, mask [n, L] int)` and `lengths [N]` (tokens per row).
`ArrayTokens(ids, mask)` adapts two arrays to it.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

ApplyFn = Callable[[np.ndarray, np.ndarray], jax.Array]  # (ids [B, L], mask [B, L]) -> emb [B, D]


class TokenSource(Protocol):
    """Tokenized texts: `lengths` [N] and `__call__(indices) -> (ids [n, L], mask [n, L])`."""

    lengths: np.ndarray

    def __call__(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]: ...


@dataclass
class ArrayTokens:
    """A TokenSource over in-memory (or memory-mapped) arrays ids [N, L], mask [N, L]."""

    ids: np.ndarray
    mask: np.ndarray

    def __post_init__(self):
        if self.ids.shape != self.mask.shape or self.ids.ndim != 2:
            raise ValueError(f"ids {self.ids.shape} and mask {self.mask.shape} must both be [N, L]")
        self.lengths = np.asarray(self.mask).sum(1).astype(np.int64)

    def __call__(self, indices):
        return np.asarray(self.ids[indices]), np.asarray(self.mask[indices])

    def __len__(self):
        return self.ids.shape[0]


@dataclass
class CallableTokens:
    """A TokenSource from a fetch function and the lengths (e.g. the data module's `doc_tokens`)."""

    fetch: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
    lengths: np.ndarray

    def __call__(self, indices):
        return self.fetch(indices)

    def __len__(self):
        return len(self.lengths)


_JITTED: dict[tuple[str, str], Callable] = {}


def local_shardings(devices) -> tuple:
    """(replicated, rows): the NamedShardings `ShardedApply` uses over `devices` (a 1-D mesh
    'batch'): params replicated on every device, a batch's rows split across them."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.asarray(list(devices), dtype=object), ("batch",))
    return NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("batch"))


class ShardedApply:
    """(ids [B, L], mask [B, L]) -> emb [B, D] float32, each batch split over this process's
    local devices (a 1-D mesh over `jax.local_devices()`), the params replicated on them once.

    A host numpy batch handed to a plain jitted function lands on local device 0 alone; here it
    is placed row-sharded, so every local chip encodes B / num_devices rows. B is padded up to
    a multiple of the device count when it is not one (`encode` picks batch sizes that are)."""

    def __init__(self, run: Callable, params, devices=None):
        devices = list(jax.local_devices() if devices is None else devices)
        self.num_devices = len(devices)
        replicated, self.rows = local_shardings(devices)
        self.params = jax.device_put(params, replicated)
        self.run = run

    def __call__(self, ids, mask) -> jax.Array:
        ids, mask = np.asarray(ids, np.int32), np.asarray(mask, np.int32)
        n = ids.shape[0]
        pad = -n % self.num_devices
        if pad:
            ids, mask = (np.concatenate([x, np.repeat(x[:1], pad, 0)]) for x in (ids, mask))
        emb = self.run(self.params, jax.device_put(ids, self.rows), jax.device_put(mask, self.rows))
        return emb[:n] if pad else emb


def student_apply_fn(student, params, tower: str = "passage", devices=None) -> ShardedApply:
    """A jitted (ids, mask) -> embedding [B, D] float32 for a DualEncoder and its params, each
    batch split over this process's local devices (`ShardedApply`; `devices` to choose others).

    Params are an argument of the jitted function (not baked-in constants), and the jitted
    function is shared by every call with an equal module, so one compile per bucket shape
    serves every checkpoint and every round.
    """
    return ShardedApply(tower_fn(student, tower), params, devices)


def tower_fn(student, tower: str = "passage") -> Callable:
    """The jitted `(params, ids [B, L], mask [B, L]) -> emb [B, D] float32` of one tower of a
    DualEncoder, shared by every call with an equal module (what `student_apply_fn` wraps, and
    what benchmarks/pod_plan.py compiles for a TPU topology)."""
    if tower not in ("query", "passage"):
        raise ValueError(f"tower must be 'query' or 'passage', got {tower!r}")
    key = (repr(student), tower)  # linen modules holding dicts are not hashable; repr is their config
    if key not in _JITTED:
        method = getattr(type(student), f"encode_{tower}")

        @jax.jit
        def run(p, ids, mask):
            emb, _ = student.apply({"params": p}, ids, mask, method=method)
            return emb.astype(jnp.float32)

        _JITTED[key] = run
    return _JITTED[key]


def bucket_lengths(max_len: int, step: int = 32) -> list[int]:
    """Bucket lengths: multiples of `step` below `max_len`, then `max_len` itself."""
    return sorted({*range(step, max_len, step), max_len})


def process_slice(n: int, index: int | None = None, count: int | None = None) -> tuple[int, int]:
    """[start, stop) of process `index` of `count` (default: this JAX process) in n rows, contiguous."""
    index = jax.process_index() if index is None else index
    count = jax.process_count() if count is None else count
    per = math.ceil(n / count) if n else 0
    start = min(index * per, n)
    return start, min(start + per, n)


def encode(
    apply_fn: ApplyFn,
    tokens: TokenSource,
    indices: Sequence[int] | np.ndarray | None = None,
    *,
    batch_size: int = 64,
    bucket_step: int = 32,
    max_len: int | None = None,
    progress: bool = True,
    desc: str = "encode",
) -> np.ndarray:
    """Embeds `tokens[indices]` (all rows by default) -> float32 [n, D], in the order of `indices`.

    Args:
      apply_fn: (ids [B, L], mask [B, L]) -> emb [B, D]; see `student_apply_fn`. Where it has
        `num_devices` (a `ShardedApply`), batch_size is rounded up to a multiple of it.
      tokens: a TokenSource (`ArrayTokens(ids, mask)` for plain arrays).
      indices: rows to encode; None = every row. Use `process_slice` for this process's share.
      batch_size: rows per call; the last batch is padded to it so shapes repeat.
      bucket_step: batches are padded to a multiple of this (or max_len), never beyond max_len.
      max_len: the longest sequence (default: the source's width).
    """
    lengths = np.asarray(tokens.lengths)
    indices = np.arange(len(lengths)) if indices is None else np.asarray(indices, np.int64)
    if indices.size == 0:
        return np.zeros((0, 0), np.float32)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    shards = int(getattr(apply_fn, "num_devices", 1))
    batch_size = -(-batch_size // shards) * shards  # every device gets the same number of rows
    if max_len is None:
        max_len = int(np.asarray(tokens(indices[:1])[0]).shape[1])
    buckets = np.asarray(bucket_lengths(max_len, bucket_step))
    order = np.argsort(-lengths[indices], kind="stable")  # longest first: memory peaks early
    out: np.ndarray | None = None
    bar = tqdm(total=len(indices), desc=desc, unit="text", disable=not progress, mininterval=2.0)
    pending = None  # overlap: dispatch batch b+1 before pulling batch b to host
    for start in range(0, len(order), batch_size):
        pos = order[start : start + batch_size]
        ids, mask = tokens(indices[pos])
        ids, mask = np.asarray(ids), np.asarray(mask)
        longest = int(lengths[indices[pos]].max())
        width = int(buckets[np.searchsorted(buckets, min(max(longest, 1), max_len))])
        ids, mask = _fit(ids, width), _fit(mask, width)
        rows = len(pos)
        if rows < batch_size:  # pad the batch with copies of its first row
            fill = batch_size - rows
            ids = np.concatenate([ids, np.repeat(ids[:1], fill, 0)])
            mask = np.concatenate([mask, np.repeat(mask[:1], fill, 0)])
        emb = apply_fn(ids.astype(np.int32), mask.astype(np.int32))
        if pending is not None:
            out = _store(out, pending, len(indices))
            bar.update(len(pending[0]))
        pending = (pos, emb, rows)
    out = _store(out, pending, len(indices))
    bar.update(len(pending[0]))
    bar.close()
    return out


def _fit(x: np.ndarray, width: int) -> np.ndarray:
    """Cuts or zero-pads [n, L] to [n, width] (tokens past a row's length are padding)."""
    if x.shape[1] >= width:
        return x[:, :width]
    return np.pad(x, ((0, 0), (0, width - x.shape[1])))


def _store(out, pending, n):
    pos, emb, rows = pending
    emb = np.asarray(emb, np.float32)[:rows]
    if out is None:
        out = np.empty((n, emb.shape[1]), np.float32)
    out[pos] = emb
    return out


def save_embeddings(path: str, emb: np.ndarray, ids: Sequence[str] | None = None) -> None:
    """Writes emb [N, D] to `path` (.npy) and, if given, the N ids to `path` + '.ids.json'.

    Written to temporary names and renamed, so a killed job never leaves half a file.
    """
    if ids is not None and len(ids) != len(emb):
        raise ValueError(f"save_embeddings({path}): {len(ids)} ids for {len(emb)} embeddings")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp.npy"
    np.save(tmp, np.asarray(emb, np.float32))
    os.replace(tmp, path)
    if ids is not None:
        with open(path + ".ids.json.tmp", "w") as f:
            json.dump(list(ids), f)
        os.replace(path + ".ids.json.tmp", path + ".ids.json")


def load_embeddings(path: str) -> tuple[np.ndarray, list[str] | None]:
    """(memory-mapped emb [N, D], ids or None) as written by `save_embeddings`."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist; write it with save_embeddings()")
    emb = np.load(path, mmap_mode="r")
    ids = None
    if os.path.exists(path + ".ids.json"):
        with open(path + ".ids.json") as f:
            ids = json.load(f)
    return emb, ids
