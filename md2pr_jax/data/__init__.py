"""Data: TFDS builders (BEIR, MS MARCO passage, NQ/DPR), tokenized prepared datasets, the grain pipeline."""

from md2pr_jax.data.prepare import RetrievalDataset, load_prepared, prepare_dataset, prepare_mode
from md2pr_jax.data.records import BadRecordError

__all__ = ["BadRecordError", "RetrievalDataset", "load_prepared", "prepare_dataset", "prepare_mode"]
