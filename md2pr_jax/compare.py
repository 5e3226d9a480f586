"""Paired comparison of student rows across ablation workdirs, seed by seed.

    python -m md2pr_jax.compare --baseline de=runs/abl:de --row md2pr=runs/abl:md2pr \
        --row md2pr_cf=runs/abl_cf:md2pr [--round 1] --out docs/results/compare

Each `NAME=WORKDIR:ROW` names the runs WORKDIR/rows/ROW_s<seed>/ of an ablation (any number of
seeds). Rows are paired with the baseline by seed: rows of the same seed share round 0's
data split and, where the workdirs share it, the mined lists, so the paired difference removes
the variance the seeds have in common. For every metric and report split it writes the mean and
standard deviation of each row, and the mean paired difference from the baseline with its
standard error (std / sqrt(n), ddof 1): `compare.json` and `COMPARE.md` in --out.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys

import numpy as np
from absl import app, flags

from md2pr_jax.report import METRICS

_SEED_DIR = re.compile(r"^(?P<row>.+)_s(?P<seed>\d+)$")


def parse_spec(spec: str) -> tuple[str, str, str]:
    """'NAME=WORKDIR:ROW' -> (name, workdir, row)."""
    name, sep, rest = spec.partition("=")
    workdir, sep2, row = rest.rpartition(":")
    if not (sep and sep2 and name and workdir and row):
        raise ValueError(f"{spec!r}: expected NAME=WORKDIR:ROW, e.g. de=runs/ablation:de")
    return name, workdir, row


def row_runs(workdir: str, row: str, rnd: int | None = None) -> dict[int, dict]:
    """seed -> {split: {metric: value}} of round `rnd` (default: the last finished round) of
    every WORKDIR/rows/ROW_s<seed>/ that finished it."""
    rows_dir = os.path.join(workdir, "rows")
    if not os.path.isdir(rows_dir):
        raise FileNotFoundError(f"{workdir} has no rows/ folder: not an ablation workdir")
    out = {}
    for name in sorted(os.listdir(rows_dir)):
        m = _SEED_DIR.match(name)
        path = os.path.join(rows_dir, name, "results.json")
        if not m or m["row"] != row or not os.path.exists(path):
            continue
        rounds = json.load(open(path)).get("rounds", [])
        chosen = [r for r in rounds if rnd is None or r["round"] == rnd]
        if chosen:
            out[int(m["seed"])] = {s: {k: v[k] for k in METRICS} for s, v in chosen[-1]["metrics"].items()}
    if not out:
        raise FileNotFoundError(f"no finished {row}_s<seed> rows in {rows_dir}" + (f" at round {rnd}" if rnd else ""))
    return out


def row_costs(workdir: str, row: str) -> dict[int, dict[str, float]]:
    """seed -> {stage: seconds} of every WORKDIR/rows/ROW_s<seed>/ (its own stages' timings.json;
    stages linked from elsewhere cost nothing here and are not listed)."""
    rows_dir = os.path.join(workdir, "rows")
    out = {}
    for name in sorted(os.listdir(rows_dir)):
        m = _SEED_DIR.match(name)
        path = os.path.join(rows_dir, name, "timings.json")
        if m and m["row"] == row and os.path.exists(path):
            out[int(m["seed"])] = {k: round(float(v), 1) for k, v in json.load(open(path)).items()}
    return out


def summarize(values: list[float]) -> dict:
    a = np.asarray(values, np.float64)
    return {"mean": float(a.mean()), "std": float(a.std(ddof=1)) if len(a) > 1 else float("nan"), "n": len(a)}


def _mark(delta: dict) -> str:
    """' *' for a gain beyond 2 SE, ' †' for a loss beyond 2 SE, '' otherwise."""
    return " *" if delta.get("beyond_2se") else " †" if delta.get("below_2se") else ""


def paired(base: dict[int, dict], other: dict[int, dict], split: str, metric: str) -> dict:
    """Mean paired difference other - base over the seeds both have, with its standard error."""
    seeds = sorted(set(base) & set(other))
    diffs = np.array([other[s][split][metric] - base[s][split][metric] for s in seeds if split in base[s]
                      and split in other[s]], np.float64)
    n = len(diffs)
    se = float(diffs.std(ddof=1) / math.sqrt(n)) if n > 1 else float("nan")
    mean = float(diffs.mean()) if n else float("nan")
    return {"mean": mean, "se": se, "n": n, "seeds": seeds, "beyond_2se": bool(n > 1 and mean > 2 * se),
            "below_2se": bool(n > 1 and mean < -2 * se)}


def compare(baseline: tuple[str, dict], rows: list[tuple[str, dict]]) -> dict:
    base_name, base = baseline
    splits = sorted({s for runs in [base] + [r for _, r in rows] for v in runs.values() for s in v})
    out: dict = {"baseline": base_name, "rows": {}}
    for name, runs in [baseline, *rows]:
        entry: dict = {"seeds": sorted(runs)}
        for split in splits:
            entry[split] = {m: summarize([v[split][m] for v in runs.values() if split in v]) for m in METRICS}
            if name != base_name:
                entry[split]["delta"] = {m: paired(base, runs, split, m) for m in METRICS}
        out["rows"][name] = entry
    return out


def markdown(result: dict) -> str:
    base = result["baseline"]
    lines = [f"# Paired comparison against `{base}`", ""]
    splits = [s for s in next(iter(result["rows"].values())) if s != "seeds"]
    for split in splits:
        lines += [f"## {split}", "", "| row | seeds | " + " | ".join(METRICS) + " | " +
                  " | ".join(f"Δ {m} (± SE)" for m in METRICS) + " |", "| --- |" + " --- |" * (1 + 2 * len(METRICS))]
        for name, entry in result["rows"].items():
            cells = [f"{entry[split][m]['mean']:.4f} ± {entry[split][m]['std']:.4f}" for m in METRICS]
            if name == base:
                deltas = ["–"] * len(METRICS)
            else:
                deltas = [f"{d['mean']:+.4f} ± {d['se']:.4f}{_mark(d)}"
                          for d in (entry[split]["delta"][m] for m in METRICS)]
            lines.append(f"| `{name}` | {len(entry['seeds'])} | " + " | ".join(cells + deltas) + " |")
        lines.append("")
    lines += ["Means ± sample standard deviation (ddof 1) over seeds; Δ: mean paired difference from the baseline (same seed) ± its "
              "standard error; * where Δ > 2 SE, † where Δ < -2 SE.", ""]
    return "\n".join(lines)


_BASELINE = flags.DEFINE_string("baseline", None, "NAME=WORKDIR:ROW of the baseline row.")
_ROW = flags.DEFINE_multi_string("row", [], "NAME=WORKDIR:ROW of a row to compare (repeatable).")
_ROUND = flags.DEFINE_integer("round", None, "The round to compare (default: each run's last).")
_OUT = flags.DEFINE_string("out", None, "Folder for compare.json and COMPARE.md.")


def main(argv) -> None:
    del argv
    if not _BASELINE.value or not _ROW.value:
        sys.exit("--baseline and at least one --row are required")
    try:
        specs = [parse_spec(s) for s in [_BASELINE.value, *_ROW.value]]
        runs = [(name, row_runs(workdir, row, _ROUND.value)) for name, workdir, row in specs]
    except (ValueError, FileNotFoundError) as e:
        sys.exit(str(e))
    result = compare(runs[0], runs[1:])
    result["command"] = " ".join(["python -m md2pr_jax.compare", *sys.argv[1:]])
    # What each row's own stages cost, seed by seed.
    result["cost_s"] = {name: row_costs(workdir, row) for name, workdir, row in specs}
    text = markdown(result)
    if _OUT.value:
        os.makedirs(_OUT.value, exist_ok=True)
        with open(os.path.join(_OUT.value, "compare.json"), "w") as f:
            json.dump(result, f, indent=2)
        with open(os.path.join(_OUT.value, "COMPARE.md"), "w") as f:
            f.write(text)
    print(text)


if __name__ == "__main__":
    app.run(main)
