"""Approximate nearest neighbours: ScaNN against exact search (JAX) and FAISS, side by side.

Two datasets, inner product, k = 10:
  - synthetic: --n (default 1M) clustered 384-d unit vectors (2,000 Gaussian clusters of
    random spread) and 1,000 held-out queries from the same mixture;
  - scifact: zero-shot all-MiniLM-L6-v2 embeddings of the SciFact corpus (5,183) and all its
    1,109 queries, as written by benchmarks/encode.py into --cache (skipped when absent).
For each: build seconds, queries per second (all queries in one batch, this machine's
threads) and recall@10 against exact search, for
  - exact: `retrieval.index.exact_search` (chunked matmul + top-k in JAX);
  - scann: tree (leaves ~ sqrt(N), spherical, SOAR spilling) + anisotropic AH (2 dims/block)
    + exact reorder, as `retrieval.index.ScannIndex.build` makes it, sweeping
    leaves searched and reorder depth;
  - faiss IVF-PQ (fast scan) + exact refine: nlist = sqrt(N), 4-bit PQ on 2-dim blocks (the
    code size of ScaNN's AH), sweeping nprobe and refine factor; FAISS HNSW (M=32) on SciFact and,
    with --hnsw, on the synthetic set (slow to build on 2 cores).
Writes JSON (default benchmarks/results/ann.json) and a recall-QPS plot (ann.png beside it).

    .venv/bin/python benchmarks/ann.py [--n 1000000] [--hnsw] [--cache DIR]

About 10-15 minutes at 1M on a 2-core CPU; peak memory about 5 GB.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time

import numpy as np

# On a shared machine OpenMP threads that spin while waiting starve everyone (FAISS builds
# took minutes for 20k points); set before faiss is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

K = 10


def synthetic(n: int, d: int, n_q: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered unit vectors with low intrinsic dimension, like text embeddings.

    x = center_c + spread_c * (z @ W) + 0.1 * noise, then L2-normalised: 2,000 Gaussian cluster
    centers, a shared 32-dim subspace W for the within-cluster variation (z ~ N(0, I_32)),
    per-cluster spread in [0.5, 1.5] (relative to the centers' scale), small isotropic noise.
    """
    rng = np.random.default_rng(seed)
    n_clusters, rank = 2000, 32
    centers = rng.normal(size=(n_clusters, d)).astype(np.float32)
    basis = (rng.normal(size=(rank, d)) * math.sqrt(d / rank)).astype(np.float32)  # same scale as centers
    spread = rng.uniform(0.5, 1.5, size=n_clusters).astype(np.float32)

    def draw(m):
        c = rng.integers(0, n_clusters, size=m)
        x = np.empty((m, d), np.float32)
        for s in range(0, m, 100_000):  # bounded temporaries
            cc = c[s : s + 100_000]
            z = rng.standard_normal((len(cc), rank), np.float32) @ basis
            x[s : s + len(cc)] = (centers[cc] + spread[cc, None] * z
                                  + 0.1 * rng.standard_normal((len(cc), d), np.float32))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    return draw(n), draw(n_q)


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found[:, :K], truth[:, :K])]))


def sweep(parts: int) -> list[int]:
    """Distinct numbers of partitions to search: 0.5% ... 35% of `parts`."""
    return sorted({max(1, int(round(parts * f))) for f in (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.35)})


def timed(fn, repeat: int = 1):
    best, out = math.inf, None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return out, best


