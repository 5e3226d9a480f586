"""The teacher's fine-tuning step (sharded, with gradient accumulation) and its batches."""

import jax
import numpy as np
from conftest import make_tiny_config

from md2pr_jax import sharding as shd
from md2pr_jax.models import teacher_from_config
from md2pr_jax.params import init_teacher_params
from md2pr_jax.teacher import TeacherBatches, create_teacher_state, make_teacher_train_step
from md2pr_jax.train import numpy_tree


class _Tokens:
    """Token rows: query row q is all q+1, doc row d is all d+1 (ids stay inside the vocabulary)."""

    def query_tokens(self, rows):
        rows = np.asarray(rows)
        return np.broadcast_to(rows[..., None] + 1, (*rows.shape, 8)).astype(np.int32), np.ones((*rows.shape, 8), np.int32)

    def doc_tokens(self, rows, max_len=None):
        rows = np.asarray(rows)
        return np.broadcast_to(rows[..., None] + 1, (*rows.shape, max_len or 16)).astype(np.int32), np.ones((*rows.shape, max_len or 16), np.int32)


def _lists(epoch):
    qs = np.arange(8) + 10 * epoch
    return qs, np.stack([qs + 100, qs + 200, qs + 300], axis=1)


def test_teacher_batches_walk_epochs_and_resume():
    batches = TeacherBatches(_lists, _Tokens(), global_batch=4, rows=slice(None), steps_per_epoch=2)
    seen = [next(batches)["q_ids"][:, 0] - 1 for _ in range(3)]
    assert [s.tolist() for s in seen] == [[0, 1, 2, 3], [4, 5, 6, 7], [10, 11, 12, 13]]
    assert batches.get_state() == {"step": 3}
    resumed = TeacherBatches(_lists, _Tokens(), 4, slice(2, 4), 2, start=3)  # the second of two processes
    batch = next(resumed)
    assert (batch["q_ids"][:, 0] - 1).tolist() == [16, 17] and batch["p_ids"].shape == (2, 3, 16)
    assert batch["cand_mask"].tolist() == [[1, 1, 1]] * 2


def test_teacher_step_accumulation_matches_one_batch():
    out = {}
    for accum in (1, 2):
        config = make_tiny_config(**{"teacher_train.grad_accum": accum, "teacher_train.warmup_steps": 0})
        mesh = shd.make_mesh(config)
        teacher = teacher_from_config(config)
        step, tx, shardings = make_teacher_train_step(config, mesh, teacher, total_steps=4)
        state = create_teacher_state(config, mesh, init_teacher_params(config), tx, shardings)
        batch = next(TeacherBatches(_lists, _Tokens(), 4, slice(None), 2))
        state, metrics = step(state, shd.to_global(batch, mesh), None)
        out[accum] = (jax.device_get(metrics), numpy_tree(state.params))
        assert int(state.step) == 1
    (m1, p1), (m2, p2) = out[1], out[2]
    assert set(m1) >= {"loss", "loss_list", "loss_point", "acc", "grad_norm", "lr"}
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, atol=1e-6)
