"""A time plan of the whole pipeline on a TPU pod, before renting it.

    .venv/bin/python benchmarks/pod_plan.py --config configs/msmarco_bert_base.py --topology v5e:4x4 \\
        [--rehearsal benchmarks/results/scale_rehearsal.json] [--utilisation 0.4]

Every stage of `--mode pipeline` (round 0: prepare, BM25 and zero-shot baselines, teacher
fine-tuning, rerank; each round: mining, the teacher pass, the filter, training, evaluation;
read from md2pr_jax/rounds/stages.py), split into the pieces that run on the chips and those
that run on the hosts, each with its work (passages, queries, pairs, steps, from the config
and the dataset's sizes) and its projected time on the topology:

* chips: XLA's FLOPs of the REAL compiled functions, compiled for the topology on libtpu's
  compile-only devices (`aot.topology_devices`): the student's train step
  (`aot.compile_step`), the teacher's fine-tuning step (`teacher.make_teacher_train_step`),
  the teacher's scoring function (`teacher.score_fn`, at the pod's per-process batch) and the
  two encoder towers (`encode.tower_fn`, at retrieval.encode_batch_size), these three on one
  host's chips (the one-host slice of the generation, `host_topology`), as they run.
  Time = FLOPs / (chips x peak bf16 FLOP/s x utilisation). The figures are cached in a JSON
  beside the output (`--flops-cache`; the train step alone compiles for 7-10 minutes here),
  keyed by the config values that shape them, so re-running the plan with other host
  throughputs or another utilisation is instant (`--no-compile` makes a missing figure an
  error; `--train-aot` takes the train step from a `--mode aot` report).
* hosts: the throughputs a rehearsal measured on this 2-core CPU
  (benchmarks/results/scale_rehearsal.json: stages [{name, items, wall_s, items_per_s,
  peak_rss_gb}]), scaled to the pod host's vCPUs at a stated parallel efficiency where the
  code runs the work on many threads, taken as is where it runs on one; each host doing its
  share where the code splits the work across processes (BM25 queries, the corpus shards of
  ScaNN), the whole where each host repeats it (data preparation, the BM25 index, the filter).
  Throughputs measured on a smaller corpus are scaled to the corpus each host searches
  (`HostKind.size_exponent`); `--rehearsal-map` names a rehearsal stage for a host kind.
  A host kind the rehearsal lacks is left unprojected (and the total is then a lower bound).

Writes JSON (default benchmarks/results/pod_plan_<config>_<topology>.json):
`{config, topology, chips, hosts, assumptions, flops, flops_checks, stages: [{name,
pipeline_stage, work, projected_s, host_memory_gb, basis, ...}], pipeline_stages, memory,
total_projected_s, budget}` and prints a table. The goal: the 2 rounds in <= 4 h, no stage over 1 h; a stage
over it carries a `note` saying why and what would fix it.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from typing import Any

os.environ.setdefault("JAX_PLATFORMS", "cpu")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

GB = 1e9

# Per generation: peak bf16 FLOP/s per chip (Cloud TPU docs: v4 275, v5e 197, v5p 459, v6e 918
# TFLOP/s), and the TPU VM host of a multi-host slice (one per 4 chips): vCPUs and RAM.
# v5e: ct5lp-hightpu-4t, 112 vCPUs, 192 GB (cloud.google.com/tpu/docs/v5e, "VM types");
# v5p: 208 vCPUs, 448 GB (cloud.google.com/tpu/docs/v5p, "VM, host and slice properties");
# v4: 240 vCPUs, 407 GB, and v6e: ct6e-standard-4t, 180 vCPUs, 720 GB, from the Cloud TPU
# docs as remembered, not re-checked for this plan.
GENERATIONS: dict[str, dict[str, Any]] = {
    "v4": {"peak_flops": 275e12, "host_vcpus": 240, "host_ram_gb": 407, "host": "TPU v4 VM",
           "source": "Cloud TPU docs (v4 host figures not re-checked)"},
    "v5e": {"peak_flops": 197e12, "host_vcpus": 112, "host_ram_gb": 192, "host": "ct5lp-hightpu-4t",
            "source": "cloud.google.com/tpu/docs/v5e: 197 bf16 TFLOP/s per chip; VM types: ct5lp-hightpu-4t "
                      "112 vCPUs, 192 GB"},
    "v5p": {"peak_flops": 459e12, "host_vcpus": 208, "host_ram_gb": 448, "host": "TPU v5p VM",
            "source": "cloud.google.com/tpu/docs/v5p: 459 bf16 TFLOP/s per chip; 208 vCPUs, 448 GB per VM"},
    "v6e": {"peak_flops": 918e12, "host_vcpus": 180, "host_ram_gb": 720, "host": "ct6e-standard-4t",
            "source": "cloud.google.com/tpu/docs/v6e: 918 bf16 TFLOP/s per chip (host figures not re-checked)"},
}

# Dataset sizes (config.data.dataset -> counts). MS MARCO passage: collection.tsv,
# queries.train.tsv with qrels, queries.dev.small.tsv (the dev set the config evaluates).
DATASET_SIZES: dict[str, dict[str, int]] = {
    "msmarco": {"passages": 8_841_823, "train_queries": 502_939, "dev_queries": 6_980, "train_qrels": 532_761},
}

# Host work: which rehearsal stage measures it (the first name found), whether the code runs it
# on many threads (so it scales with the host's cores), and how its cost grows with the corpus
# it works on (time per item ~ corpus^exponent; 0 = independent of the corpus).
@dataclasses.dataclass(frozen=True)
class HostKind:
    rehearsal: tuple[str, ...]
    parallel: bool
    code: str  # where the code does it, and on how many threads
    size_exponent: float = 0.0
    corpus_from: str = ""  # the kind whose rehearsal items give the corpus it ran on, when its own stage lacks `corpus`
    fix: str = ""  # what would shorten it, beyond more cores or hosts
    divisible: bool = True  # False: every host needs the whole result (the prepared data, the BM25 index)
    per_dim: bool = False  # cost per item ~ the embedding dimension (scaled where the rehearsal stage has `dim`)


HOST_KINDS: dict[str, HostKind] = {
    "prepare": HostKind(("prepare", "prepare_dataset", "data_prepare"), False,
                        "data/prepare.py: TFDS build and flat token tables in one process (the fast tokenizer's "
                        "batches use its own threads; taken as serial)",
                        fix="prepare once (before renting the pod, or on one host) and let every host copy the prepared "
                            "tables from the bucket; tokenise in parallel over the host's cores", divisible=False),
    "bm25_index": HostKind(("bm25_index", "bm25_build"), False,
                           "retrieval/bm25.py BM25Retriever.build: bm25s tokenize + index, one thread", 0.0,
                           fix="build the index once and copy it to every host (it is the same everywhere), or "
                               "tokenise in parallel", divisible=False),
    "bm25_search": HostKind(("bm25_search", "bm25_query"), True,
                            "retrieval/bm25.py search: bm25s on retrieval.bm25_threads (0 = all cores)", 1.0, "bm25_index",
                            fix="fewer or shallower BM25 searches (teacher_train.negative_pool), or more hosts: the "
                                "queries are already split and threaded"),
    "bm25_pair_scores": HostKind(("bm25_pair_scores", "bm25_pairs"), False,
                                 "retrieval/bm25.py pair_scores: a Python loop over queries", 0.0,
                                 fix="split the pairs across hosts; score from the search's own scores"),
    "scann_build": HostKind(("scann_build", "scann_index", "ann_build"), True,
                            "retrieval/index.py ScannIndex.build: k-means tree (sqrt(N) leaves) + AH, ScaNN's "
                            "training threads", 0.5, "scann_build",
                            fix="build once per round and reuse it for mining and evaluation; a training sample "
                                "(retrieval.scann_* keys) instead of the whole shard", per_dim=True),
    "scann_search": HostKind(("scann_search", "ann_search"), True,
                             "retrieval/index.py search_batched_parallel: ScaNN's threads", 1.0, "scann_build",
                             fix="split the queries across hosts and search every shard's index (each host now "
                                 "searches all queries on its shard), or fewer leaves to search", per_dim=True),
    "mining": HostKind(("mining", "mine_bookkeeping", "mining_bookkeeping", "mine"), False,
                       "retrieval/mining.py exclude + merge_topk (numpy, Python loop per query), one thread",
                       fix="vectorise the per-query exclusion, and split the queries across hosts"),
    "filter": HostKind(("filter", "filter_round"), False,
                       "rounds/filtering.py + stages.filter_round: numpy and Python loops, one thread",
                       fix="vectorise the per-query loops (split_scores, build_lists, teacher_signal), or compute "
                           "on process 0 only and broadcast"),
}

# The compiled functions the chips run (name -> what it is, per item of work).
FUNCTIONS = ("encode_query", "encode_passage", "teacher_score", "teacher_train_step", "train_step")


# ------------------------------------------------------------------------------ the work
def dataset_sizes(config, overrides: dict[str, int] | None = None) -> dict[str, int]:
    """The dataset's counts (DATASET_SIZES), with `overrides` (from --sizes) on top."""
    sizes = dict(DATASET_SIZES.get(config.data.dataset, {}))
    sizes.update(overrides or {})
    missing = [k for k in ("passages", "train_queries", "dev_queries", "train_qrels") if k not in sizes]
    if missing:
        raise ValueError(f"no sizes for dataset {config.data.dataset!r}: pass --sizes with {', '.join(missing)} "
                         f"(known: {sorted(DATASET_SIZES)})")
    return sizes


