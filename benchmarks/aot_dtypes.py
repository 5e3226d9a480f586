"""A pod config's train step compiled for a TPU topology in bf16 and in f32, side by side.

The GPU-free check of the bf16 path: `--mode aot` (md2pr_jax/aot.py) once per compute dtype
(`--config.model.dtype`; params stay in `model.param_dtype`) and topology, one after the other,
each in its own process. Per run: bytes per chip, FLOPs per step, whether it fits (a step XLA
finds too big for HBM is reported as not fitting, with XLA's message), and the dtypes of every
dot and convolution in the optimised HLO, with the source lines of those that take an f32
operand (a bf16 step should have them only in losses.py).

    .venv/bin/python benchmarks/aot_dtypes.py [--config configs/msmarco_bert_base.py] \
        [--topologies v5e:4x4,v6e:4x4] [--workdir /tmp/aot_dtypes]

--topologies defaults to the config's own; a second one with more HBM per chip compiles the
f32 step where it does not fit the first. Writes JSON (default
benchmarks/results/aot_dtypes_<config name>.json). Each compile of a pod config takes 6-12
minutes on 2 cores; a report already in the workdir (WORKDIR/<dtype>/aot/<topology>.json) is
not compiled again.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DTYPES = ("bfloat16", "float32")


def aot_report(config: str, workdir: str, dtype: str, topology: str) -> dict:
    """The `--mode aot` report of `config` for `topology` with compute dtype `dtype` (cached
    in workdir)."""
    path = os.path.join(workdir, "aot", topology.replace(":", "_") + ".json")
    if not os.path.exists(path):
        cmd = [sys.executable, "-m", "md2pr_jax.main", "--config", config, "--workdir", workdir, "--mode", "aot",
               "--topology", topology, f"--config.model.dtype={dtype}"]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), check=True)
    with open(path) as f:
        return json.load(f)


def summary(report: dict) -> dict:
    """The comparison's row of one report."""
    row = {
        "topology": report["topology"],
        "dtype": report["dtype"],
        "hbm_gib": report["hbm_bytes_per_chip"] / 2**30,
        "fits": report["fits"],
        "compile_s": report["compile_s"],
    }
    if "out_of_memory" in report:
        return {**row, "out_of_memory": report["out_of_memory"]}
    outside_loss = [f for f in report["f32_dots"] if not f["source"].startswith("md2pr_jax/losses.py")]
    return {
        **row,
        "gib_per_chip": report["gib_per_chip"],
        "flops_per_step": report["flops_per_step"],
        "dots": report["dots"],
        "f32_dots_outside_loss": sum(f["count"] for f in outside_loss),
    }


def main(argv=None) -> dict:
    from md2pr_jax.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/msmarco_bert_base.py")
    ap.add_argument("--topologies", default="", help="comma list; default the config's aot.topology")
    ap.add_argument("--workdir", default="/tmp/aot_dtypes")
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)
    name = os.path.splitext(os.path.basename(args.config))[0]
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"aot_dtypes_{name}.json")
    topologies = args.topologies.split(",") if args.topologies else [load_config(os.path.join(ROOT, args.config)).aot.topology]
    reports = [aot_report(args.config, os.path.join(args.workdir, d), d, t) for t in topologies for d in DTYPES]
    rows = [summary(r) for r in reports]
    for row in rows:
        print(json.dumps(row))
    result = {"config": args.config, "summary": rows, "reports": reports}
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
        f.write("\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
