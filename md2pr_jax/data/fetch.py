"""Fetching a dataset's official files once into a data dir, and the data check every run makes.

    python -m md2pr_jax.data.fetch --config CFG [--data_dir D] [--check] [--config.key=value ...]

downloads config.data.dataset from its declared source (`md2pr_jax.data.sources`) into
D/<dataset>/ (D: --data_dir, else config.data.dir / $MD2PR_DATA_DIR, else the local cache
~/.cache/md2pr_jax/data), a local folder or a bucket (gs://). Each file is verified against its
published checksum (or, where none is published, against the sha256 recorded at its first
download into D), shown with a progress bar, and resumed where a download stopped (HTTP range).
Nothing half-done is ever a dataset: locally the folder is unpacked beside its target and
renamed into place; in a bucket a marker object stands in the folder until every file is up.
A dataset already present is left alone.

`--check` downloads nothing and imports no JAX (the pod launcher runs it on a laptop): exit 0
when D holds the dataset or its builder has a source to fetch it from, else exit 2 with a
message about the data.

`ensure_data(config)` is the check of a run, made by every process before its first barrier:
one process fetches what is missing into the local cache; several processes never download,
they agree (one all-gather) that each sees the dataset, or all stop with the same error.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from http.client import HTTPException

from absl import logging
from etils import epath

from md2pr_jax.data import sources

CACHE_DATA_DIR = os.path.expanduser("~/.cache/md2pr_jax/data")  # where a run without the dataset fetches it
CHECKSUMS_FILE = ".md2pr_checksums.json"  # in a data dir: sha256 recorded at first download, by URL
MANIFEST_FILE = ".md2pr_fetch.json"  # in a fetched dataset folder: where its files came from
INCOMPLETE_FILE = ".md2pr_incomplete"  # in a bucket's dataset folder while its upload runs
_CHUNK = 1 << 20


class DataError(RuntimeError):
    """The dataset is missing, has no source, or its download failed; the message says what to do."""


class ChecksumError(DataError):
    """A downloaded file is not the one declared (or first recorded)."""


def _is_local(path: str) -> bool:
    return "://" not in str(path)


def _path(path: str) -> epath.Path:
    return epath.Path(path if not _is_local(path) else os.path.abspath(path))


def required_files(builder: str) -> tuple[str, ...]:
    if builder not in sources.REQUIRED_FILES:
        raise DataError(f"unknown builder {builder!r} (config.data.builder); known: {sorted(sources.REQUIRED_FILES)}")
    return sources.REQUIRED_FILES[builder]


def holds_dataset(data_dir: str, builder: str, dataset: str) -> bool:
    """True when data_dir/dataset/ has every file its builder needs and no unfinished upload."""
    if not data_dir:
        return False
    folder, required = _path(data_dir) / dataset, required_files(builder)
    try:
        return all((folder / f).exists() for f in required) and not (folder / INCOMPLETE_FILE).exists()
    except Exception as e:  # noqa: BLE001 - an unreadable bucket (no credentials) holds nothing we can use
        logging.warning("cannot look into %s: %s", folder, e)
        return False


def _no_source_message(builder: str, dataset: str, dirs: list[str]) -> str:
    where = " or ".join(f"{d}/{dataset}/" for d in dirs) or f"<data dir>/{dataset}/ (no data dir is set)"
    return (
        f"dataset {dataset!r} (builder {builder!r}) is not in {where}, and no download source is known for it: "
        f"put {', '.join(required_files(builder))} there by hand, or set MD2PR_DATA_DIR (config.data.dir) to the "
        f"folder that holds {dataset}/"
    )


# ----------------------------------------------------------------------------------------
# Downloading and verifying


def _download(url: str, dest: str, headers: tuple = (), progress: bool = True) -> None:
    """Downloads `url` to `dest`, resuming `dest`.part where an earlier try stopped."""
    part = dest + ".part"
    have = os.path.getsize(part) if os.path.exists(part) else 0
    req = urllib.request.Request(url, headers={"User-Agent": "md2pr_jax-fetch", **dict(headers)})
    if have:
        req.add_header("Range", f"bytes={have}-")
    try:
        resp = urllib.request.urlopen(req, timeout=60)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # the part is already whole
            os.replace(part, dest)
            return
        raise DataError(
            f"downloading {url} failed: HTTP {e.code} {e.reason}" + (" (has the file moved? see the dataset's homepage)" if e.code == 404 else "")
        ) from e
    except (OSError, HTTPException) as e:
        raise DataError(f"downloading {url} failed: {e}; check the machine's internet access and retry") from e
    from tqdm import tqdm

    with resp:
        if have and resp.status != 206:  # the server ignores ranges: start over
            have = 0
        length = resp.headers.get("Content-Length")
        total = have + int(length) if length is not None else None
        try:
            with open(part, "ab" if have else "wb") as f, tqdm(
                total=total, initial=have, unit="B", unit_scale=True, desc=os.path.basename(dest), disable=not progress
            ) as bar:
                while chunk := resp.read(_CHUNK):
                    f.write(chunk)
                    bar.update(len(chunk))
        except (OSError, HTTPException) as e:
            raise DataError(
                f"the download of {url} stopped at {os.path.getsize(part):,} bytes ({e}); run the same command again "
                f"to resume it ({part} is kept)"
            ) from e
    got = os.path.getsize(part)
    if total is not None and got != total:
        raise DataError(
            f"the download of {url} stopped at {got:,} of {total:,} bytes; run the same command again to resume it "
            f"({part} is kept)"
        )
    os.replace(part, dest)


def _digests(path: str) -> tuple[str, str]:
    """(md5, sha256) of a file."""
    md5, sha = hashlib.md5(), hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            md5.update(chunk)
            sha.update(chunk)
    return md5.hexdigest(), sha.hexdigest()


def _verify(res: sources.Resource, path: str, recorded: dict) -> dict:
    """Checks the file against the declared checksum, or the one recorded at its first download;
    returns its {sha256, size}. A file that fails is deleted (so a retry downloads it anew)."""
    md5, sha = _digests(path)
    size = os.path.getsize(path)
    first = recorded.get(res.url)
    if res.sha256:
        want, got, what = res.sha256, sha, "sha256 (declared in md2pr_jax/data/sources.py)"
    elif res.md5:
        want, got, what = res.md5, md5, "md5 (published by the dataset's authors)"
    elif first:
        want, got, what = first["sha256"], sha, f"sha256 (recorded at its first download, {first.get('date', '?')})"
    else:
        want = got = what = ""
    if got != want or (res.size and size != res.size):
        os.remove(path)
        raise ChecksumError(
            f"{res.url}: {what} is {got}, {size:,} bytes, but {want} ({res.size or '?'} bytes) was expected. The file "
            "is corrupt or the source changed; it was deleted: run the command again to download it anew, and if it "
            "fails the same way, the upstream file changed (check its homepage, then update the declaration)"
        )
    return {"sha256": sha, "size": size}


def _record_path(data_dir: str) -> epath.Path:
    return _path(data_dir) / CHECKSUMS_FILE


def _read_json(path: epath.Path, default):
    try:
        return json.loads(path.read_text()) if path.exists() else default
    except Exception:  # noqa: BLE001 - an unreadable record is treated as absent
        return default


# ----------------------------------------------------------------------------------------
# Unpacking


def _safe_join(root: str, rel: str) -> str:
    """root/rel, refusing members that would land outside root."""
    target = os.path.normpath(os.path.join(root, rel))
    if os.path.isabs(rel) or not target.startswith(os.path.abspath(root) + os.sep):
        raise DataError(f"archive member {rel!r} would be written outside {root}; the archive is not a dataset")
    return target


def _write_member(src, root: str, rel: str) -> None:
    target = _safe_join(root, rel)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    with open(target, "wb") as out:
        shutil.copyfileobj(src, out, _CHUNK)


def _unpack(res: sources.Resource, archive: str, staging: str) -> list[str]:
    """Writes what `archive` holds into `staging` (laid out as the dataset folder); returns the
    dataset-relative paths written."""
    wanted = dict(res.files)
    if res.kind in ("file", "gz"):
        (name,) = wanted.values()
        opener = gzip.open if res.kind == "gz" else open
        try:
            with opener(archive, "rb") as src:
                _write_member(src, staging, name)
        except (OSError, EOFError) as e:
            raise DataError(f"{res.url} is not a valid {res.kind} file ({e})") from e
        return [name]

    def keep(member: str) -> str | None:
        member = member.removeprefix("./")
        if wanted:
            return wanted.get(member)
        if member.startswith(res.strip) and member != res.strip:
            return member[len(res.strip) :]
        return None

    written = []
    try:
        if res.kind == "zip":
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    rel = keep(info.filename)
                    if rel and not info.is_dir():
                        with z.open(info) as src:
                            _write_member(src, staging, rel)
                        written.append(rel)
        elif res.kind == "tar.gz":
            with tarfile.open(archive, "r|gz") as t:  # one sequential pass over a large archive
                for info in t:
                    rel = keep(info.name)
                    if rel and info.isfile():
                        _write_member(t.extractfile(info), staging, rel)
                        written.append(rel)
        else:
            raise DataError(f"unknown resource kind {res.kind!r} for {res.url}")
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as e:
        raise DataError(f"{res.url} is not a valid {res.kind} archive ({e})") from e
    missing = sorted(set(wanted.values()) - set(written))
    if missing or not written:
        raise DataError(f"{res.url} lacks {', '.join(missing) or 'any file under ' + repr(res.strip)}")
    return written


# ----------------------------------------------------------------------------------------
# Fetching


def fetch(
    builder: str,
    dataset: str,
    data_dir: str,
    *,
    source: sources.DatasetSource | None = None,
    mirror: str | None = None,
    progress: bool = True,
) -> str:
    """Downloads `dataset` from its official source (or `source`) into data_dir/dataset/ and
    returns that folder; a dataset already there is left alone. Raises DataError (no source,
    a failed download) or ChecksumError, leaving no part of the dataset folder behind."""
    folder = _path(data_dir) / dataset
    if holds_dataset(data_dir, builder, dataset):
        logging.info("%s already holds %s; nothing to fetch", folder, dataset)
        return os.fspath(folder)
    source = source or sources.source_for(builder, dataset)
    if source is None:
        raise DataError(_no_source_message(builder, dataset, [data_dir]))
    local = _is_local(data_dir)
    if local and folder.exists() and any(folder.iterdir()):
        raise DataError(
            f"{folder} exists but lacks {', '.join(required_files(builder))}; it is not overwritten: complete it "
            "by hand, or move it away and fetch again"
        )
    # Downloads sit beside a local data dir (same disk as the result), else in the local cache.
    downloads = os.path.join(os.fspath(folder.parent), ".downloads") if local else os.path.join(CACHE_DATA_DIR, ".downloads")
    os.makedirs(downloads, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{dataset}.incomplete-", dir=os.fspath(folder.parent) if local else downloads)
    recorded = _read_json(_record_path(data_dir), {})
    manifest = {"builder": builder, "dataset": dataset, "homepage": source.homepage, "licence": source.licence, "files": {}}
    t0 = time.time()
    try:
        for res in source.resources:
            url = res.location(mirror)
            archive = os.path.join(downloads, res.filename)
            if not os.path.exists(archive):  # else whole from a try that failed later (verified below)
                logging.info("fetching %s", url)
                _download(url, archive, res.headers, progress)
            digest = _verify(res, archive, recorded)
            if not res.verified and res.url not in recorded:
                recorded[res.url] = {**digest, "date": time.strftime("%Y-%m-%d")}
                logging.warning(
                    "%s publishes no checksum: recorded sha256 %s in %s; later downloads into this data dir are "
                    "verified against it", res.url, digest["sha256"], _record_path(data_dir),
                )  # fmt: skip
            manifest["files"][res.url] = {**digest, "md5": res.md5, "unpacked": _unpack(res, archive, staging)}
        missing = [f for f in required_files(builder) if not os.path.exists(os.path.join(staging, f))]
        if missing:
            raise DataError(f"the source of {dataset} gave no {', '.join(missing)}; the declaration in sources.py is wrong")
        with open(os.path.join(staging, MANIFEST_FILE), "w") as f:
            json.dump({**manifest, "seconds": round(time.time() - t0, 1)}, f, indent=1)
        _publish(staging, folder)
        _record_path(data_dir).write_text(json.dumps(recorded, indent=1, sort_keys=True))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for res in source.resources:  # the unpacked folder is the product; the archives go
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(downloads, res.filename))
    logging.info("fetched %s into %s in %.0f s", dataset, folder, time.time() - t0)
    return os.fspath(folder)


def _publish(staging: str, folder: epath.Path) -> None:
    """Moves the unpacked dataset into place: one rename locally; in a bucket, each file is
    uploaded under a marker that makes the folder count as absent until the last one is up."""
    if _is_local(os.fspath(folder)):
        if folder.exists():
            folder.rmdir()  # empty (checked by fetch)
        os.replace(staging, os.fspath(folder))
        return
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / INCOMPLETE_FILE
    marker.write_text("an upload by md2pr_jax.data.fetch is in progress or was interrupted; fetch again\n")
    for dirpath, _, names in os.walk(staging):
        for name in names:
            src = os.path.join(dirpath, name)
            dst = folder / os.path.relpath(src, staging)
            dst.parent.mkdir(parents=True, exist_ok=True)
            logging.info("uploading %s (%s bytes)", dst, f"{os.path.getsize(src):,}")
            with open(src, "rb") as fin, dst.open("wb") as fout:
                shutil.copyfileobj(fin, fout, 16 * _CHUNK)
    marker.unlink()


# ----------------------------------------------------------------------------------------
# The data check of a run


def find_data_dir(config) -> str | None:
    """The first of config.data.dir and the local cache that holds config's dataset, or None."""
    d = config.data
    for root in dict.fromkeys(r for r in (d.dir, CACHE_DATA_DIR) if r):
        if holds_dataset(root, d.builder, d.dataset):
            return root
    return None


