"""The prepared dataset: ids, texts, judgements and token ids, built once and cached.

`prepare_dataset(config, workdir)` builds (or reuses) the TFDS build of config.data.builder,
applies the config's subsets and dev hold-out, tokenizes every query and document once with
the model's tokenizer, and saves it all beside each other under

    <cache_dir>/prepared/<builder>-<dataset>-<key>/

where <key> hashes everything the content depends on (source build, tokenizer, lengths,
subsets, seed, policy). A second call with the same config loads the arrays memory-mapped.

Tokens are stored unpadded as `[CLS] ... [SEP]`, truncated to max_query_len and to the longer
of the student's and the teacher's passage lengths (data.max_passage_len,
teacher.max_passage_len), in one flat int32 array plus int64 offsets. `doc_tokens` cuts them to
the length asked for (the student's by default) and ends a cut passage with [SEP] again, which
gives the same ids as tokenizing at that length. The teacher input is the concatenation of
these same arrays (the model does it), so the student's passage tokens are the first tokens of
the teacher's and positions align by construction.

Several processes (a pod): every process prepares at once, nobody waits in a queue of hosts.
The TFDS build and the prepared key are deterministic (the key hashes the builder, its version
and the source files' listing, not a path or a time), so processes that each have their own
cache folder (a pod: config.data.cache_dir or, for a bucket workdir, a folder under
~/.cache/md2pr_jax on each host) build identical files side by side. Processes that share one
cache folder (several processes on one machine; a local workdir's WORKDIR/data) take turns
through a file lock in it (<cache_dir>/locks/<builder>.lock, flock): the first builds, the
others wait on the lock, then load its result. A cache folder shared by several hosts needs a
file system whose flock reaches every host (NFS does, gcsfuse does not); should two builds
still meet, the prepared folder's rename keeps the first and drops the second.

Tokenization runs on config.data.tokenize_threads threads (0: the cores this process may use;
1: all in the calling thread), each taking a chunk of _TOKENIZE_CHUNK documents from reading the
serialized records to the token ids; the Rust encoder releases the GIL, and the chunks are
written back in order, so the files are the same whatever the number of threads.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import functools
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import cached_property
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
from absl import logging

from md2pr_jax.config import teacher_passage_len
from md2pr_jax.data import builders

PREPARED_VERSION = 3  # bump when the prepared layout or its content rules change
_TOKENIZE_CHUNK = 2048  # documents (or queries) per unit of work of one thread
T = TypeVar("T")
R = TypeVar("R")


# ----------------------------------------------------------------------------------------
# Flat storage


class FlatWriter:
    """Appends variable-length rows to `<prefix>.bin` (raw `dtype`) as they come, so a corpus
    larger than memory can be written; `close()` saves the row offsets to `<prefix>.offsets.npy`."""

    def __init__(self, prefix: str, dtype):
        self.prefix, self.dtype = prefix, np.dtype(dtype)
        self._file = open(prefix + ".bin", "wb")
        self._lengths: list[np.ndarray] = []

    def add(self, rows: Sequence) -> None:
        """rows: byte strings (uint8 tables) or integer sequences (token tables)."""
        if self.dtype == np.uint8:
            self._file.write(b"".join(rows))
            lengths = [len(r) for r in rows]
        else:
            lengths = [len(r) for r in rows]
            self._file.write(np.fromiter(itertools.chain.from_iterable(rows), self.dtype, count=sum(lengths)).tobytes())
        self._lengths.append(np.asarray(lengths, np.int64))

    def add_flat(self, data: bytes | np.ndarray, lengths: np.ndarray) -> None:
        """Rows already joined: `data` holds them back to back (raw bytes of `dtype`, or an
        array of it), `lengths` their sizes in elements."""
        self._file.write(data if isinstance(data, bytes) else np.ascontiguousarray(data, self.dtype).tobytes())
        self._lengths.append(np.asarray(lengths, np.int64))

    def close(self) -> None:
        self._file.close()
        lengths = np.concatenate(self._lengths) if self._lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, np.int64)
        np.cumsum(lengths, out=offsets[1:])
        np.save(self.prefix + ".offsets.npy", offsets)


def _load_flat(prefix: str, dtype) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.load(prefix + ".offsets.npy")
    data = np.memmap(prefix + ".bin", dtype=dtype, mode="r") if offsets[-1] else np.zeros(0, dtype)
    return data, offsets


class StringTable(Sequence[str]):
    """A read-only list of strings stored as UTF-8 bytes + offsets, memory-mapped."""

    def __init__(self, data: np.ndarray, offsets: np.ndarray):
        self.data, self.offsets = data, offsets  # uint8 [total], int64 [n + 1]

    @staticmethod
    def write(prefix: str, strings: Iterable[str]) -> None:
        writer = FlatWriter(prefix, np.uint8)
        writer.add([s.encode("utf-8") for s in strings])
        writer.close()

    @classmethod
    def load(cls, prefix: str) -> "StringTable":
        return cls(*_load_flat(prefix, np.uint8))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        return bytes(self.data[self.offsets[i] : self.offsets[i + 1]]).decode("utf-8")


class TokenTable:
    """Token ids of n sequences, stored flat: ids int32 [total], offsets int64 [n + 1].

    Each sequence is `[CLS] ... [SEP]`. `gather` pads to a fixed length; a sequence longer
    than the requested length is cut and ends with [SEP] again.
    """

    def __init__(self, ids: np.ndarray, offsets: np.ndarray, sep_id: int, pad_id: int):
        self.ids, self.offsets, self.sep_id, self.pad_id = ids, offsets, sep_id, pad_id

    @classmethod
    def load(cls, prefix: str, sep_id: int, pad_id: int) -> "TokenTable":
        return cls(*_load_flat(prefix, np.int32), sep_id, pad_id)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        """int32 [n]: tokens per sequence, [CLS] and [SEP] included (for length bucketing)."""
        return np.diff(self.offsets).astype(np.int32)

    def gather(self, indices, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask), both int32 [*indices.shape, max_len], padded with pad_id / 0."""
        idx = np.asarray(indices, np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"token index out of range [0, {len(self)}): min {idx.min()}, max {idx.max()}")
        start = self.offsets[idx]  # [...]
        length = self.offsets[idx + 1] - start
        cut = np.minimum(length, max_len)
        pos = np.arange(max_len, dtype=np.int64)
        mask = pos < cut[..., None]  # [..., L]
        flat_pos = np.where(mask, start[..., None] + pos, 0)
        ids = np.where(mask, self.ids[flat_pos], self.pad_id).astype(np.int32)
        long = length > max_len
        if long.any():
            ids[long, max_len - 1] = self.sep_id
        return ids, mask.astype(np.int32)


