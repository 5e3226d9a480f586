"""The training input pipeline (grain): round examples -> per-host numpy batches -> global arrays.

Batches are defined globally and cut per host, never the other way round: global step s of
epoch e takes rows perm_e[j*B:(j+1)*B] (j = s mod steps_per_epoch, perm_e a permutation of
the examples seeded by (seed, epoch)), and process i of n serves rows [i*b, (i+1)*b) of that
global batch, b = B/n. So a seed gives the same global batches on 1 and on N processes; only
the split differs. Each epoch drops its last partial batch.

The iterator's state is {'step': next global step, ...}, JSON-serializable; `set_state`
restores it exactly (checkpointed by the train loop as item 'data').
"""

from __future__ import annotations

import dataclasses
import os
import sys
import threading
from typing import Any, Iterator, Mapping

import grain
import ml_dtypes
import numpy as np

from md2pr_jax.config import teacher_passage_len

_STATE_VERSION = 1


@dataclasses.dataclass
class TrainExamples:
    """One round's training lists (host side, numpy), produced by the filter stage.

    query_idx:      int32 [E]        rows of the prepared dataset's queries
    cand_idx:       int32 [E, C]     rows of its documents; c=0 the positive, then negatives
                                     sorted by teacher score, highest first
    cand_mask:      float32 [E, C]   1 = usable candidate, 0 = filtered false negative / padding
    teacher_scores: float32 [E, C]   teacher logits (zeros if unknown)
    teacher_attn:   optional array-like [E, P, K, Lq, Lp] (bf16; may be an np.memmap)
    kd_mask:        optional float32 [E, C]: the candidates the distillation losses read, where
                    they differ from cand_mask (flagged candidates kept for the teacher's scores)
    """

    query_idx: np.ndarray
    cand_idx: np.ndarray
    cand_mask: np.ndarray
    teacher_scores: np.ndarray
    teacher_attn: Any = None
    kd_mask: np.ndarray | None = None

    def __post_init__(self):
        self.query_idx = np.asarray(self.query_idx, np.int32)
        self.cand_idx = np.asarray(self.cand_idx, np.int32)
        self.cand_mask = np.asarray(self.cand_mask, np.float32)
        self.teacher_scores = np.asarray(self.teacher_scores, np.float32)
        e = self.query_idx.shape[0]
        if self.query_idx.ndim != 1 or self.cand_idx.ndim != 2 or self.cand_idx.shape[0] != e:
            raise ValueError(f"TrainExamples: query_idx must be [E] and cand_idx [E, C]; got {self.query_idx.shape}, {self.cand_idx.shape}")
        if self.kd_mask is not None:
            self.kd_mask = np.asarray(self.kd_mask, np.float32)
        for name in ("cand_mask", "teacher_scores") + (("kd_mask",) if self.kd_mask is not None else ()):
            if getattr(self, name).shape != self.cand_idx.shape:
                raise ValueError(f"TrainExamples.{name} has shape {getattr(self, name).shape}; expected {self.cand_idx.shape}")
        if self.teacher_attn is not None and (self.teacher_attn.ndim != 5 or self.teacher_attn.shape[0] != e):
            raise ValueError(f"TrainExamples.teacher_attn must be [E, P, K, Lq, Lp]; got {self.teacher_attn.shape}")

    def __len__(self) -> int:
        return int(self.query_idx.shape[0])

    @property
    def num_candidates(self) -> int:
        return int(self.cand_idx.shape[1])

    def save(self, directory: str) -> None:
        """One .npy per field in `directory` (teacher_attn loads back memory-mapped)."""
        os.makedirs(directory, exist_ok=True)
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is not None:
                np.save(os.path.join(directory, f.name + ".npy"), np.asarray(value))

    @classmethod
    def load(cls, directory: str) -> "TrainExamples":
        def get(name, mmap=None):
            path = os.path.join(directory, name + ".npy")
            return np.load(path, mmap_mode=mmap) if os.path.exists(path) else None

        attn = get("teacher_attn", "r")
        if attn is not None and attn.dtype == np.dtype("V2"):  # np.save writes bfloat16 as 2-byte voids
            attn = attn.view(ml_dtypes.bfloat16)
        return cls(get("query_idx"), get("cand_idx"), get("cand_mask"), get("teacher_scores"), attn, get("kd_mask"))


