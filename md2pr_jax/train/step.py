"""The jitted (pjit-style) train and eval steps, and the teacher's forward pass.

One forward pass for both teacher modes: `teacher_forward` computes the teacher's list scores
[B, C] and query->passage attention [B, P, K, Lq, Lp]; in 'online' mode the train step calls
it under stop_gradient on each (micro-)batch, in 'cached' mode the round's scoring pass
(`teacher.PairScorer`, through the same function) stores them once and the batches carry
them. Same batch, same loss. The teacher's own fine-tuning step is `teacher.make_teacher_train_step`.

Gradient accumulation (`config.train.grad_accum` = A > 1) scans over A micro-batches inside
the step: rows i, i+A, i+2A, ... form micro-batch i, so every micro-batch stays spread over
all batch shards; gradients and metrics are averaged, and there is one optimizer update per
call. The contrastive loss then sees B/A queries' passages as negatives, not B.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from md2pr_jax import losses
from md2pr_jax import sharding as shd
from md2pr_jax.models import DualEncoder, with_dropout
from md2pr_jax.models.bert import layer_index
from md2pr_jax.train.optimizer import make_optimizer, make_schedule
from md2pr_jax.train.state import TrainState, state_shardings, teacher_param_shardings

Batch = Mapping[str, jax.Array]
TEACHER_KEYS = ("q_ids", "q_mask", "p_ids", "p_mask")
# The teacher's own passage tokens when it reads longer passages than the student (online mode;
# data/pipeline.py adds them): [B, C, Lt], the student's [B, C, Lp] their first tokens.
TEACHER_PASSAGE_KEYS = ("teacher_p_ids", "teacher_p_mask")


def student_layers(config) -> tuple[int, ...]:
    """Student layers whose token states the word-level loss needs (config order)."""
    return tuple(int(p[0]) for p in config.loss.layer_pairs) if config.loss.use_word else ()


def teacher_layers(config) -> tuple[int, ...]:
    """Teacher layers whose attention the word-level loss needs, one per layer pair."""
    return tuple(int(p[1]) for p in config.loss.layer_pairs) if config.loss.use_word else ()


def word_candidates(config, num_candidates: int) -> int:
    """K: the positive plus the top-k negatives enter the word-level loss."""
    return min(1 + int(config.loss.word_topk), num_candidates)


def teacher_forward(
    teacher: nn.Module,
    teacher_params: Any,
    batch: Batch,
    attention_layers: tuple[int, ...],
    k: int,
    mesh: Mesh | None = None,
    frozen: bool = True,
    rng: jax.Array | None = None,
    window: int | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """The teacher over every (query, candidate) pair of the lists; `frozen` (the student's
    steps and the scoring pass) stops gradients, `frozen=False` is the teacher's own training.

    batch: q_ids, q_mask [B, Lq]; p_ids, p_mask [B, C, Lp], or, where present, the teacher's
    longer teacher_p_ids, teacher_p_mask [B, C, Lt] (the teacher reads those).
    window: the passage positions of the attention kept, W (default: all the teacher read);
      the student's Lp when the teacher reads longer passages.
    Returns (scores [B, C] float32, attention [B, P, K, Lq, W] bfloat16 for the first K
    candidates, P = len(attention_layers); None when attention_layers is empty).
    """
    q_ids, q_mask = batch["q_ids"], batch["q_mask"]
    long = TEACHER_PASSAGE_KEYS[0] in batch
    p_ids, p_mask = (batch[k_] for k_ in (TEACHER_PASSAGE_KEYS if long else ("p_ids", "p_mask")))
    b, c, lp = p_ids.shape
    window = lp if window is None else int(window)
    lq = q_ids.shape[1]
    pairs = (
        jnp.repeat(q_ids, c, axis=0),  # [B*C, Lq]
        jnp.repeat(q_mask, c, axis=0),
        p_ids.reshape(b * c, lp),  # [B*C, Lp]
        p_mask.reshape(b * c, lp),
    )
    if mesh is not None:
        pairs = jax.lax.with_sharding_constraint(pairs, NamedSharding(mesh, P(shd.BATCH_AXES)))
    rngs = {"dropout": rng} if rng is not None else {}
    logits, attn = teacher.apply({"params": teacher_params}, *pairs, attention_layers=attention_layers,
                                 attention_window=window, rngs=rngs)
    scores = logits.reshape(b, c).astype(jnp.float32)
    if frozen:
        scores = jax.lax.stop_gradient(scores)
    if not attention_layers:
        return scores, None
    n = teacher.cfg["num_layers"]
    maps = [attn[layer_index(lt, n, attention=True)].reshape(b, c, lq, window)[:, :k] for lt in attention_layers]
    return scores, jax.lax.stop_gradient(jnp.stack(maps, axis=1).astype(jnp.bfloat16))


def student_forward(
    student: nn.Module,
    params: Any,
    batch: Batch,
    layers: tuple[int, ...],
    k: int,
    rng: jax.Array | None = None,
    mesh: Mesh | None = None,
) -> tuple[jax.Array, jax.Array, dict, dict]:
    """Student embeddings and token states.

    Returns q_emb [B, D], p_emb [B, C, D], q_states {ls: [B, Lq, D]},
    p_states {ls: [B, K, Lp, D]} (first K candidates), keyed by the layer as configured.
    `mesh`: as in `teacher_forward`.
    """
    if mesh is not None:
        params = shd.gather_lookup_params(params, mesh)
    b, c, lp = batch["p_ids"].shape
    # Each tower draws its own dropout masks.
    q_rngs = {"dropout": jax.random.fold_in(rng, 0)} if rng is not None else {}
    p_rngs = {"dropout": jax.random.fold_in(rng, 1)} if rng is not None else {}
    q_emb, q_st = student.apply(
        {"params": params}, batch["q_ids"], batch["q_mask"], return_layers=layers,
        method=DualEncoder.encode_query, rngs=q_rngs,
    )
    p_emb, p_st = student.apply(
        {"params": params}, batch["p_ids"].reshape(b * c, lp), batch["p_mask"].reshape(b * c, lp),
        return_layers=layers, method=DualEncoder.encode_passage, rngs=p_rngs,
    )
    n = student.cfg["num_layers"]
    q_states = {ls: q_st[layer_index(ls, n)] for ls in layers}
    p_states = {ls: p_st[layer_index(ls, n)].reshape(b, c, lp, -1)[:, :k] for ls in layers}
    return q_emb, p_emb.reshape(b, c, -1), q_states, p_states


def _loss_fn(config, mesh, student, teacher):
    """(params, batch, teacher_params, rng) -> (loss, metrics) for one (micro-)batch."""
    online = config.loss.teacher_mode == "online"
    s_layers, t_layers = student_layers(config), teacher_layers(config)

    def loss_fn(params, batch, teacher_params, rng):
        k = word_candidates(config, batch["p_ids"].shape[1])
        if online:  # the attention over the student's passage window, whatever the teacher read
            scores, attn = teacher_forward(teacher, teacher_params, batch, t_layers, k, mesh,
                                           window=batch["p_ids"].shape[-1])
            batch = dict(batch, teacher_scores=scores)
            if attn is not None:
                batch["teacher_attn"] = attn
        q_emb, p_emb, q_states, p_states = student_forward(student, params, batch, s_layers, k, rng, mesh)
        return losses.compute_loss(
            config.loss,
            q_emb=q_emb,
            p_emb=p_emb,
            scale=config.student.similarity_scale,
            q_states=q_states,
            p_states=p_states,
            batch=batch,
        )

    return loss_fn


def _check_teacher(config, teacher):
    if config.loss.teacher_mode == "online" and teacher is None:
        raise ValueError("config.loss.teacher_mode='online' needs the teacher module: pass teacher=")


def _micro_batches(batch: Batch, accum: int, mesh: Mesh) -> Batch:
    """[B, ...] -> [A, B/A, ...]; micro-batch i holds rows i, i+A, ... (spread over all shards)."""

    def split(x):
        b = x.shape[0]
        if b % (accum * shd.batch_shards(mesh)):
            raise ValueError(
                f"batch size {b} is not divisible by config.train.grad_accum={accum} x "
                f"data*fsdp={shd.batch_shards(mesh)}"
            )
        x = x.reshape(b // accum, accum, *x.shape[1:]).swapaxes(0, 1)
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(None, shd.BATCH_AXES)))

    return jax.tree.map(split, dict(batch))


def accumulate_grads(grad_fn: Callable, params: Any, batch: Batch, accum: int, mesh: Mesh, rng: jax.Array,
                     *args: Any) -> tuple[Any, dict]:
    """Gradients and metrics of `grad_fn(params, batch, *args, rng) -> ((loss, metrics), grads)`
    over the whole batch, averaged over `accum` micro-batches scanned in turn (each with its own
    rng; see `_micro_batches`). The one accumulation loop of the student's and the teacher's steps."""
    if accum == 1:
        (_, metrics), grads = grad_fn(params, batch, *args, rng)
        return grads, metrics

    def body(acc, xs):
        mb, i = xs
        (_, m), g = grad_fn(params, mb, *args, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, acc, g), m

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, ms = jax.lax.scan(body, zeros, (_micro_batches(batch, accum, mesh), jnp.arange(accum)))
    return jax.tree.map(lambda g: g / accum, grads), jax.tree.map(lambda m: m.mean(0), ms)


def make_train_step(
    config, mesh: Mesh, student: nn.Module, teacher: nn.Module | None = None, *, total_steps: int | None = None
) -> Callable[[TrainState, Batch, Any], tuple[TrainState, dict]]:
    """The jitted update `step(state, batch, teacher_params) -> (state, metrics)`.

    The state is donated; inputs and outputs carry the mesh shardings (state from
    `state_shardings`, batch by `sharding.batch_sharding`, teacher params by
    `teacher_param_shardings`; pass teacher_params=None in 'cached' mode). `total_steps`
    (default config.train.max_steps) sets the learning-rate schedule's length.
    Metrics: loss, loss_ce, loss_sent, loss_word, loss_mse, acc, grad_norm, lr.
    """
    _check_teacher(config, teacher)
    total_steps = total_steps or int(config.train.max_steps)
    if total_steps <= 0:
        raise ValueError("make_train_step needs total_steps (or config.train.max_steps > 0) for the lr schedule")
    tx = make_optimizer(config.train, total_steps)
    schedule = make_schedule(config.train, total_steps)
    loss_fn = _loss_fn(config, mesh, with_dropout(student), teacher)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    accum = int(config.train.grad_accum)

    def train_step(state: TrainState, batch: Batch, teacher_params: Any):
        with shd.activation_context(mesh):
            rng = jax.random.fold_in(state.rng, state.step)
            grads, metrics = accumulate_grads(grad_fn, state.params, batch, accum, mesh, rng, teacher_params)
            grad_norm = optax.global_norm(grads)
            updates, opt_state = tx.update(grads, state.opt_state, state.params)
            new_state = state.replace(
                step=state.step + 1, params=optax.apply_updates(state.params, updates), opt_state=opt_state
            )
            metrics = dict(metrics, grad_norm=grad_norm, lr=jnp.asarray(schedule(state.step), jnp.float32))
        return new_state, metrics

    state_sh = state_shardings(config, mesh, student)
    teacher_sh = teacher_param_shardings(config, mesh, teacher) if config.loss.teacher_mode == "online" else None
    return jax.jit(
        train_step,
        in_shardings=(state_sh, shd.batch_sharding(mesh), teacher_sh),
        out_shardings=(state_sh, shd.replicated(mesh)),
        donate_argnums=(0,),
    )


def make_eval_step(
    config, mesh: Mesh, student: nn.Module, teacher: nn.Module | None = None
) -> Callable[[Any, Batch, Any], dict]:
    """The jitted `eval_step(params, batch, teacher_params) -> metrics` (the loss terms, no update)."""
    _check_teacher(config, teacher)
    loss_fn = _loss_fn(config, mesh, student, teacher)

    def eval_step(params, batch, teacher_params):
        with shd.activation_context(mesh):
            return loss_fn(params, batch, teacher_params, None)[1]

    param_sh = state_shardings(config, mesh, student).params
    teacher_sh = teacher_param_shardings(config, mesh, teacher) if config.loss.teacher_mode == "online" else None
    return jax.jit(
        eval_step,
        in_shardings=(param_sh, shd.batch_sharding(mesh), teacher_sh),
        out_shardings=shd.replicated(mesh),
    )
