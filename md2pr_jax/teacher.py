"""The teacher's own work: fine-tuning the cross-encoder (round 0; its jitted step and batches,
run by `train.train_loop` like the student's), and scoring (query, passage) pairs: `PairScorer`
(one teacher's params resident on this process's chips, batches split over them),
`TeacherScorer` (one teacher or cross-fitted fold teachers) and `score_in_chunks` (the pairs
split across all processes, written in resumable chunks): reranking and each round's scoring
pass, the one scoring path.

Fine-tuning loss per list [p+, n_1..n_m]: listwise cross-entropy over the list plus a
pointwise binary cross-entropy (p+ = 1, negatives = 0) weighted by
`config.teacher_train.pointwise_weight`. The pointwise term calibrates sigmoid(logit) as a
probability, which the false-negative filter thresholds.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Callable, Iterator

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh
from tqdm import tqdm

from md2pr_jax import sharding as shd
from md2pr_jax.config import ConfigError, teacher_passage_len
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


def abstract_teacher_state(config, mesh, teacher: nn.Module, tx: optax.GradientTransformation) -> TrainState:
    """The teacher's TrainState as ShapeDtypeStructs carrying their shardings on `mesh` (the
    input spec of the fine-tuning step for ahead-of-time compilation, as
    `train.abstract_train_state` is the student's)."""

    def unboxed(rng):
        params = nn.unbox(init_teacher_boxed(teacher, config, rng))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rng=rng)

    shapes = jax.eval_shape(unboxed, jax.random.PRNGKey(0))
    shardings = teacher_state_shardings(config, mesh, teacher, tx)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


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


def scoring_mesh(config, devices=None) -> Mesh:
    """The mesh a process scores pairs on: its own local devices (`devices` to choose others),
    shaped by config.mesh (the one -1 axis fills them). Where config.mesh fixes a whole pod's
    axes (e.g. fsdp=16) that one host cannot hold, the host's devices go data-parallel instead.
    No device of another process is in it: scoring needs no cross-host collective per batch."""
    devices = list(jax.local_devices() if devices is None else devices)
    try:
        return shd.make_mesh(config, devices)
    except ConfigError:
        local = config.copy_and_resolve_references()
        local.mesh.data, local.mesh.fsdp, local.mesh.tensor = -1, 1, 1
        return shd.make_mesh(local, devices)


