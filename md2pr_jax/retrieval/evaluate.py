"""`--mode evaluate`: the student (latest params in the workdir, else the configured init) and BM25.

    python -m md2pr_jax.main --config configs/scifact_minilm.py --workdir W --mode evaluate

prints a table and writes W/eval/<split>.json: {system: {ndcg@10, mrr@10, recall@5, recall@20,
recall@100, recall@1000, map}, 'meta': {...}}, and beside it each system's TREC run and per-query
metrics (W/eval/per_query/, `per_query`). `evaluate_student` and `dense_run` are what the round
controller calls after each round.
"""

from __future__ import annotations

import time

import jax
import numpy as np
from absl import logging

from md2pr_jax.retrieval import per_query
from md2pr_jax.retrieval.bm25 import BM25Retriever, to_run
from md2pr_jax.retrieval.encode import CallableTokens, encode, process_slice, student_apply_fn
from md2pr_jax.retrieval.index import build_index
from md2pr_jax.retrieval.mining import gather_rows, search

EVAL_KS = {"ndcg": (10,), "mrr": (10,), "recall": (5, 20, 100, 1000)}
TABLE_KEYS = ("ndcg@10", "mrr@10", "recall@100", "recall@1000", "map")


def encode_corpus(config, params, dataset, student=None, progress: bool = True) -> tuple[np.ndarray, int]:
    """This process's contiguous corpus slice, encoded by the passage tower -> (emb [n_local, D], offset)."""
    from md2pr_jax.models import student_from_config

    student = student or student_from_config(config)
    start, stop = process_slice(dataset.num_docs)
    tokens = CallableTokens(dataset.doc_tokens, dataset.doc_lengths)
    emb = encode(
        student_apply_fn(student, params, "passage"), tokens, np.arange(start, stop),
        batch_size=config.retrieval.encode_batch_size, max_len=dataset.max_passage_len,
        progress=progress and jax.process_index() == 0, desc="encode corpus",
    )
    return emb, start


def encode_queries(config, params, dataset, rows: np.ndarray, student=None, progress: bool = True) -> np.ndarray:
    """Query-tower embeddings [len(rows), D] of query rows, split across processes and gathered."""
    from md2pr_jax.models import student_from_config

    student = student or student_from_config(config)
    rows = np.asarray(rows, np.int64)
    a, b = process_slice(len(rows))
    tokens = CallableTokens(dataset.query_tokens, dataset.query_lengths)
    local = encode(
        student_apply_fn(student, params, "query"), tokens, rows[a:b],
        batch_size=config.retrieval.encode_batch_size, max_len=dataset.max_query_len,
        progress=progress and jax.process_index() == 0, desc="encode queries",
    )
    return gather_rows(local, len(rows))


def dense_run(
    config, params, dataset, split: str, depth: int | None = None, corpus=None, progress: bool = True
) -> dict[str, dict[str, float]]:
    """The student's run {qid: {docid: score}} on the queries of `split`, top `depth` (eval_depth).

    `corpus`: an (emb_local, offset) pair from `encode_corpus` to reuse (e.g. after mining).
    """
    depth = depth or config.retrieval.eval_depth
    emb, offset = corpus if corpus is not None else encode_corpus(config, params, dataset, progress=progress)
    rows = dataset.query_indices(split)
    q = encode_queries(config, params, dataset, rows, progress=progress)
    index = build_index(emb, config.retrieval, depth)
    scores, idx = search(q, index, depth, offset=offset)
    return to_run([dataset.query_ids[r] for r in rows], dataset.doc_ids, idx, scores)


def bm25_run(dataset, split: str, depth: int = 1000, retriever: BM25Retriever | None = None, progress: bool = True):
    """BM25's run {qid: {docid: score}} on the queries of `split` (texts as prepared), the
    queries split across processes (`BM25Retriever.search_processes`)."""
    retriever = retriever or BM25Retriever.build(dataset.doc_texts, progress=progress)
    rows = dataset.query_indices(split)
    idx, scores = retriever.search_processes([dataset.query_texts[r] for r in rows], depth, progress=progress)
    return to_run([dataset.query_ids[r] for r in rows], dataset.doc_ids, idx, scores)


