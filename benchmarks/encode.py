"""Corpus encoding throughput: the JAX encoder against sentence-transformers on SciFact.

Both encode the same SciFact passages (title + ' ' + text) with all-MiniLM-L6-v2 at the same
max length and batch size. JAX: the prepared token ids through `retrieval.encode.encode`
(length-bucketed, jitted); compile time is reported apart from the steady-state pass.
PyTorch: `SentenceTransformer.encode` (which also sorts by length), tokenization included,
as users run it. Also reports the largest |difference| between the two sets of embeddings.

    MD2PR_DATA_DIR=../shared/data .venv/bin/python benchmarks/encode.py \
        [--max-len 256] [--batch-size 64] [--limit 0] [--device cpu|gpu] [--dtype float32|bfloat16] [--out PATH]

About 6-8 minutes for the full corpus at length 256 on an idle 2-core CPU. The corpus and
query embeddings are kept in --cache (default: $TMPDIR/md2pr_bench) for benchmarks/ann.py.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--max-len", type=int, default=256)
    parser.add_argument("--max-query-len", type=int, default=64, help="for the zero-shot check (no SciFact test claim is longer)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--limit", type=int, default=0, help="encode only the first N passages (0 = all)")
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "md2pr_bench"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                        help="compute dtype in both (JAX config.model.dtype; sentence-transformers: the model cast)")
    parser.add_argument("--out", default=None, help="default benchmarks/results/encode_<device>.json")
    args = parser.parse_args()
    args.out = args.out or os.path.join(os.path.dirname(__file__), "results", f"encode_{args.device}.json")
    os.environ.setdefault("JAX_PLATFORMS", "cuda" if args.device == "gpu" else "cpu")
    if not os.environ.get("MD2PR_DATA_DIR"):
        raise SystemExit("set MD2PR_DATA_DIR to the folder holding scifact/")

    from md2pr_jax.compile_cache import use_compilation_cache

    os.makedirs(args.cache, exist_ok=True)
    cache_dir = use_compilation_cache(tempfile.mkdtemp(prefix="xla_", dir=args.cache))  # empty: a cold compile first
    import jax
    import torch
    from sentence_transformers import SentenceTransformer
    from tqdm.auto import tqdm

    from md2pr_jax import hf
    from md2pr_jax.params import init_student_params
    from md2pr_jax.config import MINILM_ID, base_config
    from md2pr_jax.data import prepare_dataset
    from md2pr_jax.models import student_from_config
    from md2pr_jax.retrieval.encode import CallableTokens, bucket_lengths, encode, save_embeddings, student_apply_fn

    cfg = base_config()
    cfg.student.init = MINILM_ID
    cfg.data.max_passage_len = args.max_len
    cfg.data.max_query_len = args.max_query_len
    cfg.model.dtype = args.dtype
    ds = prepare_dataset(cfg, args.cache)
    n = args.limit or ds.num_docs
    rows = np.arange(n)
    texts = [ds.doc_texts[i] for i in rows]
    tokens = CallableTokens(ds.doc_tokens, ds.doc_lengths)

    params = init_student_params(cfg)
    student = student_from_config(cfg)
    fn = student_apply_fn(student, params, "passage")
    kw = dict(batch_size=args.batch_size, max_len=args.max_len, progress=False)
    # Compile every bucket shape once: one batch of the longest texts of each bucket.
    lengths = np.minimum(ds.doc_lengths[:n], args.max_len)
    buckets = bucket_lengths(args.max_len)
    which = np.searchsorted(buckets, lengths)
    warm = np.concatenate([rows[which == b][: args.batch_size] for b in np.unique(which)])
    t = time.perf_counter()
    encode(fn, tokens, warm, **kw)
    compile_s = time.perf_counter() - t
    # The same again with the in-memory caches dropped: what a later round, process or run pays
    # when the persistent compilation cache already holds the bucket programs.
    warm_compile_s = None
    if cache_dir:
        from md2pr_jax.retrieval import encode as encode_module

        jax.clear_caches()
        encode_module._JITTED.clear()
        fn = student_apply_fn(student, params, "passage")
        t = time.perf_counter()
        encode(fn, tokens, warm, **kw)
        warm_compile_s = time.perf_counter() - t
    model = SentenceTransformer(hf.resolve_pretrained(MINILM_ID), device="cuda" if args.device == "gpu" else "cpu")
    if args.dtype == "bfloat16":
        model = model.to(torch.bfloat16)
    model.max_seq_length = args.max_len
    model.encode(texts[: args.batch_size], batch_size=args.batch_size)  # warm-up
    # Interleave the two in chunks so that load from other jobs on a shared machine falls on both alike.
    jax_emb = np.empty((n, 384), np.float32)
    st_emb = np.empty((n, 384), np.float32)
    jax_s = st_s = 0.0
    chunks = np.array_split(np.random.default_rng(0).permutation(n), max(1, n // (args.batch_size * 8)))
    load_before = os.getloadavg()
    for chunk in tqdm(chunks, desc="chunks (jax, st)"):
        t = time.perf_counter()
        jax_emb[chunk] = encode(fn, tokens, rows[chunk], **kw)
        jax_s += time.perf_counter() - t
        t = time.perf_counter()
        st_emb[chunk] = model.encode([texts[i] for i in chunk], batch_size=args.batch_size,
                                     convert_to_numpy=True, normalize_embeddings=True)
        st_s += time.perf_counter() - t

    diff = float(np.abs(jax_emb - st_emb).max())
    result = {
        "what": "SciFact corpus encoding, all-MiniLM-L6-v2 (mean pooling, normalised)",
        "passages": int(n),
        "max_len": args.max_len,
        "batch_size": args.batch_size,
        "device": args.device,
        "dtype": args.dtype,
        "mean_tokens": float(lengths.mean()),
        "jax": {"seconds": round(jax_s, 2), "passages_per_s": round(n / jax_s, 2), "compile_s": round(compile_s, 2),
                "compile_from_cache_s": None if warm_compile_s is None else round(warm_compile_s, 2),
                "buckets": buckets},
        "sentence_transformers": {"seconds": round(st_s, 2), "passages_per_s": round(n / st_s, 2),
                                  "torch": torch.__version__, "threads": torch.get_num_threads()},
        "ratio_jax_over_st": round(st_s / jax_s, 3),
        "max_abs_diff": diff,
        "load_average_before_after": [round(load_before[0], 2), round(os.getloadavg()[0], 2)],
        "jax_version": jax.__version__,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(json.dumps(result, indent=2))
    if n == ds.num_docs:
        save_embeddings(os.path.join(args.cache, f"scifact_minilm_{args.max_len}.docs.npy"), jax_emb, ds.doc_ids)
        q_rows = np.arange(ds.num_queries)
        q_fn = student_apply_fn(student, params, "query")
        q_emb = encode(q_fn, CallableTokens(ds.query_tokens, ds.query_lengths), q_rows,
                       batch_size=args.batch_size, max_len=ds.max_query_len, progress=False)
        save_embeddings(os.path.join(args.cache, f"scifact_minilm_{args.max_len}.queries.npy"), q_emb, ds.query_ids)
        from md2pr_jax.retrieval.bm25 import to_run
        from md2pr_jax.retrieval.index import exact_search
        from md2pr_jax.retrieval.metrics import evaluate

        test = ds.query_indices("test")
        scores, idx = exact_search(q_emb[test], jax_emb, 1000)
        result["zero_shot_scifact_test"] = evaluate(
            to_run([ds.query_ids[r] for r in test], ds.doc_ids, idx, scores), ds.qrels["test"])
        result["zero_shot_scifact_test"]["max_query_len"] = args.max_query_len
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print("zero-shot SciFact test:", json.dumps(result["zero_shot_scifact_test"]))


if __name__ == "__main__":
    main()