def pipeline_work(config, sizes: dict[str, int]) -> dict[str, Any]:
    """The counts every stage works on, from the config and the dataset's sizes (see
    rounds/stages.py: the teacher's lists are one per (query, positive) pair, the student's
    likewise; a round scores each training query's positives and mine_depth candidates)."""
    from md2pr_jax.data.pipeline import steps_per_epoch

    t, tr = config.teacher_train, config.train
    lists = int(sizes["train_qrels"])  # one list per labelled (query, positive): positives_per_query 0 = all
    if int(config.data.positives_per_query) > 0:
        lists = min(lists, int(sizes["train_queries"]) * int(config.data.positives_per_query))
    teacher_steps = int(t.max_steps) or max(lists // int(t.batch_size), 1) * int(t.epochs)
    student_steps = steps_per_epoch(lists, int(tr.batch_size)) * int(tr.epochs)
    if int(tr.max_steps):
        student_steps = min(student_steps, int(tr.max_steps))
    depth = int(config.rounds.mine_depth)
    return {
        "passages": int(sizes["passages"]),
        "train_queries": int(sizes["train_queries"]),
        "dev_queries": int(sizes["dev_queries"]),
        "train_qrels": int(sizes["train_qrels"]),
        "teacher_lists": lists,
        "teacher_steps": teacher_steps if int(t.epochs) > 0 else 0,
        "teacher_folds": int(t.folds),
        "rerank_pairs": int(sizes["dev_queries"]) * int(t.rerank_depth),
        "negative_pool": int(t.negative_pool),
        "mine_depth": depth,
        "score_pairs": int(sizes["train_queries"]) * depth + lists,
        "student_examples": lists,
        "student_steps": student_steps,
        "rounds": int(config.rounds.num_rounds),
        "eval_depth": int(config.retrieval.eval_depth),
    }


# ------------------------------------------------------------------------------ FLOPs
def config_key(config) -> str:
    """A fingerprint of what shapes the compiled functions (models, dtypes, lengths, batches,
    mesh, losses): a cached figure is reused only under the same key."""
    c = config
    parts = {k: c[k].to_dict() for k in ("student", "teacher", "model", "loss", "mesh")}
    parts["data"] = {k: c.data[k] for k in ("max_query_len", "max_passage_len", "num_negatives")}
    parts["train"] = {k: c.train[k] for k in ("batch_size", "grad_accum")}
    parts["teacher_train"] = {k: c.teacher_train[k] for k in ("batch_size", "num_negatives", "grad_accum",
                                                              "score_batch_size", "pointwise_weight")}
    parts["retrieval"] = {"encode_batch_size": c.retrieval.encode_batch_size}
    for p in parts.values():  # init paths do not change shapes
        p.pop("init", None)
    blob = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def _abstract(tree, sharding):
    import jax

    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), tree)


def _figures(compiled, devices: int, items: int, item: str, seconds: float, **extra) -> dict[str, Any]:
    """What the plan keeps of a compiled function: FLOPs per chip (XLA's cost analysis of the
    partitioned module), per call (x devices) and per item, and its bytes per chip."""
    from md2pr_jax import aot

    per_chip = float(aot._cost(compiled).get("flops", 0.0))
    mem = aot.memory_report(compiled)
    return {"flops_per_chip": per_chip, "devices": devices, "flops_per_call": per_chip * devices,
            "items_per_call": items, "item": item, "flops_per_item": per_chip * devices / items,
            "bytes_per_chip": mem["total"], "compile_s": round(seconds, 1), **extra}


def host_topology(topology: str) -> str:
    """The one-host slice of a topology's generation (4 chips: v5e:2x2, v4:2x2x1): what one
    host of a multi-host slice holds. The functions that run on one host's chips (scoring,
    encoding) compile on it: libtpu does not compile collectives over a subset of a bigger
    compile-only topology's devices (it aborts on the device ids of the teacher's fsdp
    all-gather), and one host's program is the same either way."""
    from md2pr_jax.aot import parse_topology

    generation, dims = parse_topology(topology)
    return f"{generation}:2x2" + ("x1" if len(dims) == 3 else "")


