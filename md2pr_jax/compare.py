"""Paired comparison of student rows across ablation workdirs: over queries, and seed by seed.

    python -m md2pr_jax.compare --dataset scifact=runs/abl_sf --dataset nfcorpus=runs/abl_nf \
        --baseline de=de --row de_sent=de_sent --row md2pr=md2pr [--round 1] --out docs/results/X

A row is `NAME=SPEC`, SPEC one of `ROW` (that row in every --dataset workdir), `WORKDIR:ROW` or
`LABEL@WORKDIR:ROW` (one workdir, its dataset label read from its config unless given); a NAME
given again adds another dataset's runs to the same row (--baseline too: `--baseline
de=scifact@A:de --baseline de=nfcorpus@B:de`). `ROW` names the runs
WORKDIR/rows/ROW_s<seed>/ of an ablation (any number of seeds).

WORKDIR may also be an archive: a folder of per-query files named
`<label>.<row>_s<seed>.<split>.json` (and their costs in `costs.json`), as `--archive DIR`
writes them beside a comparison. A comparison committed with its archive is then rerun, or
pooled with a dataset run later, from the repository alone, after the runs are gone:

    python -m md2pr_jax.compare --dataset scifact=docs/results/X/per_query \
        --dataset nfcorpus=runs/abl_nf --baseline de=de --row md2pr=md2pr --archive docs/results/X/per_query

Query level (what a claim rests on): each query's metric in each seed's per-query file
(rounds/rNN/eval/per_query/, `retrieval.per_query`) is averaged over the seeds the row shares
with the baseline, then `significance.paired_test` gives, per split and metric, for each dataset
alone and for all datasets' queries pooled: the mean difference over queries with its 95% CI,
the paired randomization (sign-flip) and t-test p-values, Holm's adjustment across the rows
compared, and the minimal detectable effect at 80% power. Runs evaluated before per-query files
were kept have none: the query level says so, and the seed level still stands.

Seed level: rows are paired with the baseline by seed (same data split and, where the workdirs
share them, mined lists); the mean and standard deviation of each row over seeds, and the mean
paired difference from the baseline with its standard error (std / sqrt(n), ddof 1). It holds
the queries, the teacher and the lists fixed: run-to-run noise, not a test of a claim.

Writes `compare.json` (with the command, each row's cost per seed and the per-query files read)
and `COMPARE.md` in --out.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys

import numpy as np
from absl import app, flags

from md2pr_jax import significance
from md2pr_jax.layout import Layout, round_stage
from md2pr_jax.report import METRICS
from md2pr_jax.retrieval import per_query

_SEED_DIR = re.compile(r"^(?P<row>.+)_s(?P<seed>\d+)$")


@dataclasses.dataclass(frozen=True)
class Part:
    """One dataset's runs of a row: WORKDIR/rows/ROW_s<seed>/, labelled by its dataset."""

    dataset: str
    workdir: str
    row: str


def parse_spec(spec: str, datasets: dict[str, str] | None = None) -> tuple[str, list[Part]]:
    """'NAME=SPEC' -> (name, its parts). SPEC: 'WORKDIR:ROW', 'LABEL@WORKDIR:ROW', or 'ROW' for
    that row in each of `datasets` ({label: workdir}, the --dataset flags)."""
    name, sep, rest = spec.partition("=")
    if not (sep and name and rest):
        raise ValueError(f"{spec!r}: expected NAME=WORKDIR:ROW, NAME=LABEL@WORKDIR:ROW or NAME=ROW (with --dataset), "
                         "e.g. de=runs/ablation:de")
    workdir, sep2, row = rest.rpartition(":")
    if not sep2:
        if not datasets:
            raise ValueError(f"{spec!r}: NAME=ROW needs --dataset LABEL=WORKDIR; or write NAME=WORKDIR:ROW")
        return name, [Part(label, wd, rest) for label, wd in datasets.items()]
    if not (workdir and row):
        raise ValueError(f"{spec!r}: expected NAME=WORKDIR:ROW, e.g. de=runs/ablation:de")
    label, at, path = workdir.partition("@")
    if at and label and "/" not in label:
        return name, [Part(label, path, row)]
    return name, [Part(dataset_label(workdir, row), workdir, row)]


# ---------------------------------------------------------------------- archives
ARCHIVE_COSTS = "costs.json"


