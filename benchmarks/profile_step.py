"""Where the JAX train step's time goes: per-op wall times of the compiled student step.

Compiles `benchmarks/train_step.py`'s student-only step (MiniLM shape, --batch queries x 8
passages, lengths 32/128), runs it under `jax.profiler` and groups the XLA:CPU thunks of one
step by the model op they come from (the op name with layer numbers folded: `layer_N/...`),
forward and backward apart. Also writes the optimised HLO, so a fusion in the table can be
read in full (in the trace folder, printed at the end).

    .venv/bin/python benchmarks/profile_step.py [--batch 16] [--steps 2] [--out PATH]

Writes JSON (default benchmarks/results/profile_step_cpu.json). About a minute on 2 cores.
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import re
import sys
import tempfile
import time


def _op_key(op_name: str) -> str:
    """'jit(train_step)/transpose(jvp(DualEncoder.encode_passage))/.../layer_3/self/dot_general'
    -> 'backward passage layer_N/self/dot_general'."""
    direction = "backward" if "transpose(" in op_name else "forward"
    tower = "query" if "encode_query" in op_name else "passage" if "encode_passage" in op_name else "other"
    tail = op_name.split("DualEncoder.encode/")[-1] if "DualEncoder.encode/" in op_name else op_name.split("/")[-1]
    tail = re.sub(r"layer_\d+", "layer_N", tail.replace("encoder/", ""))
    return f"{direction} {tower} {tail}"


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=2, help="profiled steps (after one untimed)")
    ap.add_argument("--top", type=int, default=30)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "profile_step_cpu.json"))
    args = ap.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import jax
    from jax.profiler import ProfileData

    import train_step as ts
    from md2pr_jax import sharding as shd
    from md2pr_jax.models import student_from_config
    from md2pr_jax.train import create_train_state, make_train_step

    config = ts.bench_config(False, False, 0.0, args.batch, "float32")
    mesh = shd.make_mesh(config)
    student = student_from_config(config)
    state = create_train_state(config, mesh, student=student)
    batch = shd.to_global(ts.synthetic_batch(args.batch), mesh)
    compiled = make_train_step(config, mesh, student).lower(state, batch, None).compile()
    hlo = compiled.as_text()
    state, metrics = compiled(state, batch, None)
    jax.block_until_ready(metrics)

    trace_dir = tempfile.mkdtemp(prefix="md2pr_profile_")
    wall = []
    jax.profiler.start_trace(trace_dir)
    for _ in range(args.steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch, None)
        jax.block_until_ready(metrics)
        wall.append(time.perf_counter() - t0)
    jax.profiler.stop_trace()
    xplane = max(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)

    op_names = {}  # HLO instruction -> op_name of its metadata
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*op_name=\"([^\"]*)\"", line)
        if m:
            op_names[m.group(1)] = m.group(2)
    by_op, by_kind = collections.Counter(), collections.Counter()
    for plane in ProfileData.from_file(xplane).planes:
        for line in plane.lines:
            if not line.name.startswith(("tf_XLAEigen", "tf_XLAPjRt")):
                continue
            for ev in line.events:
                if ev.name.startswith("ThunkExecutor"):
                    continue
                seconds = ev.duration_ns / 1e9 / args.steps
                kind = re.sub(r"\.\d+$", "", ev.name)
                op = op_names.get(ev.name)
                by_op[_op_key(op) if op else f"unmapped {kind}"] += seconds
                by_kind[kind] += seconds
    total = sum(by_op.values())
    result = {
        "what": "JAX student-only train step (benchmarks/train_step.py shape), XLA:CPU thunk wall times per step",
        "batch": args.batch,
        "jax": jax.__version__,
        "step_wall_s": wall,
        "thunks_s": total,
        # Rows under a millisecond (runtime bookkeeping events, tiny fusions) are left out.
        "by_op": [{"op": k, "s": round(v, 4), "share": round(v / total, 4)} for k, v in by_op.most_common() if v >= 1e-3],
        "by_thunk_kind": [{"kind": k, "s": round(v, 4)} for k, v in by_kind.most_common() if v >= 1e-3],
        "command": "python benchmarks/profile_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    hlo_path = os.path.join(trace_dir, "train_step.hlo.txt")  # a few MB: not kept in the repository
    with open(hlo_path, "w") as f:
        f.write(hlo)
    print(f"step {min(wall):.2f} s, thunks {total:.2f} s per step; HLO in {hlo_path}, trace in {trace_dir}")
    for row in result["by_op"][: args.top]:
        print(f"{row['s']:8.3f} s {100 * row['share']:5.1f}%  {row['op']}")
    return result


if __name__ == "__main__":
    main()
