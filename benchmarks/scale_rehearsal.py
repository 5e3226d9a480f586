"""Scale rehearsal: every stage of the real pipeline at one v5e-16 host's share of MS MARCO.

A pod run (configs/msmarco_bert_base.py on v5e:4x4, 4 hosts) gives each host about a quarter
of the corpus to encode and index (8.8M / 4 = 2.2M passages) and a quarter of the training
queries to mine and score (502k / 4 = 125k), while the host-side stages (data preparation,
BM25, the filter's bookkeeping) run on the host CPU. This script runs that share on a CPU box
through the project's own code, to find what breaks or crawls at this size before a pod is
rented:

  1. a synthetic MS MARCO-shaped collection in the official TSV files (collection.tsv,
     queries.{train,dev}.tsv, qrels.{train,dev}.tsv: 'qid 0 pid 1'): passages of ~56 words
     (log-normal, long right tail), queries of ~6 words, 1-2 judged passages per training query
     (one per dev query), words drawn from a Zipf law over the MiniLM vocabulary's whole words,
     each query sharing most of its words with its positive passages (so BM25 and the dense
     retriever score above chance). Seeded, written once into <workdir>/source/msmarco and reused.
  2. the real pipeline (`rounds.runner.Runner` on <workdir>/run, the stages `--mode pipeline`
     composes: round 0, then one student round) with configs/msmarco_bert_base.py's data,
     rounds and retrieval settings (mine_depth 50, eval_depth 1000, rerank_depth 100, ...) and
     tiny random BERTs (hidden 32, 2 layers, the MiniLM tokenizer) for both encoders, small
     batches and a few hundred train steps so it runs on a CPU.

Each stage is timed with its peak memory (a sampler thread reading VmRSS every 0.1 s, and
VmHWM reset per stage through /proc/self/clear_refs where the kernel allows it); the stages
that bundle several steps get finer parts by timing the project functions they call.
The JSON is rewritten (atomically) after every stage, so a killed run keeps what it measured;
the same command resumes it (the data is reused, the Runner skips finished stages, and the
stages already in the JSON keep their figures).

    PYTHONPATH=. .venv/bin/python benchmarks/scale_rehearsal.py --workdir /tmp/rehearsal \
        [--passages 2200000] [--train-queries 125000] [--dev-queries 2000] [--steps 300] \
        [--teacher-steps 50] [--mine-depth 50] [--rerank-depth 100] [--out benchmarks/results/scale_rehearsal.json]

JSON schema (benchmarks/pod_plan.py reads it; names are stable):
    {"machine": {"cores", "ram_gb", "platform", "python", "jax"},
     "args": {...}, "config": {the overridden keys},
     "sizes": {"passages", "train_queries", "dev_queries", "train_positives"},
     "stages": {NAME: {"items", "unit", "wall_s", "items_per_s", "peak_rss_gb", "rss_start_gb",
                       "parts": {PART: {"items", "unit", "wall_s", "items_per_s", "peak_rss_gb", "calls"}}}},
     "metrics": {"bm25", "zero_shot", "teacher_rerank", "student"} (dev means),
     "goal": {"passages_ok", "queries_ok", "memory_ok", "max_peak_rss_gb", "limit_gb"},
     "complete": bool, "total_s"}
Stages, in order (unit in brackets):
    generate   [passages]  the synthetic TSV files (not part of the pipeline)
    prepare    [passages]  TFDS build + tokenization + the prepared arrays (`prepare_dataset`)
    baselines  [queries]   train queries; parts: bm25_index [passages], bm25_search [queries],
                           corpus_encode [passages], query_encode [queries], ann_index [passages],
                           dense_search [queries] (zero-shot eval and the teacher's dense negatives)
    teacher    [steps]     cross-encoder fine-tuning (round 0)
    rerank     [pairs]     teacher over BM25's top rerank_depth of the dev queries; parts: bm25_search,
                           teacher_scoring [pairs]
    mine       [queries]   round 1 mining; parts: query_encode, ann_index, dense_search
    score      [pairs]     the teacher pass over positives + mined candidates; part teacher_scoring
    filter     [queries]   threshold, flags and training lists
    train      [steps]     student training
    eval       [queries]   dev queries; parts: corpus_encode, query_encode, ann_index, dense_search
Parts not listed can appear (a part is any wrapped function a stage called).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import math
import os
import platform
import sys
import tempfile
import threading
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ("generate", "prepare", "baselines", "teacher", "rerank", "mine", "score", "filter", "train", "eval")
UNITS = {"generate": "passages", "prepare": "passages", "baselines": "queries", "teacher": "steps",
         "rerank": "pairs", "mine": "queries", "score": "pairs", "filter": "queries", "train": "steps",
         "eval": "queries"}
LIMIT_GB = 20.0
GIB = 1024**3


# ---------------------------------------------------------------------------- memory
def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class MemorySampler:
    """Peak resident memory per open span: a daemon thread reads VmRSS every `period` s; each
    span's peak is the largest sample during it, or VmHWM when that was reset at its start
    (clear_refs '5') and is larger (it catches spikes between samples)."""

    def __init__(self, period: float = 0.1):
        self.period, self.spans, self._lock = period, {}, threading.Lock()
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            rss = _status_kb("VmRSS")
            with self._lock:
                for k in self.spans:
                    self.spans[k] = max(self.spans[k], rss)
            time.sleep(self.period)

    def open(self, key) -> float:
        rss = _status_kb("VmRSS")
        with self._lock:
            self.spans[key] = rss
        return rss / 1024**2

    def close(self, key, hwm_reset: bool = False) -> float:
        with self._lock:
            peak = self.spans.pop(key, 0)
        peak = max(peak, _status_kb("VmRSS"))
        if hwm_reset:
            peak = max(peak, _status_kb("VmHWM"))
        return peak / 1024**2  # GiB


def reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# ---------------------------------------------------------------------------- the report
class Report:
    """The JSON, rewritten atomically after every stage; stages already measured are kept."""

    def __init__(self, path: str, head: dict):
        self.path = path
        old = {}
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
        same = old.get("args", {}).get("workdir") == head["args"]["workdir"] and \
            old.get("sizes_requested") == head["sizes_requested"]
        self.data = {**head, "stages": old.get("stages", {}) if same else {}, "metrics": old.get("metrics", {}) if same else {}}
        self.current: str | None = None

    def write(self) -> None:
        d = self.data
        peaks = [s["peak_rss_gb"] for s in d["stages"].values() if s.get("peak_rss_gb") is not None]
        sizes = d.get("sizes", {})
        d["goal"] = {"passages_ok": sizes.get("passages", 0) >= 2_200_000,
                     "queries_ok": sizes.get("train_queries", 0) >= 125_000,
                     "max_peak_rss_gb": round(max(peaks), 3) if peaks else None, "limit_gb": LIMIT_GB,
                     "memory_ok": bool(peaks) and max(peaks) <= LIMIT_GB}
        d["complete"] = all(s in d["stages"] for s in STAGES)
        d["total_s"] = round(sum(s["wall_s"] for s in d["stages"].values()), 1)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(self.path)), suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(d, f, indent=2, sort_keys=True)
            f.write("\n")
        os.replace(tmp, self.path)


def _rate(items, wall):
    return round(items / wall, 3) if wall > 0 else None


class Timer:
    """Times stages and the parts inside them (wrapped project functions)."""

    def __init__(self, report: Report, sampler: MemorySampler):
        self.report, self.sampler = report, sampler
        self.parts: dict[str, dict] | None = None
        self._depth = 0

    @contextlib.contextmanager
    def stage(self, name: str, items_fn):
        """Runs the body as stage `name`; items_fn() -> its item count, asked after it ran."""
        self.parts, hwm = {}, reset_hwm()
        start_gb = self.sampler.open(name)
        t = time.perf_counter()
        print(f"[rehearsal] stage {name} ...", flush=True)
        yield
        wall = time.perf_counter() - t
        peak = self.sampler.close(name, hwm)
        items = int(items_fn())
        self.report.data["stages"][name] = {
            "items": items, "unit": UNITS[name], "wall_s": round(wall, 2), "items_per_s": _rate(items, wall),
            "peak_rss_gb": round(peak, 3), "rss_start_gb": round(start_gb, 3), "parts": self.parts}
        self.parts = None
        self.report.write()
        print(f"[rehearsal] stage {name}: {items} {UNITS[name]} in {wall:.1f} s "
              f"({_rate(items, wall)}/s), peak RSS {peak:.2f} GiB", flush=True)

    def wrap(self, owner, attr: str, part: str, unit: str, count) -> None:
        """Replaces owner.attr by a timed copy recording part `part` (count(args, kwargs, out) -> items)."""
        fn = getattr(owner, attr)
        if getattr(fn, "_rehearsal", False):
            return
        timer = self

        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if timer.parts is None or timer._depth:  # outside a stage, or nested in another part
                return fn(*args, **kwargs)
            key = ("part", part, time.perf_counter())
            timer.sampler.open(key)
            timer._depth += 1
            t = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
            finally:
                timer._depth -= 1
            wall = time.perf_counter() - t
            peak = timer.sampler.close(key)
            p = timer.parts.setdefault(part, {"items": 0, "unit": unit, "wall_s": 0.0, "calls": 0, "peak_rss_gb": 0.0})
            p["items"] += int(count(args, kwargs, out))
            p["wall_s"] = round(p["wall_s"] + wall, 3)
            p["calls"] += 1
            p["peak_rss_gb"] = round(max(p["peak_rss_gb"], peak), 3)
            p["items_per_s"] = _rate(p["items"], p["wall_s"])
            return out

        timed._rehearsal = True
        setattr(owner, attr, timed)


def instrument(timer: Timer) -> None:
    """Wraps the project functions the stages call, so each stage's parts are timed."""
    from md2pr_jax.retrieval import bm25, evaluate, index, mining
    from md2pr_jax.rounds import stages

    def arg(i, name):
        return lambda a, k, out: len(k[name]) if name in k else len(a[i])

    # classmethods: wrap the bound function on the class
    timer.wrap(bm25.BM25Retriever, "cached", "bm25_index", "passages", arg(0, "doc_texts"))
    timer.wrap(bm25.BM25Retriever, "search_processes", "bm25_search", "queries", arg(1, "query_texts"))
    timer.wrap(bm25.BM25Retriever, "pair_scores", "bm25_pair_scores", "pairs", arg(2, "pairs_q"))
    timer.wrap(evaluate, "encode_corpus", "corpus_encode", "passages", lambda a, k, out: len(out[0]))
    timer.wrap(evaluate, "encode_queries", "query_encode", "queries", lambda a, k, out: len(out))
    for owner in (evaluate, index):
        timer.wrap(owner, "build_index", "ann_index", "passages", lambda a, k, out: out.size)
    timer.wrap(evaluate, "search", "dense_search", "queries", arg(0, "q"))
    timer.wrap(mining, "mine", "dense_search", "queries", arg(0, "q"))
    timer.wrap(evaluate, "score_run", "score_run", "queries", lambda a, k, out: len(a[0]))
    timer.wrap(stages, "score_pairs", "teacher_scoring", "pairs", arg(2, "pairs_q"))