def is_archive(folder: str) -> bool:
    """A folder of per-query files (`archive_name`), not an ablation workdir (no rows/)."""
    return os.path.isdir(folder) and not os.path.isdir(os.path.join(folder, "rows")) and any(
        n.endswith(".json") and n != ARCHIVE_COSTS for n in os.listdir(folder))


def archive_name(label: str, row: str, seed: int, split: str) -> str:
    return f"{label}.{row}_s{seed}.{split}.json"


def archived_files(folder: str, label: str, row: str) -> dict[int, dict[str, str]]:
    """seed -> {split: path} of the archive's files of `row` on dataset `label`."""
    pattern = re.compile(rf"^{re.escape(label)}\.{re.escape(row)}_s(?P<seed>\d+)\.(?P<split>[^.]+)\.json$")
    out: dict[int, dict[str, str]] = {}
    for name in sorted(os.listdir(folder)):
        m = pattern.match(name)
        if m:
            out.setdefault(int(m["seed"]), {})[m["split"]] = os.path.join(folder, name)
    if not out:
        raise FileNotFoundError(f"no {archive_name(label, row, 0, 'SPLIT').replace('_s0', '_s<seed>')} files in "
                                f"the archive {folder}")
    return out


def _archive_costs(folder: str) -> dict:
    path = os.path.join(folder, ARCHIVE_COSTS)
    return json.load(open(path)) if os.path.exists(path) else {}


def write_archive_costs(folder: str, costs: dict) -> None:
    """Writes folder/costs.json whole (a kill mid-write leaves the old file, not half of one)."""
    path = os.path.join(folder, ARCHIVE_COSTS)
    with open(path + ".tmp", "w") as f:
        json.dump(costs, f, indent=1, sort_keys=True)
    os.replace(path + ".tmp", path)


def write_archive(result: dict, folder: str) -> list[str]:
    """Copy every per-query file a comparison read into `folder` under `archive_name`, and merge
    its rows' costs (and each dataset's shared cost) into folder/costs.json. Returns the names
    written. Files already in `folder` are left as they are."""
    import shutil

    os.makedirs(folder, exist_ok=True)
    written = []
    costs = _archive_costs(folder)
    for name, parts in result["specs"].items():
        for part in parts:
            label, row = part["dataset"], part["row"]
            for seed, by_split in result["per_query_files"][name][label].items():
                for split, src in by_split.items():
                    dest = os.path.join(folder, archive_name(label, row, int(seed), split))
                    if src and os.path.abspath(src) != os.path.abspath(dest):
                        shutil.copyfile(src, dest)
                        written.append(os.path.basename(dest))
            by_seed = result["cost_s"][name][label]
            if by_seed:
                costs.setdefault(label, {}).setdefault("rows", {})[row] = {str(s): v for s, v in by_seed.items()}
    for label, stages in result.get("shared_cost_s", {}).items():
        if stages:
            costs.setdefault(label, {})["shared"] = stages
    write_archive_costs(folder, costs)
    return written


def dataset_label(workdir: str, row: str) -> str:
    """The dataset of a row's runs (config.data.dataset of its first seed; in an archive, the
    one label its files of `row` carry), else the workdir's name."""
    if is_archive(workdir):
        pattern = re.compile(rf"^(?P<label>[^.]+)\.{re.escape(row)}_s\d+\.[^.]+\.json$")
        labels = sorted({m["label"] for m in map(pattern.match, os.listdir(workdir)) if m})
        if len(labels) != 1:
            raise ValueError(f"the archive {workdir} holds {row!r} for {labels or 'no dataset'}: name one as "
                             f"LABEL@{workdir}:{row}")
        return labels[0]
    rows_dir = os.path.join(workdir, "rows")
    for name in sorted(os.listdir(rows_dir)) if os.path.isdir(rows_dir) else []:
        m = _SEED_DIR.match(name)
        path = os.path.join(rows_dir, name, "config.json")
        if m and m["row"] == row and os.path.exists(path):
            label = json.load(open(path)).get("data", {}).get("dataset")
            if label:
                return str(label)
    return os.path.basename(os.path.normpath(workdir))


def merge_specs(specs: list[tuple[str, list[Part]]]) -> list[tuple[str, list[Part]]]:
    """Specs of the same NAME joined, in the order the names first appear; one part per dataset."""
    merged: dict[str, list[Part]] = {}
    for name, parts in specs:
        for part in parts:
            if any(p.dataset == part.dataset for p in merged.get(name, [])):
                raise ValueError(f"row {name!r} is given twice for dataset {part.dataset!r}; label them apart "
                                 "(LABEL@WORKDIR:ROW)")
            merged.setdefault(name, []).append(part)
    return list(merged.items())


