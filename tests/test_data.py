"""Data: TFDS builders, bad-record policy, prepared datasets and the grain pipeline."""

import json
import os

import numpy as np
import pytest

from md2pr_jax.data import BadRecordError, prepare_dataset
from md2pr_jax.data.pipeline import TrainExamples, make_train_iterator, steps_per_epoch
from md2pr_jax.data.records import KINDS
from tests.conftest import make_tiny_config


@pytest.fixture(scope="module")
def tokenizer():
    from md2pr_jax.hf import load_tokenizer

    return load_tokenizer(make_tiny_config())


@pytest.fixture(scope="module")
def hf_tokenizer():
    """transformers' own tokenizer for the same folder: the reference the pipeline's is held to."""
    from md2pr_jax.hf import load_hf_tokenizer

    return load_hf_tokenizer(make_tiny_config())


def _config(data_dir, dataset, builder="beir", **overrides):
    c = make_tiny_config(**overrides)
    c.data.dir, c.data.dataset, c.data.builder = str(data_dir), dataset, builder
    return c


def _write(path, text_or_bytes):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mode = "wb" if isinstance(text_or_bytes, bytes) else "w"
    with open(path, mode) as f:
        f.write(text_or_bytes)


# ----------------------------------------------------------------------------------------
# BEIR


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def write_beir(root, name="toy", docs=8, extra_corpus=b"", extra_queries=b"", extra_qrels=""):
    """A small BEIR dataset: docs d0..d{n-1}, train queries q0..q3 (q_i judges d_i, q0 also d4),
    test queries t0, t1 (judging d5, d6). `extra_*` lines are appended (raw bytes for jsonl)."""
    src = os.path.join(root, name)
    corpus = [{"_id": f"d{i}", "title": f"Title {i}", "text": f"text of document number {i}", "metadata": {}} for i in range(docs)]
    queries = [{"_id": f"q{i}", "text": f"question {i}?", "metadata": {}} for i in range(4)]
    queries += [{"_id": f"t{i}", "text": f"test question {i}", "metadata": {}} for i in range(2)]
    _write(os.path.join(src, "corpus.jsonl"), _jsonl(corpus).encode() + extra_corpus)
    _write(os.path.join(src, "queries.jsonl"), _jsonl(queries).encode() + extra_queries)
    train = "query-id\tcorpus-id\tscore\n" + "".join(f"q{i}\td{i}\t1\n" for i in range(4)) + "q0\td4\t2\n"
    _write(os.path.join(src, "qrels", "train.tsv"), train + extra_qrels)
    _write(os.path.join(src, "qrels", "test.tsv"), "query-id\tcorpus-id\tscore\nt0\td5\t1\nt1\td6\t1\n")
    return src


def test_beir_round_trip(tmp_path, tokenizer, hf_tokenizer):
    write_beir(tmp_path / "src")
    ds = prepare_dataset(_config(tmp_path / "src", "toy"), str(tmp_path / "wd"), tokenizer=tokenizer)
    assert ds.doc_ids == [f"d{i}" for i in range(8)]
    assert ds.doc_texts[3] == "Title 3 text of document number 3"
    assert ds.qrels["train"]["q0"] == {"d0": 1, "d4": 2}
    assert ds.qrels["test"] == {"t0": {"d5": 1}, "t1": {"d6": 1}}
    assert ds.split_queries == {"train": ["q0", "q1", "q2", "q3"], "test": ["t0", "t1"]}
    assert [ds.query_ids[i] for i in ds.query_indices("test")] == ["t0", "t1"]
    assert ds.positives("train")[ds.query_index["q0"]] == [0, 4]
    ids, mask = ds.doc_tokens(np.array([[0, 3]]))
    assert ids.shape == mask.shape == (1, 2, 16) and ids.dtype == mask.dtype == np.int32
    n = int(mask[0, 1].sum())
    assert hf_tokenizer.decode(ids[0, 1, :n]) == "[CLS] title 3 text of document number 3 [SEP]"
    assert (ids[0, 1, n:] == tokenizer.pad_token_id).all() and (mask[0, 1, n:] == 0).all()
    assert ds.doc_lengths[3] == n
    # A shorter length cuts the sequence and ends it with [SEP] again.
    ids, mask = ds.query_tokens([0], max_len=3)
    assert ids[0].tolist() == [tokenizer.cls_token_id, ids[0, 1], tokenizer.sep_token_id] and mask.sum() == 3
    assert ds.bad_records["total"] == 0 and os.path.exists(os.path.join(ds.path, "bad_records.json"))


