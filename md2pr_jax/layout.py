"""The workdir layout: every path of a run, named in one place, on etils.epath (local or gs://).

    WORKDIR/config.json, timings.json, planted.json, pseudo.json
    WORKDIR/data/                          prepared, tokenized dataset (md2pr_jax.data)
    WORKDIR/baselines/                     BM25 and zero-shot rows, teacher training negatives
    WORKDIR/teacher/                       the teacher's fine-tuning (ckpt/)
    WORKDIR/rerank/                        the teacher (and hybrid) reranking BM25 top-k, scores kept
    WORKDIR/params/{teacher,student}/      the teacher after round 0, the latest student (orbax);
                                           params/teacher/fold<k>/ with cross-fitted teachers
    WORKDIR/rounds/rNN/{mine,score,filter,train,eval}/   round NN's stages
    WORKDIR/rounds/rNN/student/            the student after round NN (orbax)
    WORKDIR/eval/<split>.json              --mode evaluate
    <stage>/per_query/<system>.<split>.{run.gz,json}   every evaluation's TREC run and per-query
                                           metrics (baselines, rerank, rounds/rNN/eval, eval)
    WORKDIR/hf/{student,student_query,teacher}/          --mode export_hf
    WORKDIR/REPORT.md, results.json, *.png the report
    WORKDIR/shared/, rows/<row>_s<seed>/   an ablation: each a workdir of this same layout

A stage is named by its path under WORKDIR ('baselines', 'rounds/r01/mine'); it is finished
when its folder holds DONE, and its result is its result.json (written by `rounds.runner`).
"""

from __future__ import annotations

import dataclasses
import json
import os

from etils import epath

from md2pr_jax.artifacts import CACHE_ROOT, is_local

ROUND_STAGES = ("mine", "score", "filter", "train", "eval")  # the stages of a round, in order
ROUND0_STAGES = ("baselines", "teacher", "rerank")
DONE, RESULT = "DONE", "result.json"


def round_stage(r: int, stage: str) -> str:
    """The name of round r's `stage` ('rounds/r01/mine')."""
    return f"rounds/r{r:02d}/{stage}"


def round_stages(r: int) -> list[str]:
    return [round_stage(r, s) for s in ROUND_STAGES]


