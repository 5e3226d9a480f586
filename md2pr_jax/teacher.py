"""The teacher's own work: fine-tuning the cross-encoder (round 0; its jitted step and batches,
run by `train.train_loop` like the student's), and scoring (query, passage) pairs in batches
(`PairScorer`: reranking and each round's scoring pass, the one scoring path).

Fine-tuning loss per list [p+, n_1..n_m]: listwise cross-entropy over the list plus a
pointwise binary cross-entropy (p+ = 1, negatives = 0) weighted by
`config.teacher_train.pointwise_weight`. The pointwise term calibrates sigmoid(logit) as a
probability, which the false-negative filter thresholds.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from tqdm import tqdm

from md2pr_jax import sharding as shd
from md2pr_jax.config import teacher_passage_len
from md2pr_jax.models import with_dropout
from md2pr_jax.seeds import derive_seed
from md2pr_jax.train.optimizer import make_optimizer, make_schedule
from md2pr_jax.train.state import TrainState, init_teacher_boxed
from md2pr_jax.train.step import accumulate_grads, teacher_forward


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


def teacher_state_shardings(config, mesh, teacher: nn.Module, tx: optax.GradientTransformation) -> TrainState:
    """NamedShardings of the teacher's TrainState (Adam moments follow their params)."""

    def boxed(rng):
        params = init_teacher_boxed(teacher, config, rng)
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)

    return shd.logical_shardings(jax.eval_shape(boxed, jax.random.PRNGKey(0)), mesh)


def create_teacher_state(config, mesh, params: Any, tx: optax.GradientTransformation, shardings: TrainState) -> TrainState:
    """The teacher's TrainState from host params, created on `shardings`."""
    rng = shd.put_global(np.asarray(jax.random.PRNGKey(derive_seed(config, "teacher_state"))), shd.replicated(mesh))
    init = jax.jit(
        lambda r, p: TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p), rng=r),
        in_shardings=(shd.replicated(mesh), shardings.params),
        out_shardings=shardings,
    )
    return init(rng, shd.put_global(params, shardings.params))


def make_teacher_train_step(config, mesh, teacher: nn.Module, total_steps: int):
    """(step, tx, shardings): the jitted `step(state, batch, None) -> (state, metrics)` that
    fine-tunes the teacher, called by `train.train_loop` as the student's step is. State donated
    and sharded like the student's; `config.teacher_train.grad_accum` micro-batches as in
    `train.step.make_train_step`. batch: q_ids, q_mask [B, Lq]; p_ids, p_mask [B, C, Lp];
    cand_mask [B, C]. Metrics: loss, loss_list, loss_point, acc, grad_norm, lr."""
    tcfg = config.teacher_train
    tx = make_optimizer(tcfg, total_steps)
    schedule = make_schedule(tcfg, total_steps)
    accum = int(tcfg.grad_accum)

    train_teacher = with_dropout(teacher)

    def loss_fn(params, batch, rng):
        scores, _ = teacher_forward(train_teacher, params, batch, (), 1, mesh, frozen=False, rng=rng)
        return list_loss(scores, batch["cand_mask"], float(tcfg.pointwise_weight))

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(state: TrainState, batch, _teacher_params=None):
        with shd.activation_context(mesh):
            rng = jax.random.fold_in(state.rng, state.step)
            grads, metrics = accumulate_grads(grad_fn, state.params, batch, accum, mesh, rng)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.global_norm(grads), lr=schedule(state.step))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics

    shardings = teacher_state_shardings(config, mesh, teacher, tx)
    jitted = jax.jit(step, in_shardings=(shardings, shd.batch_sharding(mesh), None),
                     out_shardings=(shardings, shd.replicated(mesh)), donate_argnums=(0,))
    return jitted, tx, shardings


