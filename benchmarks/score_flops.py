"""XLA's FLOPs per (query, passage) pair of the teacher's scoring function (`teacher_forward`,
what `teacher.PairScorer` jits) for the pod configs, from the lowered HLO's cost analysis on
any CPU (abstract params: nothing is allocated or run). The configs' scoring costs quote it.

    .venv/bin/python benchmarks/score_flops.py [--configs msmarco_bert_base nq_bert_base]

Prints one JSON line per config. A few seconds per config.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=["msmarco_bert_base", "nq_bert_base"])
    parser.add_argument("--batch", type=int, default=256, help="pairs per call (per chip on the pod configs)")
    args = parser.parse_args()

    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from md2pr_jax.models import teacher_from_config
    from md2pr_jax.train.state import init_teacher_boxed
    from md2pr_jax.train.step import teacher_forward

    for name in args.configs:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        config = module.get_config()
        config.teacher.init = ""  # shapes only: no pretrained weights needed
        teacher = teacher_from_config(config)
        params = jax.eval_shape(lambda r: nn.unbox(init_teacher_boxed(teacher, config, r)), jax.random.PRNGKey(0))
        b, lq, lp = args.batch, config.data.max_query_len, config.data.max_passage_len
        batch = {"q_ids": jax.ShapeDtypeStruct((b, lq), jnp.int32), "q_mask": jax.ShapeDtypeStruct((b, lq), jnp.int32),
                 "p_ids": jax.ShapeDtypeStruct((b, 1, lp), jnp.int32),
                 "p_mask": jax.ShapeDtypeStruct((b, 1, lp), jnp.int32)}
        cost = jax.jit(lambda p, x: teacher_forward(teacher, p, x, (), 1)).lower(params, batch).cost_analysis()
        print(json.dumps({"config": name, "tokens_per_pair": lq + lp, "dtype": config.model.dtype,
                          "flops_per_pair": cost["flops"] / b, "mine_depth": int(config.rounds.mine_depth),
                          "score_batch_size": int(config.teacher_train.score_batch_size)}))


if __name__ == "__main__":
    main()