def test_second_build_reuses_cache(tmp_path, tokenizer):
    write_beir(tmp_path / "src")
    config = _config(tmp_path / "src", "toy")
    first = prepare_dataset(config, str(tmp_path / "wd"), tokenizer=tokenizer)
    stamps = {f: os.stat(os.path.join(first.path, f)).st_mtime_ns for f in os.listdir(first.path)}
    second = prepare_dataset(config, str(tmp_path / "wd"), tokenizer=tokenizer)
    assert not first.from_cache and second.from_cache and second.path == first.path
    assert {f: os.stat(os.path.join(first.path, f)).st_mtime_ns for f in os.listdir(first.path)} == stamps
    # A workdir whose data/ links to this one's (as the ablation's rows do) reuses it too.
    os.makedirs(tmp_path / "row")
    os.symlink(tmp_path / "wd" / "data", tmp_path / "row" / "data")
    linked = prepare_dataset(config, str(tmp_path / "row"), tokenizer=tokenizer)
    assert linked.from_cache and os.listdir(tmp_path / "wd" / "data" / "prepared") == [os.path.basename(first.path)]
    # A changed source file is noticed: the build and the preparation are redone.
    with open(tmp_path / "src" / "toy" / "qrels" / "test.tsv", "a") as f:
        f.write("t0\td7\t1\n")
    third = prepare_dataset(config, str(tmp_path / "wd"), tokenizer=tokenizer)
    assert not third.from_cache and third.qrels["test"]["t0"] == {"d5": 1, "d7": 1}


def test_tokenizer_fingerprint_ignores_call_state(hf_tokenizer):
    from md2pr_jax.data.prepare import tokenizer_fingerprint

    before = tokenizer_fingerprint(hf_tokenizer)
    hf_tokenizer(["some text"], truncation=True, max_length=5)
    assert tokenizer_fingerprint(hf_tokenizer) == before