# ----------------------------------------------------------------------------------------
# The prepared dataset


@dataclasses.dataclass
class RetrievalDataset:
    """A retrieval corpus with its queries, judgements and token ids, as the rest of the code uses it.

    doc_ids / doc_texts:     the corpus in source order; doc_texts[i] = (title + ' ' + text).strip()
    query_ids / query_texts: every query of every split (one index space; splits in `split_queries`)
    qrels:                   split -> {query id: {doc id: graded score}} (score > 0 = relevant)
    split_queries:           split -> query ids of that split (NQ test queries have answers only)
    answers:                 query id -> answer strings (NQ; empty elsewhere)
    hard_negatives:          query id -> doc ids given by the source (DPR, MS MARCO triples)
    """

    name: str
    path: str  # the folder holding the prepared files
    doc_ids: list[str]
    doc_texts: Sequence[str]
    query_ids: list[str]
    query_texts: Sequence[str]
    qrels: dict[str, dict[str, dict[str, int]]]
    split_queries: dict[str, list[str]]
    answers: dict[str, list[str]]
    hard_negatives: dict[str, list[str]]
    query_table: TokenTable
    doc_table: TokenTable
    max_query_len: int
    max_passage_len: int  # the student's: doc_tokens' default length
    bad_records: dict
    stored_passage_len: int = 0  # the longest passage length doc_tokens can give (0: max_passage_len)
    from_cache: bool = False  # True when this call loaded a previous preparation
    # Training-only passages (pseudo-queries' bodies, data/pseudo.py): rows num_docs.. of doc_ids
    # and the doc token table, in no index, mining or evaluation; their corpus source rows.
    train_only_sources: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def num_docs(self) -> int:
        """The corpus rows (0..num_docs-1): what is indexed, mined and evaluated; doc_texts
        holds these. The training-only rows (if any) follow them in doc_ids and the token table."""
        return len(self.doc_ids) - len(self.train_only_sources)

    def corpus_rows(self, rows) -> np.ndarray:
        """`rows` with each training-only passage replaced by the corpus row it was cut from
        (for what only the corpus has, e.g. BM25 scores); -1 stays -1."""
        rows = np.asarray(rows, np.int64)
        extra = rows >= self.num_docs
        if not extra.any():
            return rows
        return np.where(extra, self.train_only_sources[np.where(extra, rows - self.num_docs, 0)], rows)

    @property
    def num_queries(self) -> int:
        return len(self.query_ids)

    @cached_property
    def doc_index(self) -> dict[str, int]:
        """doc id -> row in doc_ids and the doc token table."""
        return {d: i for i, d in enumerate(self.doc_ids)}

    @cached_property
    def query_index(self) -> dict[str, int]:
        """query id -> row in query_ids and the query token table."""
        return {q: i for i, q in enumerate(self.query_ids)}

    def query_indices(self, split: str) -> np.ndarray:
        """int32 [n]: rows of the queries of `split`, in source order."""
        if split not in self.split_queries:
            raise KeyError(f"{self.name} has no split {split!r}; it has {sorted(self.split_queries)}")
        return np.array([self.query_index[q] for q in self.split_queries[split]], np.int32)

    def positives(self, split: str) -> dict[int, list[int]]:
        """query row -> rows of its relevant documents (score > 0) in `split`."""
        di, qi = self.doc_index, self.query_index
        return {qi[q]: [di[d] for d, s in docs.items() if s > 0] for q, docs in self.qrels.get(split, {}).items()}

    def query_tokens(self, indices, max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) int32 [*indices.shape, max_len or config.data.max_query_len]."""
        return self.query_table.gather(indices, max_len or self.max_query_len)

    def doc_tokens(self, indices, max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(ids, mask) int32 [*indices.shape, max_len or config.data.max_passage_len]."""
        stored = self.stored_passage_len or self.max_passage_len
        if max_len and max_len > stored:
            raise ValueError(f"{self.name}: passages were tokenized at {stored} tokens, {max_len} asked; prepare "
                             "the dataset with the longer length (teacher.max_passage_len)")
        return self.doc_table.gather(indices, max_len or self.max_passage_len)

    @property
    def query_lengths(self) -> np.ndarray:
        return self.query_table.lengths

    @property
    def doc_lengths(self) -> np.ndarray:
        return self.doc_table.lengths

    def summary(self) -> dict:
        """Counts for logs and reports."""
        return {
            "name": self.name,
            "docs": self.num_docs,
            "queries": self.num_queries,
            "splits": {
                s: {"queries": len(qs), "judgements": sum(len(self.qrels.get(s, {}).get(q, {})) for q in qs)}
                for s, qs in self.split_queries.items()
            },
            "mean_doc_tokens": float(self.doc_lengths.mean()) if self.num_docs else 0.0,
            "mean_query_tokens": float(self.query_lengths.mean()) if self.num_queries else 0.0,
            "bad_records_skipped": self.bad_records.get("total", 0),
            "path": self.path,
        }


