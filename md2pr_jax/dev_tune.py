"""Training settings chosen on dev, with the same budget for every row: a grid over row keys
(learning rate, epochs, kd temperature, β, the word temperature...), each row trained at every
point of the same grid, evaluated on dev only (test is never computed), all of them sharing an
ablation's round 0 and round-1 teacher pass; then, optionally, each row at its own chosen point
with every seed, evaluated on the config's eval split (the test read once, at the end).

    python -m md2pr_jax.dev_tune --config configs/scifact_minilm_l3.py --source runs/distill/scifact \\
        --workdir runs/distill/scifact_tune --rows de,de_sent,md2pr \\
        --grid train.epochs=1,3 --grid train.lr=3e-5,1e-4 [--student_seed 0] [--metric ndcg@10] \\
        [--final_workdir runs/distill/scifact_tuned --final_seeds 0,1,2] [--results_dir docs/results/X]

Each grid point is an ablation workdir WORKDIR/<point>/ run with `--reuse_from SOURCE` and
config.data.eval_split=dev: nothing of round 0 or round 1's teacher pass is recomputed, and a
point whose settings are SOURCE's own links SOURCE's finished rows instead of training them
again. The run resumes point by point, row by row. Writes WORKDIR/tune.json (per point and row:
the dev metrics and the row's own cost; per row, the point with the best dev --metric, ties to
the earlier point in the grid's order, and its flags) and TUNE.md, copied to --results_dir. With
--final_workdir, each row then runs at its chosen point as FINAL_WORKDIR/<row>/ (an ablation of
that row alone, seeds --final_seeds), for `md2pr_jax.compare` with `NAME=FINAL_WORKDIR/<row>:<row>`.
"""

from __future__ import annotations

if __name__ == "__main__":
    # Before the imports below (JAX among them, seconds of CPU): the process that re-executes
    # under tcmalloc would otherwise import them twice.
    from md2pr_jax.allocator import reexec_under_preferred_allocator

    reexec_under_preferred_allocator()

import itertools
import json
import os
import shutil
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from md2pr_jax import ablation, artifacts, compare
from md2pr_jax.config import ConfigError, _set_by_path, validate
from md2pr_jax.layout import Layout


def parse_grid(config, specs: list[str]) -> list[tuple[str, list]]:
    """['train.lr=3e-5,1e-4', ...] -> [(key, [values typed as the config's own]), ...]. Only the
    row keys (`ablation.ROW_KEYS`: what a row's own stages read) may be swept: any other key
    would change the shared stages the points reuse."""
    grid = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or not values:
            raise ConfigError(f"--grid {spec!r}: write KEY=V1,V2,... (e.g. train.lr=3e-5,1e-4)")
        if not any(key == k or key.startswith(k + ".") for k in ablation.ROW_KEYS):
            raise ConfigError(f"--grid {key}: only the row keys may be swept ({', '.join(ablation.ROW_KEYS)}); "
                              "another key changes the stages every point shares")
        if key in (k for k, _ in grid):
            raise ConfigError(f"--grid {key} is given twice")
        typed = []
        for text in values.split(","):
            probe = config.copy_and_resolve_references()
            _set_by_path(probe, key, text)
            node = probe
            for part in key.split("."):
                node = node[part]
            typed.append(node)
        if len(set(map(repr, typed))) < len(typed):
            raise ConfigError(f"--grid {key}: a value is repeated")
        grid.append((key, typed))
    if not grid:
        raise ConfigError("no --grid given: name at least one row key and its values")
    return grid


def points(grid: list[tuple[str, list]]) -> list[dict]:
    """The grid's points, {key: value}, the first key varying slowest."""
    keys = [k for k, _ in grid]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in grid))]


def point_name(point: dict) -> str:
    """A folder name for a point: 'train.epochs=3__train.lr=0.0001'."""
    return "__".join(f"{k}={v}" for k, v in point.items())


def point_flags(point: dict) -> list[str]:
    return [f"--config.{k}={v}" for k, v in point.items()]


def with_point(config, point: dict, eval_split: str | None = None):
    c = config.copy_and_resolve_references()
    for key, value in point.items():
        _set_by_path(c, key, repr(value) if not isinstance(value, str) else value)
    if eval_split is not None:
        c.data.eval_split = eval_split
    return validate(c)