def process_batch_size(config) -> int:
    """Pairs per jitted scoring call on this process: teacher_train.score_batch_size is the
    pod's batch (all chips of all processes), each process scoring its 1/process_count share."""
    return max(1, int(config.teacher_train.score_batch_size) // jax.process_count())


def score_fn(config, teacher: nn.Module, mesh: Mesh, attention_layers: tuple[int, ...] = ()):
    """The jitted scoring function `(params, batch) -> (logits [B, 1], attention or None)` that
    `PairScorer` calls on `mesh`: `teacher_forward` with the params on their shardings and the
    batch (q_ids, q_mask [B, Lq]; p_ids, p_mask [B, 1, teacher_passage_len]) split along the
    mesh's batch axes. Also what benchmarks/pod_plan.py compiles for a TPU topology."""
    from md2pr_jax.train.state import teacher_param_shardings

    rows = shd.batch_sharding(mesh)
    window = int(config.data.max_passage_len)
    layers = tuple(attention_layers)

    def fn(p, batch):
        with shd.activation_context(mesh):
            # Without attention maps the window is moot: the passage width varies by batch.
            return teacher_forward(teacher, p, batch, layers, 1, mesh, window=window if layers else None)

    p_shardings = teacher_param_shardings(config, mesh, teacher)
    return jax.jit(fn, in_shardings=(p_shardings, rows), out_shardings=rows)


class PairScorer:
    """Scores (query row, doc row) pairs with the frozen teacher on this process's devices
    (`scoring_mesh`), in fixed-size jitted batches split over those devices. The params are
    placed on the mesh once, at construction; every call hands only the batch.

    The teacher reads passages at `config.teacher_passage_len` tokens. With `attention_layers`,
    also returns the head-averaged query->passage attention of those layers per pair over the
    student's window ([N, P, Lq, Lp] bfloat16, Lp = config.data.max_passage_len), written into
    `attn_out` (e.g. an np.memmap).
    """

    def __init__(self, config, teacher: nn.Module, params: Any, dataset, mesh: Mesh | None = None,
                 batch_size: int = 64, attention_layers: tuple[int, ...] = ()):
        from md2pr_jax.train.state import place_teacher_params

        mesh = scoring_mesh(config) if mesh is None else mesh
        if any(d.process_index != jax.process_index() for d in mesh.devices.flat):
            raise ValueError("PairScorer scores on this process's own devices; pass teacher.scoring_mesh(config), "
                             "not a mesh spanning other processes")
        self.dataset, self.mesh, self.layers = dataset, mesh, tuple(attention_layers)
        shards = shd.batch_shards(mesh)
        self.batch_size = max(shards, -(-batch_size // shards) * shards)
        self.params = place_teacher_params(config, mesh, params, teacher=teacher)
        self._rows = shd.batch_sharding(mesh)
        self.passage_len = teacher_passage_len(config)
        self._fn = score_fn(config, teacher, mesh, self.layers)
        self._doc_lengths = None  # the dataset's stored passage lengths, read once (`_passage_widths`)

    def _passage_widths(self, d_rows: np.ndarray) -> np.ndarray | None:
        """Per pair, the passage tokens its batch needs (min(stored length, passage_len)); None
        where the batches keep the full passage_len: with attention maps (their [Lq, Lp] block is
        fixed) or a dataset without stored lengths."""
        lengths = getattr(self.dataset, "doc_lengths", None)
        if self.layers or lengths is None:
            return None
        if self._doc_lengths is None:
            self._doc_lengths = np.asarray(lengths)
        return np.minimum(self._doc_lengths[d_rows], self.passage_len)

    def _batches(self, q_rows: np.ndarray, d_rows: np.ndarray) -> Iterator[tuple[Any, dict]]:
        """(rows of the pairs in the batch: a slice or an index array, device batch). With stored
        passage lengths (and no attention maps), the pairs go longest passage first and each
        batch is padded only to the bucket (multiples of 32, `encode.bucket_lengths`) of its
        longest passage, as corpus encoding does: position ids count real tokens, so the logits
        are those of the full-width batch, at a fraction of the cost where passages are short
        (MS MARCO's ~75 tokens of 128: about half the padded FLOPs)."""
        from md2pr_jax.retrieval.encode import bucket_lengths

        n = len(q_rows)
        widths = self._passage_widths(d_rows)
        order = None if widths is None else np.argsort(-widths, kind="stable")
        buckets = np.asarray(bucket_lengths(self.passage_len))
        for start in range(0, n, self.batch_size):
            if order is None:
                rows, width = slice(start, min(start + self.batch_size, n)), self.passage_len
            else:
                rows = order[start : start + self.batch_size]
                width = int(buckets[np.searchsorted(buckets, max(int(widths[rows].max()), 1))])
            q, d = q_rows[rows], d_rows[rows]
            pad = self.batch_size - len(q)
            if pad:  # a full last batch keeps one compiled shape
                q, d = np.concatenate([q, np.repeat(q[-1:], pad)]), np.concatenate([d, np.repeat(d[-1:], pad)])
            q_ids, q_mask = self.dataset.query_tokens(q)
            p_ids, p_mask = self.dataset.doc_tokens(d, width)
            batch = {"q_ids": q_ids, "q_mask": q_mask, "p_ids": p_ids[:, None], "p_mask": p_mask[:, None]}
            yield rows, jax.device_put(batch, self._rows)

    def score(self, q_rows, d_rows, attn_out=None, desc: str = "teacher scoring", progress=True) -> np.ndarray:
        """q_rows, d_rows: int [N] -> logits float32 [N] (and attention into attn_out [N, P, Lq, Lp]).
        progress: True for a bar of this call's batches, False for none, or a caller's tqdm bar
        to advance by the pairs of each batch as it lands (a chunked pass's bar)."""
        q_rows, d_rows = np.asarray(q_rows), np.asarray(d_rows)
        n = len(q_rows)
        out = np.zeros(n, np.float32)
        outer = None if isinstance(progress, bool) else progress

        def store(rows, scores, attn):
            m = len(range(n)[rows]) if isinstance(rows, slice) else len(rows)
            out[rows] = np.asarray(scores)[:m, 0]
            if attn is not None and attn_out is not None:
                attn_out[rows] = np.asarray(attn)[:m, :, 0]
            if outer is not None:
                outer.update(m)

        pending = None  # batch b+1 is dispatched before batch b is pulled to the host
        for rows, batch in tqdm(self._batches(q_rows, d_rows), total=-(-n // self.batch_size), desc=desc,
                                unit="batch", dynamic_ncols=True, disable=outer is not None or not progress):
            result = (rows, *self._fn(self.params, batch))
            if pending is not None:
                store(*pending)
            pending = result
        if pending is not None:
            store(*pending)
        return out


class TeacherScorer:
    """Scores (query, doc) pairs with the round-0 teacher (`params`: one tree) or with
    cross-fitted fold teachers (`params`: one tree per fold, `fold_of`: training query row ->
    fold): a training query's pairs with the teacher of its fold (which never saw it) and any
    other query's with the mean logit of all fold teachers (attention, for the cached word
    level: the first fold's). Each teacher's params sit on this process's mesh for the
    scorer's lifetime; `batch_size` defaults to this process's share of
    teacher_train.score_batch_size."""

    def __init__(self, config, teacher: nn.Module, dataset, params: list, fold_of: dict[int, int] | None = None,
                 attention_layers: tuple[int, ...] = (), mesh: Mesh | None = None, batch_size: int | None = None):
        mesh = scoring_mesh(config) if mesh is None else mesh
        batch_size = process_batch_size(config) if batch_size is None else batch_size
        self.fold_of = dict(fold_of or {})
        self.scorers = [PairScorer(config, teacher, p, dataset, mesh, batch_size, attention_layers) for p in params]
        self.batch_size = self.scorers[0].batch_size

    def score(self, pairs_q: np.ndarray, pairs_d: np.ndarray, attn_out=None, desc: str = "teacher scoring",
              progress=True) -> np.ndarray:
        """pairs_q, pairs_d: int [N] -> logits float32 [N] (attention into attn_out, as PairScorer)."""
        pairs_q, pairs_d = np.asarray(pairs_q), np.asarray(pairs_d)
        if len(self.scorers) == 1:
            return self.scorers[0].score(pairs_q, pairs_d, attn_out=attn_out, desc=desc, progress=progress)
        # A caller's bar moves once for the whole call: queries of no fold pass through every
        # fold teacher, so per-batch updates from the folds would count them several times.
        outer = None if isinstance(progress, bool) else progress
        progress = progress if outer is None else False
        fold = np.array([self.fold_of.get(int(q), -1) for q in pairs_q], np.int64)
        logits = np.zeros(len(pairs_q), np.float32)
        for k, scorer in enumerate(self.scorers):
            # Queries of fold k by teacher k; queries of no fold by every teacher (their mean).
            sel = np.flatnonzero((fold == k) | (fold < 0))
            if len(sel) == 0:
                continue
            attn = None if attn_out is None else np.zeros((len(sel), *attn_out.shape[1:]), attn_out.dtype)
            got = scorer.score(pairs_q[sel], pairs_d[sel], attn_out=attn, desc=f"{desc} (fold {k})", progress=progress)
            shared = fold[sel] < 0
            logits[sel] += np.where(shared, got / len(self.scorers), got)
            if attn is not None:
                mine = (fold[sel] == k) | (shared & (k == 0))
                attn_out[sel[mine]] = attn[mine]
        if outer is not None:
            outer.update(len(pairs_q))
        return logits


def chunk_size(config, batch_size: int) -> int:
    """Pairs per chunk file: teacher_train.score_chunk_size rounded up to a multiple of this
    process's batch, so that only the last chunk has a padded batch."""
    return -(-max(int(config.teacher_train.score_chunk_size), 1) // batch_size) * batch_size


def score_in_chunks(scorer, pairs_q: np.ndarray, pairs_d: np.ndarray, folder, chunk: int,
                    attn_tail: tuple[int, ...] | None = None, attn_out=None,
                    desc: str = "teacher scoring") -> tuple[np.ndarray, dict]:
    """Scores every pair with `scorer` (`.score(q, d, attn_out=, progress=)`, e.g. TeacherScorer)
    across all processes, resumably: (logits float32 [N] on every process, info).

    The pairs fall into chunks of `chunk` pairs; chunk c is scored by process c mod
    process_count and written as soon as it is scored to FOLDER/<key>/c<c>.npz (logits, and the
    attention maps [n, *attn_tail] as bfloat16 bits when `attn_tail` is given), atomically, local
    or gs://. <key> fingerprints the pairs and the chunking, so a rerun over other pairs never
    reads stale chunks. A run killed and started again skips the chunks already written and
    scores only the rest. After every process has written its chunks, each reads all the logits
    back (and `attn_out` [N, *attn_tail], when given, the attention maps); the folder is then
    the caller's to remove (`clear_chunks`) once its own outputs are written.
    info: {chunks, resumed (chunks found written), scored_pairs (by this process), chunk}."""
    from md2pr_jax import artifacts

    pairs_q, pairs_d = np.asarray(pairs_q, np.int64), np.asarray(pairs_d, np.int64)
    n, chunk = len(pairs_q), int(chunk)
    digest = hashlib.sha1(pairs_q.tobytes())
    digest.update(pairs_d.tobytes())
    digest.update(json.dumps([n, chunk, list(attn_tail or ())]).encode())
    folder = artifacts.as_path(folder) / f"pairs-{digest.hexdigest()[:12]}"
    n_chunks = -(-n // chunk)
    done = {p.name for p in folder.iterdir()} if folder.exists() else set()
    mine = range(jax.process_index(), n_chunks, jax.process_count())
    todo = [c for c in mine if _chunk_name(c) not in done]
    resumed = sum(_chunk_name(c) in done for c in range(n_chunks))
    if resumed:
        logging.info("%s: %d of %d chunks already scored, resuming", desc, resumed, n_chunks)
    scored = 0
    main = jax.process_index() == 0
    bar = tqdm(total=sum(min(chunk, n - c * chunk) for c in todo), desc=desc, unit="pair", dynamic_ncols=True,
               disable=not main)
    for c in todo:
        a, b = c * chunk, min(n, (c + 1) * chunk)
        attn = None if attn_tail is None else np.zeros((b - a, *attn_tail), ml_dtypes.bfloat16)
        # The bar moves with every batch: a chunk can take the whole pass (one chunk of 65k pairs).
        logits = scorer.score(pairs_q[a:b], pairs_d[a:b], attn_out=attn, progress=bar)
        arrays = {"logits": logits} if attn is None else {"logits": logits, "attn": attn.view(np.uint16)}
        artifacts.save_arrays(folder / _chunk_name(c), **arrays)
        scored += b - a
    bar.close()
    shd.barrier(f"{desc}: chunks written")
    out = np.zeros(n, np.float32)
    for c in range(n_chunks):
        a, b = c * chunk, min(n, (c + 1) * chunk)
        got = artifacts.load_arrays(folder / _chunk_name(c))
        out[a:b] = got["logits"]
        if attn_out is not None:
            attn_out[a:b] = got["attn"].view(ml_dtypes.bfloat16)
    shd.barrier(f"{desc}: chunks read")
    return out, {"chunks": n_chunks, "resumed": resumed, "scored_pairs": scored, "chunk": chunk}


def _chunk_name(c: int) -> str:
    return f"c{c:06d}.npz"


def clear_chunks(folder) -> None:
    """Removes a scoring pass's chunk folder once its outputs are written (process 0)."""
    from md2pr_jax import artifacts

    folder = artifacts.as_path(folder)
    if folder.exists():
        folder.rmtree()