def cache_dir(config, workdir: str) -> str:
    """config.data.cache_dir, or WORKDIR/data."""
    return config.data.cache_dir or os.path.join(workdir, "data")


def source_dir(config) -> str:
    """Where the raw files of config.data.dataset lie: <config.data.dir>/<dataset>."""
    return os.path.join(config.data.dir, config.data.dataset) if config.data.dir else ""


def prepare_dataset(config, workdir: str, tokenizer=None) -> RetrievalDataset:
    """Builds or loads the prepared dataset for `config` (see the module docstring).

    `tokenizer` defaults to `md2pr_jax.hf.load_tokenizer(config)`; it must be a fast tokenizer
    that adds [CLS] ... [SEP]. With several JAX processes, each prepares at once into its cache
    folder; those sharing one folder take turns through its lock, so one builds and the others
    load its result (concurrent TFDS builds into one folder would race on its rename). No
    process waits for another's build unless they share the folder, and no barrier is passed.

    Every process first checks the data dir (`fetch.ensure_data`: one process fetches a missing
    dataset into the local cache; several agree that each sees it, or all raise DataError), so
    a missing dataset is one error everywhere rather than some processes failing while the
    others go on to the next collective.
    """
    config = _with_data(config)
    with cache_lock(cache_dir(config, workdir), config.data.builder):
        return _prepare_dataset(config, workdir, tokenizer)


