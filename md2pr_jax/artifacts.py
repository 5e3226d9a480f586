"""The workdir layout and the final parameters each stage leaves there.

    WORKDIR/data/                    prepared, tokenized dataset (data module)
    WORKDIR/params/teacher/          the teacher after round 0 (orbax)
    WORKDIR/params/student/          the student after the latest finished round (orbax)
    WORKDIR/rounds/rNN/              a round's artifacts: candidates, teacher scores, tau, metrics
    WORKDIR/ckpt/<stage>/            the orbax CheckpointManager of the stage in progress
    WORKDIR/eval/<split>.json        --mode evaluate
    WORKDIR/hf/{student,teacher}/    --mode export_hf
    WORKDIR/REPORT.md, results.json  the pipeline report
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np


def params_dir(workdir: str, which: str) -> str:
    return os.path.join(os.path.abspath(workdir), "params", which)


def save_params(path: str, params: Any) -> None:
    """Saves a parameter tree with orbax, replacing what was there (atomically on the orbax side)."""
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(os.path.abspath(path), jax.tree.map(np.asarray, params), force=True)
    ckptr.wait_until_finished()


def load_params(path: str, reference: Any) -> Any:
    """Restores a tree saved by `save_params`; `reference` gives structure, shapes and dtypes.

    Raises ValueError naming the parameter when a shape disagrees with the configured model.
    """
    import orbax.checkpoint as ocp

    path = os.path.abspath(path)
    meta = ocp.StandardCheckpointer().metadata(path)
    tree = getattr(meta, "item_metadata", None) or meta
    saved = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(tree)}
    for k, ref in jax.tree_util.tree_leaves_with_path(reference):
        key = jax.tree_util.keystr(k)
        if key not in saved:
            raise ValueError(f"checkpoint {path} has no parameter {key}; it was written for another model config")
        shape = tuple(getattr(saved[key], "shape", ()))
        if shape != tuple(np.shape(ref)):
            raise ValueError(
                f"checkpoint {path}: parameter {key} has shape {shape} but the config expects "
                f"{tuple(np.shape(ref))}; restore it with the config it was trained with"
            )
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), reference)
    return jax.tree.map(np.asarray, ocp.StandardCheckpointer().restore(path, abstract))


def saved_or_init(workdir: str, which: str, init: Any, init_source: str) -> tuple[Any, str]:
    """(params, source): WORKDIR/params/<which> when it exists, else `init`."""
    path = params_dir(workdir, which)
    if os.path.isdir(path):
        return load_params(path, init), path
    return init, init_source


def latest_params(config, workdir: str):
    """(student, teacher, source): the saved params in WORKDIR, else the configured init."""
    from md2pr_jax import hf

    student, s_src = saved_or_init(workdir, "student", hf.init_student_params(config), config.student.init or "random init")
    teacher, t_src = saved_or_init(workdir, "teacher", hf.init_teacher_params(config), config.teacher.init or "random init")
    return student, teacher, f"student: {s_src}, teacher: {t_src}"


def write_json(path: str, obj: Any) -> None:
    """Writes JSON atomically (temp file + rename), so a crash never leaves half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=float)
    os.replace(tmp, path)


def read_json(path: str, default: Any = None) -> Any:
    if not os.path.exists(path):
        return default
    with open(path) as f:
        return json.load(f)