def compile_function(name: str, config, devices: list) -> dict[str, Any]:
    """Compiles one of FUNCTIONS for `devices` (a topology's compile-only devices) and returns
    its figures (`_figures`)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from md2pr_jax import aot
    from md2pr_jax import sharding as shd
    from md2pr_jax.config import teacher_passage_len
    from md2pr_jax.models import student_from_config, teacher_from_config

    config = config.copy_and_resolve_references()
    config.student.init = config.teacher.init = ""  # shapes only
    hosts = len({d.process_index for d in devices})
    host_topo = host_topology(config.aot.topology)
    local = aot.topology_devices(host_topo) if name in ("encode_query", "encode_passage", "teacher_score") else []
    if local and len({d.process_index for d in local}) != 1:
        raise RuntimeError(f"{host_topo} spans {len({d.process_index for d in local})} hosts; expected one")
    lq, lp, lt = int(config.data.max_query_len), int(config.data.max_passage_len), teacher_passage_len(config)
    t0 = time.perf_counter()
    if name == "train_step":
        report = aot.compile_report(config, config.aot.topology)
        if not report.get("fits", False) and "flops_per_step" not in report:
            raise RuntimeError(f"the train step does not compile for {config.aot.topology}: {report.get('out_of_memory')}")
        return {"flops_per_chip": report["flops_per_chip"], "devices": report["chips"],
                "flops_per_call": report["flops_per_step"], "items_per_call": 1, "item": "step",
                "flops_per_item": report["flops_per_step"], "bytes_per_chip": report["bytes_per_chip"]["total"],
                "compile_s": report["compile_s"], "fits": report["fits"], "source": "aot.compile_report"}
    if name in ("encode_query", "encode_passage"):
        from md2pr_jax.retrieval.encode import local_shardings, tower_fn
        from md2pr_jax.train.state import init_student_boxed

        student = student_from_config(config)
        tower, length = ("query", lq) if name == "encode_query" else ("passage", lp)
        batch = -(-int(config.retrieval.encode_batch_size) // len(local)) * len(local)
        replicated, rows = local_shardings(local)
        params = _abstract(jax.eval_shape(lambda r: nn.unbox(init_student_boxed(student, config, r)),
                                          jax.random.PRNGKey(0)), replicated)
        ids = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=rows)
        compiled = tower_fn(student, tower).lower(params, ids, ids).compile()
        return _figures(compiled, len(local), batch, "text", time.perf_counter() - t0, tokens=length,
                        source=f"encode.tower_fn({tower!r}) on {host_topo} (one host's {len(local)} chips), batch {batch}")
    teacher = teacher_from_config(config)
    if name == "teacher_score":
        from md2pr_jax.teacher import score_fn, scoring_mesh
        from md2pr_jax.train.state import abstract_teacher_params

        mesh = scoring_mesh(config, local)
        shards = shd.batch_shards(mesh)
        per_process = max(1, int(config.teacher_train.score_batch_size) // hosts)  # teacher.process_batch_size
        batch = max(shards, -(-per_process // shards) * shards)  # as PairScorer rounds it
        rows = shd.batch_sharding(mesh)
        x = {"q_ids": ((batch, lq),), "q_mask": ((batch, lq),), "p_ids": ((batch, 1, lt),),
             "p_mask": ((batch, 1, lt),)}
        x = {k: jax.ShapeDtypeStruct(v[0], jnp.int32, sharding=rows) for k, v in x.items()}
        compiled = score_fn(config, teacher, mesh).lower(abstract_teacher_params(config, mesh, teacher), x).compile()
        return _figures(compiled, len(local), batch, "pair", time.perf_counter() - t0, tokens=lq + lt,
                        source=f"teacher.score_fn on {host_topo} (one host's {len(local)} chips, mesh {dict(mesh.shape)}), "
                               f"batch {batch} = score_batch_size / {hosts} processes")
    if name == "teacher_train_step":
        from md2pr_jax.teacher import abstract_teacher_state, make_teacher_train_step

        mesh = shd.make_mesh(config, devices)
        tc = config.teacher_train
        b, c = int(tc.batch_size), 1 + int(tc.num_negatives)
        step, tx, _ = make_teacher_train_step(config, mesh, teacher, total_steps=1000)
        rows = shd.batch_sharding(mesh)
        x = {"q_ids": ((b, lq), jnp.int32), "q_mask": ((b, lq), jnp.int32), "p_ids": ((b, c, lt), jnp.int32),
             "p_mask": ((b, c, lt), jnp.int32), "cand_mask": ((b, c), jnp.float32)}
        x = {k: jax.ShapeDtypeStruct(s, d, sharding=rows) for k, (s, d) in x.items()}
        try:
            compiled = step.lower(abstract_teacher_state(config, mesh, teacher, tx), x, None).compile()
        except jax.errors.JaxRuntimeError as e:
            raise RuntimeError(f"the teacher's fine-tuning step does not compile for {len(devices)} chips: "
                               f"{str(e).strip().splitlines()[0]}") from e
        return _figures(compiled, len(devices), 1, "step", time.perf_counter() - t0, batch=b, candidates=c,
                        source=f"teacher.make_teacher_train_step on mesh {dict(mesh.shape)}, {b} lists x {c}")
    raise ValueError(f"unknown function {name!r}; one of {FUNCTIONS}")


def read_json(path: str, default=None):
    if not path or not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)


def write_json(path: str, obj: Any) -> None:
    """Atomic: a temporary sibling renamed into place."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)


def train_figures_from_aot(path: str, config) -> dict[str, Any]:
    """The train step's figures from a `--mode aot` report (WORKDIR/aot/<topology>.json) of
    the same config and topology, instead of compiling it again."""
    report = read_json(path)
    if report is None:
        raise FileNotFoundError(f"--train-aot {path} does not exist")
    want = {"topology": config.aot.topology, "batch_size": int(config.train.batch_size),
            "candidates": 1 + int(config.data.num_negatives), "dtype": config.model.dtype}
    bad = {k: (report.get(k), v) for k, v in want.items() if report.get(k) != v}
    if bad:
        raise ValueError(f"--train-aot {path} is not this config's report: {bad} (found, expected)")
    return {"flops_per_chip": report["flops_per_chip"], "devices": report["chips"],
            "flops_per_call": report["flops_per_step"], "items_per_call": 1, "item": "step",
            "flops_per_item": report["flops_per_step"], "bytes_per_chip": report["bytes_per_chip"]["total"],
            "compile_s": report["compile_s"], "fits": report["fits"], "source": f"--mode aot report {path}"}


def flops_table(config, topology: str, cache_path: str, train_aot: str = "", compile_missing: bool = True,
                functions: tuple[str, ...] = FUNCTIONS) -> dict:
    """{function: figures} for FUNCTIONS, from `cache_path` where it holds them under this
    config's key, else compiled now (each written to the cache as soon as it is done; only
    those in `functions`)."""
    import jax

    key = config_key(config)
    cache = read_json(cache_path, {}) or {}
    if cache.get("key") != key or cache.get("topology") != topology:
        if cache:
            print(f"flops cache {cache_path} is for another config or topology: compiling again", flush=True)
        cache = {"config": config.name, "topology": topology, "key": key, "jax": jax.__version__,
                 "libtpu": _libtpu_version(), "functions": {}}
    funcs = cache["functions"]
    if train_aot and "train_step" not in funcs:
        funcs["train_step"] = train_figures_from_aot(train_aot, config)
        write_json(cache_path, cache)
    missing = [f for f in FUNCTIONS if f not in funcs and f in functions]
    if missing and not compile_missing:
        raise RuntimeError(f"{cache_path} lacks {missing} and --no-compile was given")
    if missing:
        from md2pr_jax import aot

        jax.config.update("jax_enable_compilation_cache", False)  # compile-only executables cannot be cached
        devices = aot.topology_devices(topology)
        for name in missing:
            print(f"compiling {name} for {topology} ...", flush=True)
            funcs[name] = compile_function(name, config, devices)
            print(f"  {name}: {funcs[name]['flops_per_item']:.4g} FLOPs per {funcs[name]['item']}, "
                  f"{funcs[name]['compile_s']} s", flush=True)
            write_json(cache_path, cache)
    return cache


def _libtpu_version() -> str:
    try:
        from importlib.metadata import version

        return version("libtpu")
    except Exception:  # noqa: BLE001 - only informative
        return "unknown"