def _with_data(config):
    """`config` with data.dir where `fetch.ensure_data` found (or fetched) the dataset."""
    from md2pr_jax.data.fetch import ensure_data

    root = ensure_data(config)
    if root != config.data.dir:
        config = config.copy_and_resolve_references()
        config.data.dir = root
    return config


@contextlib.contextmanager
def cache_lock(root: str, name: str) -> Iterator[None]:
    """Holds the exclusive lock <root>/locks/<name>.lock (flock) while the block runs: processes
    sharing the cache folder `root` build in it one at a time. The kernel drops the lock when
    its holder exits, a crash included. On a file system without flock, a warning and no lock."""
    folder = os.path.join(root, "locks")
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{name}.lock"), "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.info("another process is preparing %s data in %s; waiting for it", name, root)
            t = time.time()
            fcntl.flock(f, fcntl.LOCK_EX)
            logging.info("waited %.1fs for the %s lock in %s", time.time() - t, name, root)
        except OSError as e:  # e.g. ENOLCK: no locks on this file system
            logging.warning("%s allows no file lock (%s): processes sharing it may build at once", folder, e)
        yield  # closing the file releases the lock


def tokenize_threads(config) -> int:
    """config.data.tokenize_threads when positive, else the cores this process may run on."""
    n = int(config.data.tokenize_threads)
    if n > 0:
        return n
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def _prepare_dataset(config, workdir: str, tokenizer=None) -> RetrievalDataset:
    d = config.data
    root = cache_dir(config, workdir)
    build = builders.build(d.builder, d.dataset, source_dir(config), root, d.bad_records)
    if tokenizer is None:
        from md2pr_jax.hf import load_tokenizer

        tokenizer = load_tokenizer(config)
    key_fields = {
        "version": PREPARED_VERSION,
        "build": _build_stamp(build),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_query_len": int(d.max_query_len),
        "max_passage_len": int(d.max_passage_len),
        "dev_fraction": float(d.dev_fraction),
        "max_docs": int(d.max_docs),
        "max_train_queries": int(d.max_train_queries),
        "max_eval_queries": int(d.max_eval_queries),
        "train_split": d.train_split,
        "seed": int(config.seed),
    }
    stored = stored_passage_len(config)
    if stored != int(d.max_passage_len):  # keyed only when it differs
        key_fields["stored_passage_len"] = stored
    key = hashlib.sha1(json.dumps(key_fields, sort_keys=True).encode()).hexdigest()[:12]
    path = os.path.join(root, "prepared", f"{d.builder}-{d.dataset}-{key}")
    if not os.path.exists(os.path.join(path, "meta.json")):
        _prepare(config, build, tokenizer, path, key_fields)
        ds = load_prepared(path)
    else:
        ds = load_prepared(path)
        ds.from_cache = True
    logging.info("prepared %s: %s", ds.name, json.dumps(ds.summary()))
    return ds


