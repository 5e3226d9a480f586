"""One BERT encoder for the student and the teacher.

Pure-functional Flax linen: params in, arrays out. The parameter tree mirrors Hugging Face's
`BertModel` names (`embeddings/word_embeddings`, `encoder/layer_3/attention/self/query`, ...)
so that `hf.py` converts by renaming and transposing. Every parameter carries logical axis
names; `sharding.py` maps them to mesh axes.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import partitioning as nn_partitioning

Array = jax.Array

# Logical axis names used by the parameters and activations of this module.
EMBED, HEADS, MLP, VOCAB = "embed", "heads", "mlp", "vocab"
BATCH, LENGTH = "batch", "length"


def _dtype(name: str | Any):
    return jnp.dtype(name) if isinstance(name, str) else name


def _dense(features: int, names: tuple[str, str], cfg: dict, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=_dtype(cfg["dtype"]),
        param_dtype=_dtype(cfg["param_dtype"]),
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (names[1],)),
        name=name,
    )


def _layer_norm(cfg: dict, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        epsilon=cfg["layer_norm_eps"],
        dtype=_dtype(cfg["dtype"]),
        param_dtype=_dtype(cfg["param_dtype"]),
        scale_init=nn.with_logical_partitioning(nn.initializers.ones, (EMBED,)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (EMBED,)),
        name=name,
    )


def gelu_erf(x: Array) -> Array:
    """Exact GELU as Hugging Face writes it, x/2 * (1 + erf(x/sqrt 2)). jax.nn.gelu's exact
    form goes through erfc, whose two-branch lowering cost the CPU train step about 4% more."""
    return 0.5 * x * (1.0 + jax.lax.erf(x * jnp.asarray(0.5**0.5, x.dtype)))


def _act(name: str):
    if name == "gelu":  # HF's "gelu" is the exact erf form
        return gelu_erf
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return lambda x: jax.nn.gelu(x, approximate=True)
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"unsupported hidden_act {name!r}; use gelu, gelu_new or relu")


class SelfAttention(nn.Module):
    cfg: dict

    @nn.compact
    def __call__(self, x: Array, bias: Array) -> tuple[Array, Array]:
        """x: [B, L, D], bias: [B, 1, 1|L, L] additive mask -> (context [B, L, D], probs [B, H, L, L])."""
        c = self.cfg
        d, h = c["hidden_size"], c["num_heads"]
        hd = d // h

        def proj(name):
            y = _dense(d, (EMBED, HEADS), c, name)(x)
            return y.reshape(*y.shape[:2], h, hd)

        # Heads moved in front of the length explicitly ([B, H, L, hd]; k as [B, H, hd, L]), the
        # scale applied to q: XLA:CPU then runs both products as plain batched matmuls. Written
        # as einsums over [B, L, H, hd] with the scale on the logits, the CPU forward of
        # MiniLM took 25% longer (README, "Benchmarks": the profile).
        q = (proj("query") * (hd**-0.5)).transpose(0, 2, 1, 3)
        k = proj("key").transpose(0, 2, 3, 1)
        v = proj("value").transpose(0, 2, 1, 3)
        # Softmax in float32 whatever the compute dtype: bf16 softmax loses the small weights.
        logits = (q @ k).astype(jnp.float32) + bias  # [B, H, L, L]
        weights = jnp.exp(logits - jax.lax.stop_gradient(logits.max(-1, keepdims=True)))
        total = weights.sum(-1, keepdims=True)  # [B, H, L, 1]
        # Normalised after the product with v, on [B, H, L, hd] rather than [B, H, L, L] (the
        # same softmax; dropout's per-element mask commutes with the per-row division). The
        # normalised probabilities are built only where a caller reads them (teacher maps).
        drop = nn.Dropout(c["attention_dropout"])(weights, deterministic=c["deterministic"])
        ctx = ((drop.astype(v.dtype) @ v) / total.astype(v.dtype)).transpose(0, 2, 1, 3)  # [B, L, H, hd]
        return ctx.reshape(*ctx.shape[:2], d), weights / total


class BertLayer(nn.Module):
    cfg: dict

    @nn.compact
    def __call__(self, x: Array, bias: Array) -> tuple[Array, Array]:
        c = self.cfg
        det = c["deterministic"]
        ctx, probs = SelfAttention(c, name="self")(x, bias)
        ctx = _dense(c["hidden_size"], (HEADS, EMBED), c, "output_dense")(ctx)
        ctx = nn.Dropout(c["hidden_dropout"])(ctx, deterministic=det)
        x = _layer_norm(c, "attention_output_LayerNorm")(x + ctx)
        y = _dense(c["intermediate_size"], (EMBED, MLP), c, "intermediate_dense")(x)
        y = _act(c["hidden_act"])(y)
        y = _dense(c["hidden_size"], (MLP, EMBED), c, "output_dense_ffn")(y)
        y = nn.Dropout(c["hidden_dropout"])(y, deterministic=det)
        x = _layer_norm(c, "output_LayerNorm")(x + y)
        x = nn_partitioning.with_sharding_constraint(x, (BATCH, LENGTH, EMBED))
        return x, probs


class Embeddings(nn.Module):
    cfg: dict

    @nn.compact
    def __call__(self, ids: Array, type_ids: Array, pos_ids: Array) -> Array:
        c = self.cfg

        def table(n, name, names):
            return nn.Embed(
                n,
                c["hidden_size"],
                dtype=_dtype(c["dtype"]),
                param_dtype=_dtype(c["param_dtype"]),
                embedding_init=nn.with_logical_partitioning(nn.initializers.normal(0.02), names),
                name=name,
            )

        x = table(c["vocab_size"], "word_embeddings", (VOCAB, EMBED))(ids)
        x = x + table(c["max_position_embeddings"], "position_embeddings", (None, EMBED))(pos_ids)
        x = x + table(c["type_vocab_size"], "token_type_embeddings", (None, EMBED))(type_ids)
        x = _layer_norm(c, "LayerNorm")(x)
        return nn.Dropout(c["hidden_dropout"])(x, deterministic=c["deterministic"])


class Bert(nn.Module):
    """BERT encoder.

    Attributes:
      cfg: the shape (`config.bert_shape()` keys) merged with dtype, param_dtype, remat,
        dropouts and `deterministic`; built by `bert_module_config`.
      add_pooler: create HF's pooler (tanh dense on [CLS]); the teacher's score head uses it.
    """

    cfg: dict
    add_pooler: bool = False

    @nn.compact
    def __call__(
        self,
        ids: Array,
        mask: Array,
        type_ids: Array | None = None,
        pos_ids: Array | None = None,
        *,
        return_layers: Sequence[int] = (),
        attention_block: tuple[int, int] | None = None,
        attention_layers: Sequence[int] = (),
    ) -> dict[str, Any]:
        """Encodes token ids.

        Args:
          ids, mask: [B, L] token ids and a 0/1 mask of real tokens.
          type_ids: [B, L] segment ids (default 0).
          pos_ids: [B, L] position ids (default 0..L-1).
          return_layers: layer indices (0 = embeddings output, i = after layer i, negative
            from the end) whose token states to return.
          attention_block: (split, end): with attention_layers, return the head-averaged
            attention from positions [0, split) to [split, end) — the query->passage block.
          attention_layers: 1-based layer indices (negative from the end) for that block.

        Returns:
          dict with `last` [B, L, D], `states` {layer: [B, L, D]}, `attn` {layer: [B, Lq, Lp]},
          and `pooled` [B, D] when add_pooler.
        """
        c = self.cfg
        n = c["num_layers"]
        if type_ids is None:
            type_ids = jnp.zeros_like(ids)
        if pos_ids is None:
            pos_ids = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        want_states = {layer_index(l, n) for l in return_layers}
        want_attn = {layer_index(l, n, attention=True) for l in attention_layers}

        x = Embeddings(c, name="embeddings")(ids, type_ids, pos_ids)
        x = nn_partitioning.with_sharding_constraint(x, (BATCH, LENGTH, EMBED))
        bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min).astype(jnp.float32)
        states, attn = {}, {}
        if 0 in want_states:
            states[0] = x
        layer_cls = BertLayer
        if c["remat"]:
            layer_cls = nn.remat(BertLayer, prevent_cse=False)
        for i in range(1, n + 1):
            x, probs = layer_cls(c, name=f"layer_{i - 1}")(x, bias)
            if i in want_states:
                states[i] = x
            if i in want_attn and attention_block is not None:
                split, end = attention_block
                attn[i] = probs[:, :, :split, split:end].mean(axis=1)  # [B, Lq, Lp]
        out = {"last": x, "states": states, "attn": attn}
        if self.add_pooler:
            dense = _dense(c["hidden_size"], (EMBED, None), c, "pooler")
            out["pooled"] = jnp.tanh(dense(x[:, 0]))
        return out


def layer_index(layer: int, num_layers: int, *, attention: bool = False) -> int:
    """The layer a configured index names, as Hugging Face counts them.

    Token states: 0 is the embeddings output, i the output of layer i, -1 the last layer
    (`hidden_states[l]` in Hugging Face). Attention: 1..n are layers 1..n, -1 the last
    (`attentions[l - 1]`, or `attentions[l]` for negative l). Out-of-range indices raise.
    """
    first = 1 if attention else 0
    lo, hi = (-num_layers if attention else -(num_layers + 1)), num_layers
    if not (lo <= layer <= hi) or (attention and layer == 0):
        kind = "attention" if attention else "token-state"
        raise ValueError(
            f"{kind} layer {layer} is out of range for a {num_layers}-layer encoder: use "
            f"{first}..{num_layers} or {lo}..-1 (negative from the end)"
        )
    return layer if layer >= first else num_layers + 1 + layer


def with_dropout(module: nn.Module) -> nn.Module:
    """The training copy of a student or teacher module: dropout on when `config.model`
    sets a rate above 0 (the same module otherwise, so a dropout-free step stays deterministic).
    Encoding, scoring and evaluation keep the deterministic module."""
    c = module.cfg
    if c["deterministic"] and max(c["attention_dropout"], c["hidden_dropout"]) > 0:
        return module.clone(cfg={**c, "deterministic": False})
    return module


def bert_module_config(shape, model, deterministic: bool = True) -> dict:
    """Flattens a `bert_shape()` ConfigDict and `config.model` into the module's dict."""
    d = dict(shape)
    d.update(
        dtype=model.dtype,
        param_dtype=model.param_dtype,
        remat=bool(model.remat),
        attention_dropout=float(model.attention_dropout),
        hidden_dropout=float(model.hidden_dropout),
        deterministic=deterministic,
    )
    return d
