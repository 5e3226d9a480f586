"""An ablation's finished rows kept in an archive folder (compare's `--archive` layout), so that a
later session whose workdir is gone reruns the shared stages and only the rows not yet kept.

    python -m md2pr_jax.ablation --config ... --workdir runs/X --archive docs/results/X/per_query

Workdirs hold checkpoints and embeddings (too large for git) and do not survive a session on a
rented machine; the archive holds what a comparison reads (each evaluation's per-query metrics),
small enough to commit after every row. Layout, beside compare's files:

    <label>.<system>.<split>.json          the shared stages' evaluations (BM25, zero-shot, teacher)
    <label>.<row>_s<seed>.<split>.json     each finished row and seed (what `compare` reads)
    costs.json  {label: {"shared": {stage: s}, "shared_by_workdir": {workdir name: {stage: s}},
                         "rows": {row: {seed: {stage: s}}},
                         "results": {row: {seed: {"config": sha, "result": {...}}}}}}

`shared` holds the latest time of each shared stage of the label (several workdirs share a label,
e.g. a dataset's labelled ablation and its pseudo-query run), `shared_by_workdir` each workdir's
own; a run that timed no shared stage (all linked from another workdir or finished earlier) adds
nothing and erases nothing.

Reuse is guarded at two levels. The shared stages (round 0 and round 1's mining and teacher pass,
which every row trains on) are recomputed each session; their per-query metrics (the zero-shot
student that mines round 1, the teacher, its hybrid weight, BM25) must equal the archive's to 1e-6 (MAP,
which reads the whole ranking, to 1e-3),
else the archive's rows came from other lists or another teacher: none is reused and nothing is
written (a warning says why). A row and seed is then reused only under the same row config
(`config` above: a digest of the row's whole config but its name).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil

from absl import logging

from md2pr_jax import compare
from md2pr_jax.layout import Layout
from md2pr_jax.retrieval import per_query

SHARED_EVAL_STAGES = ("baselines", "rerank")


def config_digest(comparable: dict) -> str:
    return hashlib.sha256(json.dumps(comparable, sort_keys=True).encode()).hexdigest()[:16]


def _shared_files(shared: Layout) -> dict[str, str]:
    """'<system>.<split>' -> path of every per-query file the shared stages wrote."""
    out = {}
    for stage in SHARED_EVAL_STAGES:
        folder = shared.per_query_dir(stage)
        if folder.exists():
            for path in sorted(folder.glob("*.json")):
                out[path.name[: -len(".json")]] = str(path)
    return out


# Metrics that read the whole ranking (MAP over its 1,000 passages) move by ~1e-5 when two passages
# deep in it swap on a float tie between two runs of the same model (seen on NFCorpus's zero-shot
# student: 6 of 323 test queries, at most 2.4e-5, every cutoff metric equal): checked at this looser
# tolerance. A change of the model or its lists moves the cutoff metrics, checked at `tol`.
WHOLE_RANKING_METRICS = ("map",)
WHOLE_RANKING_TOL = 1e-3


def _same_metrics(ours: dict[str, str], theirs: dict[str, str], tol: float = 1e-6) -> bool:
    """Whether two sets of per-query files ('<system>.<split>' -> path) name the same evaluations
    with the same queries and every per-query metric within `tol` (the whole-ranking metrics
    within WHOLE_RANKING_TOL)."""
    if set(ours) != set(theirs):
        return False
    for name in ours:
        a, b = per_query.read_metrics(ours[name])["metrics"], per_query.read_metrics(theirs[name])["metrics"]
        if set(a) != set(b) or any(set(a[m]) != set(b[m]) for m in a):
            return False
        for m in a:
            limit = WHOLE_RANKING_TOL if m in WHOLE_RANKING_METRICS else tol
            if any(abs(float(a[m][q]) - float(b[m][q])) > limit for q in a[m]):
                return False
    return True


class RowArchive:
    """The archive folder for one dataset `label`, checked against this run's shared stages."""

    def __init__(self, folder: str, label: str, workdir: Layout):
        self.folder, self.label, self.workdir = folder, label, workdir
        os.makedirs(folder, exist_ok=True)
        ours = _shared_files(workdir.shared)
        theirs = {name: os.path.join(folder, f"{label}.{name}.json") for name in ours}
        kept = {n: p for n, p in theirs.items() if os.path.exists(p)}
        rows_kept = self._costs().get(label, {}).get("rows")
        self.reason = ""
        if not ours:
            self.reason = f"the shared stages of {workdir.root} wrote no per-query files"
        elif kept and not _same_metrics(ours, kept):
            self.reason = (f"its shared evaluations of {label} ({sorted(kept)}) differ from this run's "
                           f"({sorted(ours)}): its rows were trained on other lists or another teacher")
        elif rows_kept and not kept:
            self.reason = f"it holds rows of {label} without the shared evaluations they were trained beside"
        if self.reason:
            logging.warning("the archive %s is not used (no row read from it, none written): %s", folder, self.reason)
            return
        for name, src in ours.items():
            shutil.copyfile(src, theirs[name])
        timed = compare.shared_costs(str(workdir.root))
        if timed:  # a run that linked or resumed every shared stage timed none: keep what was recorded
            costs = self._costs()
            mine = costs.setdefault(label, {})
            mine.setdefault("shared", {}).update(timed)
            mine.setdefault("shared_by_workdir", {})[workdir.root.name] = timed
            self._write_costs(costs)

    @property
    def usable(self) -> bool:
        return not self.reason

    def _costs(self) -> dict:
        return compare._archive_costs(self.folder)

    def _write_costs(self, costs: dict) -> None:
        compare.write_archive_costs(self.folder, costs)

    def result(self, row: str, seed: int, digest: str, splits: list[str]) -> dict | None:
        """The kept result of `row` and `seed` (as `ablation._run_row` returned it) when it was
        trained under the config `digest` and its per-query files of `splits` are all here."""
        if not self.usable:
            return None
        rec = self._costs().get(self.label, {}).get("results", {}).get(row, {}).get(str(seed))
        if not rec or rec.get("config") != digest:
            return None
        names = [compare.archive_name(self.label, row, seed, s) for s in splits]
        if not all(os.path.exists(os.path.join(self.folder, n)) for n in names):
            return None
        return rec["result"]

    def add(self, row: str, seed: int, digest: str, result: dict) -> list[str]:
        """Copies a finished row's per-query files into the archive and records its cost and
        result; returns the files written."""
        if not self.usable:
            return []
        written = []
        for split, src in compare.row_per_query(str(self.workdir.root), row, label=self.label).get(seed, {}).items():
            if src:
                name = compare.archive_name(self.label, row, seed, split)
                shutil.copyfile(src, os.path.join(self.folder, name))
                written.append(name)
        costs = self._costs()
        mine = costs.setdefault(self.label, {})
        spent = compare.row_costs(str(self.workdir.root), row, label=self.label).get(seed)
        if spent:
            mine.setdefault("rows", {}).setdefault(row, {})[str(seed)] = spent
        mine.setdefault("results", {}).setdefault(row, {})[str(seed)] = {"config": digest, "result": result}
        self._write_costs(costs)
        return written
