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

if __name__ == "__main__":
    # Before the imports below (JAX among them, seconds of CPU): the process that re-executes
    # under tcmalloc would otherwise import them twice.
    from md2pr_jax.allocator import reexec_under_preferred_allocator

    reexec_under_preferred_allocator()

import json
import os
import sys

import jax
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from md2pr_jax import artifacts, compare, report, row_archive
from md2pr_jax.layout import SHARED_STAGES, Layout, linkable, round_stage, round_stages

ROWS = report.STUDENT_ROWS  # row -> config switches on top of the experiment config
METRICS = report.METRICS


def row_config(config, row: str, seed: int):
    c = config.copy_and_resolve_references()
    for key, value in ROWS[row].items():
        section, name = key.split(".")
        c[section][name] = value
    c.train.seed = seed  # data splits, teacher and round-1 candidates stay shared (config.seed)
    c.name = f"{config.name}:{row}:s{seed}"
    return c


def link_shared(shared: Layout, row: Layout) -> None:
    """Points a row's shared stages at WORKDIR/shared (relative symlinks)."""
    for stage in SHARED_STAGES:
        _link(shared, row, stage)


# Keys that decide only when a run saves its state and logs, never what it computes (training
# resumed from a checkpoint ends at the same params: tests/test_checkpoint.py; a scoring pass
# gives the same logits whatever its chunks: tests/test_teacher.py), with the value every
# archived row ran under: a finished run is reused, and a kept row found, at any value.
BOOKKEEPING_KEYS = {"train.checkpoint_every": 200, "train.keep_checkpoints": 2, "train.log_every": 10,
                    "teacher_train.score_chunk_size": 65536}
# Keys that may differ between a finished run and the ablation reusing it.
REUSE_FREE_KEYS = ("name", "rounds.num_rounds", *BOOKKEEPING_KEYS)
# Keys only a row's own stages read (filter, training, evaluation, later rounds): where they
# differ, the shared stages are still linked, but no round of a row.
ROW_KEYS = ("train", "loss.alpha", "loss.beta", "loss.gamma", "loss.kd_temperature", "loss.word_topk",
            "filter.dynamic", "filter.tau0", "filter.momentum", "filter.quantile", "filter.tau_min",
            "filter.tau_max", "filter.promote", "filter.promote_tau", "filter.tau_source", "filter.keep_flagged",
            "filter.pseudo_only", "filter.random_flags",
            "data.num_negatives", "teacher.bm25_weight", "teacher.bm25_weight_from_dev", "loss.word_temperature")
# Keys only the rerank stage reads besides the row keys: where they differ it is not linked.
RERANK_KEYS = ("teacher_train.rerank_depth",)
# Keys round 0 never reads (the pseudo-queries join from round 1's mining on): where they
# differ, round 0 is linked but round 1's mining and teacher pass are run anew.
PSEUDO_KEYS = ("data.pseudo_queries", "data.pseudo_kind")
# The split reported first. Every stage evaluates it and dev (`rounds.stages.evaluated_splits`),
# so a run evaluated on any split serves one that asks for dev alone (a sweep that chooses on
# dev and never computes test: `md2pr_jax.dev_tune`); other differences are refused.
EVAL_KEYS = ("data.eval_split",)


def _serves_eval_split(saved: dict, ours: dict) -> bool:
    """Whether the stages of a run saved with `saved` hold every split a run of `ours` reports."""
    theirs, want = saved.get("data", {}).get("eval_split", "test"), ours["data"]["eval_split"]
    return want in (theirs, "dev")


def _comparable(cfg_dict: dict, ignore: tuple[str, ...] = ()) -> dict:
    """A config as config.json holds it, over the current defaults (a key added since the source
    ran counts as its default, a key removed since is dropped), without REUSE_FREE_KEYS and
    `ignore` (dotted keys; a section name drops the whole section)."""
    from md2pr_jax.config import base_config

    def merge(default, saved):
        if not isinstance(default, dict):
            return saved
        return {k: merge(v, saved[k]) if k in saved else v for k, v in default.items()}

    d = merge(json.loads(base_config().to_json_best_effort()), json.loads(json.dumps(cfg_dict)))
    for key in REUSE_FREE_KEYS + tuple(ignore):
        node = d
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.get(p, {})
        node.pop(leaf, None)
    return d


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two nested dicts."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(prefix + k)
    return out


