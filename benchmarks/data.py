"""Data throughput: preparing SciFact (TFDS build + tokenization) and the grain training pipeline.

  - prepare: seconds to build SciFact's TFDS array_record files from $MD2PR_DATA_DIR/scifact,
    read them back, tokenize the 5,183 documents and 1,109 queries with the MiniLM tokenizer
    (max lengths 32 / 128) and save the prepared arrays, in a fresh cache (goal: under 10 s);
    and the seconds to load that cache a second time. The tokenizer's own load time is
    reported apart (it is paid once per process whatever the data).
  - pipeline: batches per second from `make_train_iterator` for the MiniLM train-step shape
    (16 queries x 8 passages, Lq 32, Lp 128) over SciFact's 809 train queries, without and
    with cached teacher attention (P=1 layer pair, K=2, bf16), with 0 and 2 reader threads.
    Compared with benchmarks/results/train_step_cpu.json where it exists (goal: >= 10x the step rate).

    MD2PR_DATA_DIR=../shared/data .venv/bin/python benchmarks/data.py [--batches 300] [--out PATH]

About half a minute on a 2-core CPU. Writes JSON (default benchmarks/results/data.json).

  - --synthetic N: preparation at MS MARCO's shape instead. A seeded synthetic collection.tsv of
    N passages (~56 words each, Zipf over the MiniLM vocabulary, capitals, numbers and accents)
    with queries and qrels in the msmarco_passage builder's TSV format (5.7% as many train
    queries as passages, as MS MARCO's 502,939 for 8.8M), built once with TFDS (timed apart), then
    prepared (Lq 32, Lp 128) side by side, each in its own process for its peak RSS:
      old      the code of --old_ref (default: the commit before the threaded preparation),
               its builders and prepare modules read from git: TFDS decoding, one thread
      new_t1   this code, data.tokenize_threads=1
      new_tN   this code, data.tokenize_threads=N (--threads, default: the cores)
    with TOKENIZERS_PARALLELISM=false, so that a thread count is the cores used (--rust_parallel
    lets the Rust encoder spread over the cores in every variant). Checks that all variants
    write identical files, and reports docs/s and the ratios.

    .venv/bin/python benchmarks/data.py --synthetic 200000 [--threads N] [--out PATH]

Writes benchmarks/results/data_prepare_synthetic.json by default.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

B, C, LQ, LP = 16, 8, 32, 128
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OLD_REF = "954cafc"  # the last commit that prepared on one thread through TFDS's decoding


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--out", default="")
    parser.add_argument("--synthetic", type=int, default=0, help="passages: compare old and new preparation")
    parser.add_argument("--threads", type=int, default=0, help="new_tN's threads (0: the cores)")
    parser.add_argument("--old_ref", default=OLD_REF, help="git commit whose preparation is 'old'")
    parser.add_argument("--rust_parallel", action="store_true", help="leave TOKENIZERS_PARALLELISM on")
    parser.add_argument("--keep", default="", help="folder kept between runs for the synthetic files and build")
    parser.add_argument("--_variant", default="", help=argparse.SUPPRESS)  # the child process of one variant
    parser.add_argument("--_cache", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._variant:
        return _variant_child(args)
    if args.synthetic:
        return synthetic_main(args)
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results", "data.json")
    if not os.environ.get("MD2PR_DATA_DIR"):
        raise SystemExit("set MD2PR_DATA_DIR to the folder holding scifact/")

    from md2pr_jax.config import base_config
    from md2pr_jax.data import prepare_dataset
    from md2pr_jax.data.pipeline import TrainExamples, make_train_iterator
    from md2pr_jax.hf import load_tokenizer

    config = base_config()
    config.data.dir = os.environ["MD2PR_DATA_DIR"]
    config.data.max_query_len, config.data.max_passage_len = LQ, LP
    config.train.batch_size = B

    t = time.perf_counter()
    tokenizer = load_tokenizer(config)
    tokenizer_load_s = time.perf_counter() - t
    with tempfile.TemporaryDirectory() as workdir:
        t, cpu = time.perf_counter(), time.process_time()
        ds = prepare_dataset(config, workdir, tokenizer=tokenizer)
        prepare_s, prepare_cpu_s = time.perf_counter() - t, time.process_time() - cpu
        with open(os.path.join(ds.path, "meta.json")) as f:
            parts = json.load(f)["seconds"]
        build_s = prepare_s - parts["total"]
        t = time.perf_counter()
        cached = prepare_dataset(config, workdir, tokenizer=tokenizer)
        cached_s = time.perf_counter() - t
        assert cached.from_cache

        rng = np.random.default_rng(0)
        train = ds.query_indices("train")
        e = len(train)
        examples = TrainExamples(
            query_idx=train,
            cand_idx=rng.integers(0, ds.num_docs, (e, C)),
            cand_mask=np.ones((e, C), np.float32),
            teacher_scores=rng.normal(size=(e, C)).astype(np.float32),
        )
        attn = rng.random((e, 1, 2, LQ, LP), dtype=np.float32)
        pipeline = {}
        for name, with_attn in (("plain", False), ("cached_attention", True)):
            for workers in (0, 2):
                config.data.num_workers = workers
                ex = TrainExamples(**{**examples.__dict__, "teacher_attn": attn if with_attn else None})
                it = make_train_iterator(ex, ds, config, seed=0, process_index=0, process_count=1)
                next(it)  # thread start-up outside the timing
                t = time.perf_counter()
                for _ in range(args.batches):
                    next(it)
                pipeline[f"{name}_threads{workers}"] = round(args.batches / (time.perf_counter() - t), 1)

    result = {
        # Teammates share these cores: the load average says how contended the timings were.
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_1m": os.getloadavg()[0]},
        "scifact_prepare": {
            "docs": ds.num_docs,
            "queries": ds.num_queries,
            "seconds_total": round(prepare_s, 2),
            "cpu_seconds_total": round(prepare_cpu_s, 2),  # all threads; wall time minus waiting for a core
            "seconds_tfds_build": round(build_s, 2),
            "seconds_prepare_documents": round(parts["documents"], 2),  # read, tokenize, write (threads overlap)
            "tokenize_threads": parts["threads"],
            "seconds_tokenizer_load": round(tokenizer_load_s, 2),
            "seconds_cached_reload": round(cached_s, 2),
            "goal_seconds": 10,
        },
        "pipeline_batches_per_s": pipeline,
        "shape": {"queries": B, "passages_per_query": C, "Lq": LQ, "Lp": LP},
    }
    step_path = os.path.join(os.path.dirname(args.out), "train_step_cpu.json")
    if os.path.exists(step_path):
        with open(step_path) as f:
            step = json.load(f)
        rate = _find_rate(step)
        if rate:
            result["train_step_per_s"] = rate
            result["pipeline_over_train_step"] = round(min(pipeline.values()) / rate, 1)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


def _find_rate(step_json: dict) -> float | None:
    """The fastest JAX steps/s in train_step_cpu.json, whatever its exact layout."""
    rates = []

    def walk(node, path=""):
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, f"{path}.{k}")
        elif isinstance(node, (int, float)) and "steps_per_s" in path and "torch" not in path.lower():
            rates.append(float(node))

    walk(step_json)
    return max(rates) if rates else None


# ----------------------------------------------------------------------------------------
# Preparation at MS MARCO's shape: old vs new, on a synthetic collection


def synthetic_msmarco(folder: str, passages: int, seed: int = 0) -> dict:
    """Writes an MS MARCO-shaped dataset into `folder` (collection.tsv, queries.{train,dev}.tsv,
    qrels.{train,dev}.tsv, the msmarco_passage builder's formats) and returns its counts.
    Passages: ~56 words (normal, sd 25, 5..220), Zipf-distributed over the MiniLM vocabulary's
    alphabetic words plus capitalised words, numbers and a few accented or dotted ones; train
    and dev queries in MS MARCO's proportions (502,939 and 6,980 for 8,841,823 passages), each
    judging one passage (6% two)."""
    from transformers import AutoTokenizer

    from md2pr_jax.config import MINILM_ID
    from md2pr_jax.hf import resolve_pretrained

    rng = np.random.default_rng(seed)
    vocab = sorted(w for w in AutoTokenizer.from_pretrained(resolve_pretrained(MINILM_ID)).get_vocab()
                   if w.isalpha() and len(w) > 2)
    words = np.array(vocab + [w.capitalize() for w in vocab[::7]] + [str(i) for i in range(0, 3000, 7)]
                     + ["1.5%", "U.S.", "(e.g.", "naïve", "café", "Zürich", "$20,000", "well-known"])
    p = 1.0 / np.arange(1, len(words) + 1) ** 0.9
    p /= p.sum()
    order = rng.permutation(len(words))

    def texts(n: int, mean: float, sd: float, lo: int, hi: int, end: str) -> list[str]:
        lens = np.clip(rng.normal(mean, sd, n).astype(int), lo, hi)
        drawn = words[order[rng.choice(len(words), int(lens.sum()), p=p)]]
        ends = np.cumsum(lens)
        return [" ".join(drawn[e - n_w : e]) + end for e, n_w in zip(ends, lens)]

    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "collection.tsv"), "w") as f:
        for start in range(0, passages, 10_000):
            batch = texts(min(10_000, passages - start), 56, 25, 5, 220, ".")
            f.writelines(f"{start + i}\t{t}\n" for i, t in enumerate(batch))
    n_train = max(2, round(passages * 502_939 / 8_841_823))
    n_dev = max(1, round(passages * 6_980 / 8_841_823))
    qids = rng.choice(max(1_200_000, 2 * (n_train + n_dev)), n_train + n_dev, replace=False)
    for split, ids in (("train", qids[:n_train]), ("dev", qids[n_train:])):
        with open(os.path.join(folder, f"queries.{split}.tsv"), "w") as f:
            f.writelines(f"{q}\t{t}\n" for q, t in zip(ids, texts(len(ids), 6, 2, 2, 20, "?")))
        with open(os.path.join(folder, f"qrels.{split}.tsv"), "w") as f:
            for q in ids:
                judged = rng.choice(passages, 1 + int(rng.random() < 0.06), replace=False)
                f.writelines(f"{q}\t0\t{d}\t1\n" for d in judged)
    return {"passages": passages, "train_queries": n_train, "dev_queries": n_dev}


def _synthetic_config(data_dir: str, cache: str, threads: int):
    from md2pr_jax.config import base_config

    config = base_config()
    config.data.dir, config.data.cache_dir = data_dir, cache
    config.data.builder, config.data.dataset, config.data.eval_split = "msmarco_passage", "msmarco", "dev"
    config.data.max_query_len, config.data.max_passage_len = LQ, LP
    config.data.tokenize_threads = threads
    return config


def synthetic_main(args) -> None:
    from md2pr_jax.data import builders

    threads = args.threads or len(os.sched_getaffinity(0))
    out = args.out or os.path.join(os.path.dirname(__file__), "results", "data_prepare_synthetic.json")
    base = args.keep or tempfile.mkdtemp(prefix="md2pr-data-bench-")
    try:
        data_dir, cache = os.path.join(base, f"src{args.synthetic}"), os.path.join(base, f"cache{args.synthetic}")
        src = os.path.join(data_dir, "msmarco")
        t = time.perf_counter()
        if not os.path.exists(os.path.join(src, "qrels.dev.tsv")):
            shutil.rmtree(src, ignore_errors=True)
            synthetic_msmarco(src, args.synthetic)
        generate_s = time.perf_counter() - t
        t = time.perf_counter()
        build = builders.build("msmarco_passage", "msmarco", src, cache)
        build_s = time.perf_counter() - t
        variants = [("old", 1), ("new_t1", 1), (f"new_t{threads}", threads)]
        results = {}
        for name, n in variants:
            shutil.rmtree(os.path.join(cache, "prepared"), ignore_errors=True)  # each variant prepares anew
            env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
            env["TOKENIZERS_PARALLELISM"] = "true" if args.rust_parallel else "false"
            cmd = [sys.executable, __file__, "--_variant", name, "--threads", str(n), "--old_ref", args.old_ref,
                   "--_cache", cache, "--synthetic", str(args.synthetic), "--keep", data_dir]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            print(name, json.dumps(results[name]), flush=True)
        hashes = {name: r.pop("file_hashes") for name, r in results.items()}
        old, t1, tn = (results[name]["docs_per_s"] for name, _ in variants)
        result = {
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "load_average_1m": os.getloadavg()[0]},
            "collection": {"passages": builders.num_records(build, "corpus"),
                           "queries": {s: builders.num_records(build, s) for s in build.splits if s != "corpus"},
                           "seconds_generate": round(generate_s, 1)},
            "tfds_build": {"seconds": round(build_s, 2), "docs_per_s": round(args.synthetic / build_s, 1),
                           "reused": not build.built_now},
            "shape": {"Lq": LQ, "Lp": LP},
            "tokenizers_parallelism": "true" if args.rust_parallel else "false",
            "old_ref": args.old_ref,
            "variants": results,
            "identical_files": all(h == hashes["old"] for h in hashes.values()),
            "new_t1_over_old": round(t1 / old, 2),
            f"new_t{threads}_over_old": round(tn / old, 2),
            f"new_t{threads}_over_new_t1": round(tn / t1, 2),
        }
        if not result["identical_files"]:
            result["file_hashes"] = hashes
    finally:
        if not args.keep:
            shutil.rmtree(base, ignore_errors=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps(result, indent=1))


def _old_prepare_module(ref: str, folder: str):
    """md2pr_jax/data/prepare.py of commit `ref`, reading records as that commit did (TFDS's
    per-record decoding); the TFDS build itself is this code's (the same files)."""
    import importlib.util
    import types

    from md2pr_jax.data import builders

    text = subprocess.run(["git", "-C", ROOT, "show", f"{ref}:md2pr_jax/data/prepare.py"],
                          check=True, capture_output=True, text=True).stdout
    path = os.path.join(folder, "old_prepare.py")
    with open(path, "w") as f:
        f.write(text)
    spec = importlib.util.spec_from_file_location("md2pr_old_prepare", path)
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up
    spec.loader.exec_module(module)
    module.builders = types.SimpleNamespace(build=builders.build, BuildResult=builders.BuildResult,
                                            read_split=_old_read_split)
    return module


def _old_read_split(result, split: str, chunk: int = 4096):
    """builders.read_split as of OLD_REF: records decoded by TFDS, one by one."""
    source = result.source(split)
    for start in range(0, len(source), chunk):
        for rec in source.__getitems__(list(range(start, min(start + chunk, len(source))))):
            out = {k: rec[k].decode("utf-8") for k in ("id", "title", "text")}
            if rec["labels"]:
                labels = json.loads(rec["labels"])
                out.update(doc_ids=list(labels["qrels"]), scores=list(labels["qrels"].values()))
                out.update(neg_ids=labels["neg_ids"], answers=labels["answers"])
            yield out


def _variant_child(args) -> None:
    """One variant in its own process: prepares the synthetic set (its TFDS build already made)
    and prints one JSON line: seconds, docs/s, peak RSS, the prepared files' hashes."""
    from md2pr_jax.hf import load_tokenizer

    config = _synthetic_config(args.keep, args._cache, args.threads)
    tokenizer = load_tokenizer(config)
    with tempfile.TemporaryDirectory() as tmp:
        if args._variant == "old":
            module = _old_prepare_module(args.old_ref, tmp)
        else:
            from md2pr_jax.data import prepare as module
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        t, cpu = time.perf_counter(), time.process_time()
        ds = module._prepare_dataset(config, os.path.dirname(args._cache), tokenizer)
        seconds, cpu_s = time.perf_counter() - t, time.process_time() - cpu
    assert not ds.from_cache, "the variant found a prepared folder: nothing was timed"
    hashes = {}
    for name in sorted(os.listdir(ds.path)):
        if name != "meta.json":
            with open(os.path.join(ds.path, name), "rb") as f:
                hashes[name] = hashlib.sha1(f.read()).hexdigest()
    print(json.dumps({
        "threads": args.threads,
        "docs": ds.num_docs,
        "queries": ds.num_queries,
        "seconds": round(seconds, 2),
        "cpu_seconds": round(cpu_s, 2),
        "docs_per_s": round(ds.num_docs / seconds, 1),
        "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "rss_before_mib": round(rss_before / 1024, 1),
        "file_hashes": hashes,
    }))


if __name__ == "__main__":
    main()
