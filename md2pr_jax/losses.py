"""The student's losses, each a pure jittable function with explicit masks.

Notation (see DESIGN.md, Losses): a query q has a candidate list c_0 = p+, c_1..c_{C-1}
(hard negatives); student scores s_i = scale * E(q).E(c_i), teacher scores t_i = CE(q, c_i).

- `contrastive_loss`: InfoNCE over every passage of the global batch (cross-batch negatives).
- `sentence_kl`:      KL(softmax(t/T) || softmax(s/T)) over each query's own list.
- `word_kl`:          KL between the teacher's query->passage attention and the student's
                      softmax over passage tokens of h_q.h_p/(sqrt(d) T_w).
- `margin_mse`:       MSE between student and teacher margins (s_0 - s_i) and (t_0 - t_i).
- `compute_loss`:     the weighted sum selected by `config.loss`, with per-term metrics.

All math runs in float32 whatever the input dtype. Masks are 1 (or True) for usable entries.
Masked logits are set to a large finite negative (never -inf), and every division and log is
guarded on both sides of its `where` (the double-where trick), so fully masked rows give
exactly 0 and finite (zero) gradients.
"""

from __future__ import annotations

from typing import Mapping

import jax
import jax.numpy as jnp

Array = jax.Array

# Fill for masked logits: exp(_NEG - max) underflows to exactly 0 in float32, yet stays finite.
_NEG = -1e9


def _f32(x) -> Array:
    """At least float32: bf16/f16/ints -> float32; float64 (only under x64, e.g. tests) stays."""
    x = jnp.asarray(x)
    if jnp.issubdtype(x.dtype, jnp.floating):
        return x.astype(jnp.promote_types(x.dtype, jnp.float32))
    return x.astype(jnp.float32)


def _valid(mask) -> Array:
    return jnp.asarray(mask) > 0


def _masked_mean(values: Array, weights: Array) -> Array:
    """sum(values * weights) / max(sum(weights), 1): 0 when nothing contributes."""
    w = _f32(weights)
    return jnp.sum(jnp.where(w > 0, values, 0.0) * w) / jnp.maximum(jnp.sum(w), 1.0)


def _masked_log_softmax(logits: Array, valid: Array) -> Array:
    """log_softmax over the last axis with invalid entries excluded (their output is junk)."""
    return jax.nn.log_softmax(jnp.where(valid, logits, _NEG), axis=-1)


def _kl_rows(p_log: Array, q_log: Array, valid: Array) -> Array:
    """sum_j p_j (log p_j - log q_j) over valid j (last axis), p given as log-probabilities."""
    p = jnp.exp(p_log)
    terms = jnp.where(valid, p * (p_log - q_log), 0.0)
    return jnp.sum(terms, axis=-1)


def list_scores(q_emb: Array, p_emb: Array, scale) -> Array:
    """Each query's scores for its own list: q_emb [B, D], p_emb [B, C, D] -> [B, C] float32."""
    return _f32(scale) * jnp.einsum("bd,bcd->bc", _f32(q_emb), _f32(p_emb))


def contrastive_loss(q_emb: Array, p_emb: Array, cand_mask: Array, scale) -> Array:
    """InfoNCE with cross-batch negatives.

    Args:
      q_emb: [B, D] query embeddings.
      p_emb: [B, C, D] candidate embeddings; p_emb[b, 0] is query b's positive.
      cand_mask: [B, C]; 0 removes a candidate from every query's softmax.
      scale: scalar multiplying q.p (1/temperature).

    Returns:
      Scalar float32: mean over queries whose positive is valid of
      -log softmax_{all valid (b', c)}(scale * q_b . p_{b', c})[(b, 0)]. 0 if none is valid.
    """
    b, c, d = p_emb.shape
    q = _f32(q_emb)  # [B, D]
    p = _f32(p_emb).reshape(b * c, d)  # [B*C, D]
    valid = _valid(cand_mask).reshape(b * c)  # [B*C]
    logits = _f32(scale) * (q @ p.T)  # [B, B*C]
    log_prob = _masked_log_softmax(logits, valid[None, :])  # [B, B*C]
    pos_idx = jnp.arange(b) * c
    nll = -log_prob[jnp.arange(b), pos_idx]  # [B]
    return _masked_mean(nll, valid[pos_idx])


def sentence_kl(s: Array, t: Array, mask: Array, temperature=1.0, t2_scaling: bool = True) -> Array:
    """List-level distillation KL(softmax(t/T) || softmax(s/T)).

    Args:
      s: [B, C] student scores.  t: [B, C] teacher scores (logits).
      mask: [B, C]; masked candidates leave both distributions.
      temperature: T.
      t2_scaling: multiply by T^2 (Hinton et al.), so that the gradient magnitude does not
        shrink as T grows; at the default T = 1 it changes nothing.

    Returns:
      Scalar float32: mean of the per-list KL over lists with at least 2 valid candidates
      (lists with 0 or 1 valid candidates contribute exactly 0, with zero gradient).
    """
    valid = _valid(mask)  # [B, C]
    used = jnp.sum(valid, axis=-1) >= 2  # [B]
    inv_t = 1.0 / _f32(temperature)
    # Double where: unused lists see constant inputs, so neither value nor gradient can blow up.
    s_safe = jnp.where(used[:, None], _f32(s), 0.0) * inv_t
    t_safe = jnp.where(used[:, None], _f32(t), 0.0) * inv_t
    kl = _kl_rows(_masked_log_softmax(t_safe, valid), _masked_log_softmax(s_safe, valid), valid)
    kl = jnp.where(used, kl, 0.0)
    out = _masked_mean(kl, used)
    if t2_scaling:
        out = out * _f32(temperature) ** 2
    return out