# ------------------------------------------------------------------------------ rehearsal
def load_rehearsal(path: str) -> dict[str, Any]:
    """{stages: {name: stage}, cores, stand_in, note, path} of a rehearsal JSON."""
    data = read_json(path)
    if data is None:
        raise FileNotFoundError(f"rehearsal {path} does not exist (benchmarks/scale_rehearsal.py writes it)")
    stages = data.get("stages")
    if isinstance(stages, dict):
        stages = flatten_rehearsal(data)
    if not isinstance(stages, list):
        raise ValueError(f"rehearsal {path}: expected {{'stages': [{{name, items, wall_s, items_per_s, peak_rss_gb}}]}}")
    by_name = {}
    for s in stages:
        if "name" not in s or not (s.get("items_per_s") or (s.get("items") and s.get("wall_s"))):
            raise ValueError(f"rehearsal {path}: stage {s} lacks name and items_per_s (or items and wall_s)")
        by_name[s["name"]] = s
    cores = data.get("cores") or (data.get("machine") or {}).get("cpus") or 2
    return {"stages": by_name, "cores": int(cores), "stand_in": bool(data.get("stand_in", False)),
            "note": data.get("note", ""), "path": path,
            "corpus": data.get("corpus") or data.get("passages") or (data.get("sizes") or {}).get("passages")}


# benchmarks/scale_rehearsal.py's stages and parts -> the host kinds' names (first found wins).
REHEARSAL_PARTS = {"bm25_index": ("baselines", "bm25_index"), "bm25_search": ("baselines", "bm25_search"),
                   "scann_build": ("mine", "ann_index"), "scann_search": ("mine", "dense_search"),
                   "bm25_pair_scores": ("rerank", "bm25_pair_scores")}


def flatten_rehearsal(data: dict) -> list[dict]:
    """The stages of benchmarks/scale_rehearsal.py's JSON ({stage: {items, wall_s, ...,
    parts: {part: {...}}}}) as a list named by host kind: whole stages under their own names,
    the parts named in REHEARSAL_PARTS under the kind's name (a ScaNN build per call, on the
    rehearsal's corpus and embedding width), and `mining` as the mine stage less its parts
    (the bookkeeping: exclusion of positives and the merged top-k)."""
    stages, sizes = data["stages"], data.get("sizes") or {}
    corpus = sizes.get("passages")
    dim = ((data.get("config") or {}).get("student.bert") or {}).get("hidden_size")
    out = [{"name": name, **{k: v for k, v in st.items() if k != "parts"}} for name, st in stages.items()]
    for kind, (stage, part) in REHEARSAL_PARTS.items():
        found = (stages.get(stage, {}).get("parts") or {}).get(part)
        if found:
            row = {"name": kind, **found, "corpus": corpus}
            if kind.startswith("scann"):
                calls = max(int(found.get("calls", 1)), 1)
                row.update(items=found["items"] / calls, wall_s=found["wall_s"] / calls, dim=dim)
                row["items_per_s"] = found["items_per_s"] if kind == "scann_search" else row["items"] / row["wall_s"]
            out.append(row)
    mine = stages.get("mine")
    if mine:
        rest = mine["wall_s"] - sum(p["wall_s"] for p in (mine.get("parts") or {}).values())
        out.append({"name": "mining", "items": mine["items"], "wall_s": max(rest, 1e-3),
                    "items_per_s": mine["items"] / max(rest, 1e-3), "peak_rss_gb": mine.get("peak_rss_gb")})
    return out


def rehearsal_stage(rehearsal: dict, kind: str) -> dict | None:
    """The rehearsal's stage measuring host work `kind`: the one --rehearsal-map names, else
    the first of HOST_KINDS[kind].rehearsal the rehearsal has."""
    for name in (*rehearsal.get("map", {}).get(kind, ()), *HOST_KINDS[kind].rehearsal):
        if name in rehearsal["stages"]:
            return rehearsal["stages"][name]
    return None


def rate(stage: dict) -> float:
    return float(stage.get("items_per_s") or stage["items"] / stage["wall_s"])


# ------------------------------------------------------------------------------ stages
@dataclasses.dataclass
class Pod:
    """The topology and the assumptions every projection uses."""

    topology: str
    generation: str
    chips: int
    hosts: int
    peak_flops: float
    utilisation: float
    host_vcpus: int
    host_ram_gb: float
    parallel_efficiency: float

    @property
    def chips_per_host(self) -> int:
        return self.chips // self.hosts


def compute_stage(name: str, pipeline_stage: str, work: dict, items: float, fn: str, flops: dict,
                  pod: Pod, memory_gb: float | None = None) -> dict[str, Any]:
    """A chip stage: items x FLOPs per item of the compiled `fn` over the whole slice."""
    f = flops[fn]
    total = float(items) * float(f["flops_per_item"])
    seconds = total / (pod.chips * pod.peak_flops * pod.utilisation)
    return {"name": name, "pipeline_stage": pipeline_stage, "where": "chips", "work": work,
            "flops": total, "projected_s": seconds, "host_memory_gb": memory_gb,
            "basis": f"XLA FLOPs of {fn} ({f['flops_per_item']:.3g} per {f['item']}) at {pod.utilisation:g} "
                     f"utilisation of {pod.chips} x {pod.peak_flops / 1e12:g} TFLOP/s"}


def host_stage(name: str, pipeline_stage: str, work: dict, items: float, kind: str, rehearsal: dict, pod: Pod,
               split: bool, corpus: float | None = None, memory_gb: float | None = None,
               dim: int | None = None) -> dict[str, Any]:
    """A host stage: this host's share of `items` (items / hosts where the code splits the work
    across processes, all of them where every host repeats it) at the rehearsal's throughput,
    scaled to the host's vCPUs at the parallel efficiency where the code runs it on many
    threads, and to the corpus (`corpus`: rows this host's index holds) by the kind's
    exponent against the rehearsal's corpus, and (ScaNN) to the embedding dimension `dim`."""
    hk = HOST_KINDS[kind]
    per_host = math.ceil(items / pod.hosts) if split else items
    out = {"name": name, "pipeline_stage": pipeline_stage, "where": "hosts", "kind": kind,
           "work": {**work, "per_host": per_host},
           "host_memory_gb": memory_gb, "split_across_hosts": split, "parallel": hk.parallel}
    measured = rehearsal_stage(rehearsal, kind)
    if measured is None:
        return {**out, "projected_s": None,
                "basis": f"no rehearsal stage {' / '.join(hk.rehearsal)} in {rehearsal['path']}: not projected",
                "note": f"unmeasured: {hk.code}"}
    r = rate(measured)
    speedup = (pod.host_vcpus / rehearsal["cores"]) * pod.parallel_efficiency if hk.parallel else 1.0
    corpus_factor, corpus_text = 1.0, ""
    base = measured.get("corpus")
    if not base and hk.corpus_from:
        base = (rehearsal_stage(rehearsal, hk.corpus_from) or {}).get("items")
    base = base or rehearsal.get("corpus")
    if hk.size_exponent and corpus and base:
        corpus_factor = (float(base) / float(corpus)) ** hk.size_exponent
        corpus_text = f", x{corpus_factor:.3g} for a {corpus:,.0f}-row corpus against its {float(base):,.0f} (^{hk.size_exponent:g})"
    dim_factor = 1.0
    if hk.per_dim and dim and measured.get("dim"):
        dim_factor = float(measured["dim"]) / float(dim)
        corpus_text += f", x{dim_factor:.3g} for {dim}-dim embeddings against its {measured['dim']}"
    pod_rate = r * speedup * corpus_factor * dim_factor
    threads = (f"scaled to {pod.host_vcpus} vCPUs at efficiency {pod.parallel_efficiency:g}" if hk.parallel
               else "one thread in the code: not scaled with cores")
    return {**out, "projected_s": per_host / pod_rate,
            "items_per_s_host": pod_rate,
            "basis": f"rehearsal {measured['name']} at {r:,.4g} items/s on {rehearsal['cores']} cores, {threads}"
                     f"{corpus_text}; {'1/' + str(pod.hosts) + ' of the work per host' if split else 'whole on every host'}"}


