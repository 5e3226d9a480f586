"""Runs the stages of one workdir, resumably: the one place that skips finished stages,
records their wall time (timings.json), holds the processes at a barrier after each stage and
writes its result.json and DONE. The modes `pipeline`, `teacher` and `student` are short
compositions of it; the ablation composes it too (md2pr_jax/ablation.py).

A run killed at any moment and started again with the same command skips finished stages and
resumes the one in progress (the student's and the teacher's training from their latest orbax
checkpoint, the data iterator included).
"""

from __future__ import annotations

import json
import time

from absl import logging

from md2pr_jax import artifacts, report
from md2pr_jax.sharding import barrier
from md2pr_jax.layout import ROUND_STAGES, round_stage
from md2pr_jax.rounds import stages


class Runner:
    """Runs and resumes the stages of one MD2PR experiment in `workdir`."""

    def __init__(self, config, workdir):
        self.ctx = stages.open_context(config, workdir)
        self.config, self.layout = config, self.ctx.layout

    def run(self, stage: str, *args) -> dict:
        """Runs `stage` ('teacher', 'rounds/r01/mine', ...) unless it is done; returns its result."""
        lay = self.layout
        if lay.done(stage):
            return lay.result(stage)
        t = time.perf_counter()
        lay.stage(stage).mkdir(parents=True, exist_ok=True)
        result = stages.STAGES[stage.rsplit("/", 1)[-1]](self.ctx, *args)
        barrier(stage)  # every process's files are written before the stage counts as done
        if self.ctx.main:
            artifacts.write_json(lay.result_file(stage), result)
            artifacts.write_text(lay.done_file(stage), time.strftime("%Y-%m-%d %H:%M:%S\n"))
            timings = artifacts.read_json(lay.timings, {})
            timings[stage] = round(time.perf_counter() - t, 1)
            artifacts.write_json(lay.timings, timings)
        return result

    def round0(self) -> dict:
        """Baselines, the teacher, then its rerank rows."""
        return {"baselines": self.run("baselines"), "teacher": self.run("teacher"), "rerank": self.run("rerank")}

    def round(self, r: int, upto: str = "eval") -> dict:
        """Round r's stages in order, through `upto`."""
        t = time.perf_counter()
        out = {}
        for s in ROUND_STAGES[: ROUND_STAGES.index(upto) + 1]:
            out[s] = self.run(round_stage(r, s), r)
        if upto == "eval":
            self._log_round(r, out, time.perf_counter() - t)
        return out

    def _log_round(self, r: int, out: dict, seconds: float) -> None:
        logging.info("round %d done in %.0f s: tau %.3f, flagged %d, %s", r, seconds, out["filter"]["tau"],
                     out["filter"]["flagged"], out["eval"].get(self.ctx.eval_split))
        left = int(self.config.rounds.num_rounds) - r
        took = self.round_seconds(r)
        if left > 0 and took is not None:
            logging.info("estimated time left: %.0f min for %d more round(s) at round %d's pace", left * took / 60, left, r)

    def round_seconds(self, r: int) -> float | None:
        """Wall seconds round r's stages took, when all of them ran in recorded time."""
        timings = artifacts.read_json(self.layout.timings, {})
        parts = [timings.get(round_stage(r, s)) for s in ROUND_STAGES]
        return None if any(p is None for p in parts) else float(sum(parts))

    def rounds(self) -> None:
        for r in range(1, int(self.config.rounds.num_rounds) + 1):
            self.round(r)

    def results(self) -> dict:
        return results(self.ctx)

    def write_report(self) -> dict:
        """results.json, REPORT.md and the plots (process 0)."""
        res = self.results()
        if self.ctx.main:
            artifacts.write_json(self.layout.results, {**res["rows"], "rounds": res["rounds"], "split": res["split"]})
            histories = {r["round"]: stages.read_history(self.layout, r["round"]) for r in res["rounds"]}
            report.write(self.layout, res, histories)
        return res


def results(ctx: stages.Context) -> dict:
    """Rows and rounds of a workdir as measured so far (results.json)."""
    lay, split, config = ctx.layout, ctx.eval_split, ctx.config
    rows: dict[str, dict] = {}
    base = lay.result("baselines")
    if base:
        rows["bm25"] = base["bm25"].get(split, {})
        rows["zero_shot"] = base["zero_shot"].get(split, {})
    rerank = lay.result("rerank") or lay.result("teacher")  # before the rerank stage, the teacher's held it
    if rerank and "teacher_rerank" in rerank:
        rows["teacher_rerank"] = rerank["teacher_rerank"].get(split, {})
        if "hybrid_rerank" in rerank:
            rows["hybrid_rerank"] = rerank["hybrid_rerank"].get(split, {})
    rounds = []
    for r in lay.finished_rounds():
        filt, train = lay.result(round_stage(r, "filter")), lay.result(round_stage(r, "train"))
        rounds.append({"round": r, "tau": filt.get("tau"), "tau_hat": filt.get("tau_hat"),
                       "flagged": filt.get("flagged"), "planted": filt.get("planted"),
                       "loss": train.get("mean", {}), "metrics": lay.result(round_stage(r, "eval"))})
    if rounds:
        rows[report.row_name(config)] = rounds[-1]["metrics"].get(split, {})
    return {"split": split, "dataset": ctx.dataset.name, "rows": rows, "rounds": rounds, "config": config.name}


def teacher_mode(config, workdir: str) -> None:
    """`--mode teacher`: round 0 (baselines, teacher fine-tuning, rerank evaluation)."""
    runner = Runner(config, workdir)
    runner.round0()
    runner.write_report()


def student_mode(config, workdir: str) -> None:
    """`--mode student`: rounds 1..R (needs round 0 in the same workdir)."""
    runner = Runner(config, workdir)
    if not runner.layout.done("teacher"):
        raise SystemExit(f"{workdir} has no finished teacher stage; run --mode teacher (or pipeline) first")
    runner.rounds()
    runner.write_report()


def pipeline_mode(config, workdir: str) -> None:
    """`--mode pipeline`: round 0, every student round, then REPORT.md and results.json."""
    t = time.perf_counter()
    runner = Runner(config, workdir)
    runner.round0()
    runner.rounds()
    res = runner.write_report()
    if runner.ctx.main:
        print(json.dumps({"rows": res["rows"], "seconds": round(time.perf_counter() - t, 1)}))