def check_source(source: str) -> None:
    """Refuses a source whose round 0 has not finished or whose dataset has no dev split."""
    src = Layout.at(source)
    base = src.shared if src.rows_dir.is_dir() else src
    if not base.done("baselines"):
        raise SystemExit(f"--source {source}: its round 0 has not finished (run its ablation first)")
    if not any(isinstance(v, dict) and "dev" in v for v in base.result("baselines").values()):
        raise SystemExit(f"--source {source}: its dataset has no dev split to choose on (give the config one: "
                         "config.data.dev_fraction > 0, or a dataset with its own dev queries)")


def row_dev(workdir: str, row: str, seed: int) -> dict | None:
    """The dev metrics of a finished row and seed of an ablation workdir (its last round), or None."""
    res = artifacts.read_json(os.path.join(workdir, "rows", f"{row}_s{seed}", "results.json"))
    if not res or not res.get("rounds"):
        return None
    return res["rounds"][-1]["metrics"].get("dev")


def choose(table: dict, rows: list[str], names: list[str], metric: str) -> dict:
    """Per row, the point with the best dev metric among those it finished (ties: the earlier)."""
    chosen = {}
    for row in rows:
        done = [(n, table[n][row]["dev"][metric]) for n in names if table.get(n, {}).get(row)]
        if done:
            best = max(done, key=lambda x: x[1])  # max keeps the first of equal values
            chosen[row] = {"point": best[0], "dev": {metric: best[1]}, "points_finished": len(done)}
    return chosen


def summarize(config, grid, workdir: str, rows: list[str], seed: int, metric: str, command: str) -> dict:
    pts = points(grid)
    names = [point_name(p) for p in pts]
    table: dict = {}
    for p, name in zip(pts, names):
        wd = os.path.join(workdir, name)
        for row in rows:
            dev = row_dev(wd, row, seed)
            if dev is None:
                continue
            cost = compare.row_costs(wd, row).get(seed, {}) if os.path.isdir(os.path.join(wd, "rows")) else {}
            table.setdefault(name, {})[row] = {"dev": dev, "cost_s": round(sum(cost.values()), 1),
                                               "linked": not cost}
    chosen = choose(table, rows, names, metric)
    for row, c in chosen.items():
        c["settings"] = pts[names.index(c["point"])]
        c["flags"] = point_flags(c["settings"])
    return {"command": command, "config": config.name, "seed": seed, "metric": metric, "split": "dev",
            "grid": [{"key": k, "values": v} for k, v in grid], "points": names, "rows": rows, "table": table,
            "complete": all(row in table.get(n, {}) for n in names for row in rows), "chosen": chosen}


def markdown(result: dict) -> str:
    m, rows = result["metric"], result["rows"]
    lines = [f"# {result['config']}: settings chosen on dev ({m}, seed {result['seed']})", "",
             f"    {result['command']}", "",
             "Every row trained at every point of the same grid; evaluated on dev only (test not computed). "
             "Cost: the row's own stages in seconds (0: linked from the source run).", "",
             "| point | " + " | ".join(f"`{r}` dev {m} (s)" for r in rows) + " |",
             "| --- | " + " | ".join("---" for _ in rows) + " |"]
    for name in result["points"]:
        cells = []
        for row in rows:
            e = result["table"].get(name, {}).get(row)
            best = result["chosen"].get(row, {}).get("point") == name
            cells.append("–" if e is None else f"{'**' if best else ''}{e['dev'][m]:.4f}{'**' if best else ''} "
                         f"({e['cost_s']:.0f})")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Chosen (bold): " + "; ".join(f"`{r}`: {' '.join(c['flags'])}" for r, c in result["chosen"].items())]
    if not result["complete"]:
        lines += ["", "**Incomplete:** some points have not run for every row; the choice is over those finished."]
    return "\n".join(lines) + "\n"


def write(result: dict, workdir: str, out: str | None) -> None:
    artifacts.write_json(os.path.join(workdir, "tune.json"), result)
    artifacts.write_text(os.path.join(workdir, "TUNE.md"), markdown(result))
    if out:
        os.makedirs(out, exist_ok=True)
        for name in ("tune.json", "TUNE.md"):
            shutil.copyfile(os.path.join(workdir, name), os.path.join(out, name))


