"""Flax models: one BERT encoder, the dual-encoder student and the cross-encoder teacher."""

from md2pr_jax.models.bert import Bert, bert_module_config, with_dropout
from md2pr_jax.models.cross_encoder import CrossEncoder, pair_inputs
from md2pr_jax.models.dual_encoder import DualEncoder, pool


def student_from_config(config, deterministic: bool = True) -> DualEncoder:
    s = config.student
    return DualEncoder(
        bert_module_config(s.bert, config.model, deterministic),
        pooling=s.pooling,
        normalize=s.normalize,
        shared_towers=s.shared_towers,
    )


def teacher_from_config(config, deterministic: bool = True) -> CrossEncoder:
    t = config.teacher
    return CrossEncoder(bert_module_config(t.bert, config.model, deterministic), head=t.head,
                        head_scale=float(t.head_scale), head_bias=float(t.head_bias))


__all__ = [
    "Bert",
    "CrossEncoder",
    "DualEncoder",
    "bert_module_config",
    "pair_inputs",
    "pool",
    "student_from_config",
    "teacher_from_config",
    "with_dropout",
]