def _finished(workdir: str, row: str, rnd: int | None) -> dict[int, dict]:
    """seed -> the chosen round's record in WORKDIR/rows/ROW_s<seed>/results.json (round `rnd`,
    default the last finished one)."""
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
            out[int(m["seed"])] = chosen[-1]
    if not out:
        raise FileNotFoundError(f"no finished {row}_s<seed> rows in {rows_dir}" + (f" at round {rnd}" if rnd else ""))
    return out


def row_runs(workdir: str, row: str, rnd: int | None = None, label: str | None = None) -> dict[int, dict]:
    """seed -> {split: {metric: value}} of round `rnd` (default: the last finished round) of
    every WORKDIR/rows/ROW_s<seed>/ that finished it; from an archive, its files' means."""
    if is_archive(workdir):
        return {seed: {s: {k: per_query.read_metrics(p)["mean"][k] for k in METRICS} for s, p in by_split.items()}
                for seed, by_split in archived_files(workdir, label or dataset_label(workdir, row), row).items()}
    return {seed: {s: {k: v[k] for k in METRICS} for s, v in rec["metrics"].items()}
            for seed, rec in _finished(workdir, row, rnd).items()}


def row_per_query(workdir: str, row: str, rnd: int | None = None,
                  label: str | None = None) -> dict[int, dict[str, str | None]]:
    """seed -> {split: the per-query file of that seed's chosen round's student on split, or
    None where the run kept none (evaluated before per-query files were written)}."""
    if is_archive(workdir):
        return archived_files(workdir, label or dataset_label(workdir, row), row)
    out = {}
    for seed, rec in _finished(workdir, row, rnd).items():
        folder = Layout.at(workdir).row(row, seed).per_query_dir(round_stage(int(rec["round"]), "eval"))
        out[seed] = {}
        for split in rec["metrics"]:
            path = per_query.metrics_path(folder, "student", split)
            out[seed][split] = str(path) if path.exists() else None
    return out


def row_costs(workdir: str, row: str, label: str | None = None) -> dict[int, dict[str, float]]:
    """seed -> {stage: seconds} of every WORKDIR/rows/ROW_s<seed>/ (its own stages' timings.json;
    stages linked from elsewhere cost nothing here and are not listed); from an archive, what
    its costs.json kept."""
    if is_archive(workdir):
        kept = _archive_costs(workdir).get(label or dataset_label(workdir, row), {}).get("rows", {}).get(row, {})
        return {int(s): v for s, v in kept.items()}
    rows_dir = os.path.join(workdir, "rows")
    out = {}
    for name in sorted(os.listdir(rows_dir)):
        m = _SEED_DIR.match(name)
        path = os.path.join(rows_dir, name, "timings.json")
        if m and m["row"] == row and os.path.exists(path):
            out[int(m["seed"])] = {k: round(float(v), 1) for k, v in json.load(open(path)).items()}
    return out


def shared_costs(workdir: str, label: str | None = None) -> dict[str, float]:
    """{stage: seconds} of an ablation's WORKDIR/shared/ (round 0 and round 1's mining and
    teacher pass, run once for every row and seed); {} where it has none."""
    if label and is_archive(workdir):
        return _archive_costs(workdir).get(label, {}).get("shared", {})
    path = os.path.join(workdir, "shared", "timings.json")
    if not os.path.exists(path):
        return {}
    return {k: round(float(v), 1) for k, v in json.load(open(path)).items()}


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


# ---------------------------------------------------------------------- query level
POOLED = "pooled"
CLAIM = ("Claims rest on the query-level paired randomization test: each query's value averaged over the seeds "
         "the row shares with the baseline, the mean difference over queries with its 95% CI (t), and the two-sided "
         "sign-flip p, Holm-adjusted across the rows compared (per split, metric and scope); the paired t-test p "
         "stands beside it. MDE80: the smallest true difference these queries detect with 80% power at p < 0.05 "
         "(paired t, from the SD of the per-query differences); a difference below it is no evidence of absence. "
         "The seed statistics hold the queries, the teacher and the mined lists fixed: they show run-to-run noise "
         "and support no claim alone.")


def _load(path: str, cache: dict) -> dict:
    if path not in cache:
        cache[path] = per_query.read_metrics(path)
    return cache[path]


