"""Train state, optimizer schedule, teacher modes and the loop, on one CPU device (tiny BERT)."""

import glob
import os
import sys

import jax
import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _train_worker import BatchIterator, random_batch, tiny_config  # noqa: E402
from md2pr_jax import sharding as shd  # noqa: E402
from md2pr_jax.models import student_from_config, teacher_from_config  # noqa: E402
from md2pr_jax.train import (  # noqa: E402
    create_train_state,
    decay_mask,
    make_eval_step,
    make_optimizer,
    make_schedule,
    make_train_step,
    numpy_tree,
    place_teacher_params,
    train_loop,
)
from md2pr_jax.rounds.filtering import gather_attention  # noqa: E402
from md2pr_jax.teacher import PairScorer  # noqa: E402
from md2pr_jax.train.step import teacher_layers, word_candidates  # noqa: E402


def test_schedule_warmup_then_linear_decay():
    config = tiny_config(**{"train.lr": 1e-3, "train.warmup_steps": 4})
    lr = make_schedule(config.train, total_steps=12)
    got = [float(lr(s)) for s in (0, 2, 4, 8, 12, 20)]
    np.testing.assert_allclose(got, [0.0, 5e-4, 1e-3, 5e-4, 0.0, 0.0], atol=1e-9)
    no_warmup = make_schedule(tiny_config(**{"train.warmup_steps": 0}).train, total_steps=10)
    np.testing.assert_allclose(float(no_warmup(0)), 1e-3, rtol=1e-6)


def test_weight_decay_skips_biases_and_layernorm():
    params = {"dense": {"kernel": 1.0, "bias": 1.0}, "LayerNorm": {"scale": 1.0, "bias": 1.0}, "word": {"embedding": 1.0}}
    assert decay_mask(params) == {
        "dense": {"kernel": True, "bias": False},
        "LayerNorm": {"scale": False, "bias": False},
        "word": {"embedding": True},
    }
    # Decay alone (zero gradient) moves kernels only.
    config = tiny_config(**{"train.weight_decay": 0.5, "train.warmup_steps": 0, "train.grad_clip": 0.0})
    tx = make_optimizer(config.train, total_steps=10)
    p = {"k": {"kernel": np.ones(2, np.float32)}, "b": {"bias": np.ones(2, np.float32)}}
    updates, _ = tx.update(jax.tree.map(np.zeros_like, p), tx.init(p), p)
    assert float(np.abs(updates["b"]["bias"]).max()) == 0.0
    np.testing.assert_allclose(updates["k"]["kernel"], -1e-3 * 0.5, rtol=1e-5)


@pytest.fixture(scope="module")
def setup():
    config = tiny_config()
    mesh = shd.make_mesh(config)
    student, teacher = student_from_config(config), teacher_from_config(config)
    teacher_params = place_teacher_params(config, mesh, rng=jax.random.PRNGKey(1), teacher=teacher)
    return config, mesh, student, teacher, teacher_params


class _BatchAsDataset:
    """A host batch seen as a dataset: query row i is the batch's query i, doc row j its j-th
    candidate in row-major order (what PairScorer reads)."""

    def __init__(self, batch):
        b, c, lp = batch["p_ids"].shape
        self.q, self.p = (batch["q_ids"], batch["q_mask"]), (batch["p_ids"].reshape(b * c, lp), batch["p_mask"].reshape(b * c, lp))

    def query_tokens(self, rows):
        return self.q[0][rows], self.q[1][rows]

    def doc_tokens(self, rows):
        return self.p[0][rows], self.p[1][rows]


def _cached_teacher_outputs(config, mesh, teacher, teacher_params, host_batch):
    """The 'cached' mode's teacher outputs as the pipeline makes them: the scoring pass over
    every (query, candidate) pair (PairScorer), then each list's first K maps gathered."""
    b, c, _ = host_batch["p_ids"].shape
    layers = teacher_layers(config)
    scorer = PairScorer(config, teacher, teacher_params, _BatchAsDataset(host_batch), mesh, 8, attention_layers=layers)
    flat = np.zeros((b * c, len(layers), config.data.max_query_len, config.data.max_passage_len), jax.numpy.bfloat16)
    scores = scorer.score(np.repeat(np.arange(b), c), np.arange(b * c), attn_out=flat).reshape(b, c)
    src = np.arange(b * c).reshape(b, c)[:, : word_candidates(config, c)]
    return scores, gather_attention(flat, src)


