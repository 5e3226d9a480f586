"""Data preparation alone at a pod host's share, on a scale rehearsal's synthetic MS MARCO files.

    .venv/bin/python benchmarks/prepare_at_scale.py --rehearsal-workdir /tmp/rehearsal_full \\
        [--threads 0] [--out benchmarks/results/prepare_at_scale.json]

Reads the TSVs that benchmarks/scale_rehearsal.py generated (its `source/`), prepares them with
the rehearsal's config into a fresh cache folder (TFDS build, tokenization, the prepared
tables) and writes {passages, wall_s, passages_per_s, peak_rss_gb, threads, prepared seconds}
as JSON: the rehearsal's `prepare` stage measured again on the current preparation code,
without re-running the rest of the pipeline.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def main(argv=None) -> dict:
    import scale_rehearsal as sr

    from md2pr_jax import artifacts
    from md2pr_jax.data.prepare import prepare_dataset

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rehearsal-workdir", required=True, help="a scale_rehearsal.py --workdir (its source/ is read)")
    ap.add_argument("--threads", type=int, default=0, help="data.tokenize_threads (0: every core)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "prepare_at_scale.json"))
    args = ap.parse_args(argv)
    src = os.path.join(os.path.abspath(args.rehearsal_workdir), "source")
    if not os.path.isdir(os.path.join(src, "msmarco")):
        raise SystemExit(f"{src}/msmarco does not exist: run benchmarks/scale_rehearsal.py --workdir first")
    # the rehearsal's defaults (only the model and step keys depend on them, not the preparation)
    rargs = argparse.Namespace(batch_size=32, steps=300, teacher_steps=50, score_batch_size=1024,
                               encode_batch_size=1024, mine_depth=0, rerank_depth=0)
    config = sr.rehearsal_config(rargs, src)
    config.data.tokenize_threads = args.threads
    work = os.path.join(os.path.abspath(args.rehearsal_workdir), "prepare_again")
    shutil.rmtree(work, ignore_errors=True)
    config.data.cache_dir = os.path.join(work, "cache")
    sr.reset_hwm()
    t0 = time.time()
    ds = prepare_dataset(config, work)
    wall = time.time() - t0
    out = {"command": "benchmarks/prepare_at_scale.py " + " ".join(argv or sys.argv[1:]), "machine": sr.machine(),
           "passages": ds.num_docs, "queries": ds.num_queries, "threads": args.threads, "wall_s": round(wall, 1),
           "passages_per_s": round(ds.num_docs / wall, 1), "peak_rss_gb": round(sr._status_kb("VmHWM") / 2**20, 3)}
    # in the rehearsal's schema too, for `benchmarks/pod_plan.py --remeasured`
    out["stages"] = [{"name": "prepare", "items": ds.num_docs, "wall_s": out["wall_s"], "unit": "passages",
                      "items_per_s": out["passages_per_s"], "peak_rss_gb": out["peak_rss_gb"]}]
    artifacts.write_json(args.out, out)
    print(json.dumps(out, indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return out


if __name__ == "__main__":
    main()