def split_qrels(dataset, split: str) -> dict[str, dict[str, int]]:
    qrels = dataset.qrels.get(split)
    if not qrels:
        raise ValueError(
            f"{dataset.name} has no judgements for split {split!r} (splits with qrels: "
            f"{sorted(s for s, q in dataset.qrels.items() if q)}); set config.data.eval_split"
        )
    return qrels


def score_run(run, dataset, split: str, folder=None, system: str = "student") -> dict[str, float]:
    """The means of EVAL_KS of `run` on `split` (every process gets them); with `folder`, process
    0 also writes the run file and per-query metrics of `system` there (`per_query.write`)."""
    save = folder is not None and jax.process_index() == 0
    return per_query.write(folder, system, split, run, split_qrels(dataset, split), EVAL_KS, save=save)


def evaluate_student(config, params, dataset, split: str, corpus=None, progress: bool = True,
                     folder=None, system: str = "student") -> dict[str, float]:
    """nDCG@10, MRR@10, Recall@{5,20,100,1000}, MAP of the student on `split` (every process gets
    them); with `folder`, its run file and per-query metrics are kept there as `system`."""
    run = dense_run(config, params, dataset, split, corpus=corpus, progress=progress)
    return score_run(run, dataset, split, folder, system)


def format_table(rows: dict[str, dict[str, float]], keys=TABLE_KEYS) -> str:
    """A Markdown table: one row per system, one column per metric."""
    lines = ["| system | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
    for name, m in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{m[k]:.4f}" for k in keys) + " |")
    return "\n".join(lines)


def load_student_params(config, workdir: str):
    """(params, source): WORKDIR/params/student when present, else the configured initialisation."""
    from md2pr_jax import params
    from md2pr_jax.layout import Layout

    return params.saved_or_init(Layout.at(workdir), "student", config)


def evaluate_mode(config, workdir: str) -> dict:
    """Evaluates the student and BM25 on config.data.eval_split; writes WORKDIR/eval/<split>.json."""
    from md2pr_jax import artifacts
    from md2pr_jax.layout import Layout, prepare_dataset

    split = config.data.eval_split
    layout = Layout.at(workdir)
    dataset = prepare_dataset(config, layout)
    qrels = split_qrels(dataset, split)
    folder = layout.per_query_dir("eval")
    params, source = load_student_params(config, workdir)
    logging.info("evaluating the student from %s on %s/%s", source, dataset.name, split)
    t = time.perf_counter()
    student = score_run(dense_run(config, params, dataset, split), dataset, split, folder, "student")
    t_dense = time.perf_counter() - t
    t = time.perf_counter()
    bm25 = score_run(bm25_run(dataset, split, config.retrieval.eval_depth), dataset, split, folder, "bm25")
    t_bm25 = time.perf_counter() - t
    result = {
        "student": student,
        "bm25": bm25,
        "meta": {
            "dataset": dataset.name, "split": split, "queries": len(qrels), "docs": dataset.num_docs,
            "student_params": source, "max_passage_len": dataset.max_passage_len,
            "max_query_len": dataset.max_query_len, "depth": config.retrieval.eval_depth,
            "seconds": {"student": round(t_dense, 1), "bm25": round(t_bm25, 1)},
            "per_query": str(folder),
        },
    }
    if jax.process_index() == 0:
        path = layout.eval_json(split)
        artifacts.write_json(path, result)
        print(f"{dataset.name} {split}: {len(qrels)} queries, {dataset.num_docs} docs (student: {source})")
        print(format_table({"student": student, "bm25": bm25}))
        print(f"written to {path}")
    return result
