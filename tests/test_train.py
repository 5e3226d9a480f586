"""Train state, optimizer schedule, teacher modes and the loop, on one CPU device (tiny BERT)."""

import glob
import os
import subprocess
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

    def doc_tokens(self, rows, max_len=None):
        return self.p[0][rows][..., :max_len], self.p[1][rows][..., :max_len]


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
    (events,) = glob.glob(os.path.join(tmp_path, "tensorboard", "events.out.tfevents*"))
    assert _scalars(events)["train/loss"] == [(h["step"], pytest.approx(h["loss"], rel=1e-6)) for h in history]


def _scalars(path):
    """{tag: [(step, value)]} from a TensorBoard event file (records: length, crc, Event, crc)."""
    from tensorboardX.proto.event_pb2 import Event

    out, data = {}, open(path, "rb").read()
    while data:
        n = int.from_bytes(data[:8], "little")
        event = Event.FromString(data[12:12 + n])
        data = data[12 + n + 4:]
        for v in event.summary.value:
            out.setdefault(v.tag, []).append((event.step, v.simple_value))
    return out


def test_the_summary_writer_loads_without_torch():
    """tensorboardX imports torch where installed (~3 s a training process); the loop's writer
    does not, and the file it writes holds the scalars."""
    code = ("import sys, tempfile; from md2pr_jax.train.loop import summary_writer; "
            "d = tempfile.mkdtemp(); w = summary_writer(d); w.add_scalar('a/b', 0.5, 3); w.close(); "
            "import glob; print('torch' in sys.modules, glob.glob(d + '/events*')[0])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert out.returncode == 0, out.stderr[-2000:]
    loaded, path = out.stdout.split()
    assert loaded == "False" and _scalars(path) == {"a/b": [(3, 0.5)]}


def test_online_mode_without_teacher_is_a_clear_error(setup):
    config, mesh, student, *_ = setup
    config = tiny_config(**{"loss.teacher_mode": "online"})
    with pytest.raises(ValueError, match="teacher"):
        make_train_step(config, mesh, student, None, total_steps=3)


def _long_passages(config, teacher_len: int, seed: int = 3):
    """A host batch whose passages are stored at `teacher_len` tokens (many longer than the
    student's Lp), cut as the prepared dataset cuts them: (batch with the student's p_ids and
    the teacher's teacher_p_ids, the TokenTable they come from)."""
    from md2pr_jax.data.prepare import TokenTable

    rng = np.random.default_rng(seed)
    b, c = config.train.batch_size, 1 + config.data.num_negatives
    seqs = []
    for _ in range(b * c):
        n = int(rng.integers(config.data.max_passage_len // 2, teacher_len + 1))
        seqs.append(np.concatenate([[101], rng.integers(1000, 30000, size=n - 2), [102]]).astype(np.int32))
    table = TokenTable(np.concatenate(seqs), np.concatenate([[0], np.cumsum([len(x) for x in seqs])]), 102, 0)
    rows = np.arange(b * c).reshape(b, c)
    batch = random_batch(config, 0)
    batch["p_ids"], batch["p_mask"] = table.gather(rows, config.data.max_passage_len)
    batch["teacher_p_ids"], batch["teacher_p_mask"] = table.gather(rows, teacher_len)
    return batch, table


def test_teacher_at_the_student_length_changes_nothing(setup):
    from md2pr_jax.data.pipeline import online_teacher_passage_len
    from md2pr_jax.data.prepare import stored_passage_len
    from md2pr_jax.train.step import teacher_forward

    config, mesh, student, teacher, teacher_params = setup
    same = tiny_config(**{"teacher.max_passage_len": config.data.max_passage_len, "loss.teacher_mode": "online"})
    assert online_teacher_passage_len(same) is None and stored_passage_len(same) == config.data.max_passage_len
    batch = random_batch(config, 0)
    layers, k = teacher_layers(config), word_candidates(config, batch["p_ids"].shape[1])
    s0, a0 = teacher_forward(teacher, teacher_params, batch, layers, k)
    s1, a1 = teacher_forward(teacher, teacher_params, batch, layers, k, window=config.data.max_passage_len)
    np.testing.assert_array_equal(np.asarray(s0), np.asarray(s1))
    np.testing.assert_array_equal(np.asarray(a0.astype(np.float32)), np.asarray(a1.astype(np.float32)))


def test_longer_teacher_word_target_is_the_renormalised_first_window(setup):
    """The teacher reads 32 passage tokens, the student 16. Online and cached, the teacher scores
    the long pair, and the word level reads the teacher's attention over the student's window:
    the first 16 columns of its full attention, renormalised over the student's passage tokens."""
    from md2pr_jax import losses
    from md2pr_jax.data.pipeline import online_teacher_passage_len
    from md2pr_jax.train.step import teacher_forward

    config, mesh, student, teacher, teacher_params = setup
    lp, lt = config.data.max_passage_len, 32
    long_cfg = tiny_config(**{"teacher.max_passage_len": lt, "loss.teacher_mode": "online"})
    assert online_teacher_passage_len(long_cfg) == lt
    batch, table = _long_passages(config, lt)
    cut = batch["teacher_p_mask"].sum(-1) > lp
    assert cut.any() and (~cut).any()
    # The student's passage is the first tokens of the teacher's (the cut ends with [SEP]).
    np.testing.assert_array_equal(batch["p_ids"][..., : lp - 1], batch["teacher_p_ids"][..., : lp - 1])

    layers, k = teacher_layers(config), word_candidates(config, batch["p_ids"].shape[1])
    full_batch = dict(batch, p_ids=batch["teacher_p_ids"], p_mask=batch["teacher_p_mask"])
    for key in ("teacher_p_ids", "teacher_p_mask"):
        full_batch.pop(key)
    s_full, a_full = teacher_forward(teacher, teacher_params, full_batch, layers, k)  # [B, P, K, Lq, 32]
    s_win, a_win = teacher_forward(teacher, teacher_params, batch, layers, k, window=lp)  # [B, P, K, Lq, 16]
    s_short, _ = teacher_forward(teacher, teacher_params, {kk: batch[kk] for kk in ("q_ids", "q_mask", "p_ids", "p_mask")},
                                 layers, k)
    np.testing.assert_array_equal(np.asarray(s_win), np.asarray(s_full))
    assert np.abs(np.asarray(s_short) - np.asarray(s_full))[cut].min() > 1e-7  # it read the longer passage
    block = np.asarray(a_full.astype(np.float32))[..., :lp]
    np.testing.assert_array_equal(np.asarray(a_win.astype(np.float32)), block)
    # The target, renormalised by hand over the student's inner passage tokens.
    inner = np.asarray(losses.inner_token_mask(batch["p_mask"][:, :k]))[:, None, :, None, :]  # [B, 1, K, 1, Lp]
    target = np.where(inner, block, 0.0)
    target = target / np.maximum(target.sum(-1, keepdims=True), 1e-30)
    assert np.abs(target.sum(-1) - 1)[(target.sum(-1) > 0)].max() < 1e-5
    assert np.abs(target - block).max() > 1e-3  # renormalising changed the rows: the test can tell

    # Online: the step reads teacher_p_ids and the window; cached: PairScorer stores the window.
    hand = shd.to_global(dict(batch, teacher_scores=np.asarray(s_full), teacher_attn=target.astype(jax.numpy.bfloat16)), mesh)
    online_batch = shd.to_global(batch, mesh)
    cached_cfg = tiny_config(**{"teacher.max_passage_len": lt})
    state = create_train_state(config, mesh, rng=jax.random.PRNGKey(0), student=student)
    m_on = jax.device_get(make_eval_step(long_cfg, mesh, student, teacher)(state.params, online_batch, teacher_params))
    m_hand = jax.device_get(make_eval_step(cached_cfg, mesh, student)(state.params, hand, None))
    np.testing.assert_allclose(m_on["loss_word"], m_hand["loss_word"], rtol=2e-3)
    np.testing.assert_allclose(m_on["loss_sent"], m_hand["loss_sent"], rtol=1e-5)

    class _Table:
        def query_tokens(self, rows):
            return batch["q_ids"][rows], batch["q_mask"][rows]

        def doc_tokens(self, rows, max_len=None):
            return table.gather(rows, max_len or lp)

    b, c = batch["p_ids"].shape[:2]
    scorer = PairScorer(cached_cfg, teacher, teacher_params, _Table(), mesh, 8, attention_layers=layers)
    flat = np.zeros((b * c, len(layers), config.data.max_query_len, lp), jax.numpy.bfloat16)
    scores = scorer.score(np.repeat(np.arange(b), c), np.arange(b * c), attn_out=flat).reshape(b, c)
    np.testing.assert_allclose(scores, np.asarray(s_full), rtol=1e-5, atol=1e-5)
    got = gather_attention(flat, np.arange(b * c).reshape(b, c)[:, :k]).astype(np.float32)
    np.testing.assert_array_equal(got, block)


class _Table:
    """Query and passage token tables (`prepare.TokenTable`) with the stored lengths PairScorer reads."""

    def __init__(self, rng, n_q: int, n_d: int, max_len: int):
        from md2pr_jax.data.prepare import TokenTable

        def table(n, lo, hi):
            lengths = rng.integers(lo, hi, n)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            ids = rng.integers(1000, 5000, offsets[-1]).astype(np.int32)
            ids[offsets[:-1]], ids[offsets[1:] - 1] = 101, 102  # [CLS] ... [SEP]
            return TokenTable(ids, offsets, 102, 0)

        self.q, self.d, self.max_len = table(n_q, 3, 9), table(n_d, 3, max_len + 20), max_len

    def query_tokens(self, rows):
        return self.q.gather(rows, 8)

    def doc_tokens(self, rows, max_len=None):
        return self.d.gather(rows, max_len or self.max_len)


class _NoLengths:
    """The same tables without stored lengths: PairScorer then pads every batch to full width."""

    def __init__(self, table):
        self.query_tokens, self.doc_tokens = table.query_tokens, table.doc_tokens


def test_pair_scorer_buckets_passages_by_length_with_the_same_logits(setup):
    config, mesh, _, teacher, teacher_params = setup
    cfg = config.copy_and_resolve_references()
    cfg.data.max_passage_len = 48  # buckets 32, 48
    rng = np.random.default_rng(0)
    table = _Table(rng, 30, 200, 48)
    table.doc_lengths = table.d.lengths
    q, d = rng.integers(0, 30, 53), rng.integers(0, 200, 53)
    bucketed = PairScorer(cfg, teacher, teacher_params, table, mesh, 8)
    full = PairScorer(cfg, teacher, teacher_params, _NoLengths(table), mesh, 8)
    widths = {b["p_ids"].shape[-1] for _, b in bucketed._batches(q, d)}
    assert widths == {32, 48}  # short batches are cut to their bucket
    assert {b["p_ids"].shape[-1] for _, b in full._batches(q, d)} == {48}
    np.testing.assert_allclose(bucketed.score(q, d, progress=False), full.score(q, d, progress=False), rtol=2e-5, atol=2e-5)