def test_the_pipelines_tokenizer_is_transformers_own_without_importing_transformers(tokenizer, hf_tokenizer):
    """The pipeline reads tokenizer.json with the `tokenizers` library (import transformers and
    torch cost each process seconds): same fingerprint (so the same prepared folders), same
    special ids, and a fresh process that loads it imports neither."""
    import subprocess
    import sys

    from md2pr_jax.data.prepare import tokenizer_fingerprint
    from tests.conftest import ROOT

    assert type(tokenizer).__name__ == "RustTokenizer"
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(hf_tokenizer)
    for role in ("cls", "sep", "pad"):
        assert getattr(tokenizer, f"{role}_token_id") == getattr(hf_tokenizer, f"{role}_token_id")
    assert tokenizer.truncation_side == hf_tokenizer.truncation_side
    code = ("import sys, json; from md2pr_jax import hf; from tests.conftest import make_tiny_config; "
            "t = hf.load_tokenizer(make_tiny_config()); "
            "print(json.dumps([t.cls_token_id, sorted(m for m in ('transformers', 'torch') if m in sys.modules)]))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == [hf_tokenizer.cls_token_id, []]


def test_a_folder_without_tokenizer_json_falls_back_to_transformers(tmp_path, hf_tokenizer):
    import shutil

    from md2pr_jax import hf
    from md2pr_jax.data.prepare import _tokenize

    folder = tmp_path / "bert"
    folder.mkdir()
    for name in ("vocab.txt", "tokenizer_config.json", "special_tokens_map.json", "config.json"):  # no tokenizer.json
        shutil.copy(os.path.join(hf_tokenizer.name_or_path, name), folder / name)
    slow_only = hf.load_tokenizer(make_tiny_config(**{"student.tokenizer": str(folder)}))
    assert type(slow_only).__name__ != "RustTokenizer"
    texts = ["Vitamin D and fractures: a meta-analysis.", "naïve café"]
    assert _tokenize(slow_only, texts, 12, slow_only.cls_token_id) == _tokenize(hf_tokenizer, texts, 12, hf_tokenizer.cls_token_id)


def test_word_cut_tokenization_is_exact(tokenizer, hf_tokenizer):
    from md2pr_jax.data.prepare import _encode, _tokenize

    texts = [
        "word " * 40,
        "\x00 \ufffd " * 30 + "real words at the end",  # words that vanish in normalisation
        "Punctuation, (lots) of it; e.g. 3.5% of U.S.-based labs! " * 5,
        "naïve café Ünïcödé " * 10,
        "short",
    ]
    assert _tokenize(tokenizer, texts, 16, tokenizer.cls_token_id) == _encode(hf_tokenizer, texts, 16)


def test_subsets_and_dev_split(tmp_path, tokenizer):
    write_beir(tmp_path / "src", docs=40)
    config = _config(tmp_path / "src", "toy", **{"data.dev_fraction": 0.5, "data.max_docs": 12, "data.max_eval_queries": 1})
    ds = prepare_dataset(config, str(tmp_path / "wd"), tokenizer=tokenizer)
    # Half the train queries are held out as 'dev'; max_eval_queries caps every non-train split.
    assert len(ds.split_queries["train"]) == 2 and len(ds.split_queries["dev"]) == 1
    assert set(ds.split_queries["train"]).isdisjoint(ds.split_queries["dev"])
    assert set(ds.split_queries["train"]) | set(ds.split_queries["dev"]) < {"q0", "q1", "q2", "q3"}
    assert len(ds.split_queries["test"]) == 1
    assert ds.num_docs == 12
    judged = {d for split in ds.qrels.values() for docs in split.values() for d in docs}
    assert judged <= set(ds.doc_ids) and ds.doc_ids == sorted(ds.doc_ids, key=lambda d: int(d[1:]))
    again = prepare_dataset(config, str(tmp_path / "wd2"), tokenizer=tokenizer)
    assert again.split_queries == ds.split_queries and again.doc_ids == ds.doc_ids  # seeded
    with pytest.raises(ValueError, match="max_train_queries|dev_fraction"):
        prepare_dataset(_config(tmp_path / "src", "toy", **{"data.dev_fraction": 0.01}), str(tmp_path / "wd3"), tokenizer=tokenizer)


# Every bad-record kind: (kind, file, line, mutation as write_beir kwargs).
BAD_CASES = [
    ("malformed_json", "corpus.jsonl", 9, dict(extra_corpus=b'{"_id": "d8", "text": \n')),
    ("missing_field", "corpus.jsonl", 9, dict(extra_corpus=b'{"_id": "d8", "title": "no text"}\n')),
    ("empty_text", "corpus.jsonl", 9, dict(extra_corpus=b'{"_id": "d8", "title": "", "text": "  "}\n')),
    ("duplicate_id", "corpus.jsonl", 9, dict(extra_corpus=b'{"_id": "d2", "title": "", "text": "again"}\n')),
    ("bad_utf8", "queries.jsonl", 7, dict(extra_queries=b'{"_id": "q9", "text": "caf\xe9"}\n')),
    ("unknown_query", "train.tsv", 7, dict(extra_qrels="q77\td1\t1\n")),
    ("unknown_doc", "train.tsv", 7, dict(extra_qrels="q1\td77\t1\n")),
    ("malformed_row", "train.tsv", 7, dict(extra_qrels="q1\td3\n")),
]
assert {k for k, *_ in BAD_CASES} == set(KINDS)


@pytest.mark.parametrize("kind,filename,line,mutation", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_record_error(tmp_path, tokenizer, kind, filename, line, mutation):
    write_beir(tmp_path / "src", **mutation)
    with pytest.raises(BadRecordError) as err:
        prepare_dataset(_config(tmp_path / "src", "toy"), str(tmp_path / "wd"), tokenizer=tokenizer)
    message = str(err.value)
    assert f"{filename}:{line}:" in message and kind.replace("_", " ") in message and "bad_records='skip'" in message


@pytest.mark.parametrize("kind,filename,line,mutation", BAD_CASES, ids=[c[0] for c in BAD_CASES])
def test_bad_record_skip(tmp_path, tokenizer, kind, filename, line, mutation):
    write_beir(tmp_path / "src", **mutation)
    config = _config(tmp_path / "src", "toy", **{"data.bad_records": "skip"})
    ds = prepare_dataset(config, str(tmp_path / "wd"), tokenizer=tokenizer)
    with open(os.path.join(ds.path, "bad_records.json")) as f:
        report = json.load(f)
    assert report["counts"] == {k: int(k == kind) for k in KINDS} and report["total"] == 1
    assert f"{filename}:{line}:" in report["examples"][kind][0]
    # The good records are all there, the bad one is not.
    assert ds.doc_ids == [f"d{i}" for i in range(8)] and ds.doc_texts[2] == "Title 2 text of document number 2"
    assert ds.qrels["train"]["q1"] == {"d1": 1} and len(ds.split_queries["train"]) == 4
    # A cached build that skipped records is refused under the 'error' policy.
    config.data.bad_records = "error"
    with pytest.raises(BadRecordError, match="skipped 1 bad record"):
        prepare_dataset(config, str(tmp_path / "wd"), tokenizer=tokenizer)


# ----------------------------------------------------------------------------------------
# MS MARCO passage and NQ (DPR), in their official formats


def test_msmarco_round_trip(tmp_path, tokenizer, hf_tokenizer):
    src = tmp_path / "src" / "msmarco"
    passages = ["The capital of France is Paris.", "Paris has the Eiffel tower.", "Berlin is in Germany.", "Tea is a drink."]
    _write(str(src / "collection.tsv"), "".join(f"{i}\t{p}\n" for i, p in enumerate(passages)))
    _write(str(src / "queries.train.tsv"), "1185869\twhat is the capital of france\n1185868\twhere is berlin\n5\tunjudged query\n")
    _write(str(src / "queries.dev.tsv"), "1048585\twhat is tea\n")
    _write(str(src / "qrels.train.tsv"), "1185869\t0\t0\t1\n1185868\t0\t2\t1\n")
    _write(str(src / "qrels.dev.tsv"), "1048585\t0\t3\t1\n")
    _write(str(src / "qidpidtriples.train.full.2.tsv"), "1185869\t0\t1\n1185869\t0\t3\n1185868\t2\t0\n")
    config = _config(tmp_path / "src", "msmarco", builder="msmarco_passage", **{"data.eval_split": "dev"})
    ds = prepare_dataset(config, str(tmp_path / "wd"), tokenizer=tokenizer)
    assert ds.doc_ids == ["0", "1", "2", "3"] and list(ds.doc_texts) == passages
    assert ds.split_queries == {"train": ["1185869", "1185868"], "dev": ["1048585"]}
    assert ds.qrels == {"train": {"1185869": {"0": 1}, "1185868": {"2": 1}}, "dev": {"1048585": {"3": 1}}}
    assert ds.hard_negatives == {"1185869": ["1", "3"], "1185868": ["0"]}
    ids, mask = ds.query_tokens([ds.query_index["1048585"]])
    assert hf_tokenizer.decode(ids[0, : mask.sum()]) == "[CLS] what is tea [SEP]"


def test_nq_dpr_round_trip(tmp_path, tokenizer):
    src = tmp_path / "src" / "nq"
    _write(
        str(src / "psgs_w100.tsv"),
        'id\ttext\ttitle\n1\t"Aaron Aaron ( or ; ""Ahärôn"") is a prophet"\tAaron\n2\tGod at Sinai granted Aaron\tAaron\n'
        '3\tThe Moon orbits the Earth\tMoon\n',
    )

    def ctx(pid, title="t", text="x"):
        return {"title": title, "text": text, "score": 1.0, "title_score": 0, "passage_id": str(pid)}

    train = [
        {"dataset": "nq_train_psgs_w100", "question": "who is aaron", "answers": ["a prophet"],
         "positive_ctxs": [ctx(1)], "negative_ctxs": [ctx(3)], "hard_negative_ctxs": [ctx(2), ctx(3)]},
        {"dataset": "nq_train_psgs_w100", "question": "what orbits the earth", "answers": ["the Moon", "moon"],
         "positive_ctxs": [ctx(3)], "negative_ctxs": [], "hard_negative_ctxs": []},
    ]  # fmt: skip
    _write(str(src / "biencoder-nq-train.json"), json.dumps(train, indent=4))
    _write(str(src / "biencoder-nq-dev.json"), json.dumps(train[1:], indent=4))
    _write(str(src / "nq-test.qa.csv"), "who got the first nobel prize in physics\t['Wilhelm Conrad Röntgen']\nwhen is the moon full\t['monthly', \"every 29 days\"]\n")
    config = _config(tmp_path / "src", "nq", builder="nq_dpr")
    ds = prepare_dataset(config, str(tmp_path / "wd"), tokenizer=tokenizer)
    assert ds.doc_ids == ["1", "2", "3"]
    assert ds.doc_texts[0] == 'Aaron Aaron Aaron ( or ; "Ahärôn") is a prophet'
    assert ds.split_queries == {"train": ["train-0", "train-1"], "dev": ["dev-0"], "test": ["test-0", "test-1"]}
    assert ds.qrels["train"] == {"train-0": {"1": 1}, "train-1": {"3": 1}} and ds.qrels["test"] == {}
    assert ds.hard_negatives == {"train-0": ["2", "3"]}
    assert ds.answers["test-1"] == ["monthly", "every 29 days"] and ds.answers["train-1"] == ["the Moon", "moon"]
    assert ds.query_texts[ds.query_index["test-0"]] == "who got the first nobel prize in physics"


def test_nq_bad_records(tmp_path, tokenizer):
    src = tmp_path / "src" / "nq"
    _write(str(src / "psgs_w100.tsv"), "id\ttext\ttitle\n1\tsome text\tT\n2\tmore text\tT\n")
    good = {"question": "q one", "answers": ["a"], "positive_ctxs": [{"passage_id": "1"}], "hard_negative_ctxs": []}
    no_positive = {"question": "q two", "answers": ["b"], "positive_ctxs": []}
    unknown = {"question": "q three", "answers": ["c"], "positive_ctxs": [{"passage_id": "1"}, {"passage_id": "99"}]}
    _write(str(src / "biencoder-nq-train.json"), json.dumps([good, no_positive, unknown], indent=1))
    _write(str(src / "nq-test.qa.csv"), "q four\t['x']\nq five\tnot a list\n")
    config = _config(tmp_path / "src", "nq", builder="nq_dpr")
    with pytest.raises(BadRecordError, match=r"biencoder-nq-train.json:\d+: missing field"):
        prepare_dataset(config, str(tmp_path / "wd"), tokenizer=tokenizer)
    config.data.bad_records = "skip"
    ds = prepare_dataset(config, str(tmp_path / "wd"), tokenizer=tokenizer)
    counts = ds.bad_records["counts"]
    assert (counts["missing_field"], counts["unknown_doc"], counts["malformed_row"]) == (1, 1, 1)
    assert ds.split_queries == {"train": ["train-0", "train-2"], "test": ["test-0"]}
    assert ds.qrels["train"]["train-2"] == {"1": 1}


def test_json_array_stream(tmp_path):
    from md2pr_jax.data.records import BadRecords, iter_json_array

    items = [{"question": f"q{i}\u00e9", "n": i} for i in range(6)]
    path = str(tmp_path / "a.json")
    _write(path, json.dumps(items, indent=2))
    got = list(iter_json_array(path, BadRecords("error"), chunk_bytes=7))  # elements span chunks
    assert [obj for _, obj in got] == items and got[1][0] == 6  # each element's first line
    raw = json.dumps(items, indent=2).encode().replace(b'"q2', b'"\xff2', 1)
    _write(path, raw)
    bad = BadRecords("skip")
    assert [obj["n"] for _, obj in iter_json_array(path, bad, chunk_bytes=5)] == [0, 1, 3, 4, 5]
    assert bad.counts == {"bad_utf8": 1} and "a.json:10:" in bad.examples["bad_utf8"][0]
    _write(path, json.dumps(items, indent=2).replace('"n": 3', '"n": 3,,'))
    with pytest.raises(BadRecordError, match=r"a.json:\d+: malformed json"):
        list(iter_json_array(path, BadRecords("error")))


def test_prepare_mode(tmp_path, capsys, monkeypatch):
    from md2pr_jax.data import prepare_mode
    from md2pr_jax.main import resolve_mode

    assert resolve_mode("prepare") is prepare_mode
    write_beir(tmp_path / "src")
    prepare_mode(_config(tmp_path / "src", "toy"), str(tmp_path / "wd"))
    printed = capsys.readouterr().out  # TFDS prints its own progress lines first
    out = json.loads(printed[printed.rindex("\n{\n") + 1 :] if not printed.startswith("{") else printed)
    assert out["docs"] == 8 and out["splits"]["train"] == {"queries": 4, "judgements": 5}


# ----------------------------------------------------------------------------------------
# SciFact (real data)


@pytest.mark.data
def test_scifact(tmp_path, data_dir, tokenizer):
    config = _config(data_dir, "scifact", **{"data.max_query_len": 32, "data.max_passage_len": 128})
    ds = prepare_dataset(config, str(tmp_path / "wd"), tokenizer=tokenizer)
    summary = ds.summary()
    assert ds.num_docs == 5183 and not ds.from_cache
    assert summary["splits"]["train"] == {"queries": 809, "judgements": 919}
    assert summary["splits"]["test"] == {"queries": 300, "judgements": 339}
    assert ds.bad_records["total"] == 0
    tfds_dir = json.load(open(os.path.join(ds.path, "meta.json")))["tfds_dir"]
    stamp = os.stat(os.path.join(tfds_dir, "md2pr_source.json")).st_mtime_ns
    again = prepare_dataset(config, str(tmp_path / "wd"), tokenizer=tokenizer)
    assert again.from_cache and again.path == ds.path
    assert os.stat(os.path.join(tfds_dir, "md2pr_source.json")).st_mtime_ns == stamp  # TFDS build reused
    ids, mask = again.doc_tokens(np.arange(4))
    assert ids.shape == (4, 128) and (ids[:, 0] == tokenizer.cls_token_id).all()


# ----------------------------------------------------------------------------------------
# The grain pipeline


class _FakeDataset:
    """Token rows that encode their own index, so batches can be checked by eye."""

    def query_tokens(self, idx, max_len):
        idx = np.asarray(idx)
        return np.repeat(idx[..., None], max_len, -1).astype(np.int32), np.ones(idx.shape + (max_len,), np.int32)

    def doc_tokens(self, idx, max_len):
        return self.query_tokens(idx, max_len)


def _examples(e=23, c=3, attn=False):
    rng = np.random.default_rng(0)
    return TrainExamples(
        query_idx=np.arange(e) + 1000,
        cand_idx=np.arange(e * c).reshape(e, c),
        cand_mask=np.ones((e, c)),
        teacher_scores=rng.normal(size=(e, c)),
        teacher_attn=rng.random((e, 2, 2, 8, 16)).astype(np.float32) if attn else None,
    )


def _take(it, n):
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_pipeline_resume(workers):
    config = make_tiny_config(**{"data.num_workers": workers})
    ex = _examples(attn=True)
    it = make_train_iterator(ex, _FakeDataset(), config, seed=3, process_index=0, process_count=1)
    first = _take(it, 4)
    state = json.loads(json.dumps(it.get_state()))
    assert state["step"] == 4
    rest = _take(it, 9)  # crosses two epoch boundaries (5 steps per epoch)
    resumed = make_train_iterator(ex, _FakeDataset(), config, seed=3, process_index=0, process_count=1)
    resumed.set_state(state)
    for a, b in zip(rest, _take(resumed, 9)):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert first[0]["teacher_attn"].dtype.name == "bfloat16" and first[0]["teacher_attn"].shape == (4, 2, 2, 8, 16)
    other = make_train_iterator(ex, _FakeDataset(), make_tiny_config(**{"train.batch_size": 8}), seed=3, process_index=0, process_count=1)
    with pytest.raises(ValueError, match="global_batch"):
        other.set_state(state)


def test_train_examples_save_load(tmp_path):
    import ml_dtypes

    ex = _examples(attn=True)
    ex.teacher_attn = ex.teacher_attn.astype(ml_dtypes.bfloat16)
    ex.save(str(tmp_path / "ex"))
    back = TrainExamples.load(str(tmp_path / "ex"))
    assert back.teacher_attn.dtype == ml_dtypes.bfloat16 and isinstance(back.teacher_attn, np.memmap)
    for name in ("query_idx", "cand_idx", "cand_mask", "teacher_scores", "teacher_attn"):
        assert np.array_equal(np.asarray(getattr(back, name)), np.asarray(getattr(ex, name)))


def test_pipeline_epochs():
    config = make_tiny_config()
    ex = _examples()
    assert steps_per_epoch(len(ex), 4) == 5
    it = make_train_iterator(ex, _FakeDataset(), config, seed=0, num_epochs=2, process_index=0, process_count=1)
    batches = list(it)
    assert len(batches) == 10 and it.epoch == 2
    epochs = [np.concatenate([b["q_ids"][:, 0] for b in batches[i : i + 5]]) for i in (0, 5)]
    for rows in epochs:
        assert len(set(rows.tolist())) == 20  # no example twice within an epoch; 3 dropped
    assert not np.array_equal(epochs[0], epochs[1])  # reshuffled each epoch
    b = batches[0]
    assert b["q_ids"].shape == (4, 8) and b["p_ids"].shape == (4, 3, 16) and b["cand_mask"].shape == (4, 3)
    assert "teacher_attn" not in b
    # Candidates stay with their query: example e has candidates 3e, 3e+1, 3e+2.
    e = b["q_ids"][:, 0] - 1000
    assert np.array_equal(b["p_ids"][:, :, 0], 3 * e[:, None] + np.arange(3))
    shifted = make_train_iterator(ex, _FakeDataset(), config, seed=0, epoch_offset=1, process_index=0, process_count=1)
    assert np.array_equal(next(shifted)["q_ids"], batches[5]["q_ids"])  # epoch_offset picks the epoch's shuffle


def test_pipeline_one_vs_two_processes():
    config = make_tiny_config()
    ex = _examples(attn=True)
    one = make_train_iterator(ex, _FakeDataset(), config, seed=7, process_index=0, process_count=1)
    two = [make_train_iterator(ex, _FakeDataset(), config, seed=7, process_index=i, process_count=2) for i in range(2)]
    for _ in range(7):
        whole = next(one)
        parts = [next(it) for it in two]
        assert parts[0]["q_ids"].shape[0] == 2
        for k in whole:
            assert np.array_equal(whole[k], np.concatenate([p[k] for p in parts]))


def test_to_global_single_process():
    import jax

    from md2pr_jax import sharding as shd
    from md2pr_jax.data.pipeline import to_global

    config = make_tiny_config()
    mesh = shd.make_mesh(config)
    batch = next(make_train_iterator(_examples(), _FakeDataset(), config, seed=0))
    out = to_global(batch, mesh)
    assert isinstance(out["p_ids"], jax.Array) and out["p_ids"].shape == (4, 3, 16)
    assert np.array_equal(np.asarray(out["q_ids"]), batch["q_ids"])
    explicit = to_global(batch, mesh, shd.batch_sharding(mesh))
    assert np.array_equal(np.asarray(explicit["teacher_scores"]), batch["teacher_scores"])


@pytest.mark.parametrize("mode,teacher_len,expect", [("online", 32, 32), ("online", 16, None), ("online", 0, None),
                                                      ("cached", 32, None)])
def test_pipeline_gives_an_online_longer_teacher_its_passages(mode, teacher_len, expect):
    """Only an online teacher reading longer passages than the student (16) gets its own
    teacher_p_ids [b, C, Lt] (same candidates); at the student's length nothing is added."""
    config = make_tiny_config(**{"loss.teacher_mode": mode, "teacher.max_passage_len": teacher_len})
    batch = next(make_train_iterator(_examples(), _FakeDataset(), config, seed=0, process_index=0, process_count=1))
    if expect is None:
        assert "teacher_p_ids" not in batch and "teacher_p_mask" not in batch
    else:
        assert batch["teacher_p_ids"].shape == (4, 3, expect) and batch["teacher_p_mask"].shape == (4, 3, expect)
        np.testing.assert_array_equal(batch["teacher_p_ids"][..., :16], batch["p_ids"])


@pytest.mark.data
def test_nfcorpus_prepares_with_many_graded_positives_and_a_longer_teacher(data_dir, tmp_path):
    """configs/nfcorpus_minilm.py: NFCorpus's own dev split, ~43 positives per train query
    (capped to one list each), graded dev/test judgements, passages stored at the teacher's 256
    tokens whose first 127 are the student's."""
    from md2pr_jax.config import load_config
    from md2pr_jax.data import prepare_dataset
    from md2pr_jax.rounds import filtering, stages

    if not os.path.isdir(os.path.join(data_dir, "nfcorpus")):
        pytest.skip("no nfcorpus under MD2PR_DATA_DIR")
    cfg = load_config(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs/nfcorpus_minilm.py"))
    ds = prepare_dataset(cfg, str(tmp_path))
    assert {s: len(q) for s, q in ds.split_queries.items()} == {"train": 2590, "dev": 324, "test": 323}
    assert ds.num_docs == 3633 and ds.max_passage_len == 128 and ds.stored_passage_len == 256
    pos = ds.positives("train")
    assert 40 < np.mean([len(v) for v in pos.values()]) < 46
    assert {s for docs in ds.qrels["test"].values() for s in docs.values()} >= {1, 2}
    capped = filtering.cap_positives(pos, stages._grades(ds, "train"), cfg.data.positives_per_query, 0)
    assert all(len(v) == 1 and v[0] in pos[q] for q, v in capped.items())
    rows = np.arange(50)
    short, long = ds.doc_tokens(rows), ds.doc_tokens(rows, 256)
    assert short[0].shape == (50, 128) and long[0].shape == (50, 256) and (long[1].sum(1) > 128).any()
    np.testing.assert_array_equal(short[0][:, :127], long[0][:, :127])
