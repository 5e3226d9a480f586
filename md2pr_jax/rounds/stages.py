"""The stages of an experiment, one plain function each: `stage(ctx[, r]) -> result`.

    round 0  baselines (BM25, zero-shot student) -> teacher (fine-tune, rerank eval)
    round r  mine (current student) -> score (teacher pass: scores, attention maps)
             -> filter (threshold, flags, training lists) -> train (student) -> eval

Each stage reads what it needs from the workdir at its top and writes its outputs into its
own folder (`Layout`); nothing crosses stages in memory, so any stage can be rerun, linked
from another run, or resumed alone. Skipping finished stages, timings, the barrier between
processes and the DONE marker are `runner.py`'s. Files every process would write alike are
written by process 0; per-process files carry the process index.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from md2pr_jax import artifacts
from md2pr_jax import checkpoint as ckpt
from md2pr_jax import params as params_lib
from md2pr_jax import sharding as shd
from md2pr_jax.config import teacher_passage_len
from md2pr_jax.layout import Layout, corpus_titles, prepare_dataset, round_stage
from md2pr_jax.rounds import filtering
from md2pr_jax.seeds import derive_seed


@dataclasses.dataclass
class Context:
    """What every stage of one workdir shares: config, layout, dataset, mesh, models, and the
    training positives the student sees (the planted check's hidden ones removed)."""

    config: Any
    layout: Layout
    dataset: Any
    mesh: Any
    student: Any
    teacher: Any
    hidden: dict[int, set]  # query row -> positives hidden by the planted check
    # query row -> the visible positives that get lists (at most data.positives_per_query)
    train_positives: dict[int, list[int]]
    report_splits: list[str]
    main: bool
    # pseudo-query row -> its positive passage (data.pseudo_queries > 0; data/pseudo.py): the
    # source passage, or the training-only passage cut from it ('title', 'ict')
    pseudo_positives: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    # query row -> every visible labelled positive (none is mined as a negative); {}: train_positives
    known_positives: dict[int, list[int]] = dataclasses.field(default_factory=dict)
    # pseudo-query row -> the corpus row its positive was cut from (`source_rows`): no negative
    pseudo_sources: dict[int, list[int]] = dataclasses.field(default_factory=dict)

    @property
    def round_positives(self) -> dict[int, list[int]]:
        """The queries every round mines and scores, with the positives that get lists: the
        training queries, then the pseudo-queries."""
        return {**self.train_positives, **self.pseudo_positives}

    @property
    def excluded_positives(self) -> dict[int, list[int]]:
        """Per round query, every labelled positive it has: left out of its mined candidates.
        A pseudo-query's source passage is left out too (for 'title' and 'ict' it is not the
        positive, but it holds the query's words: no negative)."""
        pseudo = {q: sorted({*d, *self.pseudo_sources.get(q, ())}) for q, d in self.pseudo_positives.items()}
        return {**(self.known_positives or self.train_positives), **pseudo}

    @property
    def eval_split(self) -> str:
        return self.config.data.eval_split


def source_rows(dataset, positives: dict[int, list[int]]) -> dict[int, list[int]]:
    """query row -> the corpus rows its positives were cut from (themselves, for corpus rows)."""
    return {q: dataset.corpus_rows(d).tolist() for q, d in positives.items()}


def open_context(config, workdir) -> Context:
    """Prepares (or loads) the dataset and writes config.json and planted.json."""
    from md2pr_jax.models import student_from_config, teacher_from_config

    layout = Layout.at(workdir)
    main = jax.process_index() == 0
    layout.root.mkdir(parents=True, exist_ok=True)
    mesh = shd.make_mesh(config)
    dataset = prepare_dataset(config, layout)
    dataset, pseudo = _pseudo_queries(config, layout, dataset, main)
    report_splits = evaluated_splits(config.data.eval_split, dataset)
    if main:
        artifacts.write_text(layout.config_json, config.to_json_best_effort(indent=2))
    positives = dataset.positives(config.data.train_split)
    hidden = _planted(config, layout, positives, main)
    visible = filtering.visible_positives(positives, hidden)
    listed = filtering.cap_positives(visible, _grades(dataset, config.data.train_split),
                                     int(config.data.positives_per_query), derive_seed(config, "list_positives"))
    logging.info("dataset %s", json.dumps(dataset.summary()))
    return Context(config, layout, dataset, mesh, student_from_config(config), teacher_from_config(config), hidden,
                   listed, report_splits, main, pseudo, visible, source_rows(dataset, pseudo))


def _grades(dataset, split: str) -> dict[int, dict[int, int]]:
    """query row -> {doc row: relevance} of `split`'s judgements."""
    qi, di = dataset.query_index, dataset.doc_index
    return {qi[q]: {di[d]: int(s) for d, s in docs.items() if d in di}
            for q, docs in dataset.qrels.get(split, {}).items() if q in qi}


def evaluated_splits(eval_split: str, dataset) -> list[str]:
    """The splits every baseline, rerank and round reports: `eval_split`, then 'dev', each
    once (with eval_split='dev', as on MS MARCO, just ['dev']), keeping those that have
    queries and qrels in `dataset`."""
    wanted = list(dict.fromkeys((eval_split, "dev")))
    return [s for s in wanted if s in dataset.split_queries and dataset.qrels.get(s)]


def _pseudo_queries(config, layout: Layout, dataset, main: bool):
    """(dataset with the pseudo-queries appended, pseudo-query row -> [source passage row]);
    the queries are a pure function of the config, recorded in pseudo.json for the reader."""
    from md2pr_jax import hf
    from md2pr_jax.data import pseudo

    count = int(config.data.pseudo_queries)
    if count <= 0:
        return dataset, {}
    kind = config.data.pseudo_kind
    titles = corpus_titles(config, layout, dataset.doc_ids[: dataset.num_docs]) if kind == "title" else None
    cut = pseudo.cut_queries(dataset.doc_texts, count, kind, derive_seed(config, "pseudo_queries"), titles=titles)
    if len(cut.rows) < count:
        logging.warning("%d pseudo-queries of kind %r asked, the corpus gives %d", count, kind, len(cut.rows))
    dataset = pseudo.with_pseudo_queries(dataset, cut, hf.load_tokenizer(config))
    if main and not layout.pseudo.exists():
        queries = [{"doc": dataset.doc_ids[int(d)], "text": t} for d, t in zip(cut.rows, cut.queries)]
        for q, p in zip(queries, cut.passages or ()):
            q["positive"] = p
        artifacts.write_json(layout.pseudo, {"kind": kind, "count": len(cut.rows), "queries": queries})
    return dataset, dataset.positives(pseudo.PSEUDO_SPLIT)


def _planted(config, layout: Layout, positives, main: bool) -> dict[int, set]:
    """The planted check's hidden positives, recorded in planted.json (read back when present)."""
    fraction = float(config.filter.plant_fraction)
    if fraction <= 0:
        return {}
    saved = artifacts.read_json(layout.planted)
    if saved is None:
        saved = {str(q): v for q, v in filtering.plant(positives, fraction, derive_seed(config, "planted")).items()}
        if main:
            artifacts.write_json(layout.planted, saved)
    return {int(q): set(v) for q, v in saved.items()}


def uses_teacher(config) -> bool:
    lc = config.loss
    return bool(config.filter.enabled or lc.use_sent or lc.use_word or lc.use_margin_mse)


def cached_attention(config) -> bool:
    return bool(config.loss.use_word and config.loss.teacher_mode == "cached")


# ---------------------------------------------------------------------- shared pieces
def student_params(ctx: Context, r: int):
    """The student after round r (0 = the configured initialisation)."""
    init = params_lib.init_student_params(ctx.config)
    return init if r == 0 else artifacts.load_params(ctx.layout.student(r), init)


def teacher_params(ctx: Context, fold: int | None = None):
    """The round-0 teacher (fold k's of cross-fitted teachers), else the configured init."""
    path = ctx.layout.teacher_params(fold)
    init = params_lib.init_teacher_params(ctx.config)
    return artifacts.load_params(path, init) if path.is_dir() else init


def evaluate(ctx: Context, params, corpus, stage: str, system: str = "student") -> dict:
    """The student's means on every report split; its run files and per-query metrics go to
    `stage`'s per_query/ folder as `system`."""
    from md2pr_jax.retrieval.evaluate import evaluate_student

    folder = ctx.layout.per_query_dir(stage)
    return {s: evaluate_student(ctx.config, params, ctx.dataset, s, corpus=corpus, folder=folder, system=system)
            for s in ctx.report_splits}


def corpus_embeddings(ctx: Context, params, r: int):
    """(emb_local, offset) of this process's corpus slice under the student after round r,
    cached beside that round's evaluation (round 0: the baselines)."""
    from md2pr_jax.retrieval.evaluate import encode_corpus

    prefix = ctx.layout.corpus_emb(r)
    file = prefix.parent / f"{prefix.name}.p{jax.process_index()}.npy"
    meta = prefix.parent / f"{prefix.name}.p{jax.process_index()}.json"
    if file.exists() and meta.exists():
        return artifacts.load_array(file), artifacts.read_json(meta)["offset"]
    emb, offset = encode_corpus(ctx.config, params, ctx.dataset, student=ctx.student)
    artifacts.save_array(file, emb)
    artifacts.write_json(meta, {"offset": int(offset)})
    return emb, offset


def dense_candidates(ctx: Context, params, corpus, q_rows: np.ndarray, depth: int, exclude) -> np.ndarray:
    """Top-`depth` doc rows per query row with `exclude` (per query) removed: int64 [M, depth]."""
    from md2pr_jax.retrieval.evaluate import encode_queries
    from md2pr_jax.retrieval.index import build_index
    from md2pr_jax.retrieval.mining import mine as mine_top

    emb, offset = corpus
    q = encode_queries(ctx.config, params, ctx.dataset, q_rows, student=ctx.student)
    index = build_index(emb, ctx.config.retrieval, depth + max((len(e) for e in exclude), default=0))
    idx, _ = mine_top(q, index, depth, exclude, offset=offset)
    return idx


_BM25: dict[str, Any] = {}  # index folder -> the index loaded in this process


def bm25_index(ctx: Context):
    """The BM25 index of the corpus, built once per host into a local folder beside the
    prepared dataset (<data cache>/bm25/<prepared name>/) and reused by every stage that needs
    it (baselines, rerank, the hybrid soft labels), searching on retrieval.bm25_threads."""
    from md2pr_jax.retrieval.bm25 import BM25Retriever

    ds, threads = ctx.dataset, int(ctx.config.retrieval.bm25_threads)
    path = getattr(ds, "path", None)
    if not path:
        return BM25Retriever.build(ds.doc_texts, progress=ctx.main, n_threads=threads)
    folder = os.path.join(os.path.dirname(os.path.abspath(path)), "bm25", os.path.basename(os.path.normpath(path)))
    if folder not in _BM25:
        _BM25[folder] = BM25Retriever.cached(ds.doc_texts, folder, progress=ctx.main, n_threads=threads)
    return _BM25[folder]


# ---------------------------------------------------------------------- round 0
def baselines(ctx: Context) -> dict:
    """BM25 and the zero-shot student on the report splits, and the teacher's training negatives
    (BM25 and zero-shot dense top-N, labelled positives removed)."""
    from md2pr_jax.retrieval.evaluate import bm25_run, score_run

    cfg, ds = ctx.config, ctx.dataset
    bm25 = bm25_index(ctx)
    out: dict[str, Any] = {"bm25": {}, "zero_shot": {}}
    folder = ctx.layout.per_query_dir("baselines")
    for split in ctx.report_splits:
        out["bm25"][split] = score_run(bm25_run(ds, split, cfg.retrieval.eval_depth, bm25), ds, split, folder, "bm25")
    q_rows = np.array(sorted(ctx.train_positives), np.int64)
    pool = int(cfg.teacher_train.negative_pool)
    all_pos = ds.positives(cfg.data.train_split)
    idx, _ = bm25.search_processes([ds.query_texts[q] for q in q_rows], pool + 8, progress=ctx.main)
    bm25_neg = first_unexcluded(idx, [all_pos.get(int(q), ()) for q in q_rows], pool)
    params = student_params(ctx, 0)
    corpus = corpus_embeddings(ctx, params, 0)
    out["zero_shot"] = evaluate(ctx, params, corpus, "baselines", "zero_shot")
    dense_neg = dense_candidates(ctx, params, corpus, q_rows, pool, [set(all_pos.get(int(q), ())) for q in q_rows])
    if ctx.main:
        artifacts.save_arrays(ctx.layout.train_negatives, q_rows=q_rows, bm25=bm25_neg, dense=dense_neg)
    return out


def first_unexcluded(idx: np.ndarray, exclude, width: int) -> np.ndarray:
    """int64 [M, width]: per row of idx [M, C] its first `width` entries that are >= 0 and not in
    exclude[m], in order, padded with -1 (vectorised: a loop over 125k BM25 rows took 11 s)."""
    from md2pr_jax.retrieval.mining import excluded_mask

    idx = np.asarray(idx, np.int64)
    ok = (idx >= 0) & ~excluded_mask(idx, exclude)
    rank = np.cumsum(ok, axis=1) - 1
    rows, cols = np.nonzero(ok & (rank < width))
    out = np.full((len(idx), width), -1, np.int64)
    out[rows, rank[rows, cols]] = idx[rows, cols]
    return out


def teacher_folds(ctx: Context) -> dict[int, int]:
    """Training query row -> its teacher fold (0 .. teacher_train.folds - 1), a seeded split."""
    q_rows = np.array(sorted(ctx.dataset.positives(ctx.config.data.train_split)), np.int64)
    return filtering.assign_folds(q_rows, int(ctx.config.teacher_train.folds), derive_seed(ctx.config, "teacher_folds"))


def teacher_lists(ctx: Context, epoch: int, fold: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One epoch of teacher lists: (query rows [E], doc rows [E, 1 + n]) shuffled, seeded by epoch
    (and fold: the lists of every training query outside that fold)."""
    neg = artifacts.load_arrays(ctx.layout.train_negatives)
    n = int(ctx.config.teacher_train.num_negatives)
    rng = np.random.default_rng(derive_seed(ctx.config, "teacher_epoch", epoch if fold is None else (fold, epoch)))
    q_rows = np.asarray(neg["q_rows"], np.int64)
    keep = np.ones(len(q_rows), bool)
    if fold is not None:
        folds = teacher_folds(ctx)
        keep = np.fromiter((folds.get(int(q)) != fold for q in q_rows), bool, count=len(q_rows))
    pool = np.concatenate([neg["bm25"], neg["dense"]], axis=1)[keep]
    q_rows = q_rows[keep]
    # Each query's pool: its BM25 then dense negatives, each once (first occurrence), -1 dropped.
    by_value = np.argsort(pool, axis=1, kind="stable")
    sorted_pool = np.take_along_axis(pool, by_value, 1)
    first = np.ones(pool.shape, bool)
    first[:, 1:] = sorted_pool[:, 1:] != sorted_pool[:, :-1]
    usable = np.zeros(pool.shape, bool)
    np.put_along_axis(usable, by_value, first & (sorted_pool >= 0), 1)
    size = usable.sum(1)
    # One list per (query, positive) of a query with a non-empty pool.
    k = np.fromiter((len(ctx.train_positives.get(int(q), [])) for q in q_rows), np.int64, count=len(q_rows))
    k[size == 0] = 0
    owner = np.repeat(np.arange(len(q_rows)), k)
    firsts = np.fromiter((int(p) for q, kq in zip(q_rows, k) if kq for p in ctx.train_positives[int(q)]), np.int64,
                         count=int(k.sum()))
    # n negatives per list, drawn uniformly from the pool: without replacement (the n smallest
    # of one uniform key per pool entry) where the pool holds n, with replacement where not.
    # Vectorised: a loop per query took 15 s per epoch at 125k training queries.
    keys = np.where(usable[owner], rng.random((len(owner), pool.shape[1])), np.inf)
    order = np.argsort(keys, axis=1, kind="stable")  # the pool's entries first, in a random order
    small = size[owner] < n
    pick = np.where(small[:, None], rng.integers(0, np.iinfo(np.int64).max, (len(owner), n)) % np.maximum(size[owner], 1)[:, None],
                    np.arange(n)[None, :])
    chosen = np.take_along_axis(pool[owner], np.take_along_axis(order, pick, 1), 1)
    lists = np.concatenate([firsts[:, None], chosen], axis=1) if len(owner) else np.zeros((0, 1 + n), np.int64)
    shuffle = rng.permutation(len(owner))
    return q_rows[owner][shuffle], lists[shuffle]


def teacher(ctx: Context) -> dict:
    """Round 0: fine-tune the cross-encoder (through `train.train_loop`) and save it to
    params/teacher. With teacher_train.folds = F > 1, F cross-fitted teachers instead
    (params/teacher/fold<k>), fold k's trained without fold k's training queries: each training
    query is then scored by a teacher that never saw it, as a test query is."""
    folds = int(ctx.config.teacher_train.folds)
    if folds <= 1:
        return _train_teacher(ctx, None)
    return {"folds": [_train_teacher(ctx, k) for k in range(folds)]}


def _train_teacher(ctx: Context, fold: int | None) -> dict:
    from md2pr_jax.teacher import TeacherBatches, create_teacher_state, make_teacher_train_step
    from md2pr_jax.train import numpy_tree, train_loop

    cfg, tcfg, lay = ctx.config, ctx.config.teacher_train, ctx.layout
    target = lay.teacher_params(fold)
    if target.is_dir():  # a fold finished before an interruption
        return artifacts.read_json(target.parent / f"{target.name}.json") or {}
    b = int(tcfg.batch_size)
    spe = max(len(teacher_lists(ctx, 0, fold)[0]) // b, 1)
    total = int(tcfg.max_steps) or spe * int(tcfg.epochs)
    history: list[dict] = []
    params = params_lib.init_teacher_params(cfg)
    name = "teacher" if fold is None else f"teacher/fold{fold}"
    if total > 0 and int(tcfg.epochs) > 0:
        step_fn, tx, shardings = make_teacher_train_step(cfg, ctx.mesh, ctx.teacher, total)
        state = create_teacher_state(cfg, ctx.mesh, params, tx, shardings)
        ckpt_cfg = cfg.copy_and_resolve_references()
        ckpt_cfg.train.checkpoint_every = int(tcfg.checkpoint_every)
        manager = ckpt.make_checkpoint_manager(str(lay.ckpt(name)), ckpt_cfg)
        restored = ckpt.restore(manager, abstract_state=jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
        if restored is not None:
            state = restored["state"]
        batches = TeacherBatches(lambda e: teacher_lists(ctx, e, fold), ctx.dataset, b,
                                 shd.local_batch_slice(ctx.mesh, b), spe, start=int(jax.device_get(state.step)),
                                 passage_len=teacher_passage_len(cfg))
        state, logged = train_loop(cfg, str(lay.stage(name)), state, batches, step_fn, manager,
                                   {"stage": name}, total, mesh=ctx.mesh, tag=name)
        history = [{k: v for k, v in h.items() if k != "steps_per_s"} for h in logged]
        params = numpy_tree(state.params)
    result = {"history": history, "steps": total}
    if fold is not None:
        result["fold"] = fold
        if ctx.main:
            artifacts.write_json(target.parent / f"{target.name}.json", result)
    # Every process calls the orbax save (it is collective: process 0 writes, all sync).
    artifacts.save_params(target, params)
    return result


def teacher_scorer(ctx: Context, attention_layers=()):
    """`teacher.TeacherScorer` over the round-0 teacher, or its cross-fitted fold teachers."""
    from md2pr_jax.teacher import TeacherScorer

    folds = int(ctx.config.teacher_train.folds)
    if folds <= 1:
        return TeacherScorer(ctx.config, ctx.teacher, ctx.dataset, [teacher_params(ctx)],
                             attention_layers=attention_layers)
    return TeacherScorer(ctx.config, ctx.teacher, ctx.dataset, [teacher_params(ctx, k) for k in range(folds)],
                         teacher_folds(ctx), attention_layers=attention_layers)


def score_pairs(ctx: Context, scorer, pairs_q: np.ndarray, pairs_d: np.ndarray, folder, desc: str,
                attn_tail=None, attn_out=None) -> tuple[np.ndarray, dict]:
    """`teacher.score_in_chunks` with this config's chunk size: every process scores its share of
    the pairs, each chunk written to `folder` as it is done, and gets all the logits back."""
    from md2pr_jax.teacher import chunk_size, score_in_chunks

    return score_in_chunks(scorer, pairs_q, pairs_d, folder, chunk_size(ctx.config, scorer.batch_size),
                           attn_tail=attn_tail, attn_out=attn_out, desc=desc)


HYBRID_SWEEP = (0.0, 0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)  # bm25_weight values the rerank stage reports


def rerank(ctx: Context) -> dict:
    """The teacher reranking BM25's top `rerank_depth` on the report splits; with the pairs'
    logits and normalised BM25 scores kept (rerank/<split>.npz), the hybrid teacher's rows for
    every weight of HYBRID_SWEEP come free."""
    from md2pr_jax.teacher import clear_chunks

    cfg, ds, lay = ctx.config, ctx.dataset, ctx.layout
    depth = int(cfg.teacher_train.rerank_depth)
    if depth <= 0:
        return {"depth": 0}
    scorer = teacher_scorer(ctx)
    bm25 = bm25_index(ctx)
    out: dict[str, Any] = {"teacher_rerank": {}, "hybrid_sweep": {}, "depth": depth}
    pairs = {}
    for split in ctx.report_splits:
        rows = ds.query_indices(split)
        idx, _ = bm25.search_processes([ds.query_texts[r] for r in rows], depth, progress=False)
        qq, dd = np.nonzero(idx >= 0)
        q, d = rows[qq], idx[qq, dd]
        ce, _ = score_pairs(ctx, scorer, q, d, lay.rerank_chunks(split), f"rerank {split}")
        lexical = bm25.pair_scores(ds.query_texts, q, d)
        pairs[split] = (q, d, ce, lexical)
        if ctx.main:
            artifacts.save_arrays(lay.rerank_scores(split), q=q, d=d, ce=ce, bm25=lexical)
            clear_chunks(lay.rerank_chunks(split))
        out["teacher_rerank"][split] = _rerank_metrics(ctx, split, q, d, ce, "teacher_rerank")
        out["hybrid_sweep"][split] = {str(w): _rerank_metrics(ctx, split, q, d, ce + w * lexical)["ndcg@10"]
                                      for w in HYBRID_SWEEP}
        logging.info("rerank %s (BM25 top %d): teacher %s; nDCG@10 by bm25_weight %s", split, depth,
                     out["teacher_rerank"][split], out["hybrid_sweep"][split])
    weight = hybrid_weight(cfg, out)
    if weight_at_edge(cfg, weight):
        out["bm25_weight_at_edge"] = True
        logging.warning("rerank: the best dev bm25_weight is the sweep's largest (%s): the hybrid teacher is "
                        "mostly BM25 on this dataset (teacher alone on dev: nDCG@10 %.4f)", weight,
                        out["hybrid_sweep"]["dev"]["0.0"])
    if weight > 0:
        out["bm25_weight"] = weight
        out["hybrid_rerank"] = {split: _rerank_metrics(ctx, split, q, d, ce + weight * lexical, "hybrid_rerank")
                                for split, (q, d, ce, lexical) in pairs.items()}
    return out


def _rerank_metrics(ctx: Context, split: str, q: np.ndarray, d: np.ndarray, scores: np.ndarray,
                    system: str | None = None) -> dict:
    """The means of the reranked pairs' run; with `system`, its run file and per-query metrics
    are kept in rerank/per_query/ (the hybrid sweep's points are not)."""
    from md2pr_jax.retrieval.evaluate import score_run

    ds = ctx.dataset
    run: dict[str, dict[str, float]] = {}
    for qi, di, s in zip(q, d, scores):
        run.setdefault(ds.query_ids[qi], {})[ds.doc_ids[di]] = float(s)
    return score_run(run, ds, split, ctx.layout.per_query_dir("rerank") if system else None, system or "")


def best_dev_weight(sweep: dict[str, float]) -> float:
    """The weight of a rerank sweep ({str(w): dev nDCG@10}) with the best dev nDCG@10; on a tie
    the smallest (the least BM25 mixed in)."""
    if not sweep:
        raise ValueError("the rerank stage's hybrid sweep on dev is empty")
    return min((-score, float(w)) for w, score in sweep.items())[1]


def weight_at_edge(config, weight: float) -> bool:
    """Whether dev chose the sweep's largest BM25 weight: more BM25 might do better still, so the
    teacher adds little to BM25 on this dataset (the rerank stage warns and says so in its result)."""
    return bool(config.teacher.bm25_weight_from_dev) and weight >= max(HYBRID_SWEEP)


def hybrid_weight(config, rerank_result: dict) -> float:
    """The hybrid teacher's BM25 weight w: teacher.bm25_weight, or with
    teacher.bm25_weight_from_dev the rerank stage's best on dev (`rerank_result`, its result)."""
    if not config.teacher.bm25_weight_from_dev:
        return float(config.teacher.bm25_weight)
    sweep = (rerank_result or {}).get("hybrid_sweep", {}).get("dev")
    if not sweep:
        raise ValueError("config.teacher.bm25_weight_from_dev needs the rerank stage's sweep on a 'dev' split; the "
                         "rerank result has none (teacher_train.rerank_depth > 0, and data.dev_fraction > 0 or a dev split)")
    return best_dev_weight(sweep)


def hybrid_logits(ctx: Context, logits: np.ndarray, pairs_q: np.ndarray, pairs_d: np.ndarray) -> np.ndarray:
    """The sentence level's teacher scores: the cross-encoder's logits, plus w times the pairs'
    normalised BM25 scores when the hybrid weight w (`hybrid_weight`) is set."""
    weight = hybrid_weight(ctx.config, ctx.layout.result("rerank"))
    if weight <= 0:
        return logits
    # A training-only passage (a pseudo-query's positive) is in no BM25 index: its source
    # document's score stands in for it.
    pairs_d = ctx.dataset.corpus_rows(pairs_d)
    return logits + weight * bm25_index(ctx).pair_scores(ctx.dataset.query_texts, pairs_q, pairs_d)


# ---------------------------------------------------------------------- rounds 1..R
def mine(ctx: Context, r: int) -> dict:
    """Top-K candidates for every training query under the student of round r - 1."""
    depth = int(ctx.config.rounds.mine_depth)
    params = student_params(ctx, r - 1)
    corpus = corpus_embeddings(ctx, params, r - 1)
    pos = ctx.excluded_positives
    q_rows = np.array(sorted(ctx.round_positives), np.int64)
    cand = dense_candidates(ctx, params, corpus, q_rows, depth, [set(pos[int(q)]) for q in q_rows])
    if ctx.main:
        artifacts.save_arrays(ctx.layout.candidates(r), q_rows=q_rows, cand=cand)
    return {"queries": len(q_rows), "depth": depth}


def score(ctx: Context, r: int) -> dict:
    """The round's one teacher pass over positives and mined candidates, split across every
    process and written in resumable chunks (`score_pairs`): logits (scores.npz) and, for a
    'cached' word-level loss, the attention maps of the chosen layers (attn.npy)."""
    from md2pr_jax.teacher import clear_chunks

    c = artifacts.load_arrays(ctx.layout.candidates(r))
    pairs_q, pairs_d = filtering.scoring_pairs(c["q_rows"], c["cand"], ctx.round_positives)
    info = {}
    if uses_teacher(ctx.config):
        logits, info = _teacher_pass(ctx, r, pairs_q, np.where(pairs_d >= 0, pairs_d, 0))
    else:
        logits = np.zeros(len(pairs_q), np.float32)
    if ctx.main:
        artifacts.save_arrays(ctx.layout.scores(r), q=pairs_q, d=pairs_d, logits=logits)
        clear_chunks(ctx.layout.score_chunks(r))
    # scoring: {chunks, resumed, scored_pairs (by process 0), chunk} of `teacher.score_in_chunks`
    return {"pairs": int(len(pairs_q)), "scoring": info}


def _teacher_pass(ctx: Context, r: int, pairs_q: np.ndarray, pairs_d: np.ndarray) -> tuple[np.ndarray, dict]:
    import ml_dtypes

    from md2pr_jax.train.step import teacher_layers

    cfg = ctx.config
    layers = teacher_layers(cfg) if cached_attention(cfg) else ()
    scorer = teacher_scorer(ctx, attention_layers=layers)
    desc, chunks = f"round {r} teacher pass", ctx.layout.score_chunks(r)
    tail = (len(layers), cfg.data.max_query_len, cfg.data.max_passage_len) if layers else None
    if not (layers and ctx.main):
        return score_pairs(ctx, scorer, pairs_q, pairs_d, chunks, desc, attn_tail=tail)
    target = ctx.layout.attention(r)
    with artifacts.local_folder(target.parent) as folder:
        tmp, final = os.path.join(folder, "attn.tmp.npy"), os.path.join(folder, target.name)
        # bfloat16 kept as raw uint16 bits: .npy has no bfloat16 type.
        attn = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint16, shape=(len(pairs_q), *tail))
        out = score_pairs(ctx, scorer, pairs_q, pairs_d, chunks, desc, attn_tail=tail,
                          attn_out=attn.view(ml_dtypes.bfloat16))
        attn.flush()
        del attn
        os.replace(tmp, final)
    return out


def filter_round(ctx: Context, r: int) -> dict:
    """Threshold update, false-negative flags, and the round's training lists (`filtering`)."""
    from md2pr_jax.data.pipeline import TrainExamples
    from md2pr_jax.train.step import word_candidates

    cfg, fc, lay = ctx.config, ctx.config.filter, ctx.layout
    c, s = artifacts.load_arrays(lay.candidates(r)), artifacts.load_arrays(lay.scores(r))
    q_rows, cand = c["q_rows"], c["cand"]
    positives = ctx.round_positives
    scores = filtering.split_scores(s["logits"], q_rows, cand, positives)
    cand_probs = filtering.sigmoid(scores.cand_logits)
    is_pseudo = np.array([int(q) in ctx.pseudo_positives for q in q_rows], bool)
    # tau_hat from the labelled positives, or from the pseudo-queries' (which no teacher trained on).
    pos_probs = filtering.sigmoid(np.concatenate([scores.pos_logits[i] for i in
                                                  np.flatnonzero(is_pseudo == (fc.tau_source == "pseudo"))]
                                                 or [np.zeros(0, np.float32)]))
    # The filter reads the cross-encoder's probabilities; the soft labels may be hybrid.
    soft = filtering.split_scores(hybrid_logits(ctx, s["logits"], s["q"], s["d"]), q_rows, cand, positives)
    tau_prev = lay.result(round_stage(r - 1, "filter"))["tau"] if r > 1 else float(fc.tau0)
    # Without a filter the threshold is not used and does not move.
    tau, tau_hat = filtering.update_threshold(fc, tau_prev, pos_probs) if fc.enabled else (tau_prev, float("nan"))
    flagged, promoted = filtering.flag(fc, cand, cand_probs, tau, is_pseudo if fc.pseudo_only else None)
    teacher_flags = flagged
    if fc.random_flags:
        flagged = filtering.random_flags(flagged, cand, np.random.default_rng(derive_seed(cfg, "random_flags", r)))
    n_neg = int(cfg.data.num_negatives)
    train_on = set(ctx.train_positives) | (set(ctx.pseudo_positives) if cfg.train.pseudo else set())
    lists = filtering.build_lists(q_rows, cand, soft, positives, flagged, promoted, n_neg,
                                  np.random.default_rng(derive_seed(cfg, "negatives", r)), uses_teacher(cfg),
                                  keep_flagged=bool(fc.keep_flagged), queries=train_on)
    attn = None
    if cached_attention(cfg):
        import ml_dtypes

        flat = artifacts.load_array(lay.attention(r), mmap=True)
        attn = filtering.gather_attention(flat, lists.src[:, : word_candidates(cfg, 1 + n_neg)]).view(ml_dtypes.bfloat16)
    examples = TrainExamples(lists.query, lists.docs, lists.mask, lists.teacher, attn,
                             lists.kd_mask if fc.keep_flagged else None)
    if ctx.main:
        with artifacts.local_folder(lay.examples(r)) as folder:
            examples.save(folder)
    valid = cand >= 0
    result = {"round": r, "tau": tau, "tau_hat": tau_hat, "tau_prev": tau_prev, "flagged": int(flagged.sum()),
              "bm25_weight": hybrid_weight(cfg, lay.result("rerank")) if uses_teacher(cfg) else 0.0,
              "promoted": int(promoted.sum()), "candidates": int(valid.sum()), "examples": len(lists.query),
              "tau_source": fc.tau_source, "positives_for_tau": int(len(pos_probs)), "pseudo_only": bool(fc.pseudo_only),
              "random_flags": bool(fc.random_flags), "flagged_by_teacher_kept": int((teacher_flags & ~flagged).sum()),
              "teacher_signal": _signal(soft, cand, ~is_pseudo) if uses_teacher(cfg) else None,
              **filtering.histograms(pos_probs, cand_probs, valid)}
    if ctx.pseudo_positives:
        result["pseudo"] = {"queries": int(is_pseudo.sum()), "trained_on": bool(cfg.train.pseudo),
                            "examples": int(sum(int(q) in ctx.pseudo_positives for q in lists.query)),
                            "flagged": int(flagged[is_pseudo].sum()),
                            "teacher_signal": _signal(soft, cand, is_pseudo) if uses_teacher(cfg) else None}
    if ctx.hidden:
        result["planted"] = filtering.planted_check(flagged, cand, q_rows, ctx.hidden)
    return result


def _signal(scores: filtering.RoundScores, cand: np.ndarray, rows: np.ndarray) -> dict:
    """`filtering.teacher_signal` over the queries selected by the bool mask `rows`."""
    sel = np.flatnonzero(rows)
    sub = filtering.RoundScores([scores.pos_logits[i] for i in sel], scores.cand_logits[sel],
                                [scores.start[i] for i in sel])
    return filtering.teacher_signal(sub, cand[sel])


def train_student(ctx: Context, r: int) -> dict:
    """Round r's student training from the round r - 1 student (resumes from its checkpoint)."""
    from md2pr_jax.data.pipeline import TrainExamples, make_train_iterator, steps_per_epoch
    from md2pr_jax.train import (
        abstract_train_state, create_train_state, make_train_step, numpy_tree, place_teacher_params, train_loop,
    )

    cfg, lay, stage = ctx.config, ctx.layout, round_stage(r, "train")
    examples = TrainExamples.load(artifacts.local_path(lay.examples(r)))
    total = min(steps_per_epoch(len(examples), int(cfg.train.batch_size)) * int(cfg.train.epochs),
                int(cfg.train.max_steps) or 1 << 30)
    online = cfg.loss.teacher_mode == "online" and uses_teacher(cfg)
    t_params = place_teacher_params(cfg, ctx.mesh, teacher_params(ctx), teacher=ctx.teacher) if online else None
    step_fn = make_train_step(cfg, ctx.mesh, ctx.student, ctx.teacher if online else None, total_steps=total)
    manager = ckpt.make_checkpoint_manager(str(lay.ckpt(stage)), cfg)
    batches = make_train_iterator(examples, ctx.dataset, cfg, seed=derive_seed(cfg, "batch_order", r),
                                  local_rows=shd.local_batch_slice(ctx.mesh, int(cfg.train.batch_size)))
    restored = ckpt.restore(manager, abstract_state=abstract_train_state(cfg, ctx.mesh, ctx.student))
    if restored is not None:
        state = restored["state"]
        batches.set_state(restored["data"])
        logging.info("round %d: resuming training at step %d", r, restored["step"])
    else:
        rng = jax.random.PRNGKey(derive_seed(cfg, "student_state"))
        state = create_train_state(cfg, ctx.mesh, student_params(ctx, r - 1), rng, student=ctx.student)
    log = HistoryLog(lay.history(r), int(jax.device_get(state.step)), max(int(cfg.train.checkpoint_every), 1)) if ctx.main else None
    state, _ = train_loop(cfg, str(lay.stage(stage)), state, batches, step_fn, manager, {"round": r}, total,
                          mesh=ctx.mesh, teacher_params=t_params, tag=f"round {r}",
                          on_step=log.on_step if log else None)
    if log:
        log.flush()
    params = numpy_tree(state.params)
    # Every process calls the orbax save (it is collective: process 0 writes, all sync).
    artifacts.save_params(lay.student(r), params)
    artifacts.save_params(lay.params("student"), params)
    history = read_history(lay, r)
    means = {k: float(np.mean([h[k] for h in history])) for k in history[0] if k != "step"} if history else {}
    return {"steps": total, "examples": len(examples), "mean": means}


class HistoryLog:
    """Every step's metrics in history.jsonl (one JSON line per step), rewritten whole every
    `every` steps, the checkpoint interval (an object store cannot append): a resumed run finds
    every step up to the checkpoint it resumes from, and logs the later ones again."""

    def __init__(self, path, start: int, every: int):
        self.path, self.every = path, every
        self.rows = [h for h in _read_jsonl(path) if h["step"] <= start]

    def on_step(self, step: int, _state, metrics) -> None:
        self.rows.append({"step": int(step), **{k: float(v) for k, v in jax.device_get(metrics).items()}})
        if step % self.every == 0:
            self.flush()

    def flush(self) -> None:
        artifacts.write_text(self.path, "".join(json.dumps(h) + "\n" for h in self.rows))


def _read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def read_history(layout: Layout, r: int) -> list[dict]:
    """Round r's training metrics, one per step (the last record of a step wins)."""
    by_step = {h["step"]: h for h in _read_jsonl(layout.history(r))}
    return [by_step[s] for s in sorted(by_step)]


def evaluate_round(ctx: Context, r: int) -> dict:
    params = student_params(ctx, r)
    return evaluate(ctx, params, corpus_embeddings(ctx, params, r), round_stage(r, "eval"))


STAGES = {"baselines": baselines, "teacher": teacher, "rerank": rerank, "mine": mine, "score": score,
          "filter": filter_round, "train": train_student, "eval": evaluate_round}