def inner_token_mask(mask: Array) -> Array:
    """Tokens strictly between [CLS] (position 0) and [SEP] (last real token), padding excluded.

    mask: [..., L] with right padding; the real length is mask.sum(-1). Returns bool [..., L].
    """
    valid = _valid(mask)
    length = jnp.sum(valid, axis=-1, keepdims=True)  # [..., 1]
    pos = jnp.arange(mask.shape[-1])
    return valid & (pos >= 1) & (pos < length - 1)


def word_kl(
    q_states: Array,
    q_mask: Array,
    p_states: Array,
    p_mask: Array,
    teacher_attn: Array,
    cand_mask: Array,
    temperature=1.0,
) -> Array:
    """Word-level distillation for one (student layer, teacher layer) pair.

    Args:
      q_states: [B, Lq, D] student query token states.
      q_mask: [B, Lq] query attention mask (right padded, [CLS] .. [SEP]).
      p_states: [B, K, Lp, D] student token states of the first K candidates of each list.
      p_mask: [B, K, Lp] their attention masks.
      teacher_attn: [B, K, Lq, Lp] teacher attention from query tokens to passage tokens
        (head-averaged, aligned index-for-index with the student tokens); any dtype.
      cand_mask: [B, K]; 0 drops the candidate.
      temperature: T_w, dividing the student's token logits (config.loss.word_temperature).
        Token states are not normalised, so their dot products set A_s's sharpness alone;
        T_w < 1 sharpens it. 1 is DESIGN.md's A_s exactly.

    For every valid query token i (not [CLS], not the final [SEP], not padding) and valid
    passage tokens j (likewise), A_t[i, :] is the teacher row renormalised over valid j and
    A_s[i, :] = softmax_j(h_q[i] . h_p[j] / (sqrt(D) T_w)). Query tokens whose teacher row has
    no mass on valid passage tokens are skipped. A teacher that read a longer passage gives
    its attention over the student's window only (Lp columns); the renormalisation over valid
    j makes it a distribution over that window.

    Returns:
      Scalar float32: KL(A_t || A_s) averaged over valid query tokens of each candidate, then
      over candidates with at least one such token. 0 (zero gradient) when nothing is valid.
    """
    d = q_states.shape[-1]
    q_ok = inner_token_mask(q_mask)  # [B, Lq]
    p_ok = inner_token_mask(p_mask)  # [B, K, Lp]
    c_ok = _valid(cand_mask)  # [B, K]

    logits = jnp.einsum("bid,bkjd->bkij", _f32(q_states), _f32(p_states)) / (jnp.sqrt(jnp.float32(d)) * _f32(temperature))
    p_ok_row = p_ok[:, :, None, :]  # [B, K, 1, Lp]
    s_log = _masked_log_softmax(logits, p_ok_row)  # [B, K, Lq, Lp]

    a_t = jnp.where(p_ok_row, jnp.maximum(_f32(teacher_attn), 0.0), 0.0)  # [B, K, Lq, Lp]
    mass = jnp.sum(a_t, axis=-1, keepdims=True)  # [B, K, Lq, 1]
    has_mass = mass > 0
    a_t = a_t / jnp.where(has_mass, mass, 1.0)
    pos = a_t > 0
    t_log = jnp.log(jnp.where(pos, a_t, 1.0))  # log of 0 never evaluated
    kl = jnp.sum(jnp.where(pos, a_t * (t_log - s_log), 0.0), axis=-1)  # [B, K, Lq]

    tok_w = q_ok[:, None, :] & has_mass[..., 0] & c_ok[:, :, None]  # [B, K, Lq]
    n_tok = jnp.sum(tok_w, axis=-1)  # [B, K]
    per_cand = jnp.sum(jnp.where(tok_w, kl, 0.0), axis=-1) / jnp.maximum(n_tok, 1)  # [B, K]
    return _masked_mean(per_cand, n_tok > 0)


def margin_mse(s: Array, t: Array, mask: Array) -> Array:
    """Margin-MSE: mean over valid (query, negative) pairs of ((s_0 - s_i) - (t_0 - t_i))^2.

    s, t: [B, C] student / teacher scores (c=0 the positive); mask: [B, C]. Pairs need a
    valid positive and a valid negative i >= 1. Returns scalar float32 (0 if no pair).
    """
    valid = _valid(mask)
    pair = valid[:, :1] & valid[:, 1:]  # [B, C-1]
    s, t = _f32(s), _f32(t)
    diff = (s[:, :1] - s[:, 1:]) - (t[:, :1] - t[:, 1:])
    return _masked_mean(jnp.square(diff), pair)


