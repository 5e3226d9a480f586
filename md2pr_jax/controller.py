"""The host-side round controller: teacher (round 0), then student rounds 1..R, then a report.

    round 0  baselines (BM25, zero-shot student) -> fine-tune the teacher -> rerank eval
    round r  mine (ScaNN, current student) -> teacher scoring pass (scores, attention maps)
             -> threshold update -> filter -> train the student -> evaluate

Every stage writes its outputs into its own folder of the workdir and, last, a DONE file: a
run killed at any moment and started again with the same command skips finished stages and
resumes the one in progress (the student's training from its latest orbax checkpoint, the
data iterator included). The threshold rule (DESIGN.md):

    tau_hat_r = quantile_rho { pi(q, p+) over the labelled positives }
    tau_r     = clip(m * tau_{r-1} + (1 - m) * tau_hat_r, tau_min, tau_max),  tau_0 = filter.tau0

with pi = sigmoid(teacher logit). A candidate with pi >= tau_r is a presumed false negative.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import numpy as np
from absl import logging
from tqdm import tqdm

from md2pr_jax import artifacts, hf
from md2pr_jax import checkpoint as ckpt
from md2pr_jax import sharding as shd
from md2pr_jax.artifacts import read_json, write_json

ROW_KEYS = ("ndcg@10", "mrr@10", "recall@100")
ROUND_STAGES = ("mine", "score", "filter", "train", "eval")  # the stages of a round, in order


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-np.asarray(x, np.float64)))


def update_threshold(filter_cfg, tau_prev: float, positive_probs: np.ndarray) -> tuple[float, float]:
    """(tau_r, tau_hat_r) from the previous threshold and this round's pi(q, p+)."""
    if not filter_cfg.dynamic or len(positive_probs) == 0:
        return float(filter_cfg.tau0), float("nan")
    tau_hat = float(np.quantile(positive_probs, filter_cfg.quantile))
    m = float(filter_cfg.momentum)
    tau = float(np.clip(m * tau_prev + (1 - m) * tau_hat, filter_cfg.tau_min, filter_cfg.tau_max))
    return tau, tau_hat


def planted_check(flagged: np.ndarray, cand: np.ndarray, q_rows: np.ndarray, hidden: dict[int, set]) -> dict:
    """The filter measured on hidden positives: recall = hidden positives (among the mined
    candidates) that were flagged, precision = flags that are hidden positives."""
    is_hidden = np.array([[d in hidden.get(int(q), ()) for d in row] for q, row in zip(q_rows, cand)], bool)
    mined = int(is_hidden.sum())
    hits = int((is_hidden & flagged).sum())
    n_flags = int(flagged.sum())
    return {
        "hidden_positives": int(sum(len(v) for v in hidden.values())),
        "hidden_in_candidates": mined,
        "flagged": n_flags,
        "flagged_hidden": hits,
        "recall": hits / mined if mined else float("nan"),
        "precision": hits / n_flags if n_flags else float("nan"),
    }


def row_name(config) -> str:
    """The results-table row a config's student belongs to (md2pr for the full method)."""
    lc, fc = config.loss, config.filter
    if fc.enabled:
        return "md2pr" if fc.dynamic else "static_filter"
    if lc.use_word:
        return "de_sent_word"
    return "de_sent" if lc.use_sent else "de"


