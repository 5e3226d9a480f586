"""The configured models' parameters: built from the config (random, or from a Hugging Face
folder through `hf`), read back from a workdir, and exported (`--mode export_hf`).

All trees here are host numpy, unboxed; `train.state` places them on a mesh.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from md2pr_jax import artifacts, hf
from md2pr_jax.layout import Layout
from md2pr_jax.seeds import derive_seed

Params = dict[str, Any]

# The student's init for a config, built once per process (a round reads it as the reference
# tree of every params file it loads). Keyed by what the tree depends on.
_STUDENT_CACHE: dict[str, Params] = {}


def _random_params(module, rng, *inputs, method=None) -> Params:
    import flax.linen as nn

    variables = jax.jit(lambda r: module.init(r, *inputs, method=method))(rng)
    return jax.tree.map(np.asarray, nn.unbox(variables["params"]))


def _dummy_pair(config):
    import jax.numpy as jnp

    q = jnp.ones((1, config.data.max_query_len), jnp.int32)
    p = jnp.ones((1, config.data.max_passage_len), jnp.int32)
    return q, q, p, p


def _student_key(config) -> str:
    parts = (config.student.to_dict(), config.model.to_dict(), int(config.data.max_query_len),
             int(config.data.max_passage_len), int(config.seed))
    return json.dumps(parts, sort_keys=True, default=str)


def init_student_params(config, rng: jax.Array | None = None) -> Params:
    """Student params (host numpy): from `config.student.init` when set, else random. Without
    `rng` the tree is built once per process; each call gets its own dicts over the same
    arrays (do not write into the arrays)."""
    if rng is None:
        key = _student_key(config)
        if key not in _STUDENT_CACHE:
            _STUDENT_CACHE[key] = _init_student(config, jax.random.PRNGKey(derive_seed(config, "student_init")))
        return jax.tree.map(lambda x: x, _STUDENT_CACHE[key])
    return _init_student(config, rng)


def _init_student(config, rng: jax.Array) -> Params:
    from md2pr_jax.models import student_from_config

    ref = _random_params(student_from_config(config), rng, *_dummy_pair(config))
    if not config.student.init:
        return ref
    folder = hf.resolve_pretrained(config.student.init)
    cut = bool(config.student.truncate_init)
    hf.check_shape(hf.read_hf_config(folder), config.student.bert, folder, "config.student.bert", truncate=cut)
    bert = hf.hf_to_bert(hf.read_safetensors(folder), config.student.bert.num_layers, folder, pooler=False,
                         truncate=cut)
    loaded = {name: bert for name in ref}  # shared: 'encoder'; separate: both towers start equal
    return hf.fit_params(loaded, ref, folder)


def init_teacher_params(config, rng: jax.Array | None = None) -> Params:
    """Teacher params: BertForSequenceClassification weights, or a BertModel (new head), or random."""
    from md2pr_jax.models import teacher_from_config

    rng = jax.random.PRNGKey(derive_seed(config, "teacher_init")) if rng is None else rng
    ref = _random_params(teacher_from_config(config), rng, *_dummy_pair(config))
    if not config.teacher.init:
        return ref
    folder = hf.resolve_pretrained(config.teacher.init)
    cut = bool(config.teacher.truncate_init)
    hf.check_shape(hf.read_hf_config(folder), config.teacher.bert, folder, "config.teacher.bert", truncate=cut)
    tensors = hf.read_safetensors(folder)
    loaded = {"bert": hf.hf_to_bert(tensors, config.teacher.bert.num_layers, folder, pooler=True, truncate=cut),
              "classifier": None, "score_head": None}
    loaded = {k: v for k, v in loaded.items() if k in ref}  # the configured head's parameters only
    head_file = os.path.join(folder, hf.SCORE_HEAD_FILE)
    if "score_head" in ref and os.path.exists(head_file):
        with open(head_file) as f:
            head = json.load(f)
        loaded["score_head"] = {"scale": np.float32(head["scale"]), "bias": np.float32(head["bias"])}
    if "classifier.weight" in tensors and "classifier" in ref:
        if tensors["classifier.weight"].shape[0] != 1:
            raise hf.WeightsError(f"{folder}: classifier has {tensors['classifier.weight'].shape[0]} labels; the teacher needs 1")
        loaded["classifier"] = hf.read_linear(tensors, "classifier", folder)
    return hf.fit_params(loaded, ref, folder)


def saved_or_init(layout: Layout, which: str, config) -> tuple[Params, str]:
    """(params, source): WORKDIR/params/<which> ('student' or 'teacher') when it exists, else the
    configured initialisation."""
    init_fn, init_src = {
        "student": (init_student_params, config.student.init),
        "teacher": (init_teacher_params, config.teacher.init),
    }[which]
    path = layout.params(which)
    if path.is_dir():
        return artifacts.load_params(path, init_fn(config)), str(path)
    return init_fn(config), init_src or "random init"


def export_mode(config, workdir: str) -> None:
    """`--mode export_hf`: DIR/hf/student and DIR/hf/teacher from DIR's params, else the init."""
    layout = Layout.at(workdir)
    student, s_src = saved_or_init(layout, "student", config)
    teacher, t_src = saved_or_init(layout, "teacher", config)
    source = f"student: {s_src}, teacher: {t_src}"
    tok = hf.load_hf_tokenizer(config)
    folders = {"student": layout.hf("student"), "teacher": layout.hf("teacher")}
    with artifacts.local_folder(layout.root / "hf") as out:
        hf.export_student(student, config, os.path.join(out, "student"), tok)
        if "query_encoder" in student:
            hf.export_student(student, config, os.path.join(out, "student_query"), tok, tower="query")
        hf.export_teacher(teacher, config, os.path.join(out, "teacher"), tok)
    logging.info("exported student and teacher from %s to %s", source, layout.root / "hf")
    print(json.dumps({"source": source, **{k: str(v) for k, v in folders.items()}}))
