"""The teacher's own work: fine-tuning the cross-encoder (round 0), and scoring (query, passage)
pairs in batches — for reranking and for each round's scoring pass.

Fine-tuning loss per list [p+, n_1..n_m]: listwise cross-entropy over the list plus a
pointwise binary cross-entropy (p+ = 1, negatives = 0) weighted by
`config.teacher_train.pointwise_weight`. The pointwise term calibrates sigmoid(logit) as a
probability, which the false-negative filter thresholds.
"""

from __future__ import annotations

from typing import Any, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from md2pr_jax import sharding as shd
from md2pr_jax.train.optimizer import make_optimizer, make_schedule
from md2pr_jax.train.state import TrainState
from md2pr_jax.train.step import teacher_forward


def list_loss(logits: jax.Array, cand_mask: jax.Array, pointwise_weight: float) -> tuple[jax.Array, dict]:
    """logits, cand_mask: [B, C] with the positive at c=0 -> (loss, metrics)."""
    valid = cand_mask > 0
    masked = jnp.where(valid, logits, -1e9)
    listwise = -jax.nn.log_softmax(masked, axis=-1)[:, 0]
    labels = jnp.zeros_like(logits).at[:, 0].set(1.0)
    bce = optax.sigmoid_binary_cross_entropy(logits, labels)
    pointwise = (bce * valid).sum() / jnp.maximum(valid.sum(), 1)
    loss = listwise.mean() + pointwise_weight * pointwise
    acc = (jnp.argmax(masked, axis=-1) == 0).mean()
    return loss, {"loss": loss, "loss_list": listwise.mean(), "loss_point": pointwise, "acc": acc}


def make_teacher_step(config, mesh, teacher: nn.Module, total_steps: int):
    """Jitted `step(state, batch) -> (state, metrics)` for fine-tuning the teacher (state donated)."""
    tcfg = config.teacher_train
    tx = make_optimizer(tcfg, total_steps)
    schedule = make_schedule(tcfg, total_steps)

    def loss_fn(params, batch):
        with shd.activation_context(mesh):
            scores, _ = teacher_forward(teacher, params, batch, (), 1, mesh, frozen=False)
        return list_loss(scores, batch["cand_mask"], float(tcfg.pointwise_weight))

    def step(state: TrainState, batch):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads), lr=schedule(state.step))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, rng=state.rng), metrics

    return jax.jit(step, donate_argnums=(0,)), tx


def init_teacher_state(params, tx, seed: int) -> TrainState:
    return jax.jit(
        lambda p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=jax.random.PRNGKey(seed))
    )(params)


class PairScorer:
    """Scores (query row, doc row) pairs with the frozen teacher, in fixed-size jitted batches.

    With `attention_layers`, also returns the head-averaged query->passage attention of those
    layers per pair ([N, P, Lq, Lp] bfloat16), written into `attn_out` (e.g. an np.memmap).
    """

    def __init__(self, config, teacher: nn.Module, params: Any, dataset, mesh, batch_size: int = 64,
                 attention_layers: tuple[int, ...] = ()):
        self.dataset, self.mesh, self.layers = dataset, mesh, tuple(attention_layers)
        shards = shd.batch_shards(mesh)
        self.batch_size = max(shards, (batch_size // shards) * shards)
        self.params = params

        def fn(p, batch):
            with shd.activation_context(mesh):
                return teacher_forward(teacher, p, batch, self.layers, 1, mesh)

        self._fn = jax.jit(fn)

    def _batches(self, q_rows: np.ndarray, d_rows: np.ndarray) -> Iterator[tuple[int, dict]]:
        n = len(q_rows)
        for start in range(0, n, self.batch_size):
            q = q_rows[start : start + self.batch_size]
            d = d_rows[start : start + self.batch_size]
            pad = self.batch_size - len(q)
            if pad:  # a full last batch keeps one compiled shape
                q, d = np.concatenate([q, np.repeat(q[-1:], pad)]), np.concatenate([d, np.repeat(d[-1:], pad)])
            q_ids, q_mask = self.dataset.query_tokens(q)
            p_ids, p_mask = self.dataset.doc_tokens(d)
            batch = {"q_ids": q_ids, "q_mask": q_mask, "p_ids": p_ids[:, None], "p_mask": p_mask[:, None]}
            yield start, shd.to_global(batch, self.mesh) if jax.process_count() == 1 else batch

    def score(self, q_rows, d_rows, attn_out=None, desc: str = "teacher scoring") -> np.ndarray:
        """q_rows, d_rows: int [N] -> logits float32 [N] (and attention into attn_out [N, P, Lq, Lp])."""
        q_rows, d_rows = np.asarray(q_rows), np.asarray(d_rows)
        n = len(q_rows)
        out = np.zeros(n, np.float32)
        for start, batch in tqdm(self._batches(q_rows, d_rows), total=-(-n // self.batch_size), desc=desc,
                                 unit="batch", dynamic_ncols=True):
            scores, attn = self._fn(self.params, batch)
            m = min(self.batch_size, n - start)
            out[start : start + m] = _to_host(scores)[:m, 0]
            if attn is not None:
                # Fetched on every process even where attn_out is None (the controller keeps the
                # maps on process 0 only): with several processes the fetch is a collective.
                attn_host = _to_host(attn)
                if attn_out is not None:
                    attn_out[start : start + m] = attn_host[:m, :, 0]
        return out


def _to_host(x) -> np.ndarray:
    """The whole value of `x` as numpy on every process. With several processes the scorer's
    outputs are global arrays spanning other hosts' devices: gathered (every process calls this
    for the same batches, so the collective matches)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