def ensure_data(config) -> str:
    """The data dir holding config.data.dataset, checked by every process before any barrier.

    One process: config.data.dir, else the local cache; a dataset found in neither is fetched
    into the cache when it has a source. Several processes: nothing is downloaded (each would
    download its own copy, or wait on one at a barrier); one all-gather tells every process
    whether all of them see the dataset, and if one does not, all raise the same DataError.
    """
    import jax

    d = config.data
    found = find_data_dir(config)
    dirs = [r for r in dict.fromkeys((d.dir, CACHE_DATA_DIR)) if r]
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils

        seen = np.asarray(multihost_utils.process_allgather(np.int32(found is not None)))
        lacking = [i for i, ok in enumerate(seen.reshape(-1)) if not ok]
        if lacking:
            who = f"process(es) {lacking} of {seen.size}"
            if sources.source_for(d.builder, d.dataset) is None:
                raise DataError(f"{who}: {_no_source_message(d.builder, d.dataset, dirs)}")
            raise DataError(
                f"{who} find no {d.dataset}/ in {' or '.join(dirs)}, and a multi-process run downloads nothing: fetch "
                f"it once into a folder every worker sees (python -m md2pr_jax.data.fetch --config <config> --data_dir "
                f"{d.dir or 'gs://BUCKET/data'}; on a pod: launch/tpu_pod.sh ... data), and set config.data.dir "
                "(MD2PR_DATA_DIR) to that folder"
            )
        return found
    if found:
        return found
    if sources.source_for(d.builder, d.dataset) is None:
        raise DataError(_no_source_message(d.builder, d.dataset, dirs))
    logging.info("%s is in none of %s; fetching it into %s", d.dataset, dirs, CACHE_DATA_DIR)
    fetch(d.builder, d.dataset, CACHE_DATA_DIR)
    return CACHE_DATA_DIR


