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
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

B, C, LQ, LP = 16, 8, 32, 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "data.json"))
    args = parser.parse_args()
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
            "seconds_build_read_write": round(prepare_s - parts["tokenize"], 2),
            "seconds_tokenize": round(parts["tokenize"], 2),
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


if __name__ == "__main__":
    main()
