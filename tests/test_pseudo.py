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
TITLES = ["Vitamin D and bones.", "", "Aspirin after stroke.", "Gene expression in yeast", "Short."]


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
    rows, texts, passages = pseudo.cut_queries(DOCS, 10, "sentence", seed=3)
    # Docs 1 (one sentence) and 4 (no sentence of 4 words) give none.
    assert sorted(rows.tolist()) == [0, 2, 3] and passages is None
    for d, t in zip(rows, texts):
        assert t in pseudo.sentences(DOCS[d]) and len(t.split()) >= pseudo.MIN_WORDS
    again = pseudo.cut_queries(DOCS, 10, "sentence", seed=3)
    assert again.rows.tolist() == rows.tolist() and again.queries == texts  # seeded
    first = pseudo.cut_queries(DOCS, 10, "first", seed=3)
    assert dict(zip(first.rows.tolist(), first.queries))[3] == "Gene expression in yeast changes under heat shock within minutes."
    two = pseudo.cut_queries(DOCS, 2, "sentence", seed=3, exclude=[0]).rows
    assert len(two) == 2 and 0 not in two.tolist()
    with pytest.raises(ValueError, match="pseudo_kind"):
        pseudo.cut_queries(DOCS, 2, "question", seed=0)


def test_ict_queries_leave_their_sentence_out_of_the_positive():
    """'ict': the same seeded sentence as 'sentence', and a positive that is the passage
    without it (every other sentence, in order)."""
    cut = pseudo.cut_queries(DOCS, 10, "ict", seed=3)
    assert cut.rows.tolist() == pseudo.cut_queries(DOCS, 10, "sentence", seed=3).rows.tolist()
    for d, q, p in zip(cut.rows, cut.queries, cut.passages):
        sents = pseudo.sentences(DOCS[d])
        assert q in sents and q not in p
        assert p == " ".join(s for s in sents if s != q)


def test_title_queries_take_the_title_and_the_body_as_positive():
    cut = pseudo.cut_queries(DOCS, 10, "title", seed=0, titles=TITLES)
    # Doc 1 has no title, doc 3's text does not start with its title, doc 4's is one word.
    assert sorted(cut.rows.tolist()) == [0, 2]
    by_row = {int(d): (q, p) for d, q, p in zip(cut.rows, cut.queries, cut.passages)}
    assert by_row[0] == ("Vitamin D and bones.",
                         "Low serum vitamin D predicts fractures in older adults. Supplements helped.")
    with pytest.raises(ValueError, match="one title per passage"):
        pseudo.cut_queries(DOCS, 2, "title", seed=0)


def test_pseudo_queries_join_the_dataset_as_a_split_with_their_source_passage():
    tok = hf.load_tokenizer(make_tiny_config())
    ref = hf.load_hf_tokenizer(make_tiny_config())  # transformers' own call, the reference
    ds = _dataset(tok)
    cut = pseudo.cut_queries(ds.doc_texts, 10, "sentence", seed=0)
    out = pseudo.with_pseudo_queries(ds, cut, tok)
    assert out.num_queries == ds.num_queries + len(cut.rows)
    assert out.num_docs == ds.num_docs and out.doc_ids == ds.doc_ids  # the positives are corpus rows
    assert out.positives("train") == ds.positives("train")  # the labelled queries are untouched
    pos = out.positives(pseudo.PSEUDO_SPLIT)
    assert sorted(pos) == list(range(ds.num_queries, out.num_queries))
    for q, d in zip(sorted(pos), cut.rows):
        assert pos[q] == [int(d)] and out.query_ids[q] == f"pseudo:d{d}"
        ids, mask = out.query_tokens(np.array([q]))
        want = ref(out.query_texts[q], max_length=ds.max_query_len, truncation=True)["input_ids"]
        assert ids[0, : mask[0].sum()].tolist() == want
    # The old rows read the same tokens as before.
    np.testing.assert_array_equal(out.query_tokens(np.array([0, 1]))[0], ds.query_tokens(np.array([0, 1]))[0])
    with pytest.raises(ValueError, match="already has a split"):
        pseudo.with_pseudo_queries(out, cut, tok)