# ----------------------------------------------------------------------------------------
# Command line


def check(builder: str, dataset: str, data_dir: str) -> tuple[int, str]:
    """(exit status, message) of `--check`: 0 when data_dir holds the dataset or it has a
    source to be fetched from, else 2."""
    try:
        required_files(builder)
    except DataError as e:
        return 2, f"data: {e}"
    source = sources.source_for(builder, dataset)
    # A bucket is looked into only when there is no source to fall back on: from a laptop
    # without credentials or network, each look waits out gcsfs's retries.
    if (_is_local(data_dir) or source is None) and holds_dataset(data_dir, builder, dataset):
        return 0, f"present: {data_dir}/{dataset}"
    if source is not None:
        urls = " ".join(r.url for r in source.resources)
        return 0, f"source: fetch puts {dataset} in {data_dir}/{dataset} (unless it is there) from {urls}"
    return 2, f"data: {_no_source_message(builder, dataset, [data_dir] if data_dir else [])}"


def main(argv) -> None:
    from absl import flags

    cfg = flags.FLAGS.config
    data_dir = flags.FLAGS.data_dir or cfg.data.dir or CACHE_DATA_DIR
    if flags.FLAGS.check:
        import logging as std_logging

        std_logging.getLogger("gcsfs").setLevel(std_logging.CRITICAL)  # its retry tracebacks; the outcome is logged below
        status, message = check(cfg.data.builder, cfg.data.dataset, data_dir)
        print(message, file=sys.stdout if status == 0 else sys.stderr)
        sys.exit(status)
    try:
        print(fetch(cfg.data.builder, cfg.data.dataset, data_dir))
    except DataError as e:
        sys.exit(f"data: {e}")


def run() -> None:
    from absl import app, flags
    from ml_collections import config_flags

    config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py); its data.* say what to fetch.")
    flags.DEFINE_string("data_dir", None, "Data dir (local or gs://); default config.data.dir, else ~/.cache/md2pr_jax/data.")
    flags.DEFINE_bool("check", False, "Download nothing: exit 0 when the data is there or has a source, else 2.")
    flags.mark_flag_as_required("config")
    app.run(main)


if __name__ == "__main__":
    run()