def reuse_run(config, source: str, workdir: Layout) -> list[str]:
    """Links finished stages of an earlier run into this ablation (`--reuse_from`), instead of
    recomputing them. The source is either a `--mode pipeline` workdir or an ablation workdir.
    Its round 0 and round 1's mining and teacher pass go to WORKDIR/shared, when the configs
    differ at most in the name, the number of rounds and ROW_KEYS (the rerank stage: also not
    in RERANK_KEYS); anything else is refused. Every finished round of a row goes to the same
    row and seed here when that row's config is the same up to its name and number of rounds:
    for a pipeline workdir, the row whose config is the run's own; for an ablation workdir,
    each of its rows. So a 2-round ablation can extend a 1-round one, running only round 2 of
    each row, and a sweep of a row key reuses round 0 and round 1's teacher pass."""
    src = Layout.at(source)
    is_ablation = src.rows_dir.is_dir()
    base = src.shared if is_ablation else src
    saved = artifacts.read_json(base.config_json)
    if saved is None:
        raise SystemExit(f"--reuse_from {src}: no {base.config_json} (neither a pipeline nor an ablation workdir)")
    ours = json.loads(config.to_json_best_effort())
    split_free = EVAL_KEYS if _serves_eval_split(saved, ours) else ()
    free = ROW_KEYS + RERANK_KEYS + PSEUDO_KEYS + split_free
    diff = _differences(_comparable(saved, free), _comparable(ours, free))
    if diff:
        raise SystemExit(f"--reuse_from {src}: its config differs from this one in {diff}; only the name, "
                         f"rounds.num_rounds, {', '.join(RERANK_KEYS + PSEUDO_KEYS)}, the row keys "
                         f"{', '.join(ROW_KEYS)} and data.eval_split=dev may differ")
    rest = ROW_KEYS + split_free
    same_rerank = not _differences(_comparable(saved, rest + PSEUDO_KEYS), _comparable(ours, rest + PSEUDO_KEYS))
    same_pseudo = not _differences(_comparable(saved, rest + RERANK_KEYS), _comparable(ours, rest + RERANK_KEYS))
    round1 = (round_stage(1, "mine"), round_stage(1, "score"))
    finished = [stage for stage in SHARED_STAGES if linkable(base, stage) and (stage != "rerank" or same_rerank)
                and (stage not in round1 or same_pseudo)]
    if not finished:
        raise SystemExit(f"--reuse_from {src}: it holds no finished stage to reuse (renamed or not run yet?)")
    linked = [_link(base, workdir.shared, stage) for stage in finished]
    sources = [Layout(p) for p in sorted(src.rows_dir.iterdir())] if is_ablation else [src]
    for row_src in sources:
        saved_row = artifacts.read_json(row_src.config_json) or {}
        seed = int(saved_row.get("train", {}).get("seed", config.train.seed))
        row_free = EVAL_KEYS if saved_row and _serves_eval_split(saved_row, ours) else ()
        theirs = _comparable(saved_row, row_free)
        row = next((r for r in ROWS if _comparable(row_config(config, r, seed).to_dict(), row_free) == theirs), None)
        if row is not None:
            linked += _link_rounds(config, row_src, workdir.row(row, seed))
    return [x for x in linked if x]


def _link_rounds(config, source: Layout, row: Layout) -> list[str | None]:
    """Links each round of `source` whose stages all finished, up to the configured number."""
    linked: list[str | None] = []
    for r in range(1, int(config.rounds.num_rounds) + 1):
        stages = round_stages(r)
        if all(source.done(st) for st in stages):
            linked += [_link(source, row, st) for st in stages + [round_stage(r, "student")]]
    return linked