def steps_per_epoch(num_examples: int, global_batch: int) -> int:
    """Full global batches in one epoch (the remainder is dropped)."""
    return num_examples // global_batch


class _GlobalBatches:
    """grain random-access source: index = global step -> this process's rows of that batch."""

    def __init__(self, examples, dataset, *, seed, epoch_offset, global_batch, rows, num_steps, lq, lp, with_attn,
                 teacher_lp=None):
        self.examples, self.dataset = examples, dataset
        self.seed, self.epoch_offset = int(seed), int(epoch_offset)
        self.global_batch, self.rows = global_batch, rows
        self.steps_per_epoch = steps_per_epoch(len(examples), global_batch)
        self.num_steps, self.lq, self.lp, self.with_attn = num_steps, lq, lp, with_attn
        self.teacher_lp = teacher_lp  # set: the online teacher's own, longer passages join the batch
        self._perms: dict[int, np.ndarray] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.num_steps

    def permutation(self, epoch: int) -> np.ndarray:
        with self._lock:
            if epoch not in self._perms:
                if len(self._perms) > 2:  # neighbouring epochs only (prefetch may straddle one)
                    self._perms.pop(min(self._perms))
                rng = np.random.default_rng([self.seed, epoch])
                self._perms[epoch] = rng.permutation(len(self.examples))
            return self._perms[epoch]

    def global_rows(self, step: int) -> np.ndarray:
        """int [B]: example indices of global batch `step`."""
        epoch, j = divmod(step, self.steps_per_epoch)
        perm = self.permutation(self.epoch_offset + epoch)
        return perm[j * self.global_batch : (j + 1) * self.global_batch]

    def __getitem__(self, step: int) -> dict[str, np.ndarray]:
        if not 0 <= step < self.num_steps:
            raise IndexError(step)
        rows = self.global_rows(step)[self.rows]  # [b]
        ex = self.examples
        q_ids, q_mask = self.dataset.query_tokens(ex.query_idx[rows], self.lq)  # [b, Lq]
        p_ids, p_mask = self.dataset.doc_tokens(ex.cand_idx[rows], self.lp)  # [b, C, Lp]
        batch = {
            "q_ids": q_ids,
            "q_mask": q_mask,
            "p_ids": p_ids,
            "p_mask": p_mask,
            "cand_mask": ex.cand_mask[rows],
            "teacher_scores": ex.teacher_scores[rows],
            **({"kd_mask": ex.kd_mask[rows]} if ex.kd_mask is not None else {}),
        }
        if self.teacher_lp:
            batch["teacher_p_ids"], batch["teacher_p_mask"] = self.dataset.doc_tokens(ex.cand_idx[rows], self.teacher_lp)
        if self.with_attn:
            order = np.argsort(rows)  # sorted reads are kinder to a memmap
            attn = np.empty((len(rows),) + ex.teacher_attn.shape[1:], ml_dtypes.bfloat16)
            attn[order] = np.asarray(ex.teacher_attn[np.sort(rows)]).astype(ml_dtypes.bfloat16)
            batch["teacher_attn"] = attn  # [b, P, K, Lq, Lp]
        return batch


class TrainIterator(Iterator[dict]):
    """Per-host batches of a round, with a JSON-serializable, exactly resumable state."""

    def __init__(self, source: _GlobalBatches, read_options: grain.ReadOptions, identity: dict):
        self._source, self._identity = source, identity
        self._iter = iter(grain.MapDataset.source(source).to_iter_dataset(read_options))

    @property
    def steps_per_epoch(self) -> int:
        return self._source.steps_per_epoch

    @property
    def step(self) -> int:
        """The global step of the next batch."""
        return int(self._iter.get_state()["next_index"])

    @property
    def epoch(self) -> int:
        """The epoch (epoch_offset included) of the next batch."""
        return self._source.epoch_offset + self.step // self.steps_per_epoch

    def global_rows(self, step: int) -> np.ndarray:
        """Example indices of global batch `step` (all processes)."""
        return self._source.global_rows(step)

    def __next__(self) -> dict[str, np.ndarray]:
        return next(self._iter)

    def get_state(self) -> dict:
        return {"version": _STATE_VERSION, "step": self.step, **self._identity}

    def set_state(self, state: Mapping[str, Any]) -> None:
        """Continues at state['step']; refuses a state from a different stream of batches."""
        for key, value in self._identity.items():
            if key in state and state[key] != value:
                raise ValueError(
                    f"data iterator state has {key}={state[key]!r} but this iterator has {value!r}; "
                    "it was saved for other examples or another config"
                )
        step = int(state["step"])
        if not 0 <= step <= len(self._source):
            raise ValueError(f"data iterator state step {step} is outside [0, {len(self._source)}]")
        self._iter.set_state({"next_index": step})