class TeacherBatches:
    """This process's rows of the teacher's global batches, from global step `start` on.

    `lists(epoch)` gives one epoch's (query rows [E], doc rows [E, 1 + n]) in order; global
    step s takes rows [j*B, (j+1)*B) of epoch s // steps_per_epoch (j = s mod steps_per_epoch),
    and this process serves `rows` of them. State {'step': next global step} (checkpointed by
    the train loop as item 'data')."""

    def __init__(self, lists: Callable[[int], tuple[np.ndarray, np.ndarray]], dataset, global_batch: int,
                 rows: slice, steps_per_epoch: int, start: int = 0, passage_len: int | None = None):
        self.lists, self.dataset, self.rows = lists, dataset, rows
        self.passage_len = passage_len  # the teacher's (config.teacher_passage_len); None: the dataset's
        self.global_batch, self.steps_per_epoch, self.step = int(global_batch), int(steps_per_epoch), int(start)
        self._epoch: tuple[int, tuple] | None = None

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        epoch, j = divmod(self.step, self.steps_per_epoch)
        if self._epoch is None or self._epoch[0] != epoch:
            self._epoch = (epoch, self.lists(epoch))
        qs, lists = self._epoch[1]
        rows = slice(j * self.global_batch, (j + 1) * self.global_batch)
        q_ids, q_mask = self.dataset.query_tokens(qs[rows][self.rows])
        p_ids, p_mask = self.dataset.doc_tokens(lists[rows][self.rows], self.passage_len)
        self.step += 1
        return {"q_ids": q_ids, "q_mask": q_mask, "p_ids": p_ids, "p_mask": p_mask,
                "cand_mask": np.ones(p_ids.shape[:2], np.float32)}

    def get_state(self) -> dict:
        return {"step": self.step}


class PairScorer:
    """Scores (query row, doc row) pairs with the frozen teacher, in fixed-size jitted batches.

    The teacher reads passages at `config.teacher_passage_len` tokens. With `attention_layers`,
    also returns the head-averaged query->passage attention of those layers per pair over the
    student's window ([N, P, Lq, Lp] bfloat16, Lp = config.data.max_passage_len), written into
    `attn_out` (e.g. an np.memmap).
    """

    def __init__(self, config, teacher: nn.Module, params: Any, dataset, mesh, batch_size: int = 64,
                 attention_layers: tuple[int, ...] = ()):
        self.dataset, self.mesh, self.layers = dataset, mesh, tuple(attention_layers)
        shards = shd.batch_shards(mesh)
        self.batch_size = max(shards, (batch_size // shards) * shards)
        self.params = params
        self.passage_len = teacher_passage_len(config)
        window = int(config.data.max_passage_len)

        def fn(p, batch):
            with shd.activation_context(mesh):
                return teacher_forward(teacher, p, batch, self.layers, 1, mesh, window=window)

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
            p_ids, p_mask = self.dataset.doc_tokens(d, self.passage_len)
            batch = {"q_ids": q_ids, "q_mask": q_mask, "p_ids": p_ids[:, None], "p_mask": p_mask[:, None]}
            yield start, shd.to_global(batch, self.mesh) if jax.process_count() == 1 else batch

    def score(self, q_rows, d_rows, attn_out=None, desc: str = "teacher scoring") -> np.ndarray:
        """q_rows, d_rows: int [N] -> logits float32 [N] (and attention into attn_out [N, P, Lq, Lp])."""
        q_rows, d_rows = np.asarray(q_rows), np.asarray(d_rows)
        n = len(q_rows)
        out = np.zeros(n, np.float32)
        def store(start, scores, attn):
            m = min(self.batch_size, n - start)
            out[start : start + m] = _to_host(scores)[:m, 0]
            if attn is not None:
                # Fetched on every process even where attn_out is None (the scoring stage keeps the
                # maps on process 0 only): with several processes the fetch is a collective.
                attn_host = _to_host(attn)
                if attn_out is not None:
                    attn_out[start : start + m] = attn_host[:m, :, 0]

        pending = None  # batch b+1 is dispatched before batch b is pulled to the host
        for start, batch in tqdm(self._batches(q_rows, d_rows), total=-(-n // self.batch_size), desc=desc,
                                 unit="batch", dynamic_ncols=True):
            result = (start, *self._fn(self.params, batch))
            if pending is not None:
                store(*pending)
            pending = result
        if pending is not None:
            store(*pending)
        return out


def _to_host(x) -> np.ndarray:
    """The whole value of `x` as numpy on every process. With several processes the scorer's
    outputs are global arrays spanning other hosts' devices: gathered (every process calls this
    for the same batches, so the collective matches)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)
