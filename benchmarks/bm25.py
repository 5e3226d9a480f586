"""BM25 at scale, measured on SciFact: building the index against loading the one kept on disk
(`BM25Retriever.cached`, what every stage after the first does), and search throughput on 1
thread against `--threads` (bm25s's thread pool; the rerank and baseline stages' search).

    MD2PR_DATA_DIR=../shared/data .venv/bin/python benchmarks/bm25.py [--threads 2] [--k 1000] \
        [--repeat 3] [--out benchmarks/results/bm25_cpu.json]

Under a minute on a 2-core CPU. Queries: every SciFact query, repeated --repeat times.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--k", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results/bm25_cpu.json")
    args = parser.parse_args()

    from md2pr_jax.retrieval.bm25 import BM25Retriever, threads

    root = os.path.join(os.environ["MD2PR_DATA_DIR"], "scifact")
    docs = [json.loads(line) for line in open(os.path.join(root, "corpus.jsonl"))]
    texts = [(d["title"] + " " + d["text"]).strip() for d in docs]
    queries = [json.loads(line)["text"] for line in open(os.path.join(root, "queries.jsonl"))] * args.repeat
    with tempfile.TemporaryDirectory() as folder:
        t = time.perf_counter()
        built = BM25Retriever.cached(texts, folder, progress=False)
        build_s = time.perf_counter() - t
        t = time.perf_counter()
        BM25Retriever.cached(texts, folder, progress=False)
        load_s = time.perf_counter() - t
    search = {}
    for n in (1, args.threads):
        built.n_threads = n
        built.search(queries[:50], args.k, progress=False)  # warm-up
        t = time.perf_counter()
        idx, _ = built.search(queries, args.k, progress=False)
        search[n] = time.perf_counter() - t
    result = {
        "docs": len(texts), "queries": len(queries), "k": args.k, "build_s": round(build_s, 2),
        "cached_load_s": round(load_s, 3),
        "search": {str(n): {"seconds": round(s, 2), "queries_per_s": round(len(queries) / s, 1)} for n, s in search.items()},
        "cores_visible": threads(0), "machine": platform.processor() or platform.machine(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
