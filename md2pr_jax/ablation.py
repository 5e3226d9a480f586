"""The ablation: every row of the results table, measured by this code in one resumable run.

    python -m md2pr_jax.ablation --config configs/scifact_minilm.py --workdir runs/ablation [--seeds 0,1]

Rows share what they have in common. `WORKDIR/shared` runs round 0 once (BM25, zero-shot,
the teacher and its rerank row) and round 1's mining and teacher pass (round 1 mines with
the zero-shot student, the same for every row); each row's folder `WORKDIR/rows/<row>_s<seed>`
links those stages and runs its own filter, training and evaluation (and any later rounds).
Writes `WORKDIR/ablation.json` (rows bm25, zero_shot, teacher_rerank, de, de_sent,
de_sent_word, md2pr, static_filter: the mean over seeds of ndcg@10, mrr@10, recall@100, with
`<metric>_std` and `seeds`) and `WORKDIR/REPORT.md`.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

# row -> config overrides on top of the experiment config
ROWS = {
    "de": {"loss.use_sent": False, "loss.use_word": False, "loss.use_margin_mse": False, "filter.enabled": False},
    "de_sent": {"loss.use_sent": True, "loss.use_word": False, "filter.enabled": False},
    "de_sent_word": {"loss.use_sent": True, "loss.use_word": True, "filter.enabled": False},
    "md2pr": {"loss.use_sent": True, "loss.use_word": True, "filter.enabled": True, "filter.dynamic": True},
    "static_filter": {"loss.use_sent": True, "loss.use_word": True, "filter.enabled": True, "filter.dynamic": False},
}
SHARED_STAGES = ("data", "baselines", "teacher", "params/teacher", "rounds/r01/mine", "rounds/r01/score")
METRICS = ("ndcg@10", "mrr@10", "recall@100")

def row_config(config, row: str, seed: int):
    c = config.copy_and_resolve_references()
    for key, value in ROWS[row].items():
        section, name = key.split(".")
        c[section][name] = value
    c.train.seed = seed  # data splits, teacher and round-1 candidates stay shared (config.seed)
    c.name = f"{config.name}:{row}:s{seed}"
    return c


def link_shared(shared: str, rowdir: str) -> None:
    """Points a row's shared stages at WORKDIR/shared (relative symlinks)."""
    for stage in SHARED_STAGES:
        _link(shared, rowdir, stage)


# Keys that may differ between a finished pipeline run and the ablation reusing it.
REUSE_FREE_KEYS = ("name", "rounds.num_rounds")


def _comparable(cfg_dict: dict) -> dict:
    d = json.loads(json.dumps(cfg_dict))  # tuples -> lists, as in the saved config.json
    for key in REUSE_FREE_KEYS:
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return d


def reuse_run(config, source: str, workdir: str) -> list[str]:
    """Links finished stages of an earlier run into this ablation (`--reuse_from`), instead of
    recomputing them. The source is either a `--mode pipeline` workdir or an ablation workdir.
    Its round 0 and round 1's mining and teacher pass go to WORKDIR/shared; every finished
    round of a row goes to the same row and seed here: for a pipeline workdir, the row whose
    config is the run's own; for an ablation workdir, each of its rows. The source must have
    used the same config up to its name and number of rounds; anything else is refused. So a
    2-round ablation can extend a 1-round one, running only round 2 of each row."""
    source = os.path.abspath(source)
    is_ablation = os.path.isdir(os.path.join(source, "rows"))
    base = os.path.join(source, "shared") if is_ablation else source
    saved = os.path.join(base, "config.json")
    if not os.path.exists(saved):
        raise SystemExit(f"--reuse_from {source}: no config.json there (neither a pipeline nor an ablation workdir)")
    with open(saved) as f:
        theirs = _comparable(json.load(f))
    ours = _comparable(json.loads(config.to_json_best_effort()))
    if theirs != ours:
        diff = sorted(k for k in set(theirs) | set(ours) if theirs.get(k) != ours.get(k))
        raise SystemExit(f"--reuse_from {source}: its config differs from this one in {diff}; "
                         "only the name and rounds.num_rounds may differ")
    linked = [_link(base, os.path.join(workdir, "shared"), stage) for stage in SHARED_STAGES if _finished(base, stage)]
    if is_ablation:
        row_dirs = [(os.path.join(source, "rows", name), name) for name in sorted(os.listdir(os.path.join(source, "rows")))]
    else:
        row = next((r for r in ROWS if _comparable(row_config(config, r, config.train.seed).to_dict()) ==
                    _comparable(config.to_dict())), None)
        row_dirs = [] if row is None else [(source, f"{row}_s{config.train.seed}")]
    for src, name in row_dirs:
        linked += _link_rounds(config, src, os.path.join(workdir, "rows", name))
    return [x for x in linked if x]


def _link_rounds(config, source: str, rowdir: str) -> list[str | None]:
    """Links each round of `source` whose stages all finished, up to the configured number."""
    from md2pr_jax.controller import ROUND_STAGES

    linked: list[str | None] = []
    for r in range(1, int(config.rounds.num_rounds) + 1):
        stages = [f"rounds/r{r:02d}/{s}" for s in ROUND_STAGES]
        if all(_finished(source, st) for st in stages):
            linked += [_link(source, rowdir, st) for st in stages + [f"rounds/r{r:02d}/student"]]
    return linked