def bench(name: str, db: np.ndarray, q: np.ndarray, hnsw: bool) -> dict:
    from md2pr_jax.retrieval.index import ExactIndex, ScannIndex

    n = len(db)
    print(f"== {name}: {n} x {db.shape[1]}, {len(q)} queries", flush=True)
    rows = []

    def add(method, params, build_s, s_idx, search_s):
        r = dict(method=method, params=params, build_s=round(build_s, 2), qps=round(len(q) / search_s, 1),
                 recall_at_10=round(recall(s_idx, truth), 4))
        rows.append(r)
        print(json.dumps(r), flush=True)

    # exact (JAX): the ground truth; build = moving the corpus to the device in chunks.
    (exact, build_s) = timed(lambda: ExactIndex(db))
    exact.search(q[:8], K)  # compile
    (res, search_s) = timed(lambda: exact.search(q, K), repeat=2)
    truth = res[1]
    add("exact", {}, build_s, truth, search_s)

    # ScaNN
    leaves = max(1, int(round(math.sqrt(n))))
    index, build_s = timed(lambda: ScannIndex.build(db, depth=K, num_leaves=leaves, reorder=100,
                                                   training_sample_size=min(n, 250_000)))
    for search in sweep(leaves):
        for reorder in (50, 100, 200):
            run = lambda: index.searcher.search_batched_parallel(
                q, final_num_neighbors=K, pre_reorder_num_neighbors=reorder, leaves_to_search=search)
            run()
            ((idx, _), search_s) = timed(run, repeat=2)
            add("scann", {"leaves": leaves, "leaves_to_search": search, "reorder": reorder}, build_s,
                np.asarray(idx), search_s)

    # FAISS IVF-PQ with exact refine (the analogue of ScaNN's AH + reorder)
    import faiss

    d = db.shape[1]
    nlist = leaves

    def build_ivfpq():
        quant = faiss.IndexFlatIP(d)
        # 4-bit codes on 2-dim blocks: the same code size as ScaNN's AH; fast-scan kernels.
        ivf = faiss.IndexIVFPQFastScan(quant, d, nlist, d // 2, 4, faiss.METRIC_INNER_PRODUCT)
        refine = faiss.IndexRefineFlat(ivf)  # keeps the raw vectors for the exact re-scoring
        refine.train(db[np.random.default_rng(0).permutation(n)[: min(n, 250_000)]])
        refine.add(db)
        return ivf, refine

    (ivf, refine), build_s = timed(build_ivfpq)
    for nprobe in sweep(nlist):
        ivf.nprobe = nprobe
        for factor in (5, 10, 20):
            refine.k_factor = factor
            ((_, idx), search_s) = timed(lambda: refine.search(q, K), repeat=2)
            add("faiss_ivfpq", {"nlist": nlist, "nprobe": ivf.nprobe, "pq": f"{d // 2}x4", "k_factor": factor},
                build_s, idx, search_s)

    if hnsw:
        def build_hnsw():
            h = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
            h.hnsw.efConstruction = 64
            h.add(db)
            return h

        h, build_s = timed(build_hnsw)
        for ef in (16, 32, 64, 128, 256):
            h.hnsw.efSearch = ef
            ((_, idx), search_s) = timed(lambda: h.search(q, K), repeat=2)
            add("faiss_hnsw", {"M": 32, "efConstruction": 64, "efSearch": ef}, build_s, idx, search_s)
    return {"n": n, "dim": d, "queries": len(q), "rows": rows, "summary": summarize(rows)}


def summarize(rows: list[dict]) -> dict:
    """Per method: the fastest setting reaching recall@10 >= 0.95 (and >= 0.99), and its speed-up over exact."""
    exact_qps = next(r["qps"] for r in rows if r["method"] == "exact")
    out = {"exact_qps": exact_qps}
    for method in sorted({r["method"] for r in rows} - {"exact"}):
        for target in (0.95, 0.99):
            ok = [r for r in rows if r["method"] == method and r["recall_at_10"] >= target]
            best = max(ok, key=lambda r: r["qps"]) if ok else None
            out[f"{method}@{target}"] = None if best is None else {
                "qps": best["qps"], "recall_at_10": best["recall_at_10"], "params": best["params"],
                "build_s": best["build_s"], "speedup_vs_exact": round(best["qps"] / exact_qps, 2)}
    return out


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items()):
        for method, marker in (("scann", "o"), ("faiss_ivfpq", "s"), ("faiss_hnsw", "^"), ("exact", "*")):
            pts = [(r["recall_at_10"], r["qps"]) for r in res["rows"] if r["method"] == method]
            if not pts:
                continue
            front = pareto(pts)
            ax.plot([p[0] for p in front], [p[1] for p in front], marker=marker, label=method,
                    markersize=10 if method == "exact" else 5)
        ax.set_yscale("log")
        ax.set_xlabel("recall@10 (vs exact)")
        ax.set_ylabel("queries per second")
        ax.set_title(f"{name}: N={res['n']:,}, d={res['dim']}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def pareto(points):
    """The recall-QPS frontier: points no other point beats on both axes, by recall."""
    pts = sorted(points, key=lambda p: (-p[0], -p[1]))
    front, best_qps = [], -1.0
    for r, q in pts:
        if q > best_qps:
            front.append((r, q))
            best_qps = q
    return sorted(front)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--hnsw", action="store_true", help="also FAISS HNSW on the synthetic set")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "md2pr_bench"))
    parser.add_argument("--max-len", type=int, default=256, help="which SciFact embeddings from encode.py")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "ann.json"))
    args = parser.parse_args()

    import jax

    results = {}
    prefix = os.path.join(args.cache, f"scifact_minilm_{args.max_len}")
    if os.path.exists(prefix + ".docs.npy"):
        docs = np.load(prefix + ".docs.npy")
        queries = np.load(prefix + ".queries.npy")
        results["scifact"] = bench("scifact", docs, queries, hnsw=True)
    else:
        print(f"no SciFact embeddings at {prefix}.docs.npy: run benchmarks/encode.py first; skipping", flush=True)
    t = time.perf_counter()
    db, q = synthetic(args.n, 384, args.queries)
    print(f"generated synthetic data in {time.perf_counter() - t:.1f}s", flush=True)
    results["synthetic"] = bench("synthetic", db, q, hnsw=args.hnsw)
    import faiss
    import scann  # noqa: F401  (version below)

    out = {
        "k": K,
        "datasets": results,
        "versions": {"jax": jax.__version__, "faiss": faiss.__version__, "scann": "1.4.2"},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "faiss_threads": faiss.omp_get_max_threads(),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(out, f, indent=2)
    plot(results, os.path.splitext(args.out)[0] + ".png")
    print(json.dumps({k: v["summary"] for k, v in results.items()}, indent=2))


if __name__ == "__main__":
    main()
