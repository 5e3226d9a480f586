"""Step time of a config's cached-mode student step and its teacher's scoring throughput, on
this machine's JAX devices, at the config's shapes (random token ids, every token real).

    .venv/bin/python benchmarks/small_student_step.py --config configs/nfcorpus_minilm.py [--steps 5]

Prints JSON: seconds per student step (median over --steps, after one compile step and one
warm-up step) and teacher pairs per second at query + teacher passage length. Parameters are
the config's initialisation (the 3-layer cut of all-MiniLM-L6-v2 for the small-student configs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--score-batch", type=int, default=64)
    args = ap.parse_args()

    from md2pr_jax import sharding as shd
    from md2pr_jax.config import load_config, teacher_passage_len
    from md2pr_jax.models import student_from_config, teacher_from_config
    from md2pr_jax.params import init_student_params, init_teacher_params
    from md2pr_jax.train import create_train_state, make_train_step
    from md2pr_jax.train.step import teacher_forward, teacher_layers, word_candidates

    cfg = load_config(args.config)
    mesh = shd.make_mesh(cfg)
    student, teacher = student_from_config(cfg), teacher_from_config(cfg)
    b, c = int(cfg.train.batch_size), 1 + int(cfg.data.num_negatives)
    lq, lp, lt = int(cfg.data.max_query_len), int(cfg.data.max_passage_len), teacher_passage_len(cfg)
    rng = np.random.default_rng(0)
    ids = lambda *shape: rng.integers(1000, 30000, size=shape).astype(np.int32)  # noqa: E731
    k, pairs = word_candidates(cfg, c), len(teacher_layers(cfg))
    batch = {"q_ids": ids(b, lq), "q_mask": np.ones((b, lq), np.int32), "p_ids": ids(b, c, lp),
             "p_mask": np.ones((b, c, lp), np.int32), "cand_mask": np.ones((b, c), np.float32),
             "teacher_scores": rng.normal(size=(b, c)).astype(np.float32),
             "teacher_attn": rng.random((b, pairs, k, lq, lp)).astype(jax.numpy.bfloat16)}
    state = create_train_state(cfg, mesh, init_student_params(cfg), student=student)
    step = make_train_step(cfg, mesh, student, total_steps=100)
    gbatch = shd.to_global(batch, mesh)
    times = []
    for i in range(args.steps + 2):
        t0 = time.perf_counter()
        state, metrics = step(state, gbatch, None)
        jax.block_until_ready(metrics["loss"])
        if i >= 2:
            times.append(time.perf_counter() - t0)

    tparams = init_teacher_params(cfg)
    n = int(args.score_batch)
    tb = {"q_ids": ids(n, lq), "q_mask": np.ones((n, lq), np.int32), "p_ids": ids(n, 1, lt),
          "p_mask": np.ones((n, 1, lt), np.int32)}
    score = jax.jit(lambda p, x: teacher_forward(teacher, p, x, teacher_layers(cfg), 1, window=lp))
    jax.block_until_ready(score(tparams, tb))
    ttimes = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(score(tparams, tb))
        ttimes.append(time.perf_counter() - t0)
    print(json.dumps({"config": args.config, "device": jax.devices()[0].device_kind,
                      "student_layers": int(cfg.student.bert.num_layers), "batch": [b, c, lq, lp],
                      "student_step_s": round(statistics.median(times), 3), "student_steps_s": [round(t, 3) for t in times],
                      "teacher_layers": int(cfg.teacher.bert.num_layers), "teacher_len": lq + lt,
                      "teacher_pairs_per_s": round(n / statistics.median(ttimes), 1)}, indent=1))


if __name__ == "__main__":
    main()