@dataclasses.dataclass(frozen=True)
class Layout:
    """The paths of one workdir. `Layout.at('runs/x')` (made absolute) or `Layout.at('gs://b/run')`."""

    root: epath.Path

    @classmethod
    def at(cls, workdir) -> "Layout":
        workdir = str(workdir)
        return cls(epath.Path(os.path.abspath(workdir) if is_local(workdir) else workdir))

    @property
    def local(self) -> bool:
        return is_local(self.root)

    def __str__(self) -> str:
        return str(self.root)

    # ------------------------------------------------------------------ stages
    def stage(self, name: str) -> epath.Path:
        return self.root / name

    def done(self, stage: str) -> bool:
        return (self.stage(stage) / DONE).exists()

    def done_file(self, stage: str) -> epath.Path:
        return self.stage(stage) / DONE

    def result_file(self, stage: str) -> epath.Path:
        return self.stage(stage) / RESULT

    def result(self, stage: str) -> dict:
        path = self.result_file(stage)
        return json.loads(path.read_text()) if path.exists() else {}

    def finished_rounds(self, upto: int | None = None) -> list[int]:
        """1, 2, ... while round r's evaluation is done (at most `upto`)."""
        out, r = [], 1
        while (upto is None or r <= upto) and self.done(round_stage(r, "eval")):
            out.append(r)
            r += 1
        return out

    # ------------------------------------------------------------------ files of the run
    @property
    def config_json(self) -> epath.Path:
        return self.root / "config.json"

    @property
    def timings(self) -> epath.Path:
        return self.root / "timings.json"

    @property
    def planted(self) -> epath.Path:
        return self.root / "planted.json"

    @property
    def pseudo(self) -> epath.Path:
        return self.root / "pseudo.json"

    @property
    def data(self) -> epath.Path:
        return self.root / "data"

    def data_cache(self, config) -> str:
        """The local folder of the prepared dataset (memory-mapped, so never in a bucket):
        config.data.cache_dir, else WORKDIR/data for a local workdir, else a folder under
        artifacts.CACHE_ROOT named after the bucket path (each host prepares its own copy)."""
        if config.data.cache_dir:
            return str(config.data.cache_dir)
        if self.local:
            return str(self.data)
        name = str(self.root).replace("://", "/").strip("/")
        return os.path.join(CACHE_ROOT, name, "data")

    @property
    def results(self) -> epath.Path:
        return self.root / "results.json"

    @property
    def report(self) -> epath.Path:
        return self.root / "REPORT.md"

    def plot(self, name: str) -> epath.Path:
        return self.root / f"{name}.png"

    def params(self, which: str) -> epath.Path:
        """The final params of 'teacher' (round 0) or 'student' (latest round)."""
        return self.root / "params" / which

    def teacher_params(self, fold: int | None = None) -> epath.Path:
        """The round-0 teacher, or cross-fitted teacher `fold`'s (params/teacher/fold<k>)."""
        return self.params("teacher") if fold is None else self.params("teacher") / f"fold{fold}"

    def ckpt(self, stage: str) -> epath.Path:
        return self.stage(stage) / "ckpt"

    def tensorboard(self, stage: str) -> epath.Path:
        return self.stage(stage) / "tensorboard"

    def eval_json(self, split: str) -> epath.Path:
        return self.root / "eval" / f"{split}.json"

    def per_query_dir(self, stage: str) -> epath.Path:
        """The run files and per-query metrics of the evaluations of `stage` ('baselines',
        'rerank', 'rounds/r01/eval', 'eval' for --mode evaluate): `retrieval.per_query`."""
        return self.stage(stage) / "per_query"

    def hf(self, which: str) -> epath.Path:
        return self.root / "hf" / which

    # ------------------------------------------------------------------ stage files
    @property
    def train_negatives(self) -> epath.Path:
        return self.stage("baselines") / "train_negatives.npz"

    def rerank_scores(self, split: str) -> epath.Path:
        """The rerank stage's pairs on `split`: q, d (rows), ce (teacher logits), bm25 (normalised)."""
        return self.stage("rerank") / f"{split}.npz"

    def rerank_chunks(self, split: str) -> epath.Path:
        """The rerank pass's scoring chunks on `split` while it runs (`teacher.score_in_chunks`)."""
        return self.stage("rerank") / "chunks" / split

    def corpus_emb(self, r: int) -> epath.Path:
        """Prefix of the cached corpus embeddings of the student after round r (0: zero-shot)."""
        return (self.stage("baselines") if r == 0 else self.stage(round_stage(r, "eval"))) / "corpus_emb"

    def candidates(self, r: int) -> epath.Path:
        return self.stage(round_stage(r, "mine")) / "candidates.npz"

    def scores(self, r: int) -> epath.Path:
        return self.stage(round_stage(r, "score")) / "scores.npz"

    def score_chunks(self, r: int) -> epath.Path:
        """Round r's teacher pass in chunks while it runs, removed once scores.npz is written."""
        return self.stage(round_stage(r, "score")) / "chunks"

    def attention(self, r: int) -> epath.Path:
        return self.stage(round_stage(r, "score")) / "attn.npy"

    def examples(self, r: int) -> epath.Path:
        return self.stage(round_stage(r, "filter")) / "examples"

    def history(self, r: int) -> epath.Path:
        return self.stage(round_stage(r, "train")) / "history.jsonl"

    def student(self, r: int) -> epath.Path:
        """The student after round r (r >= 1)."""
        return self.stage(round_stage(r, "student"))

    # ------------------------------------------------------------------ ablation
    @property
    def shared(self) -> "Layout":
        return Layout(self.root / "shared")

    @property
    def rows_dir(self) -> epath.Path:
        return self.root / "rows"

    def row(self, row: str, seed: int) -> "Layout":
        return Layout(self.rows_dir / f"{row}_s{seed}")

    @property
    def ablation_json(self) -> epath.Path:
        return self.root / "ablation.json"


def prepare_dataset(config, layout: Layout):
    """The prepared dataset of `config` in `layout.data_cache(config)`: every process prepares
    at once; processes sharing that folder take turns through its lock (one builds, the others
    load), hosts that share no disk each build their own identical copy (data/prepare.py)."""
    from md2pr_jax.data import prepare_dataset as prepare

    local = config.copy_and_resolve_references()
    local.data.cache_dir = layout.data_cache(config)
    return prepare(local, str(layout.root))


def corpus_titles(config, layout: Layout, doc_ids) -> list[str]:
    """The titles of `doc_ids`, read from the TFDS build beside the prepared dataset."""
    from md2pr_jax.data.prepare import corpus_titles as titles

    local = config.copy_and_resolve_references()
    local.data.cache_dir = layout.data_cache(config)
    return titles(local, str(layout.root), doc_ids)


# What an ablation's rows share with WORKDIR/shared: round 0 and round 1's mining and teacher pass.
SHARED_STAGES = ("data", "baselines", "teacher", "params/teacher", "rerank", round_stage(1, "mine"),
                 round_stage(1, "score"))


def linkable(layout: Layout, name: str) -> bool:
    """A finished stage, or for the plain folders 'data' and 'params/teacher', one that exists."""
    if name in ("data", "params/teacher"):
        return layout.stage(name).is_dir()
    return layout.done(name)

