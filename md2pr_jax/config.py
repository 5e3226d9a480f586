"""Configuration schema, defaults and validation.

Every experiment is a Python file in `configs/` whose `get_config()` starts from
`base_config()` and overrides what it needs. `validate()` turns bad values into one clear
error naming the key; `load_config()` is what the entry point and the tests use.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Any, Sequence

import ml_collections

ConfigDict = ml_collections.ConfigDict

MINILM_ID = "sentence-transformers/all-MiniLM-L6-v2"
# Kinds of pseudo-query (data/pseudo.py cuts them). Held here, not there, so that this module
# imports nothing of the project: data/pseudo -> data/prepare -> config must not close a cycle.
PSEUDO_KINDS = ("sentence", "first", "title", "ict")


def bert_shape(
    *,
    vocab_size: int = 30522,
    hidden_size: int = 384,
    num_layers: int = 6,
    num_heads: int = 12,
    intermediate_size: int = 1536,
    max_position_embeddings: int = 512,
    type_vocab_size: int = 2,
) -> ConfigDict:
    """The shape of a BERT encoder (defaults: all-MiniLM-L6-v2)."""
    return ConfigDict(
        dict(
            vocab_size=vocab_size,
            hidden_size=hidden_size,
            num_layers=num_layers,
            num_heads=num_heads,
            intermediate_size=intermediate_size,
            max_position_embeddings=max_position_embeddings,
            type_vocab_size=type_vocab_size,
            layer_norm_eps=1e-12,
            hidden_act="gelu",
        )
    )


def base_config() -> ConfigDict:
    """All keys with their defaults. Configs override values; they never add keys."""
    c = ConfigDict()
    c.seed = 0
    c.name = "md2pr"

    # --- models -------------------------------------------------------------------------
    # `init`: a Hugging Face folder or hub id ('' = random init). When set, its config.json
    # must match `bert` (a mismatch is an error naming both values).
    c.student = ConfigDict()
    c.student.init = ""
    c.student.tokenizer = ""  # '' = same as init
    c.student.bert = bert_shape()
    c.student.pooling = "mean"  # 'mean' | 'cls'
    c.student.normalize = True  # L2-normalise embeddings
    c.student.shared_towers = True  # one encoder for queries and passages
    c.student.similarity_scale = 20.0  # scores = scale * q.p (1/temperature when normalised)
    # True: `init` may hold more layers than bert.num_layers; its embeddings and first
    # num_layers layers are kept (all-MiniLM-L6-v2 cut to 3 layers). False: the counts must match.
    c.student.truncate_init = False

    c.teacher = ConfigDict()
    c.teacher.init = ""
    c.teacher.bert = bert_shape()
    # 'cls': pooler + classifier on [CLS] (HF BertForSequenceClassification, exportable as a
    # sentence-transformers CrossEncoder). 'segment_cosine': scale * cos(mean query tokens,
    # mean passage tokens) + bias over the joint encoding; from a mean-pooling sentence encoder
    # it starts as a working ranker (see models/cross_encoder.py).
    c.teacher.head = "cls"
    c.teacher.head_scale = 20.0
    c.teacher.head_bias = -10.0
    c.teacher.truncate_init = False  # as student.truncate_init
    # Passage tokens the teacher reads (0 = data.max_passage_len). Longer than the student's: the
    # student's passage is the first tokens of the teacher's, and the word level reads the
    # teacher's attention over the student's window only, renormalised over it (losses.word_kl).
    c.teacher.max_passage_len = 0
    # Hybrid teacher for the sentence level: the soft labels are the cross-encoder's logit plus
    # bm25_weight * BM25(q, d) / max BM25(q, .). The filter still reads the cross-encoder's
    # probability and the word level its attention. 0 = the cross-encoder alone. The rerank
    # stage reports a sweep of this weight on every report split: choose it on dev.
    c.teacher.bm25_weight = 0.0
    # True: the weight is the rerank stage's best on dev (its HYBRID_SWEEP), not bm25_weight.
    c.teacher.bm25_weight_from_dev = False

    c.model = ConfigDict()
    c.model.dtype = "float32"  # compute dtype; 'bfloat16' on TPU
    c.model.param_dtype = "float32"
    c.model.remat = False  # rematerialise each layer in the backward pass
    c.model.attention_dropout = 0.0
    c.model.hidden_dropout = 0.0

    # --- data ---------------------------------------------------------------------------
    c.data = ConfigDict()
    data_dir = os.environ.get("MD2PR_DATA_DIR", "")
    # holds <dataset>/ in BEIR layout: a local folder (made absolute) or a bucket folder (gs://...)
    c.data.dir = data_dir if "://" in data_dir or not data_dir else os.path.abspath(data_dir)
    c.data.dataset = "scifact"
    c.data.builder = "beir"  # 'beir' | 'msmarco_passage' | 'nq_dpr'
    c.data.cache_dir = ""  # '' = WORKDIR/data
    c.data.train_split = "train"
    c.data.eval_split = "test"
    c.data.dev_fraction = 0.0  # share of train queries held out as a dev split
    c.data.max_query_len = 32
    c.data.max_passage_len = 128  # the student's; teacher.max_passage_len may be longer
    c.data.bad_records = "error"  # 'error' | 'skip'
    c.data.max_docs = 0  # >0: keep a subset of the corpus (debug); judged docs always kept
    c.data.max_train_queries = 0
    c.data.max_eval_queries = 0
    c.data.num_negatives = 7  # hard negatives per query in a training list
    # >0: each training query keeps at most this many of its positives for its lists (one list
    # per positive; the highest graded first, ties drawn by config.seed). NFCorpus has ~43 per
    # query. Every labelled positive still leaves the mined negatives. 0 = all.
    c.data.positives_per_query = 0
    c.data.num_workers = 0
    # Threads tokenizing the corpus and queries when the dataset is prepared (0: the cores this
    # process may use; 1: in the calling thread). The prepared files are the same for any value.
    c.data.tokenize_threads = 0
    # >0: this many pseudo-queries cut from the corpus (data/pseudo.py), mined and scored by
    # the teacher in every round beside the training queries; train.pseudo trains on them.
    c.data.pseudo_queries = 0
    # 'sentence' (a seeded sentence of the passage) | 'first' | 'title' (the title as query, the
    # body as its positive) | 'ict' (a seeded sentence, the passage without it as its positive)
    c.data.pseudo_kind = "sentence"

    # --- losses -------------------------------------------------------------------------
    c.loss = ConfigDict()
    c.loss.use_ce = True
    c.loss.use_sent = True
    c.loss.use_word = True
    c.loss.use_margin_mse = False
    c.loss.alpha = 1.0  # weight of L_sent
    c.loss.beta = 0.1  # weight of L_word
    c.loss.gamma = 1.0  # weight of margin-MSE
    c.loss.kd_temperature = 1.0  # T
    # T_w: the student's token logits in L_word are h_q.h_p / (sqrt(d) T_w); 1 = DESIGN.md's A_s.
    c.loss.word_temperature = 1.0
    c.loss.word_topk = 1  # top-k negatives (by teacher score) in L_word, plus the positive
    c.loss.layer_pairs = ((-1, -1),)  # (student layer, teacher layer); negative = from the end
    c.loss.teacher_mode = "cached"  # 'cached' | 'online'

    # --- training -----------------------------------------------------------------------
    c.train = ConfigDict()
    c.train.batch_size = 16  # global number of queries per step
    c.train.seed = 0  # the student's own randomness (negative sampling, batch order, init rng), beside config.seed
    c.train.lr = 2e-5
    c.train.weight_decay = 0.01
    c.train.warmup_steps = 50
    c.train.grad_clip = 1.0
    c.train.grad_accum = 1
    c.train.epochs = 1  # per student round
    c.train.max_steps = 0  # >0 caps the steps of a round
    c.train.checkpoint_every = 25  # steps; also at a round's last step (a stopped row resumes from here)
    c.train.keep_checkpoints = 2
    c.train.log_every = 10
    c.train.pseudo = False  # train on the pseudo-queries' lists too (needs data.pseudo_queries > 0)

    # --- teacher (round 0) --------------------------------------------------------------
    c.teacher_train = ConfigDict()
    c.teacher_train.batch_size = 16  # queries per step, each with its list
    c.teacher_train.num_negatives = 7
    c.teacher_train.lr = 3e-5
    c.teacher_train.epochs = 2
    c.teacher_train.max_steps = 0
    c.teacher_train.warmup_steps = 50
    c.teacher_train.weight_decay = 0.01
    c.teacher_train.grad_clip = 1.0
    c.teacher_train.grad_accum = 1  # micro-batches per step, as train.grad_accum
    c.teacher_train.negative_pool = 30  # negatives sampled from BM25 and zero-shot dense top-N
    # Pairs per scoring step over all chips of all processes (each process scores its
    # 1/process_count share per jitted call, split over its local chips).
    c.teacher_train.score_batch_size = 64
    # Pairs per chunk of a scoring pass, each written as soon as it is scored: a killed pass
    # resumes from the last chunk written (rounded up to a multiple of the per-process batch).
    # 8,192 pairs are 5-14 min of a 2-core CPU (10-25 pairs/s), what a kill can lose; the pod
    # configs set their own. Chunks change no score: a bookkeeping key (ablation.BOOKKEEPING_KEYS).
    c.teacher_train.score_chunk_size = 8192
    c.teacher_train.checkpoint_every = 20
    c.teacher_train.pointwise_weight = 1.0  # BCE beside the listwise CE
    c.teacher_train.rerank_depth = 100  # 0: no rerank rows
    # >1: cross-fitted teachers, fold k trained without fold k's training queries; each training
    # query's candidates are scored by the teacher that never saw it (test/dev: their mean).
    c.teacher_train.folds = 1

    # --- rounds, mining and the false-negative filter ----------------------------------
    c.rounds = ConfigDict()
    c.rounds.num_rounds = 2
    c.rounds.mine_depth = 50  # top-K candidates mined per training query

    c.filter = ConfigDict()
    c.filter.enabled = True
    c.filter.dynamic = True  # False: the fixed threshold tau0 every round
    c.filter.tau0 = 0.9
    c.filter.momentum = 0.5  # m
    c.filter.quantile = 0.1  # rho
    c.filter.tau_min = 0.5
    c.filter.tau_max = 0.99
    c.filter.promote = False  # candidates above promote_tau join the positives
    c.filter.promote_tau = 0.99
    c.filter.plant_fraction = 0.0  # >0: the planted check hides this share of positives
    # Where tau_hat's positives come from: 'train' (the labelled training positives, which a
    # single teacher trained on) or 'pseudo' (the pseudo-queries' source passages: positives
    # the teacher never trained on; needs data.pseudo_queries > 0).
    c.filter.tau_source = "train"
    # True: flagged candidates leave the contrastive negatives but stay in the distillation
    # lists (sentence and word level) with their teacher scores; False: dropped from every loss.
    c.filter.keep_flagged = False
    # True: the filter flags candidates of the pseudo-queries' lists only (the labelled queries'
    # lists keep every mined negative), to tell whether a filter's gain comes from pseudo-queries
    # whose one positive leaves their other relevant passages among the negatives. Needs
    # train.pseudo; tau is updated as without it.
    c.filter.pseudo_only = False
    # True: a control for the filter. Each list drops as many candidates as the filter flags in
    # it, drawn at random among its candidates: whether a gain comes from which candidates the
    # teacher flags (false negatives) or from how many hard negatives a list keeps.
    c.filter.random_flags = False

    # --- retrieval ----------------------------------------------------------------------
    c.retrieval = ConfigDict()
    c.retrieval.encode_batch_size = 64
    c.retrieval.eval_depth = 1000
    c.retrieval.bm25_threads = 0  # BM25 search threads per process; 0 = the cores this process may use
    c.retrieval.brute_force_below = 20000  # corpora smaller than this use exact search
    c.retrieval.scann_leaves = 0  # 0 = about sqrt(N)
    c.retrieval.scann_leaves_to_search = 0  # 0 = max(leaves // 10 + 1, leaves holding 20 x depth points)
    c.retrieval.scann_reorder = 0  # 0 = 10 x depth

    # --- scale --------------------------------------------------------------------------
    c.mesh = ConfigDict()
    c.mesh.data = -1  # -1 fills the axis with the devices left
    c.mesh.fsdp = 1
    c.mesh.tensor = 1
    c.aot = ConfigDict()
    c.aot.topology = ""  # e.g. 'v5e:2x2'
    return c


def bert_base_pod_config() -> ConfigDict:
    """What the TPU-pod configs share: a BERT-base student (CLS pooling) distilled from a
    BERT-large-shaped teacher running online in the step, bf16 compute with remat, global
    batch 512 x 8 passages, params sharded over an fsdp axis. Each pod config sets its data,
    schedule and topology on top."""
    c = base_config()
    c.student.init = "bert-base-uncased"
    c.student.bert = bert_shape(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072)
    c.student.pooling = "cls"
    c.student.normalize = True
    c.student.similarity_scale = 20.0
    c.teacher.init = "bert-large-uncased"
    c.teacher.bert = bert_shape(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096)
    c.model.dtype = "bfloat16"
    c.model.param_dtype = "float32"
    c.model.remat = True
    c.data.train_split = "train"
    c.data.max_query_len = 32
    c.data.num_negatives = 7
    c.loss.teacher_mode = "online"  # a pod runs the frozen teacher inside the step
    c.loss.layer_pairs = ((6, 12), (-1, -1))
    c.loss.word_topk = 1
    c.train.batch_size = 512  # queries per step (x 8 passages each)
    c.train.lr = 3e-5
    c.teacher_train.batch_size = 128
    c.teacher_train.num_negatives = 7
    c.teacher_train.lr = 1e-5
    c.rounds.num_rounds = 2
    c.rounds.mine_depth = 50  # tens per query, as RocketQA/RocketQAv2/AR2; each config states its cost
    # The scoring pass on a 16-chip slice: 256 pairs per chip per call; a chunk (a resume
    # point) every 262,144 pairs per process, about 1.5 min of a v5e host at 40% utilisation.
    c.teacher_train.score_batch_size = 4096
    c.teacher_train.score_chunk_size = 262144
    c.retrieval.encode_batch_size = 2048
    c.mesh.data = 1
    c.mesh.fsdp = -1
    c.mesh.tensor = 1
    return c


def _diff_keys(base: ConfigDict, cfg: ConfigDict, prefix: str = "") -> list[str]:
    unknown = []
    for key, value in cfg.items():
        path = f"{prefix}{key}"
        if key not in base:
            unknown.append(path)
        elif isinstance(value, ConfigDict) and isinstance(base[key], ConfigDict):
            unknown += _diff_keys(base[key], value, path + ".")
    return unknown


class ConfigError(ValueError):
    """A configuration value that cannot work, with the key that holds it."""


def validate(cfg: ConfigDict, num_devices: int | None = None) -> ConfigDict:
    """Checks a config and returns it; raises ConfigError naming the bad key."""
    unknown = _diff_keys(base_config(), cfg)
    if unknown:
        raise ConfigError(
            f"unknown config key(s): {', '.join(unknown)}; the known keys are in "
            "md2pr_jax/config.py:base_config()"
        )

    def positive(key: str, value: Any):
        if not value > 0:
            raise ConfigError(f"config.{key} must be positive, got {value!r}")

    positive("train.lr", cfg.train.lr)
    positive("train.batch_size", cfg.train.batch_size)
    positive("train.grad_accum", cfg.train.grad_accum)
    positive("teacher_train.lr", cfg.teacher_train.lr)
    positive("teacher_train.grad_accum", cfg.teacher_train.grad_accum)
    positive("teacher_train.batch_size", cfg.teacher_train.batch_size)
    positive("loss.kd_temperature", cfg.loss.kd_temperature)
    positive("loss.word_temperature", cfg.loss.word_temperature)
    positive("data.max_query_len", cfg.data.max_query_len)
    positive("data.max_passage_len", cfg.data.max_passage_len)
    positive("retrieval.encode_batch_size", cfg.retrieval.encode_batch_size)
    positive("teacher_train.folds", cfg.teacher_train.folds)
    positive("teacher_train.score_batch_size", cfg.teacher_train.score_batch_size)
    positive("teacher_train.score_chunk_size", cfg.teacher_train.score_chunk_size)
    if not isinstance(cfg.data.tokenize_threads, int) or cfg.data.tokenize_threads < 0:
        raise ConfigError(f"config.data.tokenize_threads must be an integer >= 0 (0: the cores this process may use), "
                          f"got {cfg.data.tokenize_threads!r}")
    if cfg.retrieval.bm25_threads < 0:
        raise ConfigError("config.retrieval.bm25_threads must be >= 0 (0: the cores this process may use)")
    if cfg.data.pseudo_queries < 0:
        raise ConfigError(f"config.data.pseudo_queries must be >= 0, got {cfg.data.pseudo_queries}")
    if cfg.data.pseudo_kind not in PSEUDO_KINDS:
        raise ConfigError(f"config.data.pseudo_kind={cfg.data.pseudo_kind!r} is not one of {PSEUDO_KINDS}")
    if cfg.filter.tau_source not in ("train", "pseudo"):
        raise ConfigError(f"config.filter.tau_source={cfg.filter.tau_source!r} is not 'train' or 'pseudo'")
    for key, on in (("train.pseudo", cfg.train.pseudo), ("filter.tau_source='pseudo'", cfg.filter.tau_source == "pseudo")):
        if on and cfg.data.pseudo_queries <= 0:
            raise ConfigError(f"config.{key} needs pseudo-queries: set config.data.pseudo_queries > 0")
    if cfg.filter.random_flags and (cfg.filter.promote or not cfg.filter.enabled):
        raise ConfigError("config.filter.random_flags=True draws the flags of an enabled filter at random: it needs "
                          "config.filter.enabled=True and config.filter.promote=False (a random flag is no positive)")
    if cfg.filter.pseudo_only and not (cfg.train.pseudo and cfg.filter.enabled):
        raise ConfigError("config.filter.pseudo_only=True filters the pseudo-queries' lists: it needs "
                          "config.train.pseudo=True (and data.pseudo_queries > 0) and config.filter.enabled=True")
    if cfg.teacher_train.folds > 1 and cfg.loss.teacher_mode == "online":
        raise ConfigError("config.teacher_train.folds > 1 needs loss.teacher_mode='cached': an online teacher "
                          "in the step is one model, cross-fitted teachers are one per fold")
    if cfg.data.positives_per_query < 0 or cfg.teacher.max_passage_len < 0:
        raise ConfigError("config.data.positives_per_query and teacher.max_passage_len must be >= 0 (0 = off)")
    hybrid = cfg.teacher.bm25_weight > 0 or cfg.teacher.bm25_weight_from_dev
    if cfg.teacher.bm25_weight_from_dev and cfg.teacher_train.rerank_depth <= 0:
        raise ConfigError("config.teacher.bm25_weight_from_dev needs the rerank stage's sweep: set "
                          "teacher_train.rerank_depth > 0 (and have a dev split)")
    if hybrid and cfg.loss.teacher_mode == "online":
        raise ConfigError("config.teacher.bm25_weight > 0 needs loss.teacher_mode='cached' (bm25_weight_from_dev "
                          "too): the hybrid soft labels "
                          "are computed in the filter stage, an online teacher scores inside the step")
    if cfg.teacher.bm25_weight < 0 or cfg.teacher_train.rerank_depth < 0:
        raise ConfigError("config.teacher.bm25_weight and teacher_train.rerank_depth must be >= 0")
    if cfg.train.batch_size % cfg.train.grad_accum:
        raise ConfigError(
            f"config.train.batch_size={cfg.train.batch_size} is not divisible by "
            f"config.train.grad_accum={cfg.train.grad_accum}"
        )
    if cfg.teacher_train.batch_size % cfg.teacher_train.grad_accum:
        raise ConfigError(
            f"config.teacher_train.batch_size={cfg.teacher_train.batch_size} is not divisible by "
            f"config.teacher_train.grad_accum={cfg.teacher_train.grad_accum}"
        )
    choices = {
        "student.pooling": ("mean", "cls"),
        "loss.teacher_mode": ("cached", "online"),
        "teacher.head": ("cls", "segment_cosine"),
        "data.bad_records": ("error", "skip"),
        "data.builder": ("beir", "msmarco_passage", "nq_dpr"),
        "model.dtype": ("float32", "bfloat16", "float16"),
        "model.param_dtype": ("float32", "bfloat16"),
    }
    for key, allowed in choices.items():
        section, name = key.split(".")
        if cfg[section][name] not in allowed:
            raise ConfigError(f"config.{key}={cfg[section][name]!r}; expected one of {allowed}")
    for tower in ("student", "teacher"):
        b = cfg[tower].bert
        if b.hidden_size % b.num_heads:
            raise ConfigError(
                f"config.{tower}.bert.hidden_size={b.hidden_size} is not divisible by "
                f"num_heads={b.num_heads}"
            )
    if cfg.data.max_query_len + teacher_passage_len(cfg) > cfg.teacher.bert.max_position_embeddings:
        raise ConfigError(
            "config.data.max_query_len + the teacher's passage length (teacher.max_passage_len, else "
            f"data.max_passage_len) exceeds the teacher's max_position_embeddings={cfg.teacher.bert.max_position_embeddings}"
        )
    if 0 < cfg.teacher.max_passage_len < cfg.data.max_passage_len:
        raise ConfigError(f"config.teacher.max_passage_len={cfg.teacher.max_passage_len} is shorter than the student's "
                          f"data.max_passage_len={cfg.data.max_passage_len}: the teacher must see the student's window")
    for pair in cfg.loss.layer_pairs:
        if len(pair) != 2:
            raise ConfigError(f"config.loss.layer_pairs holds {pair!r}; each must be (student, teacher)")
    if not 0.0 <= cfg.filter.quantile <= 1.0:
        raise ConfigError(f"config.filter.quantile must lie in [0, 1], got {cfg.filter.quantile}")
    if not cfg.filter.tau_min <= cfg.filter.tau_max:
        raise ConfigError("config.filter.tau_min must not exceed config.filter.tau_max")
    if num_devices is not None:
        mesh_shape(cfg, num_devices)
    return cfg


def teacher_passage_len(cfg: ConfigDict) -> int:
    """Passage tokens the teacher reads: teacher.max_passage_len, else data.max_passage_len."""
    return int(cfg.teacher.max_passage_len) or int(cfg.data.max_passage_len)


def mesh_shape(cfg: ConfigDict, num_devices: int) -> tuple[int, int, int]:
    """(data, fsdp, tensor) for `num_devices`, filling the one -1 axis; ConfigError if it does not divide."""
    axes = [int(cfg.mesh.data), int(cfg.mesh.fsdp), int(cfg.mesh.tensor)]
    if axes.count(-1) > 1:
        raise ConfigError(f"config.mesh has more than one -1 axis: {axes}")
    fixed = 1
    for a in axes:
        if a == 0 or a < -1:
            raise ConfigError(f"config.mesh axes must be positive or -1, got {axes}")
        if a != -1:
            fixed *= a
    if num_devices % fixed:
        raise ConfigError(
            f"config.mesh (data, fsdp, tensor)={tuple(axes)} does not divide the {num_devices} "
            "devices; choose axes whose product divides the device count"
        )
    if -1 in axes:
        axes[axes.index(-1)] = num_devices // fixed
    elif fixed != num_devices:
        raise ConfigError(
            f"config.mesh (data, fsdp, tensor)={tuple(axes)} uses {fixed} devices but "
            f"{num_devices} are present; set one axis to -1 to fill it"
        )
    return tuple(axes)


def load_config(path: str, overrides: Sequence[str] = ()) -> ConfigDict:
    """Loads `get_config()` from a Python file and applies 'key=value' overrides."""
    if not os.path.exists(path):
        raise ConfigError(f"config file {path} does not exist")
    spec = importlib.util.spec_from_file_location("_md2pr_config", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    cfg = module.get_config()
    for item in overrides:
        key, _, value = item.partition("=")
        _set_by_path(cfg, key, value)
    return validate(cfg)


def _set_by_path(cfg: ConfigDict, key: str, text: str) -> None:
    import ast

    *parents, leaf = key.split(".")
    node = cfg
    for p in parents:
        if p not in node:
            raise ConfigError(f"unknown config key: {key}")
        node = node[p]
    if leaf not in node:
        raise ConfigError(f"unknown config key: {key}")
    old = node[leaf]
    if isinstance(old, str):
        value = text
    else:
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError) as e:
            raise ConfigError(f"cannot parse {key}={text!r}: {e}") from None
        if isinstance(old, float) and isinstance(value, int):
            value = float(value)
    node[leaf] = value