def _seed_mean(paths: list[str], metric: str, cache: dict) -> dict[str, float]:
    """{qid: the metric averaged over the seeds' per-query files} (the queries all of them hold)."""
    tables = [_load(p, cache)["metrics"][metric] for p in paths]
    qids = [q for q in tables[0] if all(q in t for t in tables[1:])]
    return {q: sum(t[q] for t in tables) / len(tables) for q in qids}


def query_tests(baseline: tuple[str, dict], rows: list[tuple[str, dict]], splits: list[str],
                metrics: tuple[str, ...] = METRICS, permutations: int = significance.PERMUTATIONS,
                seed: int = 0) -> dict:
    """Paired tests over queries of each row against the baseline.

    `baseline` and each row: (name, {dataset: {seed: {split: per-query file or None}}}).
    Returns {"tests": {split: {metric: {scope: {row: paired_test + p_*_holm, seeds}}}},
    "files": the per-query files read, "missing": what could not be tested and why, and the
    test's settings}; a scope is each dataset alone, and POOLED (every dataset's queries
    together, each query one unit) when there are several.
    """
    base_name, base = baseline
    cache: dict[str, dict] = {}
    tests: dict = {}
    missing: list[str] = []
    for split in splits:
        tests[split] = {m: {} for m in metrics}
        for name, runs in rows:
            labels = [d for d in runs if d in base]
            usable: dict[str, list[int]] = {}
            for label in labels:
                seeds = sorted(s for s in set(base[label]) & set(runs[label])
                               if split in base[label][s] and split in runs[label][s])
                have = [s for s in seeds if base[label][s][split] and runs[label][s][split]]
                if len(have) < len(seeds):
                    missing.append(f"{name} vs {base_name} on {label}/{split}: no per-query file for seed(s) "
                                   f"{sorted(set(seeds) - set(have))} (evaluated before per-query files were kept; "
                                   "rerun their eval stage to test them)")
                if have:
                    usable[label] = have
            pooled = len(labels) > 1 and len(usable) == len(labels)
            if len(labels) > 1 and not pooled:
                missing.append(f"{name} vs {base_name} on {split}: not pooled, "
                               f"{sorted(set(labels) - set(usable))} lack per-query files")
            for metric in metrics:
                both: tuple[list[float], list[float]] = ([], [])
                for label, seeds in usable.items():
                    a = _seed_mean([base[label][s][split] for s in seeds], metric, cache)
                    b = _seed_mean([runs[label][s][split] for s in seeds], metric, cache)
                    qids = [q for q in a if q in b]
                    if len(qids) != len(a) or len(qids) != len(b):
                        missing.append(f"{name} vs {base_name} on {label}/{split}: {len(a)} and {len(b)} queries, "
                                       f"{len(qids)} in common (tested on those)")
                    both[0].extend(a[q] for q in qids)
                    both[1].extend(b[q] for q in qids)
                    tests[split][metric].setdefault(label, {})[name] = {
                        **significance.paired_test([a[q] for q in qids], [b[q] for q in qids], permutations, seed),
                        "seeds": seeds}
                if pooled:
                    tests[split][metric].setdefault(POOLED, {})[name] = {
                        **significance.paired_test(*both, permutations, seed), "seeds": dict(usable)}
    for by_metric in tests.values():  # Holm across the rows of each split, metric and scope
        for by_scope in by_metric.values():
            for by_row in by_scope.values():
                for key in ("p_randomization", "p_t"):
                    adjusted = significance.holm([t[key] for t in by_row.values()])
                    for t, p in zip(by_row.values(), adjusted):
                        t[f"{key}_holm"] = p
    return {"tests": tests, "files": sorted(cache), "missing": list(dict.fromkeys(missing)),
            "permutations": permutations, "seed": seed, "alpha": significance.ALPHA, "power": significance.POWER}


def check_means(files: dict[int, dict[str, str | None]], runs: dict[int, dict]) -> None:
    """Each per-query file's mean equals the mean results.json reports for that seed and split:
    a stale or misplaced file is an error, never a silent mismatch."""
    for seed, by_split in files.items():
        for split, path in by_split.items():
            if not path:
                continue
            saved = per_query.read_metrics(path)["mean"]
            for metric in METRICS:
                if not math.isclose(saved[metric], runs[seed][split][metric], rel_tol=0, abs_tol=1e-9):
                    raise ValueError(f"{path}: mean {metric} {saved[metric]} but results.json says "
                                     f"{runs[seed][split][metric]} for seed {seed}; the per-query file is stale "
                                     "(rerun that eval stage)")