def test_online_and_cached_teacher_give_the_same_loss(setup):
    config, mesh, student, teacher, teacher_params = setup
    host_batch = random_batch(config, 0)
    batch = shd.to_global(host_batch, mesh)
    scores, attn = _cached_teacher_outputs(config, mesh, teacher, teacher_params, host_batch)
    b, c = batch["teacher_scores"].shape
    assert scores.shape == (b, c) and scores.dtype == np.float32
    assert attn.shape == (b, 2, 2, config.data.max_query_len, config.data.max_passage_len)
    assert attn.dtype == jax.numpy.bfloat16
    cached_batch = shd.to_global(dict(host_batch, teacher_scores=scores, teacher_attn=attn), mesh)

    results = {}
    for mode in ("online", "cached"):
        config.loss.teacher_mode = mode
        state = create_train_state(config, mesh, rng=jax.random.PRNGKey(0), student=student)
        eval_metrics = {}
        if mode == "online":  # the eval step shares the loss function; one mode suffices
            eval_metrics = make_eval_step(config, mesh, student, teacher)(state.params, cached_batch, teacher_params)
        step = make_train_step(config, mesh, student, teacher, total_steps=10)
        state, metrics = step(state, cached_batch, teacher_params if mode == "online" else None)
        results[mode] = (jax.device_get(eval_metrics), jax.device_get(metrics), numpy_tree(state.params))
    config.loss.teacher_mode = "cached"
    (e_on, m_on, p_on), (_, m_ca, p_ca) = results["online"], results["cached"]
    for key in ("loss", "loss_ce", "loss_sent", "loss_word"):
        np.testing.assert_allclose(m_on[key], m_ca[key], rtol=1e-5, atol=1e-6, err_msg=key)
        np.testing.assert_allclose(e_on[key], m_on[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert m_on["loss_word"] > 0 and m_on["loss_sent"] > 0
    for a, b_ in zip(jax.tree.leaves(p_on), jax.tree.leaves(p_ca)):
        np.testing.assert_allclose(a, b_, atol=1e-7)
    assert set(m_on) >= {"loss", "loss_ce", "loss_sent", "loss_word", "grad_norm", "lr"}
    np.testing.assert_allclose(m_on["lr"], config.train.lr, rtol=1e-6)  # warmup 0: full lr at step 0


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_dropout_is_applied_in_training_only_when_configured(setup, dropout):
    """Same params and batch, two rngs: with dropout the losses differ; without, they are equal.
    The module built for encoding stays deterministic either way (same embedding twice)."""
    _, mesh, *_ = setup
    config = tiny_config(**{"model.attention_dropout": dropout, "model.hidden_dropout": dropout,
                            "loss.use_word": False, "loss.use_sent": False})
    student = student_from_config(config)
    step = make_train_step(config, mesh, student, total_steps=10)
    batch = shd.to_global(random_batch(config, 0), mesh)
    losses = []
    for seed in (0, 1):
        state = create_train_state(config, mesh, rng=jax.random.PRNGKey(3), student=student)
        state = state.replace(rng=jax.random.PRNGKey(100 + seed))
        _, metrics = step(state, batch, None)
        losses.append(float(metrics["loss"]))
    if dropout:
        assert abs(losses[0] - losses[1]) > 1e-4, losses
    else:
        assert losses[0] == losses[1], losses
    params = create_train_state(config, mesh, rng=jax.random.PRNGKey(3), student=student).params
    ids, mask = np.asarray(batch["q_ids"]), np.asarray(batch["q_mask"])
    embs = [student.apply({"params": params}, ids, mask, method=type(student).encode_query)[0] for _ in range(2)]
    np.testing.assert_array_equal(embs[0], embs[1])


def test_pretrained_params_are_placed_and_train(setup):
    config, mesh, student, *_ = setup
    config = tiny_config(**{"loss.use_word": False, "loss.use_sent": False})
    random_state = create_train_state(config, mesh, rng=jax.random.PRNGKey(3), student=student)
    host_params = numpy_tree(random_state.params)
    state = create_train_state(config, mesh, init_params=host_params, rng=jax.random.PRNGKey(4), student=student)
    for a, b in zip(jax.tree.leaves(host_params), jax.tree.leaves(numpy_tree(state.params))):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="init_params do not match"):
        create_train_state(config, mesh, init_params={"encoder": {}}, student=student)


def test_grad_accumulation_and_loop_write_metrics(setup, tmp_path):
    _, mesh, student, *_ = setup
    config = tiny_config(**{"train.grad_accum": 2, "train.log_every": 2, "loss.use_word": False})
    state = create_train_state(config, mesh, rng=jax.random.PRNGKey(0), student=student)
    step = make_train_step(config, mesh, student, total_steps=4)
    state, history = train_loop(config, str(tmp_path), state, BatchIterator(config), step, num_steps=4, mesh=mesh)
    assert int(state.step) == 4
    assert [h["step"] for h in history] == [2, 4]
    assert all(np.isfinite(h["loss"]) and h["grad_norm"] > 0 for h in history)
    assert history[-1]["lr"] == pytest.approx(config.train.lr / 4, rel=1e-5)  # lr used by step 4 of 4
    assert glob.glob(os.path.join(tmp_path, "tensorboard", "events.out.tfevents*"))


def test_online_mode_without_teacher_is_a_clear_error(setup):
    config, mesh, student, *_ = setup
    config = tiny_config(**{"loss.teacher_mode": "online"})
    with pytest.raises(ValueError, match="teacher"):
        make_train_step(config, mesh, student, None, total_steps=3)
