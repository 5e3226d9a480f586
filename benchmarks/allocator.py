"""The student step and the teacher's scoring under each memory allocator, side by side: glibc's
malloc (the default), glibc with its mmap threshold raised (environment tunables), tcmalloc and
jemalloc (preloaded with LD_PRELOAD), each in a fresh process that runs
`benchmarks/small_student_step.py` at a config's shapes. Runs alternate (glibc, glibc_tuned,
tcmalloc, jemalloc, glibc, ...) so that a drift in the machine's speed falls on every allocator
alike; ratios are taken run against run within a repetition, then their median.

    .venv/bin/python benchmarks/allocator.py [--config configs/nfcorpus_minilm.py] [--steps 3] \\
        [--reps 2] [--out benchmarks/results/allocator_cpu.json]

Why: glibc's malloc serves allocations above its mmap threshold (at most 32 MiB on 64-bit) with
fresh mmap()s and gives them back at free(), so XLA's per-step activation buffers (the 3-layer
student's batch is 16 lists x 8 passages x 128 tokens) come back as new pages every step: minor
page faults and system time. tcmalloc keeps freed pages for reuse (which is why the entry points
run under it where it is installed, md2pr_jax/allocator.py). Writes per run: seconds per student
step (median over --steps), teacher pairs per second, the child's user and system CPU seconds and
minor page faults (from wait4's rusage), the load average before it; per allocator the medians,
and the ratios to glibc. An allocator whose library is not found is reported as missing and
skipped (Debian/Ubuntu: `apt-get install libtcmalloc-minimal4 libjemalloc2`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

from md2pr_jax import allocator

HERE = os.path.dirname(os.path.abspath(__file__))
# The settings compared: glibc's malloc as is and tuned, and the preloadable allocators that
# md2pr_jax/allocator.py knows.
SETTINGS = ("glibc", "glibc_tuned", *allocator.LIBRARIES)
# glibc_tuned: glibc's malloc with its mmap threshold at the largest value it accepts (32 MiB) and
# no trimming of the heap's top, through its environment tunables: nothing to install.
ENV = {"glibc_tuned": {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
                       "MALLOC_TOP_PAD_": str(256 << 20)}}


def preload_for(name: str) -> str | None:
    """The soname to put in LD_PRELOAD for allocator `name` ('' for glibc), or None when its
    library is not installed."""
    return "" if name.startswith("glibc") else allocator.find(name)


def run_once(preload: str, extra_env: dict, config: str, steps: int) -> dict:
    env = dict(os.environ, **extra_env, MD2PR_ALLOCATOR="glibc")  # the entry points' own choice off
    if preload:
        env["LD_PRELOAD"] = preload
    else:
        env.pop("LD_PRELOAD", None)
    cmd = [sys.executable, os.path.join(HERE, "small_student_step.py"), "--config", config, "--steps", str(steps)]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"allocator benchmark: {' '.join(cmd)} failed ({proc.returncode}):\n{err[-2000:]}")
    result = json.loads(out[out.index("{"):])
    return {"wall_s": round(wall, 2), "student_step_s": result["student_step_s"],
            "student_steps_s": result["student_steps_s"], "teacher_pairs_per_s": result["teacher_pairs_per_s"]}


def run(preload: str, extra_env: dict, config: str, steps: int) -> dict:
    load = os.getloadavg()[0]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    rec = run_once(preload, extra_env, config, steps)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rec.update(user_s=round(after.ru_utime - before.ru_utime, 2), sys_s=round(after.ru_stime - before.ru_stime, 2),
               minor_faults=after.ru_minflt - before.ru_minflt, load_avg_before=round(load, 2))
    return rec


FIGURES = ("student_step_s", "teacher_pairs_per_s", "sys_s", "user_s", "minor_faults", "wall_s")


def summarise(runs: dict[str, list[dict]]) -> dict:
    out = {}
    base = runs.get("glibc")
    for name, recs in runs.items():
        s = {f: statistics.median(r[f] for r in recs) for f in FIGURES}
        if base and name != "glibc":
            s["ratio_to_glibc"] = {f: round(statistics.median(r[f] / b[f] for r, b in zip(recs, base)), 3)
                                   for f in FIGURES if all(b[f] for b in base)}
        out[name] = s
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/nfcorpus_minilm.py")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--allocators", default="glibc,glibc_tuned,tcmalloc,jemalloc")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "allocator_cpu.json"))
    args = ap.parse_args()
    names = [n for n in args.allocators.split(",") if n]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown:
        raise SystemExit(f"allocator benchmark: unknown allocator(s) {unknown}; choose from {list(SETTINGS)}")
    found = {n: preload_for(n) for n in names}
    preloads = {n: p for n, p in found.items() if p is not None}
    missing = [n for n, p in found.items() if p is None]
    runs: dict[str, list[dict]] = {n: [] for n in preloads}
    for rep in range(args.reps):
        for n, p in preloads.items():
            rec = run(p, ENV.get(n, {}), args.config, args.steps)
            runs[n].append(rec)
            print(f"rep {rep} {n:9s} step {rec['student_step_s']:.2f} s, teacher {rec['teacher_pairs_per_s']:.1f} pairs/s, "
                  f"sys {rec['sys_s']:.1f} s, {rec['minor_faults']:,} minor faults", file=sys.stderr)
    report = {"benchmark": "allocator", "config": args.config, "steps": args.steps, "reps": args.reps,
              "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
              "preload": preloads, "env": {n: ENV[n] for n in preloads if n in ENV}, "missing": missing, "runs": runs, "summary": summarise(runs),
              "note": "runs alternate across allocators; ratios are run against run within a repetition, then "
                      "their median; the machine is shared, so absolute seconds are not comparable across reports"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report["summary"], indent=1))


if __name__ == "__main__":
    main()
