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
    """BERT + pooler + one-logit classifier (HF BertForSequenceClassification, num_labels=1)."""

    cfg: dict

    @nn.compact
    def __call__(
        self, q_ids: Array, q_mask: Array, p_ids: Array, p_mask: Array, attention_layers: Sequence[int] = ()
    ) -> tuple[Array, dict[int, Array]]:
        """q_*: [B, Lq], p_*: [B, Lp] -> (score logits [B] float32, {layer: attention [B, Lq, Lp]}).

        The attention rows are the head-averaged softmax over the whole pair; `losses.py`
        renormalises them over the passage tokens.
        """
        lq, lp = q_ids.shape[1], p_ids.shape[1]
        ids, mask, type_ids, pos_ids = pair_inputs(q_ids, q_mask, p_ids, p_mask)
        out = Bert(self.cfg, add_pooler=True, name="bert")(
            ids,
            mask,
            type_ids,
            pos_ids,
            attention_block=(lq, lq + lp),
            attention_layers=attention_layers,
        )
        logit = _dense(1, (EMBED, None), self.cfg, "classifier")(out["pooled"])
        return logit[:, 0].astype(jnp.float32), out["attn"]