def _finished(source: str, stage: str) -> bool:
    path = os.path.join(source, stage)
    return os.path.exists(os.path.join(path, "DONE")) or (stage in ("data", "params/teacher") and os.path.isdir(path))


def _link(source: str, target_root: str, stage: str) -> str | None:
    """target_root/stage -> source/stage as a relative symlink, unless it exists already or
    the source does not; returns the stage when linked."""
    src, dst = os.path.join(source, stage), os.path.join(target_root, stage)
    if os.path.lexists(dst) or not os.path.exists(src):
        return None
    os.makedirs(os.path.dirname(dst), exist_ok=True)
    os.symlink(os.path.relpath(src, os.path.dirname(dst)), dst)
    return stage


def aggregate(per_seed: list[dict]) -> dict:
    out: dict = {"seeds": len(per_seed)}
    for m in METRICS:
        values = [r[m] for r in per_seed]
        out[m] = float(np.mean(values))
        out[f"{m}_std"] = float(np.std(values))
    return out


def run(config, workdir: str, seeds: list[int], rows: list[str], multi_seed_rows: list[str],
        reuse_from: list[str] = ()) -> dict:
    from md2pr_jax import report
    from md2pr_jax.artifacts import write_json
    from md2pr_jax.controller import Controller

    workdir = os.path.abspath(workdir)
    for source in reuse_from:  # the first source to hold a stage wins
        logging.info("reusing from %s: %s", source, reuse_run(config, source, workdir))
    shared_dir = os.path.join(workdir, "shared")
    base = Controller(config, shared_dir)
    base.baselines()
    base.train_teacher()
    base.mine(1)
    base.score(1)
    common = base.results()["rows"]
    table = {k: {m: common[k][m] for m in METRICS} for k in ("bm25", "zero_shot", "teacher_rerank") if k in common}
    shown = {k: dict(v) for k, v in table.items()}
    per_row: dict[str, dict] = {}
    for row in rows:
        results = []
        for seed in seeds if row in multi_seed_rows else seeds[:1]:
            rowdir = os.path.join(workdir, "rows", f"{row}_s{seed}")
            link_shared(shared_dir, rowdir)
            ctl = Controller(row_config(config, row, seed), rowdir)
            for r in range(1, int(config.rounds.num_rounds) + 1):
                ctl.run_round(r)
            res = ctl.write_report()
            last = res["rounds"][-1]
            by_split = {s: {m: v[m] for m in METRICS} for s, v in last["metrics"].items() if isinstance(v, dict)}
            # the eval split's metrics, the last round's filter, and the other held-out splits
            # (dev: where choices are made) under their names
            results.append({**by_split.pop(res["split"]), "tau": last["tau"], "flagged": last["flagged"], **by_split})
            logging.info("ablation row %s seed %d: %s", row, seed, results[-1])
        agg = aggregate(results)
        table[row] = agg
        other_splits = [s for s, v in results[0].items() if isinstance(v, dict)]
        per_row[row] = {"per_seed": results, **agg, **{s: aggregate([r[s] for r in results]) for s in other_splits}}
        shown[row] = {m: {"mean": agg[m], "std": agg[f"{m}_std"], "n": agg["seeds"]} if agg["seeds"] > 1 else agg[m]
                      for m in METRICS}
        write_json(os.path.join(workdir, "ablation.json"), {**table, "split": base.eval_split, "per_row": per_row})
    write_json(os.path.join(workdir, "ablation.json"), {**table, "split": base.eval_split, "per_row": per_row})
    report.write(workdir, {"split": base.eval_split, "dataset": base.dataset.name, "rows": shown, "rounds": []}, {},
                 title=f"{config.name} ablation, {int(config.rounds.num_rounds)} student round(s) per row")
    return table


def _define_flags():
    """The command line's flags, defined only when this module runs as a program (the entry
    point in md2pr_jax.main defines flags of the same names)."""
    config = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py).")
    workdir = flags.DEFINE_string("workdir", None, "Ablation workdir.")
    seeds = flags.DEFINE_list("seeds", ["0", "1"], "Seeds for the student rows (DE and MD2PR need at least 2).")
    rows = flags.DEFINE_list("rows", list(ROWS), "Student rows to run.")
    multi = flags.DEFINE_list("multi_seed_rows", ["de", "md2pr"], "Rows run with every seed; the others with the first.")
    reuse = flags.DEFINE_list("reuse_from", [], "Earlier workdirs of the same config (`--mode pipeline` or ablation), "
                              "comma-separated: their round 0, round-1 mining and teacher pass, and their rows' finished "
                              "rounds are linked, not rerun; the first to hold a stage wins.")
    return config, workdir, seeds, rows, multi, reuse


def main(argv) -> None:
    del argv
    from md2pr_jax.config import validate
    from md2pr_jax.logs import quiet_library_logs

    quiet_library_logs()
    if _CONFIG.value is None or _WORKDIR.value is None:
        sys.exit("--config and --workdir are required")
    unknown = [r for r in _ROWS.value if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; choose from {list(ROWS)}")
    config = validate(_CONFIG.value)
    table = run(config, _WORKDIR.value, [int(s) for s in _SEEDS.value], _ROWS.value, _MULTI_SEED_ROWS.value,
                _REUSE_FROM.value)
    print(json.dumps(table))


if __name__ == "__main__":
    _CONFIG, _WORKDIR, _SEEDS, _ROWS, _MULTI_SEED_ROWS, _REUSE_FROM = _define_flags()
    app.run(main)
