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
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import os
import shutil
import tempfile
import time
from functools import cached_property
from typing import Iterable, Sequence

import numpy as np
from absl import logging

from md2pr_jax.config import teacher_passage_len
from md2pr_jax.data import builders

PREPARED_VERSION = 3  # bump when the prepared layout or its content rules change
_TOKENIZE_CHUNK = 2048


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

    @property
    def num_docs(self) -> int:
        return len(self.doc_ids)

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
    that adds [CLS] ... [SEP]. With several JAX processes sharing the cache folder, process 0
    builds first and the others load its result (concurrent builds race on TFDS's rename).

    Every process first checks the data dir (`fetch.ensure_data`: one process fetches a missing
    dataset into the local cache; several agree that each sees it, or all raise DataError), so
    a missing dataset is one error everywhere rather than process 0 failing while the others
    wait at the barrier below.
    """
    import jax

    from md2pr_jax.data.fetch import ensure_data

    root = ensure_data(config)
    if root != config.data.dir:
        config = config.copy_and_resolve_references()
        config.data.dir = root
    if jax.process_count() == 1:
        return _prepare_dataset(config, workdir, tokenizer)
    from jax.experimental import multihost_utils

    result = _prepare_dataset(config, workdir, tokenizer) if jax.process_index() == 0 else None
    multihost_utils.sync_global_devices("md2pr_prepare_dataset")
    return result if result is not None else _prepare_dataset(config, workdir, tokenizer)


def _prepare_dataset(config, workdir: str, tokenizer=None) -> RetrievalDataset:
    d = config.data
    root = cache_dir(config, workdir)
    build = builders.build(d.builder, d.dataset, source_dir(config), root, d.bad_records)
    if tokenizer is None:
        from md2pr_jax.hf import load_tokenizer

        tokenizer = load_tokenizer(config)
    key_fields = {
        "version": PREPARED_VERSION,
        "build": _build_stamp(build.data_dir),
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
    if stored != int(d.max_passage_len):  # keyed only when it differs: older preparations stay valid
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


def _build_stamp(data_dir: str) -> str:
    """Changes whenever the TFDS build is redone (its source stamp is rewritten). The real
    path, so a workdir whose data/ links to another's (the ablation's rows) reuses its
    prepared folder instead of preparing a copy."""
    st = os.stat(os.path.join(data_dir, "md2pr_source.json"))
    return f"{os.path.realpath(data_dir)}:{st.st_mtime_ns}"


def _prepare(config, build: builders.BuildResult, tokenizer, path: str, key_fields: dict) -> None:
    """Writes the prepared folder; the corpus streams through in chunks (never all in memory)."""
    from tqdm import tqdm

    d = config.data
    t0 = time.time()
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

    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".incomplete-", dir=os.path.dirname(path))
    specials = tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id
    t_tok = time.time()
    StringTable.write(os.path.join(tmp, "query_ids"), query_ids)
    StringTable.write(os.path.join(tmp, "query_texts"), query_texts)
    q_tok = FlatWriter(os.path.join(tmp, "query_tokens"), np.int32)
    for start in range(0, len(query_texts), _TOKENIZE_CHUNK):
        q_tok.add(_tokenize(tokenizer, query_texts[start : start + _TOKENIZE_CHUNK], d.max_query_len, specials[0]))
    q_tok.close()
    t_tok = time.time() - t_tok

    doc_ids, doc_texts, doc_tok = (
        FlatWriter(os.path.join(tmp, "doc_ids"), np.uint8),
        FlatWriter(os.path.join(tmp, "doc_texts"), np.uint8),
        FlatWriter(os.path.join(tmp, "doc_tokens"), np.int32),
    )
    corpus = builders.read_split(build, "corpus", chunk=_TOKENIZE_CHUNK)
    total = len(build.source("corpus"))
    with tqdm(total=total, desc="preparing documents", unit="doc", disable=total < 4 * _TOKENIZE_CHUNK) as bar:
        for chunk in iter(lambda: list(itertools.islice(corpus, _TOKENIZE_CHUNK)), []):
            bar.update(len(chunk))
            chunk = [doc for doc in chunk if keep is None or doc["id"] in keep]
            texts = [(doc["title"] + " " + doc["text"]).strip() for doc in chunk]
            doc_ids.add([doc["id"].encode("utf-8") for doc in chunk])
            doc_texts.add([t.encode("utf-8") for t in texts])
            t = time.time()
            doc_tok.add(_tokenize(tokenizer, texts, stored_passage_len(config), specials[0]))
            t_tok += time.time() - t
    for writer in (doc_ids, doc_texts, doc_tok):
        writer.close()

    with open(os.path.join(tmp, "judgements.json"), "w") as f:
        json.dump({"qrels": qrels, "split_queries": split_queries, "answers": answers, "hard_negatives": negatives}, f)
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
        "stored_passage_len": stored_passage_len(config),
        "seconds": {"read_and_write": time.time() - t0 - t_tok, "tokenize": t_tok},
    }
    with open(os.path.join(tmp, "meta.json"), "w") as f:
        json.dump(meta, f, indent=1)
    try:
        os.replace(tmp, path)
    except OSError:  # another process finished the same preparation first
        shutil.rmtree(tmp, ignore_errors=True)
    logging.info("prepared %s in %.1fs (tokenize %.1fs)", path, time.time() - t0, t_tok)


def _tokenize(tokenizer, texts: list[str], max_len: int, cls_id: int) -> list[list[int]]:
    """Token ids ([CLS] ... [SEP], truncated to max_len) of every text, in chunks.

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
    ids = _encode(tokenizer, short, max_len)
    redo = [i for i, c in enumerate(was_cut) if c and len(ids[i]) < max_len]
    if redo:
        for i, seq in zip(redo, _encode(tokenizer, [texts[i] for i in redo], max_len)):
            ids[i] = seq
    if any(not seq or seq[0] != cls_id for seq in ids):
        raise ValueError(f"the tokenizer does not start each sequence with [CLS] (id {cls_id}); use a BERT-style tokenizer")
    return ids


def _encode(tokenizer, texts: list[str], max_len: int) -> list[list[int]]:
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