def _link(source: Layout, target: Layout, stage: str) -> str | None:
    """target/stage -> source/stage as a relative symlink, unless target/stage exists already;
    returns the stage when linked. A missing source, or a link whose source was moved away,
    is an error (never a silent recomputation)."""
    src, dst = source.stage(stage), target.stage(stage)
    if not (source.local and target.local):
        raise SystemExit(f"linking {stage} from {source} into {target}: stages can be shared only between "
                         "local workdirs (symlinks); run the ablation with a local --workdir")
    if os.path.islink(dst) and not os.path.exists(dst):
        raise SystemExit(f"{dst} links to {os.readlink(dst)}, which no longer exists (moved or renamed?); "
                         "restore it, or delete the link to recompute that stage")
    if os.path.lexists(dst):
        return None
    if not src.exists():
        raise SystemExit(f"cannot link {stage}: {src} does not exist (moved or renamed?)")
    dst.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(src, dst.parent), dst)
    return stage


def aggregate(per_seed: list[dict]) -> dict:
    out: dict = {"seeds": len(per_seed)}
    for m in METRICS:
        values = [r[m] for r in per_seed]
        out[m] = float(np.mean(values))
        out[f"{m}_std"] = float(np.std(values))
    return out


def _run_row(config, shared: Layout, row_layout: Layout) -> dict:
    """One row and seed: its rounds (sharing round 0 and round 1's mining and teacher pass) ->
    the eval split's metrics, the last round's filter, and the other held-out splits (dev: where
    choices are made) under their names."""
    from md2pr_jax.rounds.runner import Runner

    link_shared(shared, row_layout)
    runner = Runner(config, row_layout.root)
    runner.rounds()
    res = runner.write_report()
    last = res["rounds"][-1]
    by_split = {s: {m: v[m] for m in METRICS} for s, v in last["metrics"].items() if isinstance(v, dict)}
    return {**by_split.pop(res["split"]), "tau": last["tau"], "flagged": last["flagged"], **by_split}


