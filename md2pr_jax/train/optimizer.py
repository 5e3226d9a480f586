"""The student's optimizer: AdamW, linear warmup then linear decay to 0, global-norm clipping.

Weight decay applies to kernels and embedding tables only, never to biases or LayerNorm
scales (the BERT convention). Gradient accumulation is not done here (no optax.MultiSteps):
the train step scans over micro-batches inside one jitted call (see `train/step.py`), which
keeps one optimizer update per call and one set of shardings under jit.
"""

from __future__ import annotations

from typing import Any

import jax
import optax

DECAYED_LEAVES = ("kernel", "embedding")


def make_schedule(train_cfg, total_steps: int) -> optax.Schedule:
    """lr(step): 0 -> train_cfg.lr linearly over warmup_steps, then linearly to 0 at total_steps."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    warmup = int(min(max(train_cfg.warmup_steps, 0), total_steps))
    lr = float(train_cfg.lr)
    decay = optax.linear_schedule(lr, 0.0, max(total_steps - warmup, 1))
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), decay], [warmup])


def decay_mask(params: Any) -> Any:
    """True for the leaves that get weight decay: those named 'kernel' or 'embedding'.
    Works on plain and on `nn.Partitioned`-boxed trees (the name is the last dict key)."""

    def leaf_name(path) -> str:
        keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
        return str(keys[-1]) if keys else ""

    return jax.tree_util.tree_map_with_path(lambda path, _: leaf_name(path) in DECAYED_LEAVES, params)


def make_optimizer(train_cfg, total_steps: int) -> optax.GradientTransformation:
    """optax chain: clip_by_global_norm(train_cfg.grad_clip) then AdamW with `make_schedule`
    and train_cfg.weight_decay on kernels and embeddings. grad_clip <= 0 disables clipping."""
    schedule = make_schedule(train_cfg, total_steps)
    parts = []
    if train_cfg.grad_clip and train_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(float(train_cfg.grad_clip)))
    parts.append(
        optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=float(train_cfg.weight_decay), mask=decay_mask)
    )
    return optax.chain(*parts)