def run(config, source: str, workdir: str, rows: list[str], grid, seed: int, metric: str, command: str,
        out: str | None = None) -> dict:
    os.makedirs(workdir, exist_ok=True)
    base = config.copy_and_resolve_references()
    base.train.seed = seed
    for point in points(grid):
        name = point_name(point)
        logging.info("dev tuning: point %s, rows %s", name, rows)
        ablation.run(with_point(base, point, "dev"), os.path.join(workdir, name), [seed], rows, rows, [source])
        result = summarize(config, grid, workdir, rows, seed, metric, command)
        write(result, workdir, out)  # after every point: a run cut off keeps what it chose so far
    return result


def run_chosen(config, source: str, result: dict, final_workdir: str, seeds: list[int]) -> dict[str, str]:
    """Each row at its chosen point, every seed, on the config's own eval split: {row: workdir}."""
    if not result["complete"]:
        raise SystemExit("the grid has not finished for every row; run the tuning to its end before the final rows")
    out = {}
    for row, c in result["chosen"].items():
        wd = os.path.join(final_workdir, row)
        ablation.run(with_point(config, c["settings"]), wd, seeds, [row], [row], [source])
        out[row] = wd
    return out


def _define_flags():
    config = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py).")
    source = flags.DEFINE_string("source", None, "A finished ablation (or pipeline) workdir of the same config: "
                                 "its round 0 and round-1 teacher pass are shared by every point.")
    workdir = flags.DEFINE_string("workdir", None, "Folder of the grid's points (one ablation workdir each).")
    rows = flags.DEFINE_list("rows", ["de", "de_sent", "md2pr"], "Rows tuned, each over the whole grid.")
    grid = flags.DEFINE_multi_string("grid", [], "KEY=V1,V2,...: a row key and its values (repeatable).")
    seed = flags.DEFINE_integer("student_seed", 0, "The student seed (train.seed) of every grid point.")
    metric = flags.DEFINE_string("metric", "ndcg@10", "The dev metric a row's point is chosen by.")
    final = flags.DEFINE_string("final_workdir", None, "Then run each row at its chosen point here, every "
                                "--final_seeds, evaluated on the config's eval split.")
    final_seeds = flags.DEFINE_list("final_seeds", ["0", "1", "2"], "Seeds of the final rows.")
    out = flags.DEFINE_string("results_dir", None, "Also copy tune.json and TUNE.md here (e.g. docs/results/...).")
    return config, source, workdir, rows, grid, seed, metric, final, final_seeds, out


def main(argv) -> None:
    del argv
    from md2pr_jax.compile_cache import use_compilation_cache
    from md2pr_jax.logs import quiet_library_logs

    quiet_library_logs()
    if _CONFIG.value is None or _SOURCE.value is None or _WORKDIR.value is None:
        sys.exit("--config, --source and --workdir are required")
    unknown = [r for r in _ROWS.value if r not in ablation.ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; choose from {list(ablation.ROWS)}")
    if _METRIC.value not in ablation.METRICS:
        sys.exit(f"--metric {_METRIC.value!r}: choose from {list(ablation.METRICS)}")
    if not os.path.isdir(_SOURCE.value):
        sys.exit(f"--source {_SOURCE.value}: no such workdir (run the ablation it names first)")
    check_source(_SOURCE.value)
    config = validate(_CONFIG.value)
    try:
        grid = parse_grid(config, _GRID.value)
        for point in points(grid):
            for row in _ROWS.value:
                validate(ablation.row_config(with_point(config, point, "dev"), row, _SEED.value))
    except ConfigError as e:
        sys.exit(str(e))
    use_compilation_cache()
    command = "python -m md2pr_jax.dev_tune " + " ".join(sys.argv[1:])
    result = run(config, _SOURCE.value, _WORKDIR.value, _ROWS.value, grid, _SEED.value, _METRIC.value, command,
                 _OUT.value)
    print(json.dumps({r: c["flags"] for r, c in result["chosen"].items()}))
    if _FINAL.value:
        done = run_chosen(config, _SOURCE.value, result, _FINAL.value, [int(s) for s in _FINAL_SEEDS.value])
        print(json.dumps(done))


if __name__ == "__main__":
    _CONFIG, _SOURCE, _WORKDIR, _ROWS, _GRID, _SEED, _METRIC, _FINAL, _FINAL_SEEDS, _OUT = _define_flags()
    app.run(main)