def param_count(bert) -> int:
    """Parameters of a BERT encoder of this shape (embeddings, layers, pooler)."""
    h, i, n = int(bert.hidden_size), int(bert.intermediate_size), int(bert.num_layers)
    emb = (int(bert.vocab_size) + int(bert.max_position_embeddings) + int(bert.type_vocab_size)) * h + 2 * h
    layer = 4 * (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
    return emb + n * layer + h * h + h


def memory_components(config, work: dict, pod: Pod, rehearsal: dict, assumptions: dict) -> dict[str, dict]:
    """Host RAM (GB) of the big pieces, per host: {name: {gb, how}}."""
    dim = int(config.student.bert.hidden_size)
    shard = math.ceil(work["passages"] / pod.hosts)
    tokens = assumptions["mean_passage_tokens"]
    comp = {
        "doc_texts": {"gb": work["passages"] * assumptions["bytes_per_passage_text"] / GB,
                      "how": f"{work['passages']:,} passages x {assumptions['bytes_per_passage_text']} B, the flat "
                             "UTF-8 table (memory-mapped), read whole by the BM25 build; every host"},
        "doc_tokens": {"gb": work["passages"] * tokens * 4 / GB,
                       "how": f"{work['passages']:,} x {tokens} tokens (assumed mean) x int32, memory-mapped; every host"},
        "corpus_emb_shard": {"gb": shard * dim * 4 / GB, "how": f"{shard:,} passages (1/{pod.hosts}) x {dim} x float32"},
        "scann_index_shard": {"gb": shard * (dim * 4 + dim // 2 * 0.5 * 2) / GB,
                              "how": f"{shard:,} x ({dim} float32 kept for the reorder + {dim // 2} 4-bit AH codes x 2 "
                                     "for SOAR spilling)"},
        "train_query_emb": {"gb": work["train_queries"] * dim * 4 / GB,
                            "how": f"{work['train_queries']:,} x {dim} x float32, gathered on every host"},
        "mining_lists": {"gb": work["train_queries"] * (work["mine_depth"] + 10) * 12 * (1 + pod.hosts) / GB,
                         "how": "[M, depth + excluded] scores and ids, this host's and the gathered ones"},
        "scores": {"gb": work["score_pairs"] * 20 * 3 / GB,
                   "how": f"{work['score_pairs']:,} pairs x (q, d int64 + logit) x ~3 copies (chunks, split, lists)"},
        "teacher_params": {"gb": param_count(config.teacher.bert) * 4 / GB, "how": "float32 host copy"},
        "student_params": {"gb": param_count(config.student.bert) * 4 / GB, "how": "float32 host copy"},
    }
    bm = rehearsal_stage(rehearsal, "bm25_index") if rehearsal else None
    if bm and bm.get("peak_rss_gb") and bm.get("items"):
        comp["bm25_index"] = {"gb": float(bm["peak_rss_gb"]) * work["passages"] / float(bm["items"]),
                              "how": f"rehearsal {bm['name']} peak RSS {bm['peak_rss_gb']} GB at {bm['items']:,} passages, "
                                     "scaled linearly to the corpus (an upper bound: RSS includes the texts)"}
    else:
        nnz = assumptions["bm25_terms_per_passage"]
        comp["bm25_index"] = {"gb": work["passages"] * nnz * 8 / GB,
                              "how": f"{work['passages']:,} x {nnz} distinct terms (assumed) x (float32 + int32), every host"}
    sb = rehearsal_stage(rehearsal, "scann_build") if rehearsal else None
    if sb and sb.get("peak_rss_gb") and sb.get("items"):
        comp["scann_index_shard"] = {"gb": float(sb["peak_rss_gb"]) * shard / float(sb["items"]),
                                     "how": f"rehearsal {sb['name']} peak RSS {sb['peak_rss_gb']} GB at {sb['items']:,} "
                                            f"rows, scaled to the {shard:,}-row shard"}
    return {k: {"gb": round(v["gb"], 3), "how": v["how"]} for k, v in comp.items()}


def _mem(comp: dict, *names: str) -> float:
    return round(sum(comp[n]["gb"] for n in dict.fromkeys(names)), 2)


def build_stages(config, work: dict, flops: dict, rehearsal: dict, pod: Pod, comp: dict) -> list[dict]:
    """Every piece of `--mode pipeline` in order (rounds/stages.py), chips and hosts."""
    P, Q, D = work["passages"], work["train_queries"], work["dev_queries"]
    shard = math.ceil(P / pod.hosts)
    dim = int(config.student.bert.hidden_size)  # the embeddings ScaNN indexes (no projection head)
    texts = ("doc_texts", "doc_tokens")
    resident: list[str] = []

    def mem(*names: str) -> float:
        return _mem(comp, *resident, *names)

    S: list[dict] = []
    S.append(host_stage("prepare", "prepare", {"passages": P, "queries": Q + D}, P, "prepare", rehearsal, pod,
                        split=False, memory_gb=mem(*texts)))
    # From the baselines on, each process keeps its BM25 index loaded (stages._BM25).
    resident.append("bm25_index")

    # round 0: baselines
    S.append(host_stage("bm25_index", "baselines", {"passages": P}, P, "bm25_index", rehearsal, pod, split=False,
                        memory_gb=mem(*texts, "bm25_index")))
    S.append(host_stage("bm25_search_dev", "baselines", {"queries": D, "depth": work["eval_depth"]}, D,
                        "bm25_search", rehearsal, pod, split=True, corpus=P, memory_gb=mem(*texts, "bm25_index")))
    S.append(host_stage("bm25_search_train", "baselines", {"queries": Q, "depth": work["negative_pool"] + 8}, Q,
                        "bm25_search", rehearsal, pod, split=True, corpus=P, memory_gb=mem(*texts, "bm25_index")))
    enc_mem = mem("doc_tokens", "corpus_emb_shard", "student_params")
    S.append(compute_stage("encode_corpus_r0", "baselines", {"passages": P}, P, "encode_passage", flops, pod, enc_mem))
    S.append(compute_stage("encode_queries_r0", "baselines", {"queries": Q + D}, Q + D, "encode_query", flops, pod,
                           mem("corpus_emb_shard", "train_query_emb")))
    idx_mem = mem("corpus_emb_shard", "scann_index_shard", "train_query_emb")
    for tag, queries, depth in (("eval_r0", D, work["eval_depth"]), ("pool_r0", Q, work["negative_pool"])):
        S.append(host_stage(f"scann_build_{tag}", "baselines", {"passages_per_host": shard, "depth": depth}, shard * pod.hosts,
                            "scann_build", rehearsal, pod, split=True, corpus=shard, memory_gb=idx_mem, dim=dim))
        S.append(host_stage(f"scann_search_{tag}", "baselines", {"queries": queries, "depth": depth}, queries,
                            "scann_search", rehearsal, pod, split=False, corpus=shard, memory_gb=idx_mem, dim=dim))
    S.append(host_stage("mining_pool_r0", "baselines", {"queries": Q, "depth": work["negative_pool"]}, Q, "mining",
                        rehearsal, pod, split=False, memory_gb=mem("train_query_emb", "mining_lists")))
    # round 0: teacher and rerank
    if work["teacher_steps"]:
        S.append(compute_stage("teacher_train", "teacher",
                               {"steps": work["teacher_steps"] * work["teacher_folds"], "lists": work["teacher_lists"],
                                "batch": int(config.teacher_train.batch_size)},
                               work["teacher_steps"] * work["teacher_folds"], "teacher_train_step", flops, pod,
                               mem("doc_tokens", "teacher_params")))
    if work["rerank_pairs"]:
        depth = int(config.teacher_train.rerank_depth)
        S.append(host_stage("bm25_search_rerank", "rerank", {"queries": D, "depth": depth}, D, "bm25_search",
                            rehearsal, pod, split=True, corpus=P, memory_gb=mem(*texts, "bm25_index")))
        S.append(compute_stage("teacher_score_rerank", "rerank", {"pairs": work["rerank_pairs"]}, work["rerank_pairs"],
                               "teacher_score", flops, pod, mem("doc_tokens", "teacher_params")))
        S.append(host_stage("bm25_pair_scores_rerank", "rerank", {"pairs": work["rerank_pairs"]}, work["rerank_pairs"],
                            "bm25_pair_scores", rehearsal, pod, split=False,
                            memory_gb=mem(*texts, "bm25_index")))
    for r in range(1, work["rounds"] + 1):
        rs = f"rounds/r{r:02d}"
        S.append(compute_stage(f"r{r}_encode_queries", f"{rs}/mine", {"queries": Q}, Q, "encode_query", flops, pod,
                               mem("corpus_emb_shard", "train_query_emb")))
        S.append(host_stage(f"r{r}_scann_build", f"{rs}/mine", {"passages_per_host": shard, "depth": work["mine_depth"]},
                            shard * pod.hosts, "scann_build", rehearsal, pod, split=True, corpus=shard, memory_gb=idx_mem, dim=dim))
        S.append(host_stage(f"r{r}_scann_search", f"{rs}/mine", {"queries": Q, "depth": work["mine_depth"]}, Q,
                            "scann_search", rehearsal, pod, split=False, corpus=shard, memory_gb=idx_mem, dim=dim))
        S.append(host_stage(f"r{r}_mining", f"{rs}/mine", {"queries": Q, "depth": work["mine_depth"]}, Q, "mining",
                            rehearsal, pod, split=False, memory_gb=mem("train_query_emb", "mining_lists")))
        S.append(compute_stage(f"r{r}_teacher_score", f"{rs}/score",
                               {"pairs": work["score_pairs"], "queries": Q, "depth": work["mine_depth"]},
                               work["score_pairs"], "teacher_score", flops, pod,
                               mem("doc_tokens", "teacher_params", "scores")))
        S.append(host_stage(f"r{r}_filter", f"{rs}/filter", {"queries": Q, "pairs": work["score_pairs"]}, Q, "filter",
                            rehearsal, pod, split=False, memory_gb=mem("scores", "mining_lists")))
        S.append(compute_stage(f"r{r}_train", f"{rs}/train",
                               {"steps": work["student_steps"], "examples": work["student_examples"],
                                "batch": int(config.train.batch_size)},
                               work["student_steps"], "train_step", flops, pod,
                               mem("doc_tokens", "teacher_params", "student_params")))
        S.append(compute_stage(f"r{r}_encode_corpus", f"{rs}/eval", {"passages": P}, P, "encode_passage", flops, pod,
                               enc_mem))
        S.append(compute_stage(f"r{r}_encode_queries_dev", f"{rs}/eval", {"queries": D}, D, "encode_query", flops, pod,
                               mem("corpus_emb_shard")))
        S.append(host_stage(f"r{r}_scann_build_eval", f"{rs}/eval", {"passages_per_host": shard, "depth": work["eval_depth"]},
                            shard * pod.hosts, "scann_build", rehearsal, pod, split=True, corpus=shard, memory_gb=idx_mem, dim=dim))
        S.append(host_stage(f"r{r}_scann_search_eval", f"{rs}/eval", {"queries": D, "depth": work["eval_depth"]}, D,
                            "scann_search", rehearsal, pod, split=False, corpus=shard, memory_gb=idx_mem, dim=dim))
    return S


# ------------------------------------------------------------------------------ budget
def fix_note(stage: dict, pod: Pod) -> str:
    """Why a stage (or the one dominating a pipeline stage) takes long, and what would fix it."""
    name = stage["name"]
    if stage["where"] == "chips":
        more = f"more chips (time ~ 1/chips: {pod.chips * 2} chips halve it)"
        if "teacher_score" in name:
            return (f"the teacher (a {stage['basis'].split(' (')[0].replace('XLA FLOPs of ', '')}) scores "
                    f"{stage['work'].get('pairs', 0):,} pairs; fix: lower rounds.mine_depth (pairs ~ depth), a smaller "
                    f"teacher or shorter teacher passages, or {more}")
        if "train" in name:
            return f"{stage['work'].get('steps', 0):,} steps of the compiled step; fix: fewer steps (epochs, max_steps) or {more}"
        return f"compute-bound at the assumed utilisation; fix: {more} or a smaller model"
    if stage.get("projected_s") is None:
        return stage.get("note", "unmeasured")
    fixes = []
    kind = HOST_KINDS.get(stage.get("kind", ""))
    if not stage.get("split_across_hosts") and (kind is None or kind.divisible):
        fixes.append(f"split the work across the {pod.hosts} hosts (every host repeats it now)")
    if not stage.get("parallel"):
        fixes.append(f"run it on the host's {pod.host_vcpus} vCPUs (the code uses one thread)")
    if kind and kind.fix:
        fixes.append(kind.fix)
    return f"host-bound ({_measured_by(stage)}); fix: " + "; or ".join(fixes)


def _measured_by(stage: dict) -> str:
    """'rehearsal X at ...' -> 'X at N items/s on 2 cores'."""
    basis = stage.get("basis", "")
    return basis.split(", ")[0].replace("rehearsal ", "") if basis.startswith("rehearsal ") else "host work"


def apply_budget(stages: list[dict], pod: Pod, total_budget_s: float, stage_budget_s: float) -> dict[str, Any]:
    """Marks rows and pipeline stages over `stage_budget_s` (with a note), and returns the
    pipeline-stage summary and the verdict against `total_budget_s`."""
    groups: dict[str, list[dict]] = {}
    for s in stages:
        groups.setdefault(s["pipeline_stage"], []).append(s)
        if s.get("projected_s") is not None and s["projected_s"] > stage_budget_s:
            s["over_budget"] = True
            s["note"] = fix_note(s, pod)
    summary = []
    for name, rows in groups.items():
        known = [r for r in rows if r.get("projected_s") is not None]
        seconds = sum(r["projected_s"] for r in known)
        entry = {"name": name, "projected_s": seconds, "rows": [r["name"] for r in rows],
                 "unprojected_rows": [r["name"] for r in rows if r.get("projected_s") is None],
                 "host_memory_gb": max((r["host_memory_gb"] or 0) for r in rows)}
        if seconds > stage_budget_s:
            top = max(known, key=lambda r: r["projected_s"])
            entry["over_budget"] = True
            entry["note"] = (f"{seconds / 3600:.2f} h > {stage_budget_s / 3600:g} h; {top['name']} takes "
                             f"{top['projected_s'] / 3600:.2f} h: {fix_note(top, pod)}")
        summary.append(entry)
    total = sum(s["projected_s"] for s in stages if s.get("projected_s") is not None)
    unprojected = [s["name"] for s in stages if s.get("projected_s") is None]
    by_where = {w: sum(s["projected_s"] for s in stages if s["where"] == w and s.get("projected_s") is not None)
                for w in ("chips", "hosts")}
    return {"pipeline_stages": summary, "total_projected_s": total,
            "budget": {"total_s": total_budget_s, "stage_s": stage_budget_s, "total_ok": total <= total_budget_s,
                       "chips_s": by_where["chips"], "hosts_s": by_where["hosts"],
                       "stages_over": [e["name"] for e in summary if e.get("over_budget")],
                       "rows_over": [s["name"] for s in stages if s.get("over_budget")],
                       "unprojected_rows": unprojected,
                       "verdict": ("within budget" if total <= total_budget_s and not any(e.get("over_budget") for e in summary)
                                   else "over budget") + (" (some rows unprojected: lower bound)" if unprojected else "")}}


def make_pod(topology: str, chips: int, hosts: int, utilisation: float, parallel_efficiency: float,
             host_vcpus: int = 0, host_ram_gb: float = 0) -> Pod:
    from md2pr_jax.aot import parse_topology

    generation, _ = parse_topology(topology)
    g = GENERATIONS[generation]
    if not 0 < utilisation <= 1:
        raise ValueError(f"--utilisation must be in (0, 1], got {utilisation}")
    if not 0 < parallel_efficiency <= 1:
        raise ValueError(f"--parallel-efficiency must be in (0, 1], got {parallel_efficiency}")
    return Pod(topology, generation, chips, hosts, g["peak_flops"], utilisation, host_vcpus or g["host_vcpus"],
               host_ram_gb or g["host_ram_gb"], parallel_efficiency)


def flops_checks(config, flops: dict) -> dict[str, Any]:
    """Cross-checks of XLA's counts against each other: the teacher's fine-tuning step per pair
    over its scoring forward per pair (forward + backward is ~3x the forward by hand; more with
    remat recomputation), and the student's step against a hand count from the compiled parts
    (student forward x 3 over its passages and queries, plus the online teacher forward over the
    word level's candidates). Ratios below the hand count mean XLA's cost analysis counts less
    than the hand rule, so the compute stages may be optimistic by about that much."""
    from md2pr_jax.train.step import word_candidates

    out: dict[str, Any] = {}
    f = {k: v["flops_per_item"] for k, v in flops.items()}
    tc = config.teacher_train
    if {"teacher_train_step", "teacher_score"} <= set(f):
        pairs = int(tc.batch_size) * (1 + int(tc.num_negatives))
        out["teacher_train_step_over_forward"] = round(f["teacher_train_step"] / (pairs * f["teacher_score"]), 3)
    if {"train_step", "encode_passage", "encode_query", "teacher_score"} <= set(f):
        b, c = int(config.train.batch_size), 1 + int(config.data.num_negatives)
        online = config.loss.teacher_mode == "online" and config.loss.use_word
        hand = 3 * (b * c * f["encode_passage"] + b * f["encode_query"])
        hand += b * word_candidates(config, c) * f["teacher_score"] if online else 0.0
        out["train_step_hand_count"] = hand
        out["train_step_over_hand_count"] = round(f["train_step"] / hand, 3)
    out["reading"] = ("forward + backward is ~3x the forward by hand (4x with remat recomputing it); ratios below "
                      "that mean XLA's cost analysis counts fewer FLOPs than the hand rule, and the compute stages "
                      "are optimistic by up to that factor")
    return out


def plan(config, pod: Pod, flops_cache: dict, rehearsal: dict, sizes: dict, total_budget_s: float = 4 * 3600,
         stage_budget_s: float = 3600, assumptions: dict | None = None) -> dict[str, Any]:
    """The whole plan (module doc) from its inputs; no compiling, no I/O."""
    asm = {"mean_passage_tokens": 80, "bytes_per_passage_text": 340, "bm25_terms_per_passage": 35, **(assumptions or {})}
    work = pipeline_work(config, sizes)
    flops = flops_cache["functions"]
    comp = memory_components(config, work, pod, rehearsal, asm)
    stages = build_stages(config, work, flops, rehearsal, pod, comp)
    result = apply_budget(stages, pod, total_budget_s, stage_budget_s)
    peak = max((s["host_memory_gb"] or 0) for s in stages)
    g = GENERATIONS[pod.generation]
    return {
        "config": config.name,
        "topology": pod.topology,
        "chips": pod.chips,
        "hosts": pod.hosts,
        "assumptions": {
            "utilisation": pod.utilisation,
            "peak_flops_per_chip": pod.peak_flops,
            "peak_source": g["source"],
            "host": {"type": g["host"], "vcpus": pod.host_vcpus, "ram_gb": pod.host_ram_gb, "source": g["source"]},
            "parallel_efficiency": pod.parallel_efficiency,
            "parallel_scaling": "items/s x (host vCPUs / rehearsal cores) x efficiency for work the code runs on many "
                                "threads; one-thread work keeps the rehearsal's rate (same per-core speed assumed)",
            "rehearsal": {"path": rehearsal["path"], "cores": rehearsal["cores"], "stand_in": rehearsal["stand_in"],
                          "remeasured": rehearsal.get("remeasured", []),
                          "note": rehearsal["note"] or ("" if not rehearsal["stand_in"] else "STAND-IN figures"),
                          "stages": list(rehearsal["stages"].values())},
            "sizes": sizes,
            "work": work,
            "host_kinds": {k: {"rehearsal_stage": list(v.rehearsal), "parallel": v.parallel, "code": v.code,
                               "size_exponent": v.size_exponent} for k, v in HOST_KINDS.items()},
            "passage_encoding": "at the full passage length (an upper bound: encode.py pads each batch only to "
                                "its length bucket)",
            "not_counted": "compiles (the persistent cache holds them after the first run), checkpoint and "
                           "chunk writes, gathers between hosts, the train step's input pipeline (assumed "
                           "overlapped), trec_eval metrics, the hybrid BM25 labels (teacher.bm25_weight = "
                           f"{float(config.teacher.bm25_weight):g}, from dev: {bool(config.teacher.bm25_weight_from_dev)})",
            "memory": asm,
        },
        "flops": {k: {kk: v[kk] for kk in ("flops_per_item", "item", "items_per_call", "devices", "bytes_per_chip",
                                           "compile_s", "source") if kk in v} for k, v in flops.items()},
        "flops_checks": flops_checks(config, flops),
        "stages": stages,
        "pipeline_stages": result["pipeline_stages"],
        "memory": {"components_per_host_gb": comp, "peak_per_host_gb": peak, "total_gb": round(peak * pod.hosts, 2),
                   "host_ram_gb": pod.host_ram_gb, "fits": peak <= pod.host_ram_gb},
        "total_projected_s": result["total_projected_s"],
        "budget": result["budget"],
    }


def _hms(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def format_table(result: dict) -> str:
    """The plan as a text table: every row, then the pipeline stages and the verdict."""
    lines = [f"{result['config']} on {result['topology']}: {result['chips']} chips, {result['hosts']} hosts; "
             f"utilisation {result['assumptions']['utilisation']:g}, host {result['assumptions']['host']['vcpus']} "
             f"vCPUs at parallel efficiency {result['assumptions']['parallel_efficiency']:g}"
             + ("; REHEARSAL IS A STAND-IN" if result["assumptions"]["rehearsal"]["stand_in"] else ""),
             f"{'stage':<26} {'pipeline stage':<18} {'where':<6} {'work':<44} {'time':>9} {'RAM/host':>9}  flag"]
    for s in result["stages"]:
        work = ", ".join(f"{k} {v:,}" for k, v in s["work"].items() if isinstance(v, int) and k != "depth")[:44]
        mem = f"{s['host_memory_gb']:.1f} GB" if s.get("host_memory_gb") is not None else "-"
        flag = "OVER" if s.get("over_budget") else ("?" if s.get("projected_s") is None else "")
        lines.append(f"{s['name']:<26} {s['pipeline_stage']:<18} {s['where']:<6} {work:<44} {_hms(s.get('projected_s')):>9} "
                     f"{mem:>9}  {flag}")
    lines.append("")
    lines.append(f"{'pipeline stage':<20} {'time':>9}  flag")
    for e in result["pipeline_stages"]:
        lines.append(f"{e['name']:<20} {_hms(e['projected_s']):>9}  {'OVER: ' + e['note'] if e.get('over_budget') else ''}"
                     + (f" (unprojected: {', '.join(e['unprojected_rows'])})" if e["unprojected_rows"] else ""))
    b = result["budget"]
    lines.append(f"chips {_hms(b['chips_s'])} (XLA FLOPs), hosts {_hms(b['hosts_s'])} (rehearsal"
                 + (", STAND-IN" if result["assumptions"]["rehearsal"]["stand_in"] else "") + ")")
    lines.append(f"total {_hms(result['total_projected_s'])} (budget {_hms(b['total_s'])}, no stage over "
                 f"{_hms(b['stage_s'])}): {b['verdict']}; peak host RAM {result['memory']['peak_per_host_gb']:.1f} GB "
                 f"of {result['memory']['host_ram_gb']:g} per host, {result['memory']['total_gb']:.1f} GB over all hosts")
    return "\n".join(lines)


def topology_shape(topology: str, flops_cache: dict) -> tuple[int, int]:
    """(chips, hosts) of a topology: from the compiled train step's device count and the
    compile-only devices' process indices where compiled here, else from the name (4 chips
    per host on every generation's multi-host slices)."""
    from md2pr_jax.aot import parse_topology

    _, dims = parse_topology(topology)
    chips = math.prod(dims)
    hosts = flops_cache.get("hosts") or max(1, chips // 4)
    return chips, int(hosts)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", default="configs/msmarco_bert_base.py")
    ap.add_argument("--topology", default="", help="e.g. v5e:4x4 (default: the config's aot.topology)")
    ap.add_argument("--rehearsal", default=os.path.join(ROOT, "benchmarks", "results", "scale_rehearsal.json"))
    ap.add_argument("--remeasured", action="append", default=[],
                    help="a JSON with stages [{name, items, wall_s, items_per_s, ...}] measured again on newer "
                         "code (e.g. benchmarks/prepare_at_scale.py's): its stages replace the rehearsal's of the "
                         "same name (repeatable)")
    ap.add_argument("--utilisation", type=float, default=0.4, help="share of peak FLOP/s the chips reach")
    ap.add_argument("--parallel-efficiency", type=float, default=0.5,
                    help="share of the ideal speedup from the rehearsal's cores to the host's vCPUs")
    ap.add_argument("--host-vcpus", type=int, default=0, help="override the generation's host vCPUs")
    ap.add_argument("--host-ram-gb", type=float, default=0)
    ap.add_argument("--flops-cache", default="", help="default: beside --out, pod_plan_flops_<config>_<topology>.json")
    ap.add_argument("--train-aot", default="", help="take the train step's FLOPs from this --mode aot report")
    ap.add_argument("--no-compile", action="store_true", help="fail instead of compiling what the cache lacks")
    ap.add_argument("--functions", default=",".join(FUNCTIONS), help="compile only these (comma list)")
    ap.add_argument("--compile-only", action="store_true", help="fill the FLOPs cache and stop (no plan)")
    ap.add_argument("--rehearsal-map", default="",
                    help="host kind=rehearsal stage name, comma list (e.g. mining=mine_bookkeeping); kinds: "
                         + ", ".join(HOST_KINDS))
    ap.add_argument("--sizes", default="", help="dataset counts, e.g. passages=21015324,train_queries=58880,...")
    ap.add_argument("--total-budget-h", type=float, default=4.0)
    ap.add_argument("--stage-budget-h", type=float, default=1.0)
    ap.add_argument("--out", default="")
    args = ap.parse_args(argv)

    from md2pr_jax.config import load_config

    config = load_config(args.config if os.path.isabs(args.config) else os.path.join(ROOT, args.config))
    topology = args.topology or config.aot.topology
    if not topology:
        raise SystemExit("--topology is needed (the config has no aot.topology)")
    config.aot.topology = topology
    name = os.path.splitext(os.path.basename(args.config))[0]
    tag = f"{name}_{topology.replace(':', '_')}"
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"pod_plan_{tag}.json")
    cache_path = args.flops_cache or os.path.join(os.path.dirname(out), f"pod_plan_flops_{tag}.json")
    sizes = {k: int(v) for k, v in (kv.split("=") for kv in args.sizes.split(",") if kv)}
    functions = tuple(f for f in args.functions.split(",") if f)
    unknown = sorted(set(functions) - set(FUNCTIONS))
    if unknown:
        raise SystemExit(f"--functions: unknown {unknown}; known: {', '.join(FUNCTIONS)}")
    rehearsal = None if args.compile_only else load_rehearsal(args.rehearsal)
    for path in args.remeasured if rehearsal is not None else ():
        again = load_rehearsal(path)
        rehearsal["stages"].update({name: {**st, "source": path} for name, st in again["stages"].items()})
        rehearsal["remeasured"] = rehearsal.get("remeasured", []) + [{"path": path, "stages": sorted(again["stages"])}]
    for kv in filter(None, args.rehearsal_map.split(",")):
        kind, _, stage = kv.partition("=")
        if kind not in HOST_KINDS or not stage:
            raise SystemExit(f"--rehearsal-map {kv!r}: expected KIND=STAGE with KIND one of {', '.join(HOST_KINDS)}")
        if rehearsal is not None:
            rehearsal.setdefault("map", {})[kind] = (stage,)
    cache = flops_table(config, topology, cache_path, args.train_aot, not args.no_compile, functions)
    if "hosts" not in cache:  # the compile-only topology's process count
        try:
            from md2pr_jax import aot

            cache["hosts"] = len({d.process_index for d in aot.topology_devices(topology)})
            write_json(cache_path, cache)
        except RuntimeError:  # no libtpu: keep the 4-chips-per-host rule
            pass
    if args.compile_only:
        print(json.dumps({k: v["flops_per_item"] for k, v in cache["functions"].items()}))
        return cache
    lacking = [f for f in FUNCTIONS if f not in cache["functions"]]
    if lacking:
        raise SystemExit(f"{cache_path} lacks {lacking}: compile them (--functions) or pass --train-aot")
    chips, hosts = topology_shape(topology, cache)
    pod = make_pod(topology, chips, hosts, args.utilisation, args.parallel_efficiency, args.host_vcpus, args.host_ram_gb)
    result = plan(config, pod, cache, rehearsal, dataset_sizes(config, sizes), args.total_budget_h * 3600,
                  args.stage_budget_h * 3600)
    result["flops_cache"] = os.path.relpath(cache_path, ROOT)
    write_json(out, result)
    print(format_table(result))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
