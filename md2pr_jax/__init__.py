"""md2pr_jax: MD2PR dense retrievers (multi-level distillation) in JAX/Flax, from one CPU host to a TPU pod."""

__version__ = "0.1.0"
