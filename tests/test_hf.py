"""Hugging Face weights in and out (and md2pr_jax.params, which builds params from them): parity with sentence-transformers, round trips, bad input."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from conftest import ROOT, make_tiny_config

from md2pr_jax import hf
from md2pr_jax.config import MINILM_ID, load_config
from md2pr_jax.models import DualEncoder, student_from_config, teacher_from_config
from md2pr_jax.params import init_student_params, init_teacher_params

QUERIES = ["Vitamin D deficiency raises the risk of fractures.", "Aspirin lowers mortality after a stroke."]
PASSAGES = [
    "We studied bone density in 400 adults with low serum vitamin D levels over five years.",
    "A randomised trial of aspirin in patients after ischaemic stroke found fewer deaths.",
    "Gene expression in yeast changes under heat shock.",
]


def _tokens(tok, texts, max_len):
    enc = tok(texts, max_length=max_len, truncation=True, padding="max_length", return_tensors="np")
    return enc["input_ids"].astype(np.int32), enc["attention_mask"].astype(np.int32)


def _jax_embed(cfg, params, tok, texts, max_len):
    model = student_from_config(cfg)
    ids, mask = _tokens(tok, texts, max_len)
    emb, _ = model.apply({"params": params}, ids, mask, method=DualEncoder.encode_passage)
    return np.asarray(emb)


def _jax_scores(cfg, params, tok, pairs):
    teacher = teacher_from_config(cfg)
    q_ids, q_mask = _tokens(tok, [q for q, _ in pairs], cfg.data.max_query_len)
    p_ids, p_mask = _tokens(tok, [p for _, p in pairs], cfg.data.max_passage_len)
    scores, _ = teacher.apply({"params": params}, q_ids, q_mask, p_ids, p_mask)
    return np.asarray(scores)


@pytest.mark.data
def test_minilm_import_matches_sentence_transformers(data_dir):
    from sentence_transformers import SentenceTransformer

    cfg = load_config(os.path.join(ROOT, "configs/scifact_minilm.py"), ["data.max_passage_len=256"])
    params = init_student_params(cfg)
    tok = hf.load_hf_tokenizer(cfg)
    with open(os.path.join(data_dir, "scifact", "corpus.jsonl")) as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(40), f)]
    ours = _jax_embed(cfg, params, tok, texts, 256)
    ref = SentenceTransformer(hf.resolve_pretrained(MINILM_ID), device="cpu").encode(texts, batch_size=16)
    assert ours.shape == (40, 384)
    assert np.abs(ours - ref).max() <= 1e-4


@pytest.mark.parametrize("which", ["tiny", "minilm"])
def test_export_round_trip(tmp_path, which):
    from sentence_transformers import CrossEncoder as STCrossEncoder
    from sentence_transformers import SentenceTransformer
    from transformers import AutoModel

    if which == "tiny":
        cfg = make_tiny_config()
        cfg.data.max_query_len, cfg.data.max_passage_len = 16, 32
    else:  # the CrossEncoder export is the `cls` head's (segment_cosine: the test below)
        cfg = load_config(os.path.join(ROOT, "configs/scifact_minilm.py"), ["teacher.head=cls"])
    student = init_student_params(cfg, jax.random.PRNGKey(3))
    teacher = init_teacher_params(cfg, jax.random.PRNGKey(4))
    tok = hf.load_hf_tokenizer(cfg)
    s_dir = hf.export_student(student, cfg, str(tmp_path / "student"), tok)
    t_dir = hf.export_teacher(teacher, cfg, str(tmp_path / "teacher"), tok)

    ours = _jax_embed(cfg, student, tok, PASSAGES, cfg.data.max_passage_len)
    st = SentenceTransformer(s_dir, device="cpu")
    assert np.abs(st.encode(PASSAGES) - ours).max() <= 1e-5

    ids, mask = _tokens(tok, PASSAGES, cfg.data.max_passage_len)
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(s_dir)(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).last_hidden_state
    m = mask[..., None].astype(np.float32)
    pooled = (hidden.numpy() * m).sum(1) / m.sum(1)
    pooled /= np.linalg.norm(pooled, axis=-1, keepdims=True)
    assert np.abs(pooled - ours).max() <= 1e-5

    pairs = [(q, p) for q in QUERIES for p in PASSAGES]
    ours_scores = _jax_scores(cfg, teacher, tok, pairs)
    ce = STCrossEncoder(t_dir, device="cpu", activation_fn=torch.nn.Identity())
    theirs = ce.predict(pairs, convert_to_numpy=True)
    assert np.abs(theirs - ours_scores).max() <= 1e-4
    assert np.std(ours_scores) > 0  # the scores differ across pairs: the test can fail


def test_import_round_trip_preserves_every_tensor(tmp_path):
    cfg = make_tiny_config()
    teacher = init_teacher_params(cfg, jax.random.PRNGKey(0))
    hf.export_teacher(teacher, cfg, str(tmp_path / "t"))
    cfg.teacher.init = str(tmp_path / "t")
    again = init_teacher_params(cfg, jax.random.PRNGKey(99))
    for a, b in zip(jax.tree.leaves(teacher), jax.tree.leaves(again)):
        np.testing.assert_array_equal(a, b)


def test_layer_count_mismatch_is_named(tmp_path):
    cfg = make_tiny_config()
    hf.export_student(init_student_params(cfg), cfg, str(tmp_path / "s"))
    small = make_tiny_config()
    small.student.bert.num_layers = 1
    small.student.init = str(tmp_path / "s")
    with pytest.raises(hf.WeightsError, match="num_hidden_layers=2 but config.student.bert.num_layers=1"):
        init_student_params(small)


def test_tensor_shape_mismatch_is_named(tmp_path):
    cfg = make_tiny_config()
    hf.export_student(init_student_params(cfg), cfg, str(tmp_path / "s"))
    with open(tmp_path / "s" / "config.json") as f:
        meta = json.load(f)
    meta.pop("intermediate_size")  # the tensors still say 64; the config below says 128
    with open(tmp_path / "s" / "config.json", "w") as f:
        json.dump(meta, f)
    other = make_tiny_config()
    other.student.bert.intermediate_size = 128
    other.student.init = str(tmp_path / "s")
    with pytest.raises(hf.WeightsError, match=r"intermediate_dense.*has shape \(64,\).*expects \(128,\)"):
        init_student_params(other)


def test_missing_and_corrupt_weights(tmp_path):
    cfg = make_tiny_config()
    folder = tmp_path / "s"
    hf.export_student(init_student_params(cfg), cfg, str(folder))
    cfg.student.init = str(folder)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(b"not a safetensors file")
    with pytest.raises(hf.WeightsError, match="model.safetensors is not a readable safetensors file"):
        init_student_params(cfg)
    os.remove(folder / "model.safetensors")
    with pytest.raises(hf.WeightsError, match="model.safetensors does not exist"):
        init_student_params(cfg)


def test_unknown_id_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(hf.WeightsError, match="cannot resolve pretrained model 'no-such-org/no-such-model'"):
        hf.resolve_pretrained("no-such-org/no-such-model")


def test_failed_export_leaves_no_folder(tmp_path):
    cfg = make_tiny_config()
    params = init_student_params(cfg)
    del params["encoder"]["layer_1"]["output_LayerNorm"]  # export fails half way through
    with pytest.raises(KeyError):
        hf.export_student(params, cfg, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == []


def test_export_mode_cli_writes_loadable_student(tmp_path):
    from sentence_transformers import SentenceTransformer

    work = tmp_path / "w"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run(
        [sys.executable, "-m", "md2pr_jax.main", "--config", os.path.join(ROOT, "configs/scifact_minilm.py"),
         "--workdir", str(work), "--mode", "export_hf"],
        check=True, cwd=ROOT, env=env, capture_output=True,
    )
    ours = SentenceTransformer(str(work / "hf" / "student"), device="cpu").encode(PASSAGES)
    ref = SentenceTransformer(hf.resolve_pretrained(MINILM_ID), device="cpu").encode(PASSAGES)
    assert np.abs(ours - ref).max() <= 1e-5
    assert os.path.exists(work / "hf" / "teacher" / "model.safetensors")
    shutil.rmtree(work)


def test_segment_cosine_teacher_round_trip_and_score(tmp_path):
    """The segment_cosine head: its score is scale * cos(segment means) + bias of the joint
    encoding, and its export (BertModel + score-head file) loads back tensor for tensor."""
    from md2pr_jax.models import pair_inputs, pool

    cfg = make_tiny_config(**{"teacher.head": "segment_cosine", "teacher.head_scale": 7.0, "teacher.head_bias": -2.0})
    teacher = init_teacher_params(cfg, jax.random.PRNGKey(0))
    assert "classifier" not in teacher and float(teacher["score_head"]["scale"]) == 7.0
    teacher["score_head"] = {"scale": np.float32(5.5), "bias": np.float32(-1.25)}
    tok = hf.load_hf_tokenizer(cfg)
    pairs = [(q, p) for q in QUERIES for p in PASSAGES]
    scores = _jax_scores(cfg, teacher, tok, pairs)

    # The same score by hand from the BERT states of the packed pair.
    from md2pr_jax.models import Bert

    q_ids, q_mask = _tokens(tok, [q for q, _ in pairs], cfg.data.max_query_len)
    p_ids, p_mask = _tokens(tok, [p for _, p in pairs], cfg.data.max_passage_len)
    ids, mask, type_ids, pos_ids = pair_inputs(q_ids, q_mask, p_ids, p_mask)
    bert = Bert(teacher_from_config(cfg).cfg, add_pooler=True)
    last = np.asarray(bert.apply({"params": teacher["bert"]}, ids, mask, type_ids, pos_ids)["last"])
    lq = cfg.data.max_query_len
    q = np.asarray(pool(last[:, :lq], mask[:, :lq], "mean"))
    p = np.asarray(pool(last[:, lq:], mask[:, lq:], "mean"))
    cos = (q * p).sum(-1) / np.linalg.norm(q, axis=-1) / np.linalg.norm(p, axis=-1)
    np.testing.assert_allclose(scores, 5.5 * cos - 1.25, atol=1e-4)
    assert np.std(scores) > 0

    hf.export_teacher(teacher, cfg, str(tmp_path / "t"), tok)
    assert json.load(open(tmp_path / "t" / hf.SCORE_HEAD_FILE))["scale"] == 5.5
    cfg.teacher.init = str(tmp_path / "t")
    again = init_teacher_params(cfg, jax.random.PRNGKey(99))
    flat = lambda t: {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(t)}  # noqa: E731
    a, b = flat(teacher), flat(again)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


def test_unknown_teacher_head_is_named():
    from md2pr_jax.config import ConfigError, validate

    cfg = make_tiny_config(**{"teacher.head": "maxsim"})
    with pytest.raises(ConfigError, match="teacher.head"):
        validate(cfg)


@pytest.mark.data
def test_segment_cosine_teacher_export_matches_hf_on_the_packed_pair(tmp_path):
    """The exported segment_cosine teacher, run by transformers' BertModel on the packed pair
    `[CLS] q [SEP] p [SEP]`, gives our scores from the segment means (token type 0 vs 1)."""
    from transformers import AutoModel

    cfg = load_config(os.path.join(ROOT, "configs/scifact_minilm.py"))
    assert cfg.teacher.head == "segment_cosine"
    teacher = init_teacher_params(cfg)
    tok = hf.load_hf_tokenizer(cfg)
    t_dir = hf.export_teacher(teacher, cfg, str(tmp_path / "teacher"), tok)
    head = json.load(open(os.path.join(t_dir, hf.SCORE_HEAD_FILE)))
    pairs = [(q, p) for q in QUERIES for p in PASSAGES]
    ours = _jax_scores(cfg, teacher, tok, pairs)
    enc = tok([q for q, _ in pairs], [p for _, p in pairs], padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = AutoModel.from_pretrained(t_dir)(**enc).last_hidden_state.numpy()
    real = enc["attention_mask"].numpy()[..., None].astype(np.float32)
    seg = enc["token_type_ids"].numpy()[..., None]
    q = (hidden * real * (seg == 0)).sum(1) / (real * (seg == 0)).sum(1)
    p = (hidden * real * (seg == 1)).sum(1) / (real * (seg == 1)).sum(1)
    cos = (q * p).sum(-1) / np.linalg.norm(q, axis=-1) / np.linalg.norm(p, axis=-1)
    np.testing.assert_allclose(ours, head["scale"] * cos + head["bias"], atol=1e-3)
    assert np.std(ours) > 0.1


def test_layer_indices_match_hugging_face(tmp_path):
    """Every form of a layer index, asked for alone, names the layer Hugging Face numbers so:
    token states 0..n and -(n+1)..-1 are `hidden_states[l]`; attention 1..n and -n..-1 are
    `attentions[l - 1]` / `attentions[l]` (head mean, query->passage block). The train step's
    teacher and student forwards read the same layers: -1 is the last layer on both sides."""
    import jax.numpy as jnp
    from transformers import AutoModel

    from md2pr_jax.config import bert_shape
    from md2pr_jax.models import Bert
    from md2pr_jax.models.bert import layer_index
    from md2pr_jax.train.step import student_forward, teacher_forward

    n = 3
    cfg = make_tiny_config(**{"teacher.head": "segment_cosine"})
    shape = dict(hidden_size=32, num_layers=n, num_heads=2, intermediate_size=64, max_position_embeddings=64)
    cfg.teacher.bert, cfg.student.bert = bert_shape(**shape), bert_shape(**shape)
    teacher = init_teacher_params(cfg, jax.random.PRNGKey(5))
    tok = hf.load_hf_tokenizer(cfg)
    t_dir = hf.export_teacher(teacher, cfg, str(tmp_path / "t"), tok)
    enc = tok(QUERIES[0], PASSAGES[0], return_tensors="np")  # one unpadded pair
    ids, types = enc["input_ids"].astype(np.int32), enc["token_type_ids"].astype(np.int32)
    split, end = int((types[0] == 0).sum()), ids.shape[1]
    model = AutoModel.from_pretrained(t_dir, attn_implementation="eager")
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(ids), token_type_ids=torch.tensor(types),
                    output_hidden_states=True, output_attentions=True)
    assert len(ref.hidden_states) == n + 1 and len(ref.attentions) == n
    bert = Bert(teacher_from_config(cfg).cfg, add_pooler=True)

    def run(**kw):
        return bert.apply({"params": teacher["bert"]}, ids, np.ones_like(ids), types,
                          attention_block=(split, end), **kw)

    for l in list(range(n + 1)) + list(range(-(n + 1), 0)):
        (got,) = run(return_layers=(l,))["states"].values()
        np.testing.assert_allclose(np.asarray(got), ref.hidden_states[l].numpy(), atol=2e-5, err_msg=f"states {l}")
    for l in list(range(1, n + 1)) + list(range(-n, 0)):
        (got,) = run(attention_layers=(l,))["attn"].values()
        theirs = ref.attentions[l - 1 if l > 0 else l].numpy().mean(1)[:, :split, split:end]
        np.testing.assert_allclose(np.asarray(got), theirs, atol=2e-6, err_msg=f"attention {l}")
    # The layers differ, so a wrong index could not pass.
    assert np.abs(ref.attentions[-1].numpy() - ref.attentions[-2].numpy()).max() > 1e-3

    # The step's forwards key their outputs by the configured index and read the same layer.
    q_ids, q_mask = _tokens(tok, QUERIES, cfg.data.max_query_len)
    p_ids, p_mask = _tokens(tok, PASSAGES[:2], cfg.data.max_passage_len)
    batch = {"q_ids": q_ids, "q_mask": q_mask, "p_ids": np.stack([p_ids] * 2), "p_mask": np.stack([p_mask] * 2)}
    t_mod = teacher_from_config(cfg)
    _, by_form = teacher_forward(t_mod, teacher, batch, (-1, n, n - 1), 2)
    np.testing.assert_array_equal(np.asarray(by_form[:, 0]), np.asarray(by_form[:, 1]))
    assert float(jnp.abs(by_form[:, 0].astype(jnp.float32) - by_form[:, 2].astype(jnp.float32)).max()) > 1e-4
    student = init_student_params(cfg, jax.random.PRNGKey(6))
    _, _, q_states, _ = student_forward(student_from_config(cfg), student, batch, (-1, n, n - 1), 2)
    np.testing.assert_array_equal(np.asarray(q_states[-1]), np.asarray(q_states[n]))
    assert float(jnp.abs(q_states[-1] - q_states[n - 1]).max()) > 1e-4
    for bad, attention in ((0, True), (n + 1, True), (-(n + 1), True), (n + 1, False), (-(n + 2), False)):
        with pytest.raises(ValueError, match="out of range"):
            layer_index(bad, n, attention=attention)


@pytest.mark.parametrize("tower", ["student", "teacher"])
def test_truncated_init_equals_the_full_model_after_layer_n(tmp_path, tower):
    """truncate_init keeps the embeddings and first N layers of a deeper folder: the cut model's
    last token states are the full model's hidden state after layer N (not after its last)."""
    from md2pr_jax.models import Bert

    full = make_tiny_config()
    full.student.bert.num_layers = full.teacher.bert.num_layers = 3
    init = init_student_params if tower == "student" else init_teacher_params
    export = hf.export_student if tower == "student" else hf.export_teacher
    params = init(full, jax.random.PRNGKey(7))
    export(params, full, str(tmp_path / "full"))

    cut = make_tiny_config(**{f"{tower}.init": str(tmp_path / "full"), f"{tower}.truncate_init": True})
    cut[tower].bert.num_layers = 2
    got = init(cut, jax.random.PRNGKey(8))
    encoder = (lambda p: p["encoder"]) if tower == "student" else (lambda p: p["bert"])
    assert "layer_2" not in encoder(got)

    ids = np.array([[101, 2023, 2003, 1037, 3231, 102, 0, 0]], np.int32)
    mask = (ids > 0).astype(np.int32)
    types, pos = np.zeros_like(ids), np.arange(ids.shape[1], dtype=np.int32)[None]

    def states(cfg, p, layer):
        from md2pr_jax.models import bert_module_config

        bert = Bert(bert_module_config(cfg[tower].bert, cfg.model, True), add_pooler=tower == "teacher")
        (out,) = bert.apply({"params": encoder(p)}, ids, mask, types, pos, return_layers=(layer,))["states"].values()
        return np.asarray(out)

    after_2 = states(full, params, 2)
    np.testing.assert_allclose(states(cut, got, -1), after_2, atol=1e-6)
    assert np.abs(states(full, params, 3) - after_2).max() > 1e-3  # layer 3 differs: a wrong cut would fail

    cut[tower].truncate_init = False
    with pytest.raises(hf.WeightsError, match="num_hidden_layers=3"):
        init(cut, jax.random.PRNGKey(8))
