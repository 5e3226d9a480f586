"""md2pr_jax.data.pseudo: pseudo-queries cut from the corpus and appended to a dataset."""

import numpy as np
import pytest
from conftest import make_tiny_config

from md2pr_jax import hf
from md2pr_jax.data import pseudo
from md2pr_jax.data.prepare import RetrievalDataset, TokenTable, _tokenize

DOCS = [
    "Vitamin D and bones. Low serum vitamin D predicts fractures in older adults. Supplements helped.",
    "One sentence only with many words in it.",
    "Aspirin after stroke. A randomised trial of aspirin found fewer deaths at one year. Bleeding rose.",
    "Yeast. Ok. Gene expression in yeast changes under heat shock within minutes.",
    "Short. Tiny.",
]


def _dataset(tok, max_query_len=12):
    cls_id = tok.cls_token_id
    q_texts = ["does vitamin d prevent fractures", "aspirin and mortality"]
    q_tok = _tokenize(tok, q_texts, max_query_len, cls_id)
    d_tok = _tokenize(tok, DOCS, 32, cls_id)
    flat = lambda seqs: (np.concatenate([np.asarray(s, np.int32) for s in seqs]),  # noqa: E731
                         np.concatenate([[0], np.cumsum([len(s) for s in seqs])]).astype(np.int64))
    return RetrievalDataset(
        name="toy", path="", doc_ids=[f"d{i}" for i in range(len(DOCS))], doc_texts=DOCS,
        query_ids=["q0", "q1"], query_texts=q_texts, qrels={"train": {"q0": {"d0": 1}, "q1": {"d2": 1}}},
        split_queries={"train": ["q0", "q1"]}, answers={}, hard_negatives={},
        query_table=TokenTable(*flat(q_tok), tok.sep_token_id, tok.pad_token_id),
        doc_table=TokenTable(*flat(d_tok), tok.sep_token_id, tok.pad_token_id),
        max_query_len=max_query_len, max_passage_len=32, bad_records={})


def test_cut_queries_take_a_sentence_of_their_passage():
    rows, texts = pseudo.cut_queries(DOCS, 10, "sentence", seed=3)
    # Docs 1 (one sentence) and 4 (no sentence of 4 words) give none.
    assert sorted(rows.tolist()) == [0, 2, 3]
    for d, t in zip(rows, texts):
        assert t in pseudo.sentences(DOCS[d]) and len(t.split()) >= pseudo.MIN_WORDS
    again = pseudo.cut_queries(DOCS, 10, "sentence", seed=3)
    assert again[0].tolist() == rows.tolist() and again[1] == texts  # seeded
    first_rows, first = pseudo.cut_queries(DOCS, 10, "first", seed=3)
    assert dict(zip(first_rows.tolist(), first))[3] == "Gene expression in yeast changes under heat shock within minutes."
    two, _ = pseudo.cut_queries(DOCS, 2, "sentence", seed=3, exclude=[0])
    assert len(two) == 2 and 0 not in two.tolist()
    with pytest.raises(ValueError, match="pseudo_kind"):
        pseudo.cut_queries(DOCS, 2, "title", seed=0)


def test_pseudo_queries_join_the_dataset_as_a_split_with_their_source_passage():
    tok = hf.load_tokenizer(make_tiny_config())
    ds = _dataset(tok)
    rows, texts = pseudo.cut_queries(ds.doc_texts, 10, "sentence", seed=0)
    out = pseudo.with_pseudo_queries(ds, rows, texts, tok)
    assert out.num_queries == ds.num_queries + len(rows)
    assert out.positives("train") == ds.positives("train")  # the labelled queries are untouched
    pos = out.positives(pseudo.PSEUDO_SPLIT)
    assert sorted(pos) == list(range(ds.num_queries, out.num_queries))
    for q, d in zip(sorted(pos), rows):
        assert pos[q] == [int(d)] and out.query_ids[q] == f"pseudo:d{d}"
        ids, mask = out.query_tokens(np.array([q]))
        want = tok(out.query_texts[q], max_length=ds.max_query_len, truncation=True)["input_ids"]
        assert ids[0, : mask[0].sum()].tolist() == want
    # The old rows read the same tokens as before.
    np.testing.assert_array_equal(out.query_tokens(np.array([0, 1]))[0], ds.query_tokens(np.array([0, 1]))[0])
    with pytest.raises(ValueError, match="already has a split"):
        pseudo.with_pseudo_queries(out, rows, texts, tok)


def test_pseudo_config_is_validated():
    from md2pr_jax.config import ConfigError, validate

    with pytest.raises(ConfigError, match="data.pseudo_queries > 0"):
        validate(make_tiny_config(**{"train.pseudo": True}))
    with pytest.raises(ConfigError, match="pseudo_kind"):
        validate(make_tiny_config(**{"data.pseudo_queries": 5, "data.pseudo_kind": "title"}))
    with pytest.raises(ConfigError, match="tau_source"):
        validate(make_tiny_config(**{"filter.tau_source": "dev"}))
    validate(make_tiny_config(**{"data.pseudo_queries": 5, "train.pseudo": True, "filter.tau_source": "pseudo"}))