def run_comparison(baseline: tuple[str, list[Part]], rows: list[tuple[str, list[Part]]], rnd: int | None = None,
                   permutations: int = significance.PERMUTATIONS, seed: int = 0) -> dict:
    """The whole comparison (compare.json less its command): query-level tests, seed statistics
    per dataset, the specs, the per-query files found and each row's cost per seed."""
    specs = [baseline, *rows]
    runs = {name: {p.dataset: row_runs(p.workdir, p.row, rnd, p.dataset) for p in parts} for name, parts in specs}
    files = {name: {p.dataset: row_per_query(p.workdir, p.row, rnd, p.dataset) for p in parts}
             for name, parts in specs}
    for name, _ in specs:
        for label, by_seed in files[name].items():
            check_means(by_seed, runs[name][label])
    labels = list(dict.fromkeys(p.dataset for _, parts in specs for p in parts))
    splits = sorted({s for by_label in runs.values() for by_seed in by_label.values() for v in by_seed.values()
                     for s in v})
    base_name = baseline[0]
    queries = query_tests((base_name, files[base_name]), [(n, files[n]) for n, _ in rows], splits,
                          permutations=permutations, seed=seed)
    seeds = {label: compare((base_name, runs[base_name][label]),
                            [(n, runs[n][label]) for n, _ in rows if label in runs[n]])
             for label in labels if label in runs[base_name]}
    return {"baseline": base_name, "datasets": labels, "claim": CLAIM, "query_level": queries, "seed_level": seeds,
            "specs": {name: [dataclasses.asdict(p) for p in parts] for name, parts in specs},
            "per_query_files": files,
            "cost_s": {name: {p.dataset: row_costs(p.workdir, p.row, p.dataset) for p in parts} for name, parts in specs},
            "shared_cost_s": {p.dataset: shared_costs(p.workdir, p.dataset) for _, parts in specs for p in parts}}


def _p(x: float) -> str:
    return "–" if x is None or math.isnan(x) else f"{x:.4f}" if x >= 1e-4 else f"{x:.1e}"


def report_markdown(result: dict) -> str:
    """COMPARE.md: which statistic a claim rests on, the query-level tests, what could not be
    tested, the seed statistics per dataset, and each row's cost."""
    base, q = result["baseline"], result["query_level"]
    lines = [f"# Paired comparison against `{base}`", "", f"Datasets: {', '.join(result['datasets'])}.", "",
             result["claim"], ""]
    tested = False
    for split, by_metric in q["tests"].items():
        for metric, by_scope in by_metric.items():
            if not by_scope:
                continue
            tested = True
            lines += [f"## Query level: {split}, {metric}", "",
                      "| scope | row | queries | seeds | Δ mean [95% CI] | p (rand.) | p Holm | p (t) | p (t) Holm | "
                      "MDE80 | wins/losses |", "| --- |" + " --- |" * 10]
            for scope, by_row in by_scope.items():
                for name, t in by_row.items():
                    n_seeds = len(t["seeds"]) if isinstance(t["seeds"], list) else min(map(len, t["seeds"].values()))
                    mark = " *" if t["p_randomization_holm"] < q["alpha"] else ""
                    lines.append(
                        f"| {scope} | `{name}` | {t['n']} | {n_seeds} | {t['mean']:+.4f} [{t['ci95'][0]:+.4f}, "
                        f"{t['ci95'][1]:+.4f}]{mark} | {_p(t['p_randomization'])} | {_p(t['p_randomization_holm'])} | "
                        f"{_p(t['p_t'])} | {_p(t['p_t_holm'])} | {t['mde80']:.4f} | {t['wins']}/{t['losses']} |")
            lines.append("")
    if tested:
        lines += [f"Δ: row − `{base}` over queries, each query averaged over the seeds; * where the Holm-adjusted "
                  f"randomization p < {q['alpha']} ({q['permutations']} sign flips, seed {q['seed']}).", ""]
    else:
        lines += ["## Query level: not available", "",
                  "No run compared here kept per-query files (they were evaluated before per-query results were "
                  "written), so no query-level test was run; only the seed statistics below remain, and they support "
                  "no claim alone. Rerun the rows' eval stages (remove rounds/rNN/eval/DONE) to test them.", ""]
    if q["missing"]:
        lines += ["Not tested:", ""] + [f"- {m}" for m in q["missing"]] + [""]
    for label, seed_result in result["seed_level"].items():
        lines += [f"## Seed statistics: {label}", ""] + markdown(seed_result).replace("\n## ", "\n### ").split("\n")[2:]
    lines += ["## Cost (seconds of each row's own stages)", "", "| row | dataset | seed | seconds |",
              "| --- | --- | --- | --- |"]
    for name, by_label in result["cost_s"].items():
        for label, by_seed in by_label.items():
            for s, stages in by_seed.items():
                lines.append(f"| `{name}` | {label} | {s} | {sum(stages.values()):.0f} |")
    if lines[-1].startswith("| ---"):
        lines.append("| (no timings.json in these rows) | | | |")
    for label, stages in result.get("shared_cost_s", {}).items():
        if stages:
            lines.append(f"\nShared by every row and seed on {label} (round 0, round 1's mining and teacher pass): "
                         f"{sum(stages.values()):.0f} s (" + ", ".join(f"{k} {v:.0f}" for k, v in stages.items()) + ").")
    lines += ["", f"Per-query files read: {len(q['files'])} (listed in compare.json).", ""]
    return "\n".join(lines)