# ---------------------------------------------------------------------------- synthetic data
def _lognormal_lengths(rng, n: int, mean: float, sigma: float, lo: int, hi: int) -> np.ndarray:
    mu = math.log(mean) - sigma**2 / 2
    return np.clip(np.rint(rng.lognormal(mu, sigma, n)), lo, hi).astype(np.int64)


def vocabulary() -> list[str]:
    """The MiniLM WordPiece vocabulary's whole lower-case words in id order (BERT's vocabulary
    is roughly ordered by frequency after its special and single-character entries), so one
    word is mostly one token and the Zipf rank follows the real frequency order."""
    from transformers import AutoTokenizer

    from md2pr_jax.config import MINILM_ID
    from md2pr_jax.hf import resolve_pretrained

    vocab = AutoTokenizer.from_pretrained(resolve_pretrained(MINILM_ID)).get_vocab()
    words = [w for w, i in sorted(vocab.items(), key=lambda kv: kv[1]) if i >= 1996 and w.isalpha() and w.isascii()]
    if len(words) < 10000:
        raise SystemExit(f"the MiniLM vocabulary holds only {len(words)} whole words")
    return words


def generate(folder: str, passages: int, train_queries: int, dev_queries: int, seed: int = 0,
             zipf_s: float = 1.07, chunk: int = 100_000) -> dict:
    """Writes the five MS MARCO TSV files into `folder` (see the module docstring); returns
    their summary. Queries' positives are distinct passages; 10% of training queries have 2."""
    rng = np.random.default_rng(seed)
    words = np.array(vocabulary(), dtype=object)
    v = len(words)
    cdf = np.cumsum(1.0 / np.arange(1, v + 1) ** zipf_s)
    cdf /= cdf[-1]
    n_q = train_queries + dev_queries
    if n_q * 2 > passages:
        raise SystemExit(f"--passages {passages} is too small for {n_q} queries (each needs distinct positives)")
    n_pos = np.ones(n_q, np.int64)
    n_pos[:train_queries][rng.random(train_queries) < 0.1] = 2
    pos_rows = rng.choice(passages, int(n_pos.sum()), replace=False)
    pos_start = np.concatenate([[0], np.cumsum(n_pos)])
    owner = np.full(passages, -1, np.int64)  # passage -> the query it is positive for
    owner[pos_rows] = np.repeat(np.arange(n_q), n_pos)
    q_lengths = _lognormal_lengths(rng, n_q, 6.0, 0.38, 2, 30)
    pos_words: list[list[str]] = [[] for _ in range(n_q)]  # the positives' words, collected while writing
    total_words = 0
    os.makedirs(folder, exist_ok=True)
    from tqdm.auto import tqdm

    with open(os.path.join(folder, "collection.tsv.tmp"), "w") as f:
        for start in tqdm(range(0, passages, chunk), desc="collection.tsv", unit_scale=chunk, mininterval=5):
            n = min(chunk, passages - start)
            lengths = _lognormal_lengths(rng, n, 56.0, 0.55, 3, 360)
            ids = np.searchsorted(cdf, rng.random(int(lengths.sum())))
            flat = words[ids]
            bounds = np.concatenate([[0], np.cumsum(lengths)])
            lines = []
            for i in range(n):
                toks = flat[bounds[i]:bounds[i + 1]]
                lines.append(f"{start + i}\t{' '.join(toks)}\n")
                q = owner[start + i]
                if q >= 0:
                    pos_words[q].extend(toks)
            f.write("".join(lines))
            total_words += int(lengths.sum())
    # A query: ~60% of its words from its positives (their rarer words first: what a searcher
    # types), the rest from the Zipf law.
    rank = {w: i for i, w in enumerate(words)}
    texts = []
    for q in range(n_q):
        k = int(q_lengths[q])
        cand = list(dict.fromkeys(pos_words[q]))
        rng.shuffle(cand)
        from_pos = min(len(cand), max(1, int(round(0.6 * k))))
        chosen = sorted(cand[: 2 * from_pos], key=lambda w: -rank[w])[:from_pos]
        chosen += list(words[np.searchsorted(cdf, rng.random(k - from_pos))])
        rng.shuffle(chosen)
        texts.append(" ".join(chosen))
    qids = rng.choice(np.arange(1_000_000, 10_000_000), n_q, replace=False)
    splits = {"train": range(train_queries), "dev": range(train_queries, n_q)}
    for split, rows in splits.items():
        with open(os.path.join(folder, f"queries.{split}.tsv"), "w") as f:
            f.write("".join(f"{qids[q]}\t{texts[q]}\n" for q in rows))
        with open(os.path.join(folder, f"qrels.{split}.tsv"), "w") as f:
            # dev: one judged passage per query (MS MARCO dev averages 1.07)
            f.write("".join(f"{qids[q]}\t0\t{pos_rows[p]}\t1\n" for q in rows
                            for p in range(pos_start[q], pos_start[q] + (n_pos[q] if split == "train" else 1))))
    os.replace(os.path.join(folder, "collection.tsv.tmp"), os.path.join(folder, "collection.tsv"))
    return {"passages": passages, "train_queries": train_queries, "dev_queries": dev_queries,
            "train_positives": int(n_pos[:train_queries].sum()), "mean_passage_words": round(total_words / passages, 2),
            "mean_query_words": round(float(q_lengths.mean()), 2), "vocabulary": v, "zipf_s": zipf_s, "seed": seed}


