"""Losses against hand-written numpy references, finite differences, masking and padding."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from md2pr_jax import losses

RNG = np.random.default_rng(0)


# ----------------------------------------------------------------- numpy references (loops)


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def ref_contrastive(q, p, cmask, scale):
    b, c, _ = p.shape
    flat_p = p.reshape(b * c, -1)
    flat_m = cmask.reshape(-1) > 0
    out = []
    for i in range(b):
        if not cmask[i, 0] > 0:
            continue
        keep = np.nonzero(flat_m)[0]
        logits = np.array([scale * q[i] @ flat_p[j] for j in keep])
        lsm = _np_log_softmax(logits)
        out.append(-lsm[list(keep).index(i * c)])
    return float(np.mean(out)) if out else 0.0


def ref_sentence_kl(s, t, mask, temp):
    out = []
    for i in range(s.shape[0]):
        keep = mask[i] > 0
        if keep.sum() < 2:
            continue
        lt = _np_log_softmax(t[i][keep] / temp)
        ls = _np_log_softmax(s[i][keep] / temp)
        out.append(np.sum(np.exp(lt) * (lt - ls)))
    return float(np.mean(out)) * temp**2 if out else 0.0


def ref_word_kl(qs, qm, ps, pm, attn, cmask, temperature=1.0):
    b, k = cmask.shape
    d = qs.shape[-1]
    per_cand = []
    for bi in range(b):
        qlen = int(qm[bi].sum())
        for ki in range(k):
            if not cmask[bi, ki] > 0:
                continue
            plen = int(pm[bi, ki].sum())
            pj = list(range(1, plen - 1))
            kls = []
            for i in range(1, qlen - 1):
                row = np.array([attn[bi, ki, i, j] for j in pj], np.float64)
                if row.sum() <= 0:
                    continue
                a_t = row / row.sum()
                logits = np.array([qs[bi, i] @ ps[bi, ki, j] / (np.sqrt(d) * temperature) for j in pj])
                ls = _np_log_softmax(logits)
                nz = a_t > 0
                kls.append(np.sum(a_t[nz] * (np.log(a_t[nz]) - ls[nz])))
            if kls:
                per_cand.append(np.mean(kls))
    return float(np.mean(per_cand)) if per_cand else 0.0


def ref_margin_mse(s, t, mask):
    sq = []
    for bi in range(s.shape[0]):
        if not mask[bi, 0] > 0:
            continue
        for i in range(1, s.shape[1]):
            if mask[bi, i] > 0:
                sq.append(((s[bi, 0] - s[bi, i]) - (t[bi, 0] - t[bi, i])) ** 2)
    return float(np.mean(sq)) if sq else 0.0


# ----------------------------------------------------------------- fixtures


def _right_mask(lengths, width):
    return (np.arange(width)[None, :] < np.asarray(lengths)[:, None]).astype(np.int32)


def _word_case(b=2, k=2, lq=6, lp=7, d=4, seed=1):
    r = np.random.default_rng(seed)
    qs = r.normal(size=(b, lq, d))
    ps = r.normal(size=(b, k, lp, d))
    qm = _right_mask(r.integers(3, lq + 1, size=b), lq)
    pm = _right_mask(r.integers(3, lp + 1, size=b * k), lp).reshape(b, k, lp)
    attn = r.uniform(0.01, 1.0, size=(b, k, lq, lp))
    cm = np.ones((b, k), np.float32)
    return qs, qm, ps, pm, attn, cm


def _loss_cfg(**kw):
    c = ml_collections.ConfigDict(
        dict(
            use_ce=True,
            use_sent=True,
            use_word=True,
            use_margin_mse=True,
            alpha=0.7,
            beta=0.3,
            gamma=0.2,
            kd_temperature=2.0,
            word_topk=1,
            layer_pairs=((-1, -1), (2, 3)),
            teacher_mode="cached",
            word_temperature=1.0,
        )
    )
    c.update(kw)
    return c


def _full_case(b=3, c=4, k=2, lq=6, lp=7, d=5, seed=2):
    r = np.random.default_rng(seed)
    q_emb = r.normal(size=(b, d)).astype(np.float32)
    p_emb = r.normal(size=(b, c, d)).astype(np.float32)
    layers = (-1, 2)
    q_states = {l: r.normal(size=(b, lq, d)).astype(np.float32) for l in layers}
    p_states = {l: r.normal(size=(b, k, lp, d)).astype(np.float32) for l in layers}
    batch = dict(
        q_mask=_right_mask(r.integers(3, lq + 1, size=b), lq),
        p_mask=_right_mask(r.integers(3, lp + 1, size=b * c), lp).reshape(b, c, lp),
        cand_mask=np.ones((b, c), np.float32),
        teacher_scores=r.normal(size=(b, c)).astype(np.float32),
        teacher_attn=r.uniform(0.01, 1, size=(b, len(layers), k, lq, lp)).astype(jnp.bfloat16),
    )
    return dict(q_emb=q_emb, p_emb=p_emb, scale=3.0, q_states=q_states, p_states=p_states, batch=batch)


# ----------------------------------------------------------------- values vs references


def test_contrastive_matches_reference():
    q, p = RNG.normal(size=(3, 4)), RNG.normal(size=(3, 3, 4))
    m = np.array([[1, 1, 0], [0, 1, 1], [1, 0, 1]], np.float32)  # query 1's positive masked
    got = losses.contrastive_loss(q, p, m, 2.5)
    np.testing.assert_allclose(got, ref_contrastive(q, p, m, 2.5), rtol=1e-5)


def test_contrastive_tiny_by_hand():
    # B=1, C=2, orthogonal unit vectors: logits [scale, 0] -> loss = log(1 + e^-scale).
    q = np.array([[1.0, 0.0]])
    p = np.array([[[1.0, 0.0], [0.0, 1.0]]])
    got = losses.contrastive_loss(q, p, np.ones((1, 2)), 2.0)
    np.testing.assert_allclose(got, np.log1p(np.exp(-2.0)), rtol=1e-6)


def test_sentence_kl_matches_reference():
    s, t = RNG.normal(size=(4, 5)), RNG.normal(size=(4, 5))
    m = np.array([[1, 1, 1, 1, 1], [1, 0, 1, 0, 1], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], np.float32)
    got = losses.sentence_kl(s, t, m, 2.0)
    np.testing.assert_allclose(got, ref_sentence_kl(s, t, m, 2.0), rtol=1e-5)
    # Identical distributions: exactly zero divergence.
    np.testing.assert_allclose(losses.sentence_kl(s, s, m, 2.0), 0.0, atol=1e-6)


def test_sentence_kl_t2_scaling():
    s, t, m = RNG.normal(size=(2, 3)), RNG.normal(size=(2, 3)), np.ones((2, 3))
    a = losses.sentence_kl(s, t, m, 3.0, t2_scaling=True)
    b = losses.sentence_kl(s, t, m, 3.0, t2_scaling=False)
    np.testing.assert_allclose(a, 9.0 * b, rtol=1e-6)


def test_word_kl_matches_reference():
    qs, qm, ps, pm, attn, cm = _word_case()
    cm[1, 1] = 0.0
    attn[0, 0, 2] = 0.0  # a teacher row without mass: skipped
    got = jax.jit(losses.word_kl)(qs, qm, ps, pm, attn, cm)
    np.testing.assert_allclose(got, ref_word_kl(qs, qm, ps, pm, attn, cm), rtol=1e-5)


def test_word_temperature_divides_the_student_logits():
    """T_w = 1 is today's loss; T_w = 0.5 matches the reference at 0.5, equals scaling the query
    states by 1/T_w, and differs from T_w = 1."""
    qs, qm, ps, pm, attn, cm = _word_case()
    base = float(losses.word_kl(qs, qm, ps, pm, attn, cm))
    assert float(losses.word_kl(qs, qm, ps, pm, attn, cm, 1.0)) == base
    sharp = float(jax.jit(losses.word_kl)(qs, qm, ps, pm, attn, cm, 0.5))
    np.testing.assert_allclose(sharp, ref_word_kl(qs, qm, ps, pm, attn, cm, temperature=0.5), rtol=1e-5)
    np.testing.assert_allclose(sharp, float(losses.word_kl(qs / 0.5, qm, ps, pm, attn, cm)), rtol=1e-5)
    assert abs(sharp - base) > 1e-3


def test_compute_loss_reads_word_temperature():
    case = _full_case()
    _, m1 = losses.compute_loss(_loss_cfg(), **case)
    _, m2 = losses.compute_loss(_loss_cfg(word_temperature=0.25), **case)
    assert float(m1["loss_word"]) != float(m2["loss_word"])
    np.testing.assert_allclose(float(m1["loss_sent"]), float(m2["loss_sent"]))


def test_inner_token_mask_excludes_cls_sep_padding():
    m = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]])
    got = np.asarray(losses.inner_token_mask(m))
    np.testing.assert_array_equal(got, [[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 0, 0]])


def test_margin_mse_matches_reference():
    s, t = RNG.normal(size=(3, 4)), RNG.normal(size=(3, 4))
    m = np.array([[1, 1, 0, 1], [0, 1, 1, 1], [1, 1, 1, 1]], np.float32)
    np.testing.assert_allclose(losses.margin_mse(s, t, m), ref_margin_mse(s, t, m), rtol=1e-5)


# ----------------------------------------------------------------- gradients (float64)


def _check_grad(fn, x, eps=1e-6, n=6, seed=0):
    """Central differences along n random directions vs jax.grad, all in float64."""
    x = jnp.asarray(x, jnp.float64)
    fn = jax.jit(fn)
    g = jax.jit(jax.grad(fn))(x)
    assert g.dtype == jnp.float64
    r = np.random.default_rng(seed)
    for _ in range(n):
        v = jnp.asarray(r.normal(size=x.shape))
        fd = (fn(x + eps * v) - fn(x - eps * v)) / (2 * eps)
        np.testing.assert_allclose(jnp.vdot(g, v), fd, rtol=1e-5, atol=1e-8)


def _x64(test):
    """Run a test with float64 enabled (jax.enable_x64 context, no subprocess)."""

    def wrapped():
        with jax.enable_x64(True):
            test()

    wrapped.__name__ = test.__name__
    return wrapped


@_x64
def test_contrastive_grad():
    p = RNG.normal(size=(3, 2, 4))
    m = np.array([[1, 1], [0, 1], [1, 0]])
    _check_grad(lambda q: losses.contrastive_loss(q, p, m, 2.0), RNG.normal(size=(3, 4)))
    q = RNG.normal(size=(3, 4))
    _check_grad(lambda pp: losses.contrastive_loss(q, pp, m, 2.0), p)


@_x64
def test_sentence_kl_grad():
    t = RNG.normal(size=(3, 4))
    m = np.array([[1, 1, 1, 1], [1, 0, 1, 1], [1, 0, 0, 0]])
    _check_grad(lambda s: losses.sentence_kl(s, t, m, 1.5), RNG.normal(size=(3, 4)))


@_x64
def test_word_kl_grad():
    qs, qm, ps, pm, attn, cm = _word_case(d=3)
    _check_grad(lambda x: losses.word_kl(x, qm, ps, pm, attn, cm), qs)
    _check_grad(lambda x: losses.word_kl(qs, qm, x, pm, attn, cm), ps)


@_x64
def test_margin_mse_grad():
    t = RNG.normal(size=(2, 4))
    m = np.array([[1, 1, 0, 1], [1, 1, 1, 1]])
    _check_grad(lambda s: losses.margin_mse(s, t, m), RNG.normal(size=(2, 4)))


# ----------------------------------------------------------------- masking, padding, switches


def test_all_masked_contributes_zero_without_nan():
    s, t = RNG.normal(size=(2, 4)), RNG.normal(size=(2, 4))
    zero = np.zeros((2, 4))
    for fn in (
        lambda x: losses.sentence_kl(x, t, zero, 2.0),
        lambda x: losses.margin_mse(x, t, zero),
    ):
        assert float(jax.jit(fn)(s)) == 0.0
        g = np.asarray(jax.jit(jax.grad(fn))(jnp.asarray(s)))
        assert np.all(np.isfinite(g)) and np.all(g == 0)
    # One fully masked list beside a normal one: the mean is the normal list's KL alone.
    m = np.array([[1, 1, 1, 1], [0, 0, 0, 0]])
    np.testing.assert_allclose(
        losses.sentence_kl(s, t, m, 2.0), losses.sentence_kl(s[:1], t[:1], m[:1], 2.0), rtol=1e-6
    )
    g = np.asarray(jax.grad(lambda x: losses.sentence_kl(x, t, m, 2.0))(jnp.asarray(s)))
    assert np.all(np.isfinite(g)) and np.all(g[1] == 0)

    q, p = RNG.normal(size=(2, 3)), RNG.normal(size=(2, 4, 3))
    f = lambda x: losses.contrastive_loss(x, p, zero, 2.0)  # noqa: E731
    assert float(jax.jit(f)(q)) == 0.0
    g = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(q)))
    assert np.all(np.isfinite(g)) and np.all(g == 0)

    qs, qm, ps, pm, attn, cm = _word_case()
    for args in (
        (qs, qm, ps, pm, attn, np.zeros_like(cm)),  # no candidate
        (qs, np.zeros_like(qm), ps, pm, attn, cm),  # no query token
        (qs, qm, ps, np.zeros_like(pm), attn, cm),  # no passage token
        (qs, qm, ps, pm, np.zeros_like(attn), cm),  # no teacher mass
    ):
        f = lambda x, a=args: losses.word_kl(x, *a[1:])  # noqa: E731
        assert float(jax.jit(f)(qs)) == 0.0
        g = np.asarray(jax.jit(jax.grad(f))(jnp.asarray(qs)))
        assert np.all(np.isfinite(g)) and np.all(g == 0)


def test_padding_changes_nothing():
    # Extra padded candidates (cand_mask 0) with junk embeddings / scores.
    q, p = RNG.normal(size=(3, 4)), RNG.normal(size=(3, 2, 4))
    s, t = RNG.normal(size=(3, 3)), RNG.normal(size=(3, 3))
    m = np.ones((3, 3))
    p_pad = np.concatenate([p, 1e3 * RNG.normal(size=(3, 2, 4))], axis=1)
    m2 = np.concatenate([np.ones((3, 2)), np.zeros((3, 2))], axis=1)
    np.testing.assert_allclose(
        losses.contrastive_loss(q, p_pad, m2, 2.0), losses.contrastive_loss(q, p, m2[:, :2], 2.0), rtol=1e-6
    )
    pad = lambda x: np.concatenate([x, 1e3 * RNG.normal(size=(3, 2))], axis=1)  # noqa: E731
    m3 = np.concatenate([m, np.zeros((3, 2))], axis=1)
    for fn in (lambda a, b, mm: losses.sentence_kl(a, b, mm, 2.0), losses.margin_mse):
        np.testing.assert_allclose(fn(pad(s), pad(t), m3), fn(s, t, m), rtol=1e-6)

    # Extra padded tokens (mask 0) on query and passage sides.
    qs, qm, ps, pm, attn, cm = _word_case()
    b, k, lq, lp, d = *cm.shape, qs.shape[1], ps.shape[2], qs.shape[2]
    qs2 = np.concatenate([qs, RNG.normal(size=(b, 3, d))], axis=1)
    qm2 = np.concatenate([qm, np.zeros((b, 3), qm.dtype)], axis=1)
    ps2 = np.concatenate([ps, RNG.normal(size=(b, k, 2, d))], axis=2)
    pm2 = np.concatenate([pm, np.zeros((b, k, 2), pm.dtype)], axis=2)
    attn2 = RNG.uniform(size=(b, k, lq + 3, lp + 2))
    attn2[:, :, :lq, :lp] = attn
    word = jax.jit(losses.word_kl)
    np.testing.assert_allclose(word(qs2, qm2, ps2, pm2, attn2, cm), word(qs, qm, ps, pm, attn, cm), rtol=1e-6)


def test_compute_loss_combines_and_switches_terms():
    case = _full_case()
    cfg = _loss_cfg()
    total, m = losses.compute_loss(cfg, **case)
    b = case["batch"]
    s = case["scale"] * np.einsum("bd,bcd->bc", case["q_emb"], case["p_emb"])
    attn = np.asarray(b["teacher_attn"], np.float32)
    k = 2
    ce = ref_contrastive(case["q_emb"], case["p_emb"], b["cand_mask"], case["scale"])
    sent = ref_sentence_kl(s, b["teacher_scores"], b["cand_mask"], 2.0)
    word = np.mean(
        [
            ref_word_kl(
                case["q_states"][ls], b["q_mask"], case["p_states"][ls], b["p_mask"][:, :k],
                attn[:, i], b["cand_mask"][:, :k],
            )
            for i, ls in enumerate((-1, 2))
        ]
    )
    mse = ref_margin_mse(s, b["teacher_scores"], b["cand_mask"])
    for key, want in (("loss_ce", ce), ("loss_sent", sent), ("loss_word", word), ("loss_mse", mse)):
        np.testing.assert_allclose(m[key], want, rtol=1e-4, err_msg=key)
    np.testing.assert_allclose(total, ce + 0.7 * sent + 0.3 * word + 0.2 * mse, rtol=1e-4)
    np.testing.assert_allclose(m["loss"], total)
    np.testing.assert_allclose(m["acc"], np.mean(np.argmax(s, axis=1) == 0))

    for switch, key, weight in (
        ("use_ce", "loss_ce", 1.0),
        ("use_sent", "loss_sent", 0.7),
        ("use_word", "loss_word", 0.3),
        ("use_margin_mse", "loss_mse", 0.2),
    ):
        t_off, m_off = losses.compute_loss(_loss_cfg(**{switch: False}), **case)
        assert float(m_off[key]) == 0.0
        np.testing.assert_allclose(t_off, total - weight * m[key], rtol=1e-4, atol=1e-6)

    # Word term off: no states or attention maps needed at all.
    off = dict(case, q_states=None, p_states=None)
    off["batch"] = {k_: v for k_, v in b.items() if k_ != "teacher_attn"}
    losses.compute_loss(_loss_cfg(use_word=False), **off)


def test_compute_loss_jits_and_names_missing_layers():
    case = _full_case()
    cfg = _loss_cfg()
    f = jax.jit(lambda c: losses.compute_loss(cfg, **c))
    np.testing.assert_allclose(f(case)[0], losses.compute_loss(cfg, **case)[0], rtol=1e-5)
    bad = dict(case, q_states={-1: case["q_states"][-1]})
    with pytest.raises(ValueError, match=r"q_states lacks student layer\(s\) \[2\]"):
        losses.compute_loss(cfg, **bad)


def test_kd_mask_keeps_flagged_candidates_for_the_teacher_terms_only():
    """With kd_mask, a candidate masked out of cand_mask (a flagged false negative) leaves the
    contrastive loss and the accuracy but stays in the sentence, word and margin-MSE terms."""
    case = _full_case()
    b = case["batch"]
    cand = np.asarray(b["cand_mask"], np.float32).copy()
    flagged = np.zeros_like(cand, bool)
    flagged[0, 1] = flagged[1, 2] = True
    assert cand[flagged].all()  # the flagged entries were real candidates
    kept = dict(case, batch=dict(b, cand_mask=np.where(flagged, 0.0, cand), kd_mask=cand))
    _, m = losses.compute_loss(_loss_cfg(), **kept)
    s = case["scale"] * np.einsum("bd,bcd->bc", case["q_emb"], case["p_emb"])
    attn = np.asarray(b["teacher_attn"], np.float32)
    k = 2
    np.testing.assert_allclose(m["loss_ce"], ref_contrastive(case["q_emb"], case["p_emb"], np.where(flagged, 0.0, cand),
                                                             case["scale"]), rtol=1e-4)
    np.testing.assert_allclose(m["loss_sent"], ref_sentence_kl(s, b["teacher_scores"], cand, 2.0), rtol=1e-4)
    word = np.mean([ref_word_kl(case["q_states"][ls], b["q_mask"], case["p_states"][ls], b["p_mask"][:, :k],
                                attn[:, i], cand[:, :k]) for i, ls in enumerate((-1, 2))])
    np.testing.assert_allclose(m["loss_word"], word, rtol=1e-4)
    np.testing.assert_allclose(m["loss_mse"], ref_margin_mse(s, b["teacher_scores"], cand), rtol=1e-4)
    # Without kd_mask the same flags leave every term: the sentence level differs.
    dropped = dict(case, batch=dict(b, cand_mask=np.where(flagged, 0.0, cand)))
    _, m_drop = losses.compute_loss(_loss_cfg(), **dropped)
    assert abs(float(m_drop["loss_sent"]) - float(m["loss_sent"])) > 1e-4
    np.testing.assert_allclose(m_drop["loss_ce"], m["loss_ce"], rtol=1e-6)