def corpus_titles(config, workdir: str, doc_ids: Sequence[str]) -> list[str]:
    """The title of each document in `doc_ids` ('' where it has none), read from the TFDS build
    of config.data (the prepared files keep only title + ' ' + text). For the 'title' kind of
    pseudo-query (data/pseudo.py); reads the whole corpus split once."""
    config = _with_data(config)
    d = config.data
    with cache_lock(cache_dir(config, workdir), d.builder):
        build = builders.build(d.builder, d.dataset, source_dir(config), cache_dir(config, workdir), d.bad_records)
    wanted = set(doc_ids)
    titles = {rec["id"]: rec["title"] for rec in builders.read_split(build, "corpus") if rec["id"] in wanted}
    return [titles.get(i, "") for i in doc_ids]


def stored_passage_len(config) -> int:
    """The passage length the prepared tokens keep: the student's or the teacher's, the longer."""
    return max(int(config.data.max_passage_len), teacher_passage_len(config))


def tokenizer_fingerprint(tokenizer) -> str:
    """A hash of what tokenization depends on (vocabulary, normaliser, pre/post-processing),
    leaving out the truncation/padding state that each call changes."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    spec.pop("truncation", None)
    spec.pop("padding", None)
    return hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _build_stamp(build: builders.BuildResult) -> str:
    """What the TFDS build's content depends on: the builder, its config and version, and its
    source files ({path: [size, mtime or object generation]}, recorded beside the build). The
    same on every host building from the same files (a bucket's, or one shared folder's), so
    hosts preparing side by side agree on the prepared folder's name and bytes; a rebuild from
    changed sources changes it, and a workdir whose data/ links to another's (the ablation's
    rows) reuses its prepared folder. Without a recorded listing (a build made from no source
    folder), the build's real path and time."""
    stamp_path = os.path.join(build.data_dir, "md2pr_source.json")
    with open(stamp_path) as f:
        source = (json.load(f) or {}).get("source") or {}
    if source.get("files"):
        b = build.builder
        fields = {"builder": b.name, "config": b.builder_config.name, "version": str(b.version), "source": source}
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    return f"{os.path.realpath(build.data_dir)}:{os.stat(stamp_path).st_mtime_ns}"


@dataclasses.dataclass
class _DocChunk:
    """One chunk of the corpus, ready to append: each table's rows joined, with their lengths."""

    count: int  # records read (kept or not), for the progress bar
    ids: bytes
    id_lengths: np.ndarray
    texts: bytes
    text_lengths: np.ndarray
    tokens: np.ndarray  # int32, the kept documents' token ids back to back
    token_lengths: np.ndarray


