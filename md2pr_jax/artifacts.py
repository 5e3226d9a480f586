"""Reading and writing the workdir's files through etils.epath, so that a workdir can be local
or in a bucket (gs://): parameter trees (orbax), JSON and text written atomically, numpy
arrays, and copies of local folders. Where each file lives is `md2pr_jax.layout`'s business.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

import jax
import numpy as np
from etils import epath

PathLike = str | os.PathLike | epath.Path


def _path(path: PathLike) -> epath.Path:
    s = str(path)
    return epath.Path(s if "://" in s else os.path.abspath(s))


def save_params(path: PathLike, params: Any) -> None:
    """Saves a parameter tree with orbax, replacing what was there (atomically on the orbax side)."""
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(_path(path), jax.tree.map(np.asarray, params), force=True)
    ckptr.wait_until_finished()


def load_params(path: PathLike, reference: Any) -> Any:
    """Restores a tree saved by `save_params`; `reference` gives structure, shapes and dtypes.

    Raises ValueError naming the parameter when a shape disagrees with the configured model.
    """
    import orbax.checkpoint as ocp

    path = _path(path)
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


def _atomic_write(path: PathLike, data: bytes) -> None:
    """Temp file + rename beside the target, so a crash never leaves half a file (a bucket's
    objects appear whole anyway)."""
    path = _path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}.tmp{os.getpid()}"
    tmp.write_bytes(data)
    tmp.replace(path)


def write_text(path: PathLike, text: str) -> None:
    _atomic_write(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any) -> None:
    """Writes JSON atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=float))


def read_json(path: PathLike, default: Any = None) -> Any:
    path = _path(path)
    if not path.exists():
        return default
    return json.loads(path.read_text())


def save_arrays(path: PathLike, **arrays: np.ndarray) -> None:
    """An .npz of `arrays`, written atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    _atomic_write(path, buf.getvalue())


def load_arrays(path: PathLike) -> dict[str, np.ndarray]:
    with _path(path).open("rb") as f:
        with np.load(f) as z:
            return {k: z[k] for k in z.files}


def save_array(path: PathLike, array: np.ndarray) -> None:
    """One .npy, written atomically."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    _atomic_write(path, buf.getvalue())


def load_array(path: PathLike, mmap: bool = False) -> np.ndarray:
    """One .npy; `mmap` maps a local file instead of reading it (a remote one is read whole)."""
    path = _path(path)
    if mmap and "://" not in str(path):
        return np.load(str(path), mmap_mode="r")
    with path.open("rb") as f:
        return np.load(f)


@contextlib.contextmanager
def local_folder(target: PathLike) -> Iterator[str]:
    """A local folder to write into: `target` itself when local, else a temporary folder whose
    files are copied to `target` (e.g. gs://...) on success."""
    target = _path(target)
    if "://" not in str(target):
        target.mkdir(parents=True, exist_ok=True)
        yield str(target)
        return
    tmp = tempfile.mkdtemp(prefix="md2pr-")
    try:
        yield tmp
        copy_tree(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_tree(src: str, dst: PathLike) -> None:
    """Copies the local folder `src` to `dst` (any epath), file by file."""
    dst = _path(dst)
    for folder, _, files in os.walk(src):
        rel = os.path.relpath(folder, src)
        out = dst if rel == "." else dst / rel
        out.mkdir(parents=True, exist_ok=True)
        for name in files:
            epath.Path(os.path.join(folder, name)).copy(out / name, overwrite=True)


def local_path(path: PathLike) -> str:
    """A local path with `path`'s content (a file or a folder): `path` itself when local, else a
    copy downloaded into a temporary folder that lives as long as the process (memory maps may
    point into it)."""
    path = _path(path)
    if "://" not in str(path):
        return str(path)
    import atexit

    tmp = tempfile.mkdtemp(prefix="md2pr-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)
    target = os.path.join(tmp, path.name)
    _download(path, target)
    return target


def _download(src: epath.Path, dst: str) -> None:
    if src.is_dir():
        os.makedirs(dst, exist_ok=True)
        for child in src.iterdir():
            _download(child, os.path.join(dst, child.name))
    else:
        src.copy(epath.Path(dst), overwrite=True)