def _define_flags():
    """The command line's flags, defined only when this module runs as a program (the ablation
    imports it and has flags of its own, --archive among them)."""
    _BASELINE = flags.DEFINE_multi_string("baseline", [], "NAME=SPEC of the baseline row: SPEC is WORKDIR:ROW, "
                                          "LABEL@WORKDIR:ROW, or ROW (in every --dataset workdir); repeatable "
                                          "with the same NAME, one dataset each, like --row.")
    _ROW = flags.DEFINE_multi_string("row", [], "NAME=SPEC of a row to compare (repeatable; a NAME again adds a dataset).")
    _DATASET = flags.DEFINE_multi_string("dataset", [], "LABEL=WORKDIR: an ablation workdir and its dataset's label "
                                         "(repeatable), for NAME=ROW specs.")
    _ROUND = flags.DEFINE_integer("round", None, "The round to compare (default: each run's last).")
    _PERMUTATIONS = flags.DEFINE_integer("permutations", significance.PERMUTATIONS, "Sign flips of the randomization test.")
    _SEED = flags.DEFINE_integer("seed", 0, "Seed of the randomization test's sign flips.")
    _OUT = flags.DEFINE_string("out", None, "Folder for compare.json and COMPARE.md.")
    _ARCHIVE = flags.DEFINE_string("archive", None, "Folder to copy the per-query files read into (as "
                                   "LABEL.ROW_s<seed>.SPLIT.json) with the rows' costs (costs.json): a "
                                   "WORKDIR the comparison can be rerun from once the runs are gone.")
    return _BASELINE, _ROW, _DATASET, _ROUND, _PERMUTATIONS, _SEED, _OUT, _ARCHIVE


def main(argv) -> None:
    del argv
    if not _BASELINE.value or not _ROW.value:
        sys.exit("--baseline and at least one --row are required")
    bad = [d for d in _DATASET.value if "=" not in d]
    if bad:
        sys.exit(f"--dataset expects LABEL=WORKDIR, got {bad}")
    datasets = dict(d.split("=", 1) for d in _DATASET.value)
    try:
        base_specs = [parse_spec(s, datasets) for s in _BASELINE.value]
        names = sorted({name for name, _ in base_specs})
        if len(names) > 1:
            raise ValueError(f"--baseline names {names}: one baseline row, given once per dataset under one NAME")
        baseline, *rows = merge_specs([*base_specs, *(parse_spec(s, datasets) for s in _ROW.value)])
        if not rows:
            raise ValueError(f"every --row is named {baseline[0]!r} like the baseline; name the rows apart")
        result = run_comparison(baseline, rows, _ROUND.value, _PERMUTATIONS.value, _SEED.value)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(str(e))
    result = {"command": " ".join(["python -m md2pr_jax.compare", *sys.argv[1:]]), **result}
    text = report_markdown(result)
    if _OUT.value:
        os.makedirs(_OUT.value, exist_ok=True)
        with open(os.path.join(_OUT.value, "compare.json"), "w") as f:
            json.dump(result, f, indent=2)
        with open(os.path.join(_OUT.value, "COMPARE.md"), "w") as f:
            f.write(text)
    if _ARCHIVE.value:
        written = write_archive(result, _ARCHIVE.value)
        print(f"archived {len(written)} per-query files in {_ARCHIVE.value}", file=sys.stderr)
    print(text)


if __name__ == "__main__":
    _BASELINE, _ROW, _DATASET, _ROUND, _PERMUTATIONS, _SEED, _OUT, _ARCHIVE = _define_flags()
    app.run(main)
