"""The student: a dual encoder scoring query and passage by the dot product of embeddings."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from md2pr_jax.models.bert import Bert

Array = jax.Array


def pool(states: Array, mask: Array, how: str) -> Array:
    """states: [B, L, D], mask: [B, L] -> [B, D] by 'cls' or masked 'mean' pooling (float32)."""
    states = states.astype(jnp.float32)
    if how == "cls":
        return states[:, 0]
    m = mask.astype(jnp.float32)[..., None]
    return (states * m).sum(1) / jnp.maximum(m.sum(1), 1e-9)


class DualEncoder(nn.Module):
    """Query and passage towers (one shared BERT, or two).

    Attributes:
      cfg: the BERT module dict (see `bert.bert_module_config`).
      pooling: 'mean' or 'cls'.
      normalize: L2-normalise the embeddings.
      shared_towers: one encoder (`encoder`) or two (`query_encoder`, `passage_encoder`).
    """

    cfg: dict
    pooling: str = "mean"
    normalize: bool = True
    shared_towers: bool = True

    def setup(self):
        if self.shared_towers:
            enc = Bert(self.cfg, name="encoder")
            self.towers = {"query": enc, "passage": enc}
        else:
            self.towers = {
                "query": Bert(self.cfg, name="query_encoder"),
                "passage": Bert(self.cfg, name="passage_encoder"),
            }

    def encode(
        self, ids: Array, mask: Array, tower: str = "passage", return_layers: Sequence[int] = ()
    ) -> tuple[Array, dict[int, Array]]:
        """ids, mask: [B, L] -> (embedding [B, D] float32, {layer: token states [B, L, D]})."""
        out = self.towers[tower](ids, mask, return_layers=return_layers)
        emb = pool(out["last"], mask, self.pooling)
        if self.normalize:
            emb = emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), 1e-12)
        return emb, out["states"]

    def encode_query(self, ids, mask, return_layers: Sequence[int] = ()):
        return self.encode(ids, mask, "query", return_layers)

    def encode_passage(self, ids, mask, return_layers: Sequence[int] = ()):
        return self.encode(ids, mask, "passage", return_layers)

    def __call__(self, q_ids, q_mask, p_ids, p_mask):
        """Initialises every tower; returns (q_emb [B, D], p_emb [N, D])."""
        return self.encode_query(q_ids, q_mask)[0], self.encode_passage(p_ids, p_mask)[0]
