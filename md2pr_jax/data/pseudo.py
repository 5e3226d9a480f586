"""Pseudo-queries cut from the corpus, with no generator: queries the teacher never trained on.

Distillation pays where the teacher labels queries it has not seen (RocketQA's unlabelled
queries, GPL's pseudo-labelling). Without a query generator, a passage gives its own query:

    kind 'sentence'  one sentence of the passage, chosen by the seed (4 words or more); the
                     positive is the passage itself, the sentence still in it
    kind 'first'     the passage's first sentence (in BEIR corpora often the title with the
                     opening words of the text); the positive is the passage itself
    kind 'title'     the document's title; the positive is its body (the text without the
                     title), a training-only passage
    kind 'ict'       inverse cloze: one sentence chosen by the seed; the positive is the passage
                     with that sentence removed, a training-only passage

The two last kinds give a query whose words are not copied in its positive. Their positives
are new passages: they join the doc token table after the corpus rows (`train_only_sources`
of the dataset, ids `pseudo-passage:<doc id>`), where no index, mining or evaluation reads them;
the source document (which holds the query verbatim) stays out of the query's mined negatives.
A pseudo-query is the hard label's query (its one positive), which is what a dual encoder
without a teacher trains on; the teacher's scores over the mined candidates are the soft ones.
The queries join the dataset as split `PSEUDO_SPLIT`, with ids `pseudo:<doc id>`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import NamedTuple

import numpy as np

from md2pr_jax.config import PSEUDO_KINDS as KINDS
from md2pr_jax.data.prepare import RetrievalDataset, TokenTable, _tokenize

PSEUDO_SPLIT = "pseudo"
MIN_WORDS = 4
TITLE_MIN_WORDS = 3  # titles are short queries ("Aspirin after stroke")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9(\[])")


def sentences(text: str) -> list[str]:
    """The sentences of a passage (split after . ! ? before a capital, digit or bracket)."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


class Cut(NamedTuple):
    """Pseudo-queries cut from a corpus: the source doc rows int64 [n], the query texts, and the
    positive passages' texts for the kinds whose positive is a training-only passage
    (TRAIN_ONLY_KINDS; None for the others, whose positive is the source passage itself)."""

    rows: np.ndarray
    queries: list[str]
    passages: list[str] | None


TRAIN_ONLY_KINDS = ("title", "ict")


def _body(doc_text: str, title: str) -> str:
    """The document's text without its leading title (doc_texts hold title + ' ' + text); ''
    when there is no title or the text does not start with it."""
    title = title.strip()
    if not title or not doc_text.startswith(title):
        return ""
    return doc_text[len(title):].strip()


def cut_queries(doc_texts, count: int, kind: str, seed: int, exclude=(), titles=None) -> Cut:
    """Up to `count` passages drawn by `seed` (rows in `exclude` left out), each giving one
    query of `kind` (module docstring); `titles` (one per passage) is needed by 'title'.

    A passage gives none where its query or its positive would be empty or a copy: no sentence
    of MIN_WORDS words or more, or only one sentence ('sentence', 'first', 'ict': the query
    would be the whole passage); for 'title', a title of fewer than TITLE_MIN_WORDS words, a
    body of fewer than MIN_WORDS words, or a text that does not start with its title. So n may
    fall short of `count`."""
    if kind not in KINDS:
        raise ValueError(f"config.data.pseudo_kind={kind!r} is not one of {KINDS}")
    if kind == "title" and (titles is None or len(titles) != len(doc_texts)):
        raise ValueError("pseudo_kind 'title' needs one title per passage")
    rng = np.random.default_rng(seed)
    skip = set(int(d) for d in exclude)
    rows, queries, passages = [], [], []
    for d in rng.permutation(len(doc_texts)):
        if len(rows) >= count:
            break
        d = int(d)
        if d in skip:
            continue
        text = doc_texts[d]
        if kind == "title":
            query, body = titles[d].strip(), _body(text, titles[d])
            if len(query.split()) < TITLE_MIN_WORDS or len(body.split()) < MIN_WORDS:
                continue
            rows.append(d)
            queries.append(query)
            passages.append(body)
            continue
        sents = sentences(text)
        usable = [i for i, s in enumerate(sents) if len(s.split()) >= MIN_WORDS]
        if len(sents) < 2 or not usable:
            continue
        pick = usable[0] if kind == "first" else usable[int(rng.integers(len(usable)))]
        rows.append(d)
        queries.append(sents[pick])
        if kind == "ict":
            passages.append(" ".join(s for i, s in enumerate(sents) if i != pick))
    return Cut(np.asarray(rows, np.int64), queries, passages if kind in TRAIN_ONLY_KINDS else None)


def with_pseudo_queries(dataset: RetrievalDataset, cut: Cut, tokenizer) -> RetrievalDataset:
    """The dataset with the pseudo-queries of `cut` appended to its query space as split
    PSEUDO_SPLIT (tokenized as the dataset's queries are), each judged relevant to its positive:
    its source passage, or for TRAIN_ONLY_KINDS the training-only passage appended after the
    corpus rows (tokenized at the stored passage length, as the corpus was)."""
    if PSEUDO_SPLIT in dataset.split_queries:
        raise ValueError(f"{dataset.name} already has a split named {PSEUDO_SPLIT!r}")
    if len(dataset.train_only_sources):
        raise ValueError(f"{dataset.name} already has training-only passages")
    doc_rows = cut.rows
    ids = [f"pseudo:{dataset.doc_ids[int(d)]}" for d in doc_rows]
    query_table = _append(dataset.query_table, _tokenize(tokenizer, list(cut.queries), dataset.max_query_len,
                                                         tokenizer.cls_token_id))
    doc_ids, doc_table, sources = list(dataset.doc_ids), dataset.doc_table, dataset.train_only_sources
    positive_ids = [dataset.doc_ids[int(d)] for d in doc_rows]
    if cut.passages is not None:
        positive_ids = [f"pseudo-passage:{dataset.doc_ids[int(d)]}" for d in doc_rows]
        length = dataset.stored_passage_len or dataset.max_passage_len
        doc_table = _append(doc_table, _tokenize(tokenizer, list(cut.passages), length, tokenizer.cls_token_id))
        doc_ids += positive_ids
        sources = np.asarray(doc_rows, np.int64)
    qrels = dict(dataset.qrels)
    qrels[PSEUDO_SPLIT] = {q: {p: 1} for q, p in zip(ids, positive_ids)}
    split_queries = {**dataset.split_queries, PSEUDO_SPLIT: ids}
    return dataclasses.replace(
        dataset,
        doc_ids=doc_ids,
        doc_table=doc_table,
        train_only_sources=sources,
        query_ids=list(dataset.query_ids) + ids,
        query_texts=list(dataset.query_texts) + list(cut.queries),
        qrels=qrels,
        split_queries=split_queries,
        query_table=query_table,
    )


def _append(table: TokenTable, tokens: list[list[int]]) -> TokenTable:
    """`table` with the rows `tokens` after its own."""
    lengths = np.asarray([len(t) for t in tokens], np.int64)
    ids = np.concatenate([table.ids, *(np.asarray(t, np.int32) for t in tokens)]).astype(np.int32)
    offsets = np.concatenate([table.offsets, table.offsets[-1] + np.cumsum(lengths)]).astype(np.int64)
    return TokenTable(ids, offsets, table.sep_id, table.pad_id)