@pytest.mark.parametrize("kind", ["title", "ict"])
def test_training_only_positives_follow_the_corpus_rows(kind):
    """'title' and 'ict' positives are new passages after the corpus: num_docs (what is indexed
    and evaluated) and the corpus rows' tokens are unchanged, each positive reads its own text's
    tokens, and corpus_rows maps it back to the document it was cut from."""
    tok = hf.load_tokenizer(make_tiny_config())
    ref = hf.load_hf_tokenizer(make_tiny_config())  # transformers' own call, the reference
    ds = _dataset(tok)
    cut = pseudo.cut_queries(ds.doc_texts, 10, kind, seed=0, titles=TITLES)
    out = pseudo.with_pseudo_queries(ds, cut, tok)
    n = len(cut.rows)
    assert n > 0 and out.num_docs == ds.num_docs and len(out.doc_ids) == ds.num_docs + n
    np.testing.assert_array_equal(out.doc_tokens(np.arange(ds.num_docs))[0], ds.doc_tokens(np.arange(ds.num_docs))[0])
    pos = out.positives(pseudo.PSEUDO_SPLIT)
    for q, d, text in zip(sorted(pos), cut.rows, cut.passages):
        (p,) = pos[q]
        assert p >= ds.num_docs and out.doc_ids[p] == f"pseudo-passage:d{d}"
        ids, mask = out.doc_tokens(np.array([p]))
        assert ids[0, : mask[0].sum()].tolist() == ref(text, max_length=ds.max_passage_len, truncation=True)["input_ids"]
        assert out.corpus_rows(np.array([p, 1, -1])).tolist() == [int(d), 1, -1]


def test_pseudo_config_is_validated():
    from md2pr_jax.config import ConfigError, validate

    with pytest.raises(ConfigError, match="data.pseudo_queries > 0"):
        validate(make_tiny_config(**{"train.pseudo": True}))
    with pytest.raises(ConfigError, match="pseudo_kind"):
        validate(make_tiny_config(**{"data.pseudo_queries": 5, "data.pseudo_kind": "question"}))
    with pytest.raises(ConfigError, match="tau_source"):
        validate(make_tiny_config(**{"filter.tau_source": "dev"}))
    validate(make_tiny_config(**{"data.pseudo_queries": 5, "train.pseudo": True, "filter.tau_source": "pseudo"}))
    with pytest.raises(ConfigError, match="pseudo_only"):
        validate(make_tiny_config(**{"data.pseudo_queries": 5, "filter.pseudo_only": True}))
    with pytest.raises(ConfigError, match="pseudo_only"):
        validate(make_tiny_config(**{"data.pseudo_queries": 5, "train.pseudo": True, "filter.pseudo_only": True,
                                     "filter.enabled": False}))
    validate(make_tiny_config(**{"data.pseudo_queries": 5, "train.pseudo": True, "filter.pseudo_only": True}))
    for bad in ({"filter.enabled": False}, {"filter.promote": True}):
        with pytest.raises(ConfigError, match="random_flags"):
            validate(make_tiny_config(**{"filter.random_flags": True, **bad}))
    validate(make_tiny_config(**{"filter.random_flags": True}))


def test_a_training_only_positive_keeps_its_source_document_out_of_the_mined_negatives():
    """The source document holds the title (or the removed sentence) verbatim: mining leaves it
    out for its pseudo-query, beside the positive itself; the labelled queries keep theirs."""
    from md2pr_jax.rounds.stages import Context, source_rows

    tok = hf.load_tokenizer(make_tiny_config())
    ds = pseudo.with_pseudo_queries(_dataset(tok), pseudo.cut_queries(DOCS, 10, "title", seed=0, titles=TITLES), tok)
    pos = ds.positives(pseudo.PSEUDO_SPLIT)
    ctx = Context(None, None, ds, None, None, None, {}, {0: [0], 1: [2]}, [], True, pos, {}, source_rows(ds, pos))
    excluded = ctx.excluded_positives
    assert excluded[0] == [0] and excluded[1] == [2]
    for q, (p,) in pos.items():
        source = int(ds.corpus_rows([p])[0])
        assert p >= ds.num_docs and excluded[q] == sorted([source, p])
        assert ds.doc_ids[p] == f"pseudo-passage:{ds.doc_ids[source]}"
