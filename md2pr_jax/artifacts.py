"""Reading and writing the workdir's files through etils.epath, so that a workdir can be local
or in a bucket (gs://): parameter trees (orbax), JSON and text written atomically, numpy
arrays, and copies of local folders. Where each file lives is `md2pr_jax.layout`'s business.

Atomic writes: a local file is written beside its target and renamed over it; a bucket's file
is written once as its final object (an object appears whole, and a rename in a bucket is a
copy and a delete). Remote folders read as local ones (Hugging Face weights) are copied once
into a cache under ~/.cache/md2pr_jax.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import tempfile
from typing import Any, Iterator

import numpy as np
from etils import epath

PathLike = str | os.PathLike | epath.Path
CACHE_ROOT = os.path.expanduser("~/.cache/md2pr_jax")  # local copies of what lies in buckets


def is_local(path: PathLike) -> bool:
    """True for a path on this machine's filesystem (no URL scheme such as gs://)."""
    return "://" not in str(path)


def as_path(path: PathLike) -> epath.Path:
    """`path` as an epath: a URL as it is, a local path made absolute."""
    s = str(path)
    return epath.Path(s if not is_local(s) else os.path.abspath(s))



def save_params(path: PathLike, params: Any) -> None:
    """Saves a parameter tree with orbax, replacing what was there (atomically on the orbax side)."""
    import jax  # here, not at the top: compare and the report read artifacts without JAX
    import orbax.checkpoint as ocp

    ckptr = ocp.StandardCheckpointer()
    ckptr.save(as_path(path), jax.tree.map(np.asarray, params), force=True)
    ckptr.wait_until_finished()


def load_params(path: PathLike, reference: Any) -> Any:
    """Restores a tree saved by `save_params`; `reference` gives structure, shapes and dtypes.

    Raises ValueError naming the parameter when a shape disagrees with the configured model.
    """
    import jax
    import orbax.checkpoint as ocp

    path = as_path(path)
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
    """A crash never leaves half a file: locally a temp file renamed over the target; in a
    bucket one write of the final object, which appears whole or not at all."""
    path = as_path(path)
    if not is_local(path):
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f"{path.name}.tmp{os.getpid()}"
    tmp.write_bytes(data)
    tmp.replace(path)


def write_bytes(path: PathLike, data: bytes) -> None:
    """Writes bytes atomically (e.g. a gzipped run file)."""
    _atomic_write(path, data)


def read_bytes(path: PathLike) -> bytes:
    return as_path(path).read_bytes()


def write_text(path: PathLike, text: str) -> None:
    _atomic_write(path, text.encode("utf-8"))


def write_json(path: PathLike, obj: Any) -> None:
    """Writes JSON atomically."""
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=float))


def read_json(path: PathLike, default: Any = None) -> Any:
    path = as_path(path)
    if not path.exists():
        return default
    return json.loads(path.read_text())


def save_arrays(path: PathLike, **arrays: np.ndarray) -> None:
    """An .npz of `arrays`, written atomically."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    _atomic_write(path, buf.getvalue())


def load_arrays(path: PathLike) -> dict[str, np.ndarray]:
    with as_path(path).open("rb") as f:
        with np.load(f) as z:
            return {k: z[k] for k in z.files}


def save_array(path: PathLike, array: np.ndarray) -> None:
    """One .npy, written atomically."""
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    _atomic_write(path, buf.getvalue())


def load_array(path: PathLike, mmap: bool = False) -> np.ndarray:
    """One .npy; `mmap` maps a local file instead of reading it (a remote one is read whole)."""
    path = as_path(path)
    if mmap and is_local(path):
        return np.load(str(path), mmap_mode="r")
    with path.open("rb") as f:
        return np.load(f)


@contextlib.contextmanager
def local_folder(target: PathLike) -> Iterator[str]:
    """A local folder to write into: `target` itself when local, else a temporary folder whose
    files are copied to `target` (e.g. gs://...) on success."""
    target = as_path(target)
    if is_local(target):
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
    dst = as_path(dst)
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
    path = as_path(path)
    if is_local(path):
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


def listing(path: PathLike) -> dict[str, list]:
    """{file path: [size, version]} of every file under the folder `path` (or of the file
    `path`), what a cache built from them depends on: version is the mtime in ns of a local file,
    the generation of an object (one listing request per 1000 objects)."""
    path = as_path(path)
    if is_local(path):
        files = [str(path)] if path.is_file() else sorted(
            os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
        return {f: [os.stat(f).st_size, os.stat(f).st_mtime_ns] for f in files}
    import fsspec

    fs, key = fsspec.core.url_to_fs(str(path))
    protocol = str(path).split("://", 1)[0]
    found = fs.find(key, detail=True)  # {bucket/key: info} of every object under the prefix
    return {f"{protocol}://{k}": [int(v["size"]), str(v.get("generation") or v.get("mtime") or "")]
            for k, v in sorted(found.items()) if v.get("type") != "directory"}


def cached_copy(path: PathLike) -> str:
    """A local folder with the content of the folder `path`: `path` itself when local, else a
    copy under CACHE_ROOT/copies/<bucket>/<path>-<hash of the listing>, downloaded once per
    machine (into a temporary sibling renamed into place) and reused while the files in the
    bucket are unchanged."""
    path = as_path(path)
    if is_local(path):
        return str(path)
    files = listing(path)
    if not files:
        raise FileNotFoundError(f"{path} holds no file (a folder in a bucket is a prefix of objects)")
    key = hashlib.sha1(json.dumps(files, sort_keys=True).encode()).hexdigest()[:12]
    name = str(path).replace("://", "/").strip("/")
    target = os.path.join(CACHE_ROOT, "copies", f"{name}-{key}")
    if os.path.isdir(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".incomplete-", dir=os.path.dirname(target))
    try:
        _download(path, tmp)
        os.replace(tmp, target)
    except OSError:
        if not os.path.isdir(target):  # not another process finishing the same copy first
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