def list_accuracy(s: Array, mask: Array) -> Array:
    """Share of queries (with a valid positive) whose positive has the top own-list score."""
    valid = _valid(mask)
    top = jnp.argmax(jnp.where(valid, _f32(s), -jnp.inf), axis=-1)
    return _masked_mean(_f32(top == 0), valid[:, 0])


def compute_loss(
    loss_cfg,
    *,
    q_emb: Array,
    p_emb: Array,
    scale,
    q_states: Mapping[int, Array] | None = None,
    p_states: Mapping[int, Array] | None = None,
    batch: Mapping[str, Array],
) -> tuple[Array, dict[str, Array]]:
    """The total student loss selected by `config.loss`, and its metrics.

    Args:
      loss_cfg: `config.loss` (use_ce, use_sent, use_word, use_margin_mse, alpha, beta, gamma,
        kd_temperature, word_temperature, layer_pairs). Switches are read at trace time: terms that are off are
        never computed.
      q_emb: [B, D] query embeddings. p_emb: [B, C, D] candidate embeddings.
      scale: similarity scale (1/temperature).
      q_states: {student layer: [B, Lq, D]}, keys exactly pair[0] of `loss_cfg.layer_pairs`.
      p_states: {student layer: [B, K, Lp, D]} for the first K candidates of each list.
      batch: q_mask [B, Lq], p_mask [B, C, Lp], cand_mask [B, C], teacher_scores [B, C],
        teacher_attn [B, P, K, Lq, Lp] (P in `layer_pairs` order; needed when use_word), and
        optionally kd_mask [B, C]: the candidates the teacher terms (sentence, word, margin-MSE)
        read, where they differ from cand_mask (flagged candidates kept for the teacher's
        scores, out of the contrastive negatives); default cand_mask.

    Returns:
      (loss, metrics) with metrics 'loss', 'loss_ce', 'loss_sent', 'loss_word', 'loss_mse'
      (0.0 for terms switched off) and 'acc' (top-1 own-list accuracy).

    L = use_ce*L_ce + use_sent*alpha*L_sent + use_word*beta*L_word + use_margin_mse*gamma*L_mse,
    with L_sent scaled by T^2 and L_word the mean over layer pairs.
    """
    cand_mask = batch["cand_mask"]
    kd_mask = batch.get("kd_mask", cand_mask)
    s = list_scores(q_emb, p_emb, scale)  # [B, C]
    zero = jnp.zeros((), jnp.float32)
    terms = {"loss_ce": zero, "loss_sent": zero, "loss_word": zero, "loss_mse": zero}
    total = zero

    if loss_cfg.use_ce:
        terms["loss_ce"] = contrastive_loss(q_emb, p_emb, cand_mask, scale)
        total = total + terms["loss_ce"]
    if loss_cfg.use_sent:
        terms["loss_sent"] = sentence_kl(
            s, batch["teacher_scores"], kd_mask, loss_cfg.kd_temperature
        )
        total = total + loss_cfg.alpha * terms["loss_sent"]
    if loss_cfg.use_word:
        pairs = tuple(loss_cfg.layer_pairs)
        if not pairs:
            raise ValueError("config.loss.use_word is on but config.loss.layer_pairs is empty")
        for name, states in (("q_states", q_states), ("p_states", p_states)):
            missing = [p[0] for p in pairs if states is None or p[0] not in states]
            if missing:
                raise ValueError(
                    f"compute_loss: {name} lacks student layer(s) {missing} named in "
                    "config.loss.layer_pairs; encode with return_layers=[pair[0] for each pair]"
                )
        attn = batch["teacher_attn"]  # [B, P, K, Lq, Lp]
        if attn.shape[1] != len(pairs):
            raise ValueError(
                f"batch['teacher_attn'] has {attn.shape[1]} layer pairs (axis 1), "
                f"config.loss.layer_pairs has {len(pairs)}"
            )
        per_pair = []
        for i, (ls, _) in enumerate(pairs):
            k = p_states[ls].shape[1]
            per_pair.append(
                word_kl(
                    q_states[ls],
                    batch["q_mask"],
                    p_states[ls],
                    batch["p_mask"][:, :k],
                    attn[:, i, :k],
                    kd_mask[:, :k],
                    loss_cfg.word_temperature,
                )
            )
        terms["loss_word"] = sum(per_pair) / len(per_pair)
        total = total + loss_cfg.beta * terms["loss_word"]
    if loss_cfg.use_margin_mse:
        terms["loss_mse"] = margin_mse(s, batch["teacher_scores"], kd_mask)
        total = total + loss_cfg.gamma * terms["loss_mse"]

    metrics = {"loss": total, **terms, "acc": list_accuracy(jax.lax.stop_gradient(s), cand_mask)}
    return total, metrics