# ---------------------------------------------------------------------------- the config
def rehearsal_config(args, data_dir: str):
    """configs/msmarco_bert_base.py with tiny random encoders, CPU batch sizes and step counts;
    its data, rounds, filter and retrieval settings stay."""
    from md2pr_jax.config import MINILM_ID, bert_shape, validate

    spec = importlib.util.spec_from_file_location("msmarco_config", os.path.join(ROOT, "configs", "msmarco_bert_base.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config()
    c.name = "scale_rehearsal"
    tiny = dict(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_position_embeddings=192)
    for tower in ("student", "teacher"):
        c[tower].init = ""
        c[tower].bert = bert_shape(**tiny)
    c.student.tokenizer = MINILM_ID
    c.model.dtype = "float32"
    c.model.remat = False
    c.loss.layer_pairs = ((1, 1), (2, 2))
    c.data.dir = data_dir
    c.rounds.num_rounds = 1
    c.train.batch_size = args.batch_size
    c.train.max_steps = args.steps
    c.train.warmup_steps = max(args.steps // 10, 1)
    c.train.checkpoint_every = max(args.steps // 2, 1)
    c.train.log_every = max(args.steps // 10, 1)
    c.teacher_train.batch_size = args.batch_size
    c.teacher_train.max_steps = args.teacher_steps
    c.teacher_train.warmup_steps = max(args.teacher_steps // 10, 1)
    c.teacher_train.checkpoint_every = max(args.teacher_steps, 1)
    c.teacher_train.score_batch_size = args.score_batch_size
    c.retrieval.encode_batch_size = args.encode_batch_size
    c.mesh.data, c.mesh.fsdp = -1, 1
    if args.mine_depth:
        c.rounds.mine_depth = args.mine_depth
    if args.rerank_depth:
        c.teacher_train.rerank_depth = args.rerank_depth
    return validate(c)


OVERRIDDEN = ("student.init", "teacher.init", "student.bert", "teacher.bert", "model.dtype", "model.remat",
              "loss.layer_pairs", "rounds.num_rounds", "train.batch_size", "train.max_steps",
              "teacher_train.batch_size", "teacher_train.max_steps", "teacher_train.score_batch_size",
              "retrieval.encode_batch_size", "mesh.data", "mesh.fsdp")


def _get(c, key):
    for k in key.split("."):
        c = c[k]
    return c.to_dict() if hasattr(c, "to_dict") else c


# ---------------------------------------------------------------------------- main
def machine() -> dict:
    import jax

    ram = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                ram = int(line.split()[1]) / 1024**2
    return {"cores": os.cpu_count(), "affinity_cores": len(os.sched_getaffinity(0)), "ram_gb": round(ram, 2),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(), "jax": jax.__version__,
            "jax_devices": [str(d) for d in jax.devices()]}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workdir", required=True, help="data and run folder (not in the repository)")
    p.add_argument("--passages", type=int, default=2_200_000)
    p.add_argument("--train-queries", type=int, default=125_000)
    p.add_argument("--dev-queries", type=int, default=2_000)
    p.add_argument("--steps", type=int, default=300, help="student train steps")
    p.add_argument("--teacher-steps", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=32, help="queries per train step (student and teacher)")
    p.add_argument("--score-batch-size", type=int, default=1024, help="teacher_train.score_batch_size")
    p.add_argument("--encode-batch-size", type=int, default=1024, help="retrieval.encode_batch_size")
    p.add_argument("--mine-depth", type=int, default=0, help="rounds.mine_depth (0: the msmarco config's, 50)")
    p.add_argument("--rerank-depth", type=int, default=0,
                   help="teacher_train.rerank_depth (0: the msmarco config's, 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "scale_rehearsal.json"))
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    workdir = os.path.abspath(args.workdir)
    src_root = os.path.join(workdir, "source")
    src = os.path.join(src_root, "msmarco")
    requested = {"passages": args.passages, "train_queries": args.train_queries, "dev_queries": args.dev_queries,
                 "seed": args.seed}

    from md2pr_jax.logs import quiet_library_logs

    quiet_library_logs()
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.INFO)
    from md2pr_jax.compile_cache import use_compilation_cache

    use_compilation_cache()
    report = Report(args.out, {"machine": machine(), "args": {**vars(args), "workdir": workdir},
                               "sizes_requested": requested})
    sampler = MemorySampler()
    timer = Timer(report, sampler)
    instrument(timer)

    # 1. the synthetic files (once; a different size in the same workdir is an error)
    marker = os.path.join(src, "rehearsal_source.json")
    if os.path.exists(marker):
        with open(marker) as f:
            summary = json.load(f)
        if {k: summary.get(k) for k in requested} != requested:
            raise SystemExit(f"{src} holds data of another size ({summary}); use a new --workdir")
    else:
        with timer.stage("generate", lambda: args.passages):
            summary = generate(src, args.passages, args.train_queries, args.dev_queries, args.seed)
        with open(marker + ".tmp", "w") as f:
            json.dump(summary, f)
        os.replace(marker + ".tmp", marker)
    report.data["sizes"] = {k: summary[k] for k in ("passages", "train_queries", "dev_queries", "train_positives")}
    report.data["synthetic"] = summary
    report.write()

    # 2. the pipeline, stage by stage, through the Runner
    from md2pr_jax import artifacts
    from md2pr_jax.data.fetch import ensure_data
    from md2pr_jax.report import row_name
    from md2pr_jax.layout import round_stage
    from md2pr_jax.rounds.runner import Runner

    config = rehearsal_config(args, src_root)
    config.data.dir = ensure_data(config)
    report.data["config"] = {k: _get(config, k) for k in OVERRIDDEN + ("rounds.mine_depth", "retrieval.eval_depth",
                                                                      "teacher_train.rerank_depth", "data.max_query_len",
                                                                      "data.max_passage_len", "loss.teacher_mode")}
    run_dir = os.path.join(workdir, "run")
    holder: dict = {}
    prepared = "prepare" in report.data["stages"]
    with (contextlib.nullcontext() if prepared else timer.stage("prepare", lambda: holder["runner"].ctx.dataset.num_docs)):
        holder["runner"] = Runner(config, run_dir)
    runner = holder["runner"]
    ds = runner.ctx.dataset
    n_train = len(runner.ctx.train_positives)
    n_dev = len(ds.query_indices("dev"))

    def result(stage):
        return runner.layout.result(stage) or {}

    counts = {
        "baselines": lambda: n_train,
        "teacher": lambda: result("teacher").get("steps", 0),
        "rerank": lambda: (timer.parts or {}).get("teacher_scoring", {}).get("items", 0),
        "mine": lambda: result(round_stage(1, "mine")).get("queries", 0),
        "score": lambda: result(round_stage(1, "score")).get("pairs", 0),
        "filter": lambda: n_train,
        "train": lambda: result(round_stage(1, "train")).get("steps", 0),
        "eval": lambda: n_dev,
    }
    for name in STAGES[2:]:
        stage = name if name in ("baselines", "teacher", "rerank") else round_stage(1, name)
        if runner.layout.done(stage):
            if name not in report.data["stages"]:  # finished by a run this report did not see
                timings = artifacts.read_json(runner.layout.timings, {})
                report.data["stages"][name] = {"items": 0, "unit": UNITS[name], "wall_s": timings.get(stage, 0.0),
                                               "items_per_s": None, "peak_rss_gb": None, "parts": {},
                                               "note": "finished before this report; wall_s from timings.json"}
            continue
        with timer.stage(name, counts[name]):
            runner.run(stage, *([] if name in ("baselines", "teacher", "rerank") else [1]))
    res = runner.write_report()
    rows = res["rows"]
    report.data["metrics"] = {k: rows.get(v, {}) for k, v in (("bm25", "bm25"), ("zero_shot", "zero_shot"),
                                                             ("teacher_rerank", "teacher_rerank"),
                                                             ("student", row_name(config)))}
    report.data["timings_json"] = artifacts.read_json(runner.layout.timings, {})
    report.write()
    for name, s in report.data["stages"].items():
        print(f"{name:10s} {s['items']:>10} {s['unit']:8s} {s['wall_s']:>9.1f} s {s['items_per_s'] or 0:>12.1f}/s "
              f"peak {s['peak_rss_gb'] or 0:.2f} GiB", flush=True)
        for part, q in s.get("parts", {}).items():
            print(f"    {part:18s} {q['items']:>10} {q['unit']:8s} {q['wall_s']:>9.1f} s {q['items_per_s'] or 0:>12.1f}/s "
                  f"peak {q['peak_rss_gb']:.2f} GiB", flush=True)
    print(json.dumps({"metrics": report.data["metrics"], "goal": report.data["goal"]}), flush=True)
    return report.data


if __name__ == "__main__":
    main(sys.argv[1:])
