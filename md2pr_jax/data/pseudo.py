"""Pseudo-queries cut from the corpus, with no generator: queries the teacher never trained on.

Distillation pays where the teacher labels queries it has not seen (RocketQA's unlabelled
queries, GPL's pseudo-labelling). Without a query generator, a passage gives its own query,
inverse-cloze style:

    kind 'sentence'  one sentence of the passage, chosen by the seed (4 words or more)
    kind 'first'     the passage's first sentence (in BEIR corpora often the title with
                     the opening words of the text)

The source passage is the query's hard label (its one positive), which is what a dual encoder
without a teacher trains on; the teacher's scores over the mined candidates are the soft ones.
The queries join the dataset as split `PSEUDO_SPLIT`, with ids `pseudo:<doc id>`.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np

from md2pr_jax.config import PSEUDO_KINDS as KINDS
from md2pr_jax.data.prepare import RetrievalDataset, TokenTable, _tokenize

PSEUDO_SPLIT = "pseudo"
MIN_WORDS = 4
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")


def sentences(text: str) -> list[str]:
    """The sentences of a passage (split after . ! ? before a capital, digit or bracket)."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def cut_queries(doc_texts, count: int, kind: str, seed: int, exclude=()) -> tuple[np.ndarray, list[str]]:
    """(doc rows int64 [n], query texts [n]): up to `count` passages drawn by `seed` (rows in
    `exclude` left out), each giving one query of `kind`. A passage with no sentence of
    MIN_WORDS words or more (and a passage that is one sentence only, whose query would be the
    whole passage) gives none, so n may fall short of `count` on a corpus of short passages."""
    if kind not in KINDS:
        raise ValueError(f"config.data.pseudo_kind={kind!r} is not one of {KINDS}")
    rng = np.random.default_rng(seed)
    skip = set(int(d) for d in exclude)
    rows, texts = [], []
    for d in rng.permutation(len(doc_texts)):
        if len(rows) >= count:
            break
        if int(d) in skip:
            continue
        sents = sentences(doc_texts[int(d)])
        usable = [s for s in sents if len(s.split()) >= MIN_WORDS]
        if len(sents) < 2 or not usable:
            continue
        text = usable[0] if kind == "first" else usable[int(rng.integers(len(usable)))]
        rows.append(int(d))
        texts.append(text)
    return np.asarray(rows, np.int64), texts


def with_pseudo_queries(dataset: RetrievalDataset, doc_rows: np.ndarray, texts: list[str], tokenizer) -> RetrievalDataset:
    """The dataset with the pseudo-queries appended to its query space as split PSEUDO_SPLIT,
    each judged relevant to its source passage (tokenized as the dataset's queries are)."""
    if PSEUDO_SPLIT in dataset.split_queries:
        raise ValueError(f"{dataset.name} already has a split named {PSEUDO_SPLIT!r}")
    ids = [f"pseudo:{dataset.doc_ids[int(d)]}" for d in doc_rows]
    tokens = _tokenize(tokenizer, list(texts), dataset.max_query_len, tokenizer.cls_token_id)
    old = dataset.query_table
    new_ids = np.concatenate([old.ids, *(np.asarray(t, np.int32) for t in tokens)]).astype(np.int32)
    lengths = np.asarray([len(t) for t in tokens], np.int64)
    new_offsets = np.concatenate([old.offsets, old.offsets[-1] + np.cumsum(lengths)]).astype(np.int64)
    qrels = dict(dataset.qrels)
    qrels[PSEUDO_SPLIT] = {q: {dataset.doc_ids[int(d)]: 1} for q, d in zip(ids, doc_rows)}
    split_queries = {**dataset.split_queries, PSEUDO_SPLIT: ids}
    return dataclasses.replace(
        dataset,
        query_ids=list(dataset.query_ids) + ids,
        query_texts=list(dataset.query_texts) + list(texts),
        qrels=qrels,
        split_queries=split_queries,
        query_table=TokenTable(new_ids, new_offsets, old.sep_id, old.pad_id),
    )