def filter_only(config, workdir: str, rows: list[str], reuse_from: list[str] = ()) -> dict:
    """`--upto filter`: round 0, round 1's mining and teacher pass, and each row's round-1 filter,
    no training: what the planted check (config.filter.plant_fraction > 0) needs for round 1.
    Writes WORKDIR/filter_only.json (per row: tau, flagged, planted) and a REPORT.md table."""
    from md2pr_jax.rounds.runner import Runner

    layout = Layout.at(workdir)
    for source in reuse_from:
        logging.info("reusing from %s: %s", source, reuse_run(config, source, layout))
    base = Runner(config, layout.shared.root)
    base.round0()
    base.round(1, upto="score")
    out = {}
    for row in rows:
        row_layout = layout.row(row, int(config.train.seed))
        link_shared(layout.shared, row_layout)
        runner = Runner(row_config(config, row, int(config.train.seed)), row_layout.root)
        filt = runner.round(1, upto="filter")["filter"]
        out[row] = {k: filt.get(k) for k in ("tau", "tau_hat", "flagged", "candidates", "planted", "teacher_signal")}
        logging.info("filter-only row %s: %s", row, out[row])
    artifacts.write_json(layout.root / "filter_only.json", out)
    lines = [f"# {config.name}: round 1's filter per row (no training)", "",
             "| row | tau | flagged | hidden in candidates | flagged hidden | recall | precision |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for row, r in out.items():
        p = r.get("planted") or {}
        lines.append(f"| `{row}` | {r['tau']:.3f} | {r['flagged']} | {p.get('hidden_in_candidates', '–')} | "
                     f"{p.get('flagged_hidden', '–')} | {p.get('recall', float('nan')):.3f} | "
                     f"{p.get('precision', float('nan')):.3f} |")
    if base.ctx.main:
        artifacts.write_text(layout.report, "\n".join(lines) + "\n")
    return out


# Keys added to the config after rows were archived, with the value every such row ran under:
# a row at that value leaves the key out of its digest, so that the archive still keeps it.
DIGEST_LATER_KEYS = {"filter.pseudo_only": False, "filter.random_flags": False}


def row_digest(row_cfg) -> str:
    """What a kept row was trained under (`row_archive`): its whole config but its name, where
    the data lies on this machine, BOOKKEEPING_KEYS (at the value the archived rows ran under)
    and DIGEST_LATER_KEYS at their old value."""
    d = json.loads(row_cfg.to_json_best_effort())
    d.pop("name", None)
    for key in ("dir", "cache_dir"):
        d.get("data", {}).pop(key, None)
    for key, archived in BOOKKEEPING_KEYS.items():
        section, name = key.split(".")
        d.setdefault(section, {})[name] = archived
    for key, old in DIGEST_LATER_KEYS.items():
        section, name = key.split(".")
        if d.get(section, {}).get(name, old) == old:
            d.get(section, {}).pop(name, None)
    return row_archive.config_digest(d)


def run(config, workdir: str, seeds: list[int], rows: list[str], multi_seed_rows: list[str],
        reuse_from: list[str] = (), archive: str | None = None) -> dict:
    from md2pr_jax.rounds.runner import Runner

    layout = Layout.at(workdir)
    for source in reuse_from:  # the first source to hold a stage wins
        logging.info("reusing from %s: %s", source, reuse_run(config, source, layout))
    base = Runner(config, layout.shared.root)
    if archive and (jax.process_count() > 1 or not layout.local):
        raise ValueError("--archive keeps a single-host run's rows in a local folder; a pod's workdir in a bucket "
                         "outlives the hosts already")
    base.round0()
    base.round(1, upto="score")
    common = base.results()["rows"]
    split = base.ctx.eval_split
    kept = row_archive.RowArchive(archive, str(config.data.dataset), layout) if archive else None
    table = {k: {m: common[k][m] for m in METRICS} for k in ("bm25", "zero_shot", "teacher_rerank", "hybrid_rerank")
             if k in common}
    shown = {k: dict(v) for k, v in table.items()}
    per_row: dict[str, dict] = {}
    results: dict[str, list[dict]] = {row: [] for row in rows}
    # Seed-major: every row's first seed before any row's second, so that a run cut off (or
    # read while it runs) has all its rows on the same seeds, ready for a paired comparison.
    for seed in seeds:
        for row in rows:
            if seed != seeds[0] and row not in multi_seed_rows:
                continue
            cfg = row_config(config, row, seed)
            digest = row_digest(cfg)
            res = kept.result(row, seed, digest, base.ctx.report_splits) if kept else None
            if res is not None:
                logging.info("row %s seed %d: kept in the archive %s (trained in an earlier run), not rerun",
                             row, seed, archive)
            else:
                res = _run_row(cfg, layout.shared, layout.row(row, seed))
                if kept:
                    logging.info("archived %s", kept.add(row, seed, digest, res))
            results[row].append({**res, "seed": seed})
            logging.info("ablation row %s seed %d: %s", row, seed, results[row][-1])
            agg = aggregate(results[row])
            table[row] = agg
            other_splits = [s for s, v in results[row][0].items() if isinstance(v, dict)]
            per_row[row] = {"per_seed": results[row], **agg,
                            **{s: aggregate([r[s] for r in results[row]]) for s in other_splits}}
            shown[row] = {m: {"mean": agg[m], "std": agg[f"{m}_std"], "n": agg["seeds"]} if agg["seeds"] > 1
                          else agg[m] for m in METRICS}
            artifacts.write_json(layout.ablation_json, {**table, "split": split, "per_row": per_row})
    per_row = {row: per_row[row] for row in rows}  # the rows in the order asked for
    paired = paired_with_de(per_row, split)
    artifacts.write_json(layout.ablation_json, {**table, "split": split, "per_row": per_row,
                                                **({"paired_vs_de": paired} if paired else {})})
    report.write(layout, {"split": split, "dataset": base.ctx.dataset.name, "rows": shown, "rounds": []}, {},
                 title=f"{config.name} ablation, {int(config.rounds.num_rounds)} student round(s) per row")
    if "de" in per_row and len(per_row) > 1 and base.ctx.main and layout.local:
        # Every row against DE over queries (and seed by seed): WORKDIR/compare.json, in REPORT.md.
        # Rows kept in a usable archive may not be in this workdir: the archive holds every row.
        source, label = ((archive, kept.label) if kept and kept.usable else (str(layout.root), base.ctx.dataset.name))
        part = lambda row: [compare.Part(label, source, row)]  # noqa: E731
        result = compare.run_comparison(("de", part("de")), [(row, part(row)) for row in per_row if row != "de"])
        artifacts.write_json(layout.root / "compare.json", result)
        artifacts.write_text(layout.report, layout.report.read_text() + "\n" + compare.report_markdown(result))
    return table


def paired_with_de(per_row: dict, split: str) -> dict | None:
    """Every row against DE, paired by seed (`compare`), where DE and the row share 2+ seeds."""
    def by_seed(row):
        return {r["seed"]: {split: {m: r[m] for m in METRICS}, **{s: v for s, v in r.items() if isinstance(v, dict)}}
                for r in per_row[row]["per_seed"]}

    if "de" not in per_row:
        return None
    de = by_seed("de")
    others = [(row, by_seed(row)) for row in per_row if row != "de" and len(set(by_seed(row)) & set(de)) > 1]
    return compare.compare(("de", de), others) if others else None


def _define_flags():
    """The command line's flags, defined only when this module runs as a program (the entry
    point in md2pr_jax.main defines flags of the same names)."""
    config = config_flags.DEFINE_config_file("config", None, "Experiment config (configs/*.py).")
    workdir = flags.DEFINE_string("workdir", None, "Ablation workdir.")
    seeds = flags.DEFINE_list("seeds", ["0", "1"], "Seeds for the student rows (DE and MD2PR need at least 2).")
    rows = flags.DEFINE_list("rows", [r for r, sw in ROWS.items() if not sw.get("train.pseudo")],
                             "Student rows to run (the *_pseudo rows need config.data.pseudo_queries > 0).")
    multi = flags.DEFINE_list("multi_seed_rows", ["de", "md2pr"], "Rows run with every seed; the others with the first.")
    reuse = flags.DEFINE_list("reuse_from", [], "Earlier workdirs of the same config (`--mode pipeline` or ablation), "
                              "comma-separated: their round 0, round-1 mining and teacher pass, and their rows' finished "
                              "rounds are linked, not rerun; the first to hold a stage wins.")
    upto = flags.DEFINE_enum("upto", "eval", ["eval", "filter"], "eval: every row's rounds in full. filter: round 1 "
                             "through each row's filter only, no training (the planted check's round 1; the first seed).")
    archive = flags.DEFINE_string("archive", None, "A folder (committed, e.g. docs/results/X/per_query) that keeps each "
                                  "finished row's per-query files, cost and result (md2pr_jax.row_archive): a rerun whose "
                                  "workdir is gone recomputes the shared stages and trains only the rows not kept there.")
    return config, workdir, seeds, rows, multi, reuse, upto, archive


def main(argv) -> None:
    del argv
    from md2pr_jax.compile_cache import use_compilation_cache
    from md2pr_jax.config import validate
    from md2pr_jax.logs import quiet_library_logs

    quiet_library_logs()
    if _CONFIG.value is None or _WORKDIR.value is None:
        sys.exit("--config and --workdir are required")
    unknown = [r for r in _ROWS.value if r not in ROWS]
    if unknown:
        sys.exit(f"unknown rows {unknown}; choose from {list(ROWS)}")
    config = validate(_CONFIG.value)
    for row in _ROWS.value:  # a row's own switches must make a valid config too (e.g. *_pseudo rows)
        validate(row_config(config, row, int(_SEEDS.value[0])))
    use_compilation_cache()
    if _UPTO.value == "filter":
        config.train.seed = int(_SEEDS.value[0])
        print(json.dumps(filter_only(config, _WORKDIR.value, _ROWS.value, _REUSE_FROM.value)))
        return
    table = run(config, _WORKDIR.value, [int(s) for s in _SEEDS.value], _ROWS.value, _MULTI_SEED_ROWS.value,
                _REUSE_FROM.value, _ARCHIVE.value)
    print(json.dumps(table))


if __name__ == "__main__":
    _CONFIG, _WORKDIR, _SEEDS, _ROWS, _MULTI_SEED_ROWS, _REUSE_FROM, _UPTO, _ARCHIVE = _define_flags()
    app.run(main)