def make_train_iterator(
    examples: TrainExamples,
    dataset,
    config,
    *,
    seed: int,
    epoch_offset: int = 0,
    num_epochs: int | None = None,
    batch_size: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    local_rows: slice | None = None,
) -> TrainIterator:
    """An iterator over this process's share of each global training batch.

    Args:
      examples: the round's lists (`TrainExamples`).
      dataset: the `RetrievalDataset` the indices refer to (its query_tokens / doc_tokens).
      config: uses train.batch_size (global B), data.max_query_len / max_passage_len,
        data.num_workers (grain reader threads; 0 = read in the caller's thread) and
        loss.teacher_mode (teacher_attn is batched only in 'cached' mode).
      seed, epoch_offset: epoch e uses the permutation seeded by (seed, epoch_offset + e).
      num_epochs: None = endless; else the iterator stops after num_epochs * steps_per_epoch.
      batch_size: the global batch (default config.train.batch_size).
      process_index, process_count: default jax.process_index() / jax.process_count().
      local_rows: the rows of each global batch this process serves (default
        [i*b, (i+1)*b)); pass `sharding.local_batch_slice(mesh, B)` on unusual meshes.

    Yields dicts: q_ids, q_mask int32 [b, Lq]; p_ids, p_mask int32
    [b, C, Lp]; cand_mask, teacher_scores float32 [b, C]; teacher_attn bf16 [b, P, K, Lq, Lp];
    in 'online' mode with a longer teacher, teacher_p_ids, teacher_p_mask int32 [b, C, Lt].
    """
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    global_batch = int(batch_size or config.train.batch_size)
    if global_batch % process_count:
        raise ValueError(f"global batch {global_batch} is not divisible by {process_count} processes")
    per_host = global_batch // process_count
    rows = local_rows if local_rows is not None else slice(process_index * per_host, (process_index + 1) * per_host)
    spe = steps_per_epoch(len(examples), global_batch)
    if spe == 0:
        raise ValueError(f"{len(examples)} training examples make no full global batch of {global_batch}")
    num_steps = sys.maxsize if num_epochs is None else spe * int(num_epochs)
    with_attn = examples.teacher_attn is not None and config.loss.teacher_mode == "cached"
    source = _GlobalBatches(
        examples,
        dataset,
        seed=seed,
        epoch_offset=epoch_offset,
        global_batch=global_batch,
        rows=rows,
        num_steps=num_steps,
        lq=int(config.data.max_query_len),
        lp=int(config.data.max_passage_len),
        with_attn=with_attn,
        teacher_lp=online_teacher_passage_len(config),
    )
    workers = int(config.data.num_workers)
    read_options = grain.ReadOptions(num_threads=workers, prefetch_buffer_size=max(2 * workers, 1) if workers else 0)
    identity = {"seed": int(seed), "epoch_offset": int(epoch_offset), "num_examples": len(examples), "global_batch": global_batch}
    return TrainIterator(source, read_options, identity)


def online_teacher_passage_len(config) -> int | None:
    """The passage length of the batch's teacher_p_ids: the online teacher's, where it reads
    longer passages than the student; None otherwise (the teacher reads p_ids)."""
    t = teacher_passage_len(config)
    online = config.loss.teacher_mode == "online"
    return t if online and t > int(config.data.max_passage_len) else None


def to_global(batch: Mapping[str, np.ndarray], mesh, sharding=None) -> dict:
    """This process's batch -> global jax arrays (`jax.make_array_from_process_local_data`),
    sharded by `sharding` (default: batch dim over the mesh's ('data', 'fsdp') axes)."""
    import jax

    from md2pr_jax import sharding as shd

    if sharding is None:
        return shd.to_global(batch, mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}
