"""Data: TFDS builders (BEIR, MS MARCO passage, NQ/DPR), their official sources and fetching,
tokenized prepared datasets, the grain pipeline.

The names below are imported on first use, so that `python -m md2pr_jax.data.fetch --check`
loads neither TFDS nor JAX.
"""

import importlib

_LAZY = {
    "RetrievalDataset": "md2pr_jax.data.prepare",
    "load_prepared": "md2pr_jax.data.prepare",
    "prepare_dataset": "md2pr_jax.data.prepare",
    "prepare_mode": "md2pr_jax.data.prepare",
    "BadRecordError": "md2pr_jax.data.records",
}
__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'md2pr_jax.data' has no attribute {name!r}")