def _prepare(config, build: builders.BuildResult, tokenizer, path: str, key_fields: dict) -> None:
    """Writes the prepared folder; the corpus streams through in chunks (never all in memory),
    tokenized on `tokenize_threads(config)` threads and written in order."""
    from tqdm import tqdm

    d = config.data
    t0 = time.time()
    threads = tokenize_threads(config)
    splits = {s: list(builders.read_split(build, s)) for s in build.splits if s != "corpus"}
    rng = np.random.default_rng(config.seed)
    splits = _select_queries(splits, d, rng)
    keep = _select_docs(build, splits, d.max_docs, rng)  # None = every document

    query_ids, query_texts, qrels, split_queries, answers, negatives = [], [], {}, {}, {}, {}
    seen = set()
    for split, queries in splits.items():
        split_queries[split], qrels[split] = [], {}
        for q in queries:
            if q["id"] not in seen:
                seen.add(q["id"])
                query_ids.append(q["id"])
                query_texts.append(q["text"])
            split_queries[split].append(q["id"])
            judged = {doc: int(s) for doc, s in zip(q["doc_ids"], q["scores"]) if keep is None or doc in keep}
            if judged:
                qrels[split][q["id"]] = judged
            if q["answers"]:
                answers[q["id"]] = q["answers"]
            negs = [n for n in q["neg_ids"] if keep is None or n in keep]
            if negs:
                negatives[q["id"]] = negs
    t_queries_read = time.time() - t0

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".incomplete-", dir=os.path.dirname(path))
    try:
        specials = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
        passage_len = stored_passage_len(config)
        for max_len in (int(d.max_query_len), passage_len):  # the encoders are made before any thread asks
            _encoder(tokenizer, max_len)
        pool = ThreadPoolExecutor(threads, thread_name_prefix="md2pr-tokenize") if threads > 1 else None
        try:
            t = time.time()
            StringTable.write(os.path.join(tmp, "query_ids"), query_ids)
            StringTable.write(os.path.join(tmp, "query_texts"), query_texts)
            q_tok = FlatWriter(os.path.join(tmp, "query_tokens"), np.int32)
            chunks = (query_texts[s : s + _TOKENIZE_CHUNK] for s in range(0, len(query_texts), _TOKENIZE_CHUNK))
            encode = functools.partial(_tokenize_flat, tokenizer, max_len=int(d.max_query_len), cls_id=specials[0])
            for tokens, lengths in ordered_map(encode, chunks, pool, 2 * threads):
                q_tok.add_flat(tokens, lengths)
            q_tok.close()
            t_queries = time.time() - t

            t = time.time()
            writers = [FlatWriter(os.path.join(tmp, name), dtype) for name, dtype in
                       (("doc_ids", np.uint8), ("doc_texts", np.uint8), ("doc_tokens", np.int32))]
            total = builders.num_records(build, "corpus")
            work = functools.partial(_doc_chunk, build, keep, tokenizer, passage_len, specials[0])
            spans = ((s, min(s + _TOKENIZE_CHUNK, total)) for s in range(0, total, _TOKENIZE_CHUNK))
            with tqdm(total=total, desc="preparing documents", unit="doc", disable=total < 4 * _TOKENIZE_CHUNK) as bar:
                for chunk in ordered_map(work, spans, pool, 2 * threads):
                    writers[0].add_flat(chunk.ids, chunk.id_lengths)
                    writers[1].add_flat(chunk.texts, chunk.text_lengths)
                    writers[2].add_flat(chunk.tokens, chunk.token_lengths)
                    bar.update(chunk.count)
            for writer in writers:
                writer.close()
            t_docs = time.time() - t
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)

        with open(os.path.join(tmp, "judgements.json"), "w") as f:
            judgements = {"qrels": qrels, "split_queries": split_queries, "answers": answers, "hard_negatives": negatives}
            json.dump(judgements, f)
        with open(os.path.join(tmp, "bad_records.json"), "w") as f:
            json.dump(build.bad_records, f, indent=1)
        meta = {
            "name": f"{d.builder}/{d.dataset}",
            "key": key_fields,
            "tfds_dir": build.data_dir,
            "cls_id": specials[0],
            "sep_id": specials[1],
            "pad_id": specials[2],
            "max_query_len": int(d.max_query_len),
            "max_passage_len": int(d.max_passage_len),
            "stored_passage_len": passage_len,
            # Wall seconds of each part; tokenization overlaps reading and writing on the threads.
            "seconds": {"read_queries": t_queries_read, "queries": t_queries, "documents": t_docs,
                        "total": time.time() - t0, "threads": threads},
        }
        with open(os.path.join(tmp, "meta.json"), "w") as f:
            json.dump(meta, f, indent=1)
    except BaseException:  # a half-written folder is never left behind (at MS MARCO's size, GBs)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished the same preparation first
        shutil.rmtree(tmp, ignore_errors=True)
    logging.info("prepared %s in %.1fs (documents %.1fs, %d threads)", path, time.time() - t0, t_docs, threads)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], pool: ThreadPoolExecutor | None, ahead: int) -> Iterator[R]:
    """fn(item) for each item, in the items' order: on `pool` with at most `ahead` calls queued
    or running (memory stays bounded), or one after another in this thread when pool is None."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: collections.deque = collections.deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= max(1, ahead):
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        for future in pending:
            future.cancel()


def _doc_chunk(build: builders.BuildResult, keep: set[str] | None, tokenizer, max_len: int, cls_id: int,
               span: tuple[int, int]) -> _DocChunk:
    """Corpus records [start, stop): read, parsed, filtered by `keep`, joined and tokenized."""
    records = builders.parse_records(builders.read_raw(build, "corpus", *span))
    if keep is not None:
        records = [doc for doc in records if doc["id"] in keep]
    ids = [doc["id"].encode("utf-8") for doc in records]
    texts = [(doc["title"] + " " + doc["text"]).strip() for doc in records]
    text_bytes = [t.encode("utf-8") for t in texts]
    tokens, token_lengths = _tokenize_flat(tokenizer, texts, max_len=max_len, cls_id=cls_id)
    return _DocChunk(
        count=span[1] - span[0],
        ids=b"".join(ids),
        id_lengths=np.fromiter(map(len, ids), np.int64, len(ids)),
        texts=b"".join(text_bytes),
        text_lengths=np.fromiter(map(len, text_bytes), np.int64, len(text_bytes)),
        tokens=tokens,
        token_lengths=token_lengths,
    )


def _tokenize_flat(tokenizer, texts: list[str], max_len: int, cls_id: int) -> tuple[np.ndarray, np.ndarray]:
    """`_tokenize`'s ids back to back (int32) and the length of each text's (int64)."""
    ids = _tokenize(tokenizer, texts, max_len, cls_id)
    lengths = np.fromiter(map(len, ids), np.int64, len(ids))
    return np.fromiter(itertools.chain.from_iterable(ids), np.int32, int(lengths.sum())), lengths


def _tokenize(tokenizer, texts: list[str], max_len: int, cls_id: int) -> list[list[int]]:
    """Token ids ([CLS] ... [SEP], truncated to max_len) of every text; the same ids as
    `_encode` (the tokenizer's own call), by a faster path that threads may share.

    For BERT WordPiece tokenizers, each whitespace-separated word gives at least one token and
    tokens never cross whitespace, so a text is first cut to its first max_len words: the
    result is the same, and long documents tokenize several times faster. A cut text that
    gives fewer than max_len tokens (words that vanish in normalisation) is redone in full.
    """
    if not texts:
        return []
    short, was_cut = texts, []
    if _is_wordpiece(tokenizer):
        short = []
        for text in texts:
            words = text.split(None, max_len)
            was_cut.append(len(words) > max_len)
            short.append(" ".join(words[:max_len]) if was_cut[-1] else text)
    encoder = _encoder(tokenizer, max_len)
    ids = [e.ids for e in encoder.encode_batch_fast(short, add_special_tokens=True)]
    redo = [i for i, c in enumerate(was_cut) if c and len(ids[i]) < max_len]
    if redo:
        for i, e in zip(redo, encoder.encode_batch_fast([texts[i] for i in redo], add_special_tokens=True)):
            ids[i] = e.ids
    if any(not seq or seq[0] != cls_id for seq in ids):
        raise ValueError(f"the tokenizer does not start each sequence with [CLS] (id {cls_id}); use a BERT-style tokenizer")
    return ids


@functools.lru_cache(maxsize=16)
def _encoder(tokenizer, max_len: int):
    """A copy of the fast tokenizer's Rust tokenizer, set once as the tokenizer's own call sets
    it for (truncation=True, max_length=max_len, no padding): threads share it read-only (the
    call itself changes the truncation state each time, which threads must not share), and
    `encode_batch_fast` skips the character offsets and the Python BatchEncoding."""
    from tokenizers import Tokenizer

    encoder = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    encoder.no_padding()
    encoder.enable_truncation(max_len, stride=0, strategy="longest_first", direction=tokenizer.truncation_side)
    encoder.encode_special_tokens = bool(getattr(tokenizer, "split_special_tokens", False))
    return encoder


def _encode(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
    """The tokenizer's own call: the reference `_tokenize` is checked against."""
    enc = tokenizer(
        texts,
        add_special_tokens=True,
        truncation=True,
        max_length=max_len,
        return_attention_mask=False,
        return_token_type_ids=False,
    )
    return enc["input_ids"]


@functools.lru_cache(maxsize=8)
def _is_wordpiece(tokenizer) -> bool:
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    return (spec.get("model") or {}).get("type") == "WordPiece" and (spec.get("pre_tokenizer") or {}).get(
        "type"
    ) == "BertPreTokenizer"


def _select_queries(splits: dict[str, list[dict]], d, rng: np.random.Generator) -> dict[str, list[dict]]:
    """Applies dev_fraction, max_train_queries and max_eval_queries (seeded; source order kept)."""
    splits = dict(splits)
    train = d.train_split
    if d.dev_fraction > 0:
        if "dev" in splits:
            raise ValueError(
                f"config.data.dev_fraction={d.dev_fraction} would hold out a 'dev' split, but "
                f"{d.dataset} already has one; set dev_fraction=0 to use it"
            )
        if train not in splits:
            raise ValueError(f"config.data.dev_fraction needs a {train!r} split; the dataset has {sorted(splits)}")
        n = len(splits[train])
        n_dev = int(round(d.dev_fraction * n))
        if not 0 < n_dev < n:
            raise ValueError(f"config.data.dev_fraction={d.dev_fraction} of {n} train queries leaves an empty split")
        dev = np.zeros(n, bool)
        dev[rng.choice(n, n_dev, replace=False)] = True
        splits["dev"] = [q for q, h in zip(splits[train], dev) if h]
        splits[train] = [q for q, h in zip(splits[train], dev) if not h]
    for split, queries in splits.items():
        cap = d.max_train_queries if split == train else d.max_eval_queries
        if cap and len(queries) > cap:
            keep = np.sort(rng.choice(len(queries), cap, replace=False))
            splits[split] = [queries[i] for i in keep]
    return splits


def _select_docs(build: builders.BuildResult, splits: dict[str, list[dict]], max_docs: int, rng) -> set[str] | None:
    """None (every document), or with max_docs > 0 the ids to keep: every judged document of
    the kept queries plus seeded random others, up to max_docs."""
    total = len(build.source("corpus"))
    if not max_docs or total <= max_docs:
        return None
    judged = {doc for queries in splits.values() for q in queries for doc in q["doc_ids"]}
    others = [doc["id"] for doc in builders.read_split(build, "corpus") if doc["id"] not in judged]
    if len(judged) > max_docs:
        logging.warning("config.data.max_docs=%d < %d judged documents; keeping all judged ones", max_docs, len(judged))
    extra = min(max(0, max_docs - len(judged)), len(others))
    return judged | {others[i] for i in rng.choice(len(others), extra, replace=False)}


def load_prepared(path: str) -> RetrievalDataset:
    """Loads a prepared folder (arrays memory-mapped)."""
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    with open(os.path.join(path, "judgements.json")) as f:
        j = json.load(f)
    with open(os.path.join(path, "bad_records.json")) as f:
        bad = json.load(f)
    sep, pad = meta["sep_id"], meta["pad_id"]
    return RetrievalDataset(
        name=meta["name"],
        path=path,
        doc_ids=list(StringTable.load(os.path.join(path, "doc_ids"))),
        doc_texts=StringTable.load(os.path.join(path, "doc_texts")),
        query_ids=list(StringTable.load(os.path.join(path, "query_ids"))),
        query_texts=list(StringTable.load(os.path.join(path, "query_texts"))),
        qrels=j["qrels"],
        split_queries=j["split_queries"],
        answers=j["answers"],
        hard_negatives=j["hard_negatives"],
        query_table=TokenTable.load(os.path.join(path, "query_tokens"), sep, pad),
        doc_table=TokenTable.load(os.path.join(path, "doc_tokens"), sep, pad),
        max_query_len=meta["max_query_len"],
        max_passage_len=meta["max_passage_len"],
        bad_records=bad,
        stored_passage_len=meta.get("stored_passage_len", meta["max_passage_len"]),
    )


def prepare_mode(config, workdir: str) -> None:
    """`--mode prepare`: builds or loads the dataset and prints its counts."""
    t0 = time.time()
    ds = prepare_dataset(config, workdir)
    summary = ds.summary()
    summary["seconds"] = round(time.time() - t0, 2)
    summary["from_cache"] = ds.from_cache
    print(json.dumps(summary, indent=1))