class Controller:
    """Runs and resumes the stages of one MD2PR experiment in `workdir`."""

    def __init__(self, config, workdir: str):
        from md2pr_jax.data import prepare_dataset
        from md2pr_jax.models import student_from_config, teacher_from_config

        self.config = config
        self.workdir = os.path.abspath(workdir)
        os.makedirs(self.workdir, exist_ok=True)
        self.mesh = shd.make_mesh(config)
        self.main = jax.process_index() == 0
        self.dataset = prepare_dataset(config, self.workdir)  # process 0 builds, the others load
        self.student = student_from_config(config)
        self.teacher = teacher_from_config(config)
        splits = self.dataset.split_queries
        self.train_split = config.data.train_split
        self.eval_split = config.data.eval_split
        self.report_splits = [s for s in (self.eval_split, "dev") if s in splits and self.dataset.qrels.get(s)]
        with open(os.path.join(self.workdir, "config.json"), "w") as f:
            f.write(config.to_json_best_effort(indent=2))
        logging.info("dataset %s", json.dumps(self.dataset.summary()))

    # ---------------------------------------------------------------- bookkeeping
    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def done(self, stage: str) -> bool:
        return os.path.exists(self.path(stage, "DONE"))

    def finish(self, stage: str, result: dict) -> dict:
        write_json(self.path(stage, "result.json"), result)
        with open(self.path(stage, "DONE"), "w") as f:
            f.write(time.strftime("%Y-%m-%d %H:%M:%S\n"))
        return result

    def result(self, stage: str) -> dict:
        return read_json(self.path(stage, "result.json"), {})

    def barrier(self, name: str) -> None:
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(name)

    # ---------------------------------------------------------------- shared pieces
    def train_positives(self) -> dict[int, list[int]]:
        """query row -> labelled positive doc rows the student sees (planted ones hidden)."""
        pos = self.dataset.positives(self.train_split)
        hidden = self.hidden_positives()
        return {q: [d for d in docs if d not in hidden.get(q, set())] for q, docs in pos.items()}

    def hidden_positives(self) -> dict[int, set]:
        """The planted check: a seeded share of training positives hidden from the student."""
        frac = float(self.config.filter.plant_fraction)
        if frac <= 0:
            return {}
        path = self.path("planted.json")
        saved = read_json(path)
        if saved is None:
            rng = np.random.default_rng(self.config.seed + 7)
            pairs = [(q, d) for q, docs in sorted(self.dataset.positives(self.train_split).items()) for d in docs]
            # A query may lose its only positive: it is still mined, so its hidden positive can
            # turn up among the candidates, which is what the check measures.
            order = rng.permutation(len(pairs))[: int(round(frac * len(pairs)))]
            hidden: dict[int, list] = {}
            for i in sorted(order):
                q, d = pairs[i]
                hidden.setdefault(int(q), []).append(int(d))
            saved = {str(q): v for q, v in hidden.items()}
            if self.main:
                write_json(path, saved)
        return {int(q): set(v) for q, v in saved.items()}

    def student_params(self, round_index: int):
        """The student after `round_index` (0 = the configured initialisation)."""
        init = hf.init_student_params(self.config)
        if round_index == 0:
            return init
        return artifacts.load_params(self.path(f"rounds/r{round_index:02d}/student"), init)

    def teacher_params(self):
        init = hf.init_teacher_params(self.config)
        path = artifacts.params_dir(self.workdir, "teacher")
        return artifacts.load_params(path, init) if os.path.isdir(path) else init

    def evaluate(self, params, corpus, splits) -> dict:
        from md2pr_jax.retrieval.evaluate import evaluate_student

        return {s: evaluate_student(self.config, params, self.dataset, s, corpus=corpus) for s in splits}

    def corpus_embeddings(self, params, path: str):
        """(emb_local, offset) of this process's corpus slice, cached in `path` (.npy)."""
        from md2pr_jax.retrieval.evaluate import encode_corpus

        file = f"{path}.p{jax.process_index()}.npy"
        meta = f"{path}.p{jax.process_index()}.json"
        if os.path.exists(file) and os.path.exists(meta):
            return np.load(file), read_json(meta)["offset"]
        emb, offset = encode_corpus(self.config, params, self.dataset, student=self.student)
        os.makedirs(os.path.dirname(file), exist_ok=True)
        np.save(file + ".tmp.npy", emb)
        os.replace(file + ".tmp.npy", file)
        write_json(meta, {"offset": int(offset)})
        return emb, offset

    def dense_candidates(self, params, corpus, q_rows: np.ndarray, depth: int, exclude) -> np.ndarray:
        """Top-`depth` doc rows per query row with `exclude` (per query) removed: int64 [M, depth]."""
        from md2pr_jax.retrieval.evaluate import encode_queries
        from md2pr_jax.retrieval.index import build_index
        from md2pr_jax.retrieval.mining import mine

        emb, offset = corpus
        q = encode_queries(self.config, params, self.dataset, q_rows, student=self.student)
        index = build_index(emb, self.config.retrieval, depth + max((len(e) for e in exclude), default=0))
        idx, _ = mine(q, index, depth, exclude, offset=offset)
        return idx

    # ---------------------------------------------------------------- round 0
    def baselines(self) -> dict:
        """BM25 and the zero-shot student on the report splits, and their training candidates."""
        stage = "baselines"
        if self.done(stage):
            return self.result(stage)
        from md2pr_jax.retrieval import metrics
        from md2pr_jax.retrieval.bm25 import BM25Retriever
        from md2pr_jax.retrieval.evaluate import EVAL_KS, bm25_run, split_qrels

        cfg = self.config
        os.makedirs(self.path(stage), exist_ok=True)
        bm25 = BM25Retriever.build(self.dataset.doc_texts)
        out: dict[str, Any] = {"bm25": {}, "zero_shot": {}}
        for split in self.report_splits:
            out["bm25"][split] = metrics.evaluate(
                bm25_run(self.dataset, split, cfg.retrieval.eval_depth, bm25), split_qrels(self.dataset, split), EVAL_KS
            )
        # Training negatives for the teacher: BM25 and zero-shot dense top-N, positives removed.
        pos = self.train_positives()
        q_rows = np.array(sorted(pos), np.int64)
        pool = int(cfg.teacher_train.negative_pool)
        all_pos = self.dataset.positives(self.train_split)
        idx, _ = bm25.search([self.dataset.query_texts[q] for q in q_rows], pool + 8)
        bm25_neg = np.full((len(q_rows), pool), -1, np.int64)
        for i, q in enumerate(q_rows):
            row = [d for d in idx[i] if d >= 0 and d not in all_pos.get(int(q), ())][:pool]
            bm25_neg[i, : len(row)] = row
        params = self.student_params(0)
        corpus = self.corpus_embeddings(params, self.path(stage, "corpus_emb"))
        out["zero_shot"] = self.evaluate(params, corpus, self.report_splits)
        dense_neg = self.dense_candidates(params, corpus, q_rows, pool, [set(all_pos.get(int(q), ())) for q in q_rows])
        if self.main:
            np.savez(self.path(stage, "train_negatives.npz"), q_rows=q_rows, bm25=bm25_neg, dense=dense_neg)
        self.barrier("baselines")
        return self.finish(stage, out)

    def teacher_examples(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """One epoch of teacher lists: (query rows [E], doc rows [E, 1 + n]) shuffled, seeded by epoch."""
        neg = np.load(self.path("baselines", "train_negatives.npz"))
        n = int(self.config.teacher_train.num_negatives)
        rng = np.random.default_rng([self.config.seed, 1000 + epoch])
        pos = self.train_positives()
        qs, lists = [], []
        for i, q in enumerate(neg["q_rows"]):
            pool = list(dict.fromkeys(int(d) for d in np.concatenate([neg["bm25"][i], neg["dense"][i]]) if d >= 0))
            for p in pos.get(int(q), []):
                if len(pool) == 0:
                    continue
                chosen = rng.choice(pool, size=n, replace=len(pool) < n)
                qs.append(int(q))
                lists.append([p, *chosen])
        order = rng.permutation(len(qs))
        return np.asarray(qs, np.int64)[order], np.asarray(lists, np.int64)[order]

    def train_teacher(self) -> dict:
        """Round 0: fine-tune the cross-encoder, save it, and measure it as a BM25 reranker."""
        stage = "teacher"
        if self.done(stage):
            return self.result(stage)
        from md2pr_jax.teacher import init_teacher_state, make_teacher_step
        from md2pr_jax.train import numpy_tree, place_teacher_params

        cfg, tcfg = self.config, self.config.teacher_train
        os.makedirs(self.path(stage), exist_ok=True)
        b = int(tcfg.batch_size)
        n_lists = len(self.teacher_examples(0)[0])
        spe = max(n_lists // b, 1)
        total = int(tcfg.max_steps) or spe * int(tcfg.epochs)
        history = []
        if total > 0 and int(tcfg.epochs) > 0:
            params = place_teacher_params(cfg, self.mesh, hf.init_teacher_params(cfg), teacher=self.teacher)
            step_fn, tx = make_teacher_step(cfg, self.mesh, self.teacher, total)
            state = init_teacher_state(params, tx, cfg.seed)
            ckpt_cfg = cfg.copy_and_resolve_references()
            ckpt_cfg.train.checkpoint_every = int(tcfg.checkpoint_every)
            manager = ckpt.make_checkpoint_manager(self.path(stage, "ckpt"), ckpt_cfg)
            restored = ckpt.restore(manager, abstract_state=jax.tree.map(
                lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state))
            if restored is not None:
                state = restored["state"]
            start = int(jax.device_get(state.step))
            epoch_cache: dict[int, tuple] = {}
            bar = tqdm(total=total, initial=start, desc="teacher", dynamic_ncols=True, disable=not self.main)
            lo = shd.local_batch_slice(self.mesh, b)
            for step in range(start, total):
                epoch, j = divmod(step, spe)
                if epoch not in epoch_cache:
                    epoch_cache = {epoch: self.teacher_examples(epoch)}
                qs, lists = epoch_cache[epoch]
                rows = slice(j * b, (j + 1) * b)
                q_ids, q_mask = self.dataset.query_tokens(qs[rows][lo])
                p_ids, p_mask = self.dataset.doc_tokens(lists[rows][lo])
                batch = {"q_ids": q_ids, "q_mask": q_mask, "p_ids": p_ids, "p_mask": p_mask,
                         "cand_mask": np.ones(p_ids.shape[:2], np.float32)}
                state, metrics = step_fn(state, shd.to_global(batch, self.mesh))
                if (step + 1) % max(int(cfg.train.log_every), 1) == 0 or step + 1 == total:
                    values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                    history.append({"step": step + 1, **values})
                    bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['acc']:.2f}")
                ckpt.save(manager, step + 1, state, {"stage": stage}, {"step": step + 1}, force=step + 1 == total)
                bar.update(1)
            bar.close()
            manager.wait_until_finished()
            params = state.params
        else:
            params = hf.init_teacher_params(cfg)
        host_params = numpy_tree(params)
        # Every process calls the orbax save (it is collective: process 0 writes, all sync).
        artifacts.save_params(artifacts.params_dir(self.workdir, "teacher"), host_params)
        self.barrier("teacher_saved")
        rerank = self.teacher_rerank(host_params)
        return self.finish(stage, {"teacher_rerank": rerank, "history": history, "steps": total})

    def teacher_rerank(self, params) -> dict:
        """The teacher reranking BM25's top `rerank_depth` on the report splits."""
        from md2pr_jax.retrieval import metrics
        from md2pr_jax.retrieval.bm25 import BM25Retriever
        from md2pr_jax.retrieval.evaluate import EVAL_KS, split_qrels
        from md2pr_jax.teacher import PairScorer

        depth = int(self.config.teacher_train.rerank_depth)
        scorer = PairScorer(self.config, self.teacher, params, self.dataset, self.mesh,
                            int(self.config.teacher_train.score_batch_size))
        bm25 = BM25Retriever.build(self.dataset.doc_texts, progress=False)
        out = {}
        for split in self.report_splits:
            rows = self.dataset.query_indices(split)
            idx, _ = bm25.search([self.dataset.query_texts[r] for r in rows], depth, progress=False)
            qq, dd = np.nonzero(idx >= 0)
            scores = scorer.score(rows[qq], idx[qq, dd], desc=f"rerank {split}")
            run: dict[str, dict[str, float]] = {}
            for qi, di, s in zip(qq, dd, scores):
                run.setdefault(self.dataset.query_ids[rows[qi]], {})[self.dataset.doc_ids[idx[qi, di]]] = float(s)
            out[split] = metrics.evaluate(run, split_qrels(self.dataset, split), EVAL_KS)
        return out

    # ---------------------------------------------------------------- rounds 1..R
    def uses_teacher(self) -> bool:
        lc = self.config.loss
        return bool(self.config.filter.enabled or lc.use_sent or lc.use_word or lc.use_margin_mse)

    def cached_attention(self) -> bool:
        return bool(self.config.loss.use_word and self.config.loss.teacher_mode == "cached")

    def mine(self, r: int) -> dict:
        stage = f"rounds/r{r:02d}/mine"
        if self.done(stage):
            return self.result(stage)
        cfg = self.config
        os.makedirs(self.path(stage), exist_ok=True)
        params = self.student_params(r - 1)
        emb_path = self.path("baselines", "corpus_emb") if r == 1 else self.path(f"rounds/r{r - 1:02d}/eval/corpus_emb")
        corpus = self.corpus_embeddings(params, emb_path)
        pos = self.train_positives()
        q_rows = np.array(sorted(pos), np.int64)
        cand = self.dense_candidates(params, corpus, q_rows, int(cfg.rounds.mine_depth), [set(pos[int(q)]) for q in q_rows])
        if self.main:
            np.savez(self.path(stage, "candidates.npz"), q_rows=q_rows, cand=cand)
        self.barrier(stage)
        return self.finish(stage, {"queries": len(q_rows), "depth": int(cfg.rounds.mine_depth)})

    def score(self, r: int) -> dict:
        """The round's one teacher pass over positives and mined candidates."""
        stage = f"rounds/r{r:02d}/score"
        if self.done(stage):
            return self.result(stage)
        import ml_dtypes

        from md2pr_jax.teacher import PairScorer
        from md2pr_jax.train.step import teacher_layers

        cfg = self.config
        os.makedirs(self.path(stage), exist_ok=True)
        c = np.load(self.path(f"rounds/r{r:02d}/mine", "candidates.npz"))
        q_rows, cand = c["q_rows"], c["cand"]
        pos = self.train_positives()
        pairs_q, pairs_d = [], []
        for q, row in zip(q_rows, cand):
            docs = list(pos[int(q)]) + [int(d) for d in row]
            pairs_q += [int(q)] * len(docs)
            pairs_d += docs
        pairs_q, pairs_d = np.asarray(pairs_q, np.int64), np.asarray(pairs_d, np.int64)
        n = len(pairs_q)
        if not self.uses_teacher():
            scores = np.zeros(n, np.float32)
        else:
            layers = teacher_layers(cfg) if self.cached_attention() else ()
            attn = None
            if layers and self.main:
                shape = (n, len(layers), cfg.data.max_query_len, cfg.data.max_passage_len)
                # bfloat16 kept as raw uint16 bits: .npy has no bfloat16 type.
                attn = np.lib.format.open_memmap(self.path(stage, "attn.tmp.npy"), mode="w+", dtype=np.uint16, shape=shape)
            scorer = PairScorer(cfg, self.teacher, self.teacher_params(), self.dataset, self.mesh,
                                int(cfg.teacher_train.score_batch_size), attention_layers=layers)
            view = attn.view(ml_dtypes.bfloat16) if attn is not None else None
            scores = scorer.score(pairs_q, np.where(pairs_d >= 0, pairs_d, 0), attn_out=view, desc=f"round {r} teacher pass")
            if attn is not None:
                attn.flush()
                del attn, view
                os.replace(self.path(stage, "attn.tmp.npy"), self.path(stage, "attn.npy"))
        if self.main:
            np.savez(self.path(stage, "scores.npz"), q=pairs_q, d=pairs_d, logits=scores)
        self.barrier(stage)
        return self.finish(stage, {"pairs": int(n)})

    def filter_and_examples(self, r: int) -> dict:
        """Threshold update, false-negative flags, and the round's training lists."""
        stage = f"rounds/r{r:02d}/filter"
        if self.done(stage):
            return self.result(stage)
        from md2pr_jax.data.pipeline import TrainExamples
        from md2pr_jax.train.step import word_candidates

        cfg, fc = self.config, self.config.filter
        os.makedirs(self.path(stage), exist_ok=True)
        c = np.load(self.path(f"rounds/r{r:02d}/mine", "candidates.npz"))
        s = np.load(self.path(f"rounds/r{r:02d}/score", "scores.npz"))
        q_rows, cand, logits = c["q_rows"], c["cand"], s["logits"]
        pos = self.train_positives()
        # Unflatten the scoring pass: per query, its positives then its candidates.
        offsets, pos_logits, cand_logits, starts = 0, [], np.zeros(cand.shape, np.float32), []
        for i, q in enumerate(q_rows):
            k = len(pos[int(q)])
            starts.append(offsets)
            pos_logits.append(logits[offsets : offsets + k])
            cand_logits[i] = logits[offsets + k : offsets + k + cand.shape[1]]
            offsets += k + cand.shape[1]
        pos_probs = sigmoid(np.concatenate(pos_logits)) if pos_logits else np.zeros(0)
        cand_probs = sigmoid(cand_logits)
        prev = self.tau_history()
        tau_prev = prev[-1]["tau"] if prev else float(fc.tau0)
        if fc.enabled:
            tau, tau_hat = update_threshold(fc, tau_prev, pos_probs)
        else:  # no filter: the threshold is not used and does not move
            tau, tau_hat = tau_prev, float("nan")
        valid = cand >= 0
        flagged = (cand_probs >= tau) & valid if fc.enabled else np.zeros(cand.shape, bool)
        promoted = (cand_probs >= fc.promote_tau) & flagged if fc.promote else np.zeros(cand.shape, bool)

        # Training lists: for every (query, positive) pair, num_negatives negatives sampled
        # from the unflagged candidates, then ordered by teacher score (hardest first).
        n_neg = int(cfg.data.num_negatives)
        rng = np.random.default_rng([cfg.seed, cfg.train.seed, r])
        ex_q, ex_c, ex_m, ex_t, ex_src = [], [], [], [], []
        for i, q in enumerate(q_rows):
            usable = np.nonzero(valid[i] & ~flagged[i])[0]
            positives = [(d, pos_logits[i][j], starts[i] + j) for j, d in enumerate(pos[int(q)])]
            positives += [(int(cand[i, j]), cand_logits[i, j], starts[i] + len(pos[int(q)]) + j) for j in np.nonzero(promoted[i])[0]]
            for d, t_pos, src_pos in positives:
                chosen = rng.choice(usable, size=min(n_neg, len(usable)), replace=False) if len(usable) else np.zeros(0, int)
                if self.uses_teacher():
                    chosen = chosen[np.argsort(-cand_logits[i, chosen], kind="stable")]
                row_d = np.zeros(1 + n_neg, np.int64)
                row_m = np.zeros(1 + n_neg, np.float32)
                row_t = np.zeros(1 + n_neg, np.float32)
                row_s = np.full(1 + n_neg, -1, np.int64)
                row_d[0], row_m[0], row_t[0], row_s[0] = d, 1.0, t_pos, src_pos
                m = len(chosen)
                row_d[1 : 1 + m] = cand[i, chosen]
                row_m[1 : 1 + m] = 1.0
                row_t[1 : 1 + m] = cand_logits[i, chosen]
                row_s[1 : 1 + m] = starts[i] + len(pos[int(q)]) + chosen
                ex_q.append(int(q))
                ex_c.append(row_d)
                ex_m.append(row_m)
                ex_t.append(row_t)
                ex_src.append(row_s)
        attn = None
        if self.cached_attention():
            import ml_dtypes

            flat = np.load(self.path(f"rounds/r{r:02d}/score", "attn.npy"), mmap_mode="r")
            k = word_candidates(cfg, 1 + n_neg)
            src = np.asarray(ex_src)[:, :k]  # [E, K]
            attn = np.zeros((len(ex_q), flat.shape[1], k, flat.shape[2], flat.shape[3]), np.uint16)
            for e in range(len(ex_q)):
                for j in range(k):
                    if src[e, j] >= 0:
                        attn[e, :, j] = flat[src[e, j]]
            attn = attn.view(ml_dtypes.bfloat16)
        examples = TrainExamples(np.asarray(ex_q), np.asarray(ex_c), np.asarray(ex_m), np.asarray(ex_t), attn)
        if self.main:
            examples.save(self.path(stage, "examples"))
        bins = np.linspace(0, 1, 21)
        result = {
            "round": r,
            "tau": tau,
            "tau_hat": tau_hat,
            "tau_prev": tau_prev,
            "flagged": int(flagged.sum()),
            "promoted": int(promoted.sum()),
            "candidates": int(valid.sum()),
            "examples": len(ex_q),
            "hist_bins": bins.tolist(),
            "hist_positive": np.histogram(pos_probs, bins)[0].tolist(),
            "hist_candidate": np.histogram(cand_probs[valid], bins)[0].tolist(),
        }
        hidden = self.hidden_positives()
        if hidden:
            result["planted"] = planted_check(flagged, cand, q_rows, hidden)
        self.barrier(stage)
        return self.finish(stage, result)

    def tau_history(self) -> list[dict]:
        out = []
        r = 1
        while self.done(f"rounds/r{r:02d}/filter"):
            res = self.result(f"rounds/r{r:02d}/filter")
            out.append({"round": r, "tau": res["tau"], "tau_hat": res["tau_hat"], "flagged": res["flagged"]})
            r += 1
        return out

    def train_student(self, r: int) -> dict:
        stage = f"rounds/r{r:02d}/train"
        if self.done(stage):
            return self.result(stage)
        from md2pr_jax.data.pipeline import TrainExamples, make_train_iterator, steps_per_epoch
        from md2pr_jax.train import (
            abstract_train_state, create_train_state, make_train_step, numpy_tree, place_teacher_params, train_loop,
        )

        cfg = self.config
        os.makedirs(self.path(stage), exist_ok=True)
        examples = TrainExamples.load(self.path(f"rounds/r{r:02d}/filter", "examples"))
        if examples.teacher_attn is not None:
            import ml_dtypes

            examples.teacher_attn = examples.teacher_attn.view(ml_dtypes.bfloat16)
        spe = steps_per_epoch(len(examples), int(cfg.train.batch_size))
        total = min(spe * int(cfg.train.epochs), int(cfg.train.max_steps) or 1 << 30)
        online = cfg.loss.teacher_mode == "online" and self.uses_teacher()
        teacher_params = None
        if online:
            teacher_params = place_teacher_params(cfg, self.mesh, self.teacher_params(), teacher=self.teacher)
        step_fn = make_train_step(cfg, self.mesh, self.student, self.teacher if online else None, total_steps=total)
        manager = ckpt.make_checkpoint_manager(self.path(stage, "ckpt"), cfg)
        batches = make_train_iterator(examples, self.dataset, cfg, seed=(cfg.seed * 1000 + cfg.train.seed) * 100 + r,
                                      local_rows=shd.local_batch_slice(self.mesh, int(cfg.train.batch_size)))
        restored = ckpt.restore(manager, abstract_state=abstract_train_state(cfg, self.mesh, self.student))
        if restored is not None:
            state = restored["state"]
            batches.set_state(restored["data"])
            logging.info("round %d: resuming training at step %d", r, restored["step"])
        else:
            state = create_train_state(cfg, self.mesh, self.student_params(r - 1), jax.random.PRNGKey(cfg.seed * 7919 + cfg.train.seed), student=self.student)
        log_path = self.path(stage, "history.jsonl")

        def on_step(step, _state, metrics):
            if self.main:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                with open(log_path, "a") as f:
                    f.write(json.dumps({"step": int(step), **values}) + "\n")

        state, _ = train_loop(cfg, self.path(stage), state, batches, step_fn, manager, {"round": r}, total,
                              mesh=self.mesh, teacher_params=teacher_params, tag=f"round {r}", on_step=on_step)
        params = numpy_tree(state.params)
        # Every process calls the orbax save (it is collective: process 0 writes, all sync).
        artifacts.save_params(self.path(f"rounds/r{r:02d}/student"), params)
        artifacts.save_params(artifacts.params_dir(self.workdir, "student"), params)
        self.barrier(stage)
        history = self.history(r)
        means = {k: float(np.mean([h[k] for h in history])) for k in history[0] if k != "step"} if history else {}
        return self.finish(stage, {"steps": total, "examples": len(examples), "mean": means})

    def history(self, r: int) -> list[dict]:
        path = self.path(f"rounds/r{r:02d}/train", "history.jsonl")
        if not os.path.exists(path):
            return []
        by_step = {}
        with open(path) as f:
            for line in f:
                h = json.loads(line)
                by_step[h["step"]] = h  # a resumed run rewrites the steps after its checkpoint
        return [by_step[s] for s in sorted(by_step)]

    def evaluate_round(self, r: int) -> dict:
        stage = f"rounds/r{r:02d}/eval"
        if self.done(stage):
            return self.result(stage)
        os.makedirs(self.path(stage), exist_ok=True)
        params = self.student_params(r)
        corpus = self.corpus_embeddings(params, self.path(stage, "corpus_emb"))
        return self.finish(stage, self.evaluate(params, corpus, self.report_splits))

    def timed(self, stage: str, fn, *args):
        """Runs a stage and records its wall time in WORKDIR/timings.json (stages this process
        actually ran; a skipped, finished stage keeps the time it took when it ran)."""
        skipped = self.done(stage)
        t = time.perf_counter()
        out = fn(*args)
        if not skipped and self.main:
            timings = read_json(self.path("timings.json"), {})
            timings[stage] = round(time.perf_counter() - t, 1)
            write_json(self.path("timings.json"), timings)
        return out

    def round_seconds(self, r: int) -> float | None:
        """Wall seconds round r's stages took, when all of them ran in recorded time."""
        timings = read_json(self.path("timings.json"), {})
        parts = [timings.get(f"rounds/r{r:02d}/{s}") for s in ROUND_STAGES]
        return None if any(p is None for p in parts) else float(sum(parts))

    def run_round(self, r: int) -> dict:
        t = time.perf_counter()
        rr = f"rounds/r{r:02d}"
        self.timed(f"{rr}/mine", self.mine, r)
        self.timed(f"{rr}/score", self.score, r)
        filt = self.timed(f"{rr}/filter", self.filter_and_examples, r)
        train = self.timed(f"{rr}/train", self.train_student, r)
        ev = self.timed(f"{rr}/eval", self.evaluate_round, r)
        logging.info("round %d done in %.0f s: tau %.3f, flagged %d, %s", r, time.perf_counter() - t,
                     filt["tau"], filt["flagged"], ev.get(self.eval_split))
        left = int(self.config.rounds.num_rounds) - r
        took = self.round_seconds(r)
        if left > 0 and took is not None:
            logging.info("estimated time left: %.0f min for %d more round(s) at round %d's pace", left * took / 60, left, r)
        return {"filter": filt, "train": train, "eval": ev}

    # ---------------------------------------------------------------- report
    def results(self) -> dict:
        """Rows and rounds as measured so far (results.json)."""
        split = self.eval_split
        rows: dict[str, dict] = {}
        base = self.result("baselines")
        if base:
            rows["bm25"] = base["bm25"].get(split, {})
            rows["zero_shot"] = base["zero_shot"].get(split, {})
        teacher = self.result("teacher")
        if teacher:
            rows["teacher_rerank"] = teacher["teacher_rerank"].get(split, {})
        rounds = []
        r = 1
        while self.done(f"rounds/r{r:02d}/eval"):
            ev = self.result(f"rounds/r{r:02d}/eval")
            filt = self.result(f"rounds/r{r:02d}/filter")
            train = self.result(f"rounds/r{r:02d}/train")
            rounds.append({"round": r, "tau": filt.get("tau"), "tau_hat": filt.get("tau_hat"),
                           "flagged": filt.get("flagged"), "planted": filt.get("planted"),
                           "loss": train.get("mean", {}), "metrics": ev})
            r += 1
        if rounds:
            rows[row_name(self.config)] = rounds[-1]["metrics"].get(split, {})
        return {"split": split, "dataset": self.dataset.name, "rows": rows, "rounds": rounds,
                "config": self.config.name}

    def write_report(self) -> dict:
        from md2pr_jax import report

        res = self.results()
        if self.main:
            write_json(self.path("results.json"), {**res["rows"], "rounds": res["rounds"], "split": res["split"]})
            report.write(self.workdir, res, {r["round"]: self.history(r["round"]) for r in res["rounds"]})
        return res


def teacher_mode(config, workdir: str) -> None:
    """`--mode teacher`: round 0 (baselines, teacher fine-tuning, rerank evaluation)."""
    ctl = Controller(config, workdir)
    ctl.timed("baselines", ctl.baselines)
    ctl.timed("teacher", ctl.train_teacher)
    ctl.write_report()


def student_mode(config, workdir: str) -> None:
    """`--mode student`: rounds 1..R (needs round 0 in the same workdir)."""
    ctl = Controller(config, workdir)
    if not ctl.done("teacher"):
        raise SystemExit(f"{workdir} has no finished teacher stage; run --mode teacher (or pipeline) first")
    for r in range(1, int(config.rounds.num_rounds) + 1):
        ctl.run_round(r)
    ctl.write_report()


def pipeline_mode(config, workdir: str) -> None:
    """`--mode pipeline`: round 0, every student round, then REPORT.md and results.json."""
    t = time.perf_counter()
    ctl = Controller(config, workdir)
    ctl.timed("baselines", ctl.baselines)
    ctl.timed("teacher", ctl.train_teacher)
    for r in range(1, int(config.rounds.num_rounds) + 1):
        ctl.run_round(r)
    res = ctl.write_report()
    if ctl.main:
        print(json.dumps({"rows": res["rows"], "seconds": round(time.perf_counter() - t, 1)}))
