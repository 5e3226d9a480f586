"""The teacher: a cross-encoder reading `[CLS] q [SEP] p [SEP]` and returning a relevance score.

Alignment by construction: the input is the student's padded query ids [B, Lq] followed by
the student's padded passage ids [B, Lp], with the passage's own [CLS] masked out. Position
ids count real tokens only, so the result equals Hugging Face on the packed sequence, and the
query->passage attention block [Lq, Lp] lines up index for index with the student's query
and passage token states (column 0, the passage's [CLS], is always zero).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from md2pr_jax.models.bert import EMBED, Bert, _dense
from md2pr_jax.models.dual_encoder import pool

Array = jax.Array


def pair_inputs(q_ids: Array, q_mask: Array, p_ids: Array, p_mask: Array):
    """Builds the teacher input from student-layout ids: (ids, mask, type_ids, pos_ids), each [B, Lq+Lp]."""
    q_ids, q_mask, p_ids, p_mask = (jnp.asarray(x) for x in (q_ids, q_mask, p_ids, p_mask))
    p_mask = p_mask.at[:, 0].set(0)  # the passage's [CLS] is not part of the pair
    ids = jnp.concatenate([q_ids, p_ids], axis=1)
    mask = jnp.concatenate([q_mask, p_mask], axis=1).astype(jnp.int32)
    type_ids = jnp.concatenate([jnp.zeros_like(q_ids), jnp.ones_like(p_ids)], axis=1)
    pos_ids = jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)
    return ids, mask, type_ids, pos_ids


class CrossEncoder(nn.Module):
    """BERT over the pair + a score head.

    head 'cls': pooler + one-logit classifier (HF BertForSequenceClassification, num_labels=1).
    head 'segment_cosine': `scale * cos(mean(query tokens), mean(passage tokens)) + bias`, the
      means taken over the two segments of the *joint* encoding. Initialised from a mean-pooling
      sentence encoder, it starts as that encoder's similarity with cross-attention added, so
      fine-tuning begins from a working ranker instead of a random [CLS] head.
    """

    cfg: dict
    head: str = "cls"
    head_scale: float = 20.0  # initial scale and bias of the segment_cosine head
    head_bias: float = -10.0

    @nn.compact
    def __call__(
        self, q_ids: Array, q_mask: Array, p_ids: Array, p_mask: Array, attention_layers: Sequence[int] = (),
        attention_window: int | None = None,
    ) -> tuple[Array, dict[int, Array]]:
        """q_*: [B, Lq], p_*: [B, Lp] -> (score logits [B] float32, {layer: attention [B, Lq, W]}).

        The attention rows are the head-averaged softmax over the whole pair, kept for the
        first W = attention_window passage positions (default Lp): a teacher reading a longer
        passage than the student gives its attention over the student's window. `losses.py`
        renormalises them over the passage tokens.
        """
        lq, lp = q_ids.shape[1], p_ids.shape[1]
        window = lp if attention_window is None else int(attention_window)
        if not 0 < window <= lp:
            raise ValueError(f"attention_window={window} must lie in [1, {lp}] (the passage length the teacher read)")
        ids, mask, type_ids, pos_ids = pair_inputs(q_ids, q_mask, p_ids, p_mask)
        out = Bert(self.cfg, add_pooler=True, name="bert")(
            ids,
            mask,
            type_ids,
            pos_ids,
            attention_block=(lq, lq + window),
            attention_layers=attention_layers,
        )
        if self.head == "cls":
            logit = _dense(1, (EMBED, None), self.cfg, "classifier")(out["pooled"])[:, 0]
        elif self.head == "segment_cosine":
            logit = segment_cosine_head(out["last"], mask, lq, self.head_scale, self.head_bias)
        else:
            raise ValueError(f"unknown teacher head {self.head!r}; use 'cls' or 'segment_cosine'")
        return logit.astype(jnp.float32), out["attn"]


class _ScaleBias(nn.Module):
    scale: float
    bias: float

    @nn.compact
    def __call__(self, x: Array) -> Array:
        s = self.param("scale", nn.with_logical_partitioning(nn.initializers.constant(self.scale), ()), ())
        b = self.param("bias", nn.with_logical_partitioning(nn.initializers.constant(self.bias), ()), ())
        return s * x + b


def segment_cosine_head(last: Array, mask: Array, lq: int, scale: float, bias: float) -> Array:
    q = pool(last[:, :lq], mask[:, :lq], "mean")
    p = pool(last[:, lq:], mask[:, lq:], "mean")
    cos = (q * p).sum(-1) / (jnp.linalg.norm(q, axis=-1) * jnp.linalg.norm(p, axis=-1) + 1e-6)
    return _ScaleBias(scale, bias, name="score_head")(cos)
