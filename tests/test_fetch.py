"""Fetching datasets from their official sources, against a local HTTP server started by the test.

The server serves small files written by the test in the official formats and layout (BEIR's
zip, MS MARCO's tar.gz of TSVs, DPR's gzipped TSV/JSON and plain CSV) under
<host>/<path of the official URL>, i.e. as a mirror ($MD2PR_DATA_MIRROR). It honours HTTP
ranges (as the real hosts do) and can be told to drop a connection halfway through a file.
"""

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
import time
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
from conftest import ROOT

from md2pr_jax.data import builders, fetch, sources
from test_gcs import DATA_BUCKET, _env, gcs  # noqa: F401 - gcs: the fake-gcs-server fixture
from tests.test_data import write_beir

# ----------------------------------------------------------------------------------------
# The server


class Mirror:
    """An HTTP server on 127.0.0.1 serving `root`; `cut[path] = n` sends only n bytes of the
    next response for that path (announcing them all) and drops the connection."""

    def __init__(self, root):
        self.root, self.cut, self.requests, self.headers = str(root), {}, [], []
        mirror = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 - the http.server API
                mirror.requests.append((self.path, self.headers.get("Range")))
                mirror.headers.append(dict(self.headers))
                path = os.path.join(mirror.root, self.path.lstrip("/"))
                if not os.path.isfile(path):
                    self.send_error(404)
                    return
                with open(path, "rb") as f:
                    data = f.read()
                start = 0
                if self.headers.get("Range"):
                    start = int(self.headers["Range"].split("=")[1].rstrip("-"))
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                n = mirror.cut.pop(self.path, None)
                self.wfile.write(body if n is None else body[:n])
                if n is not None:
                    self.wfile.flush()
                    self.close_connection = True

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def path_of(self, url: str) -> str:
        """Where the mirror keeps the file of an official URL."""
        parts = urlsplit(url)
        return os.path.join(self.root, parts.netloc + parts.path)

    def put(self, url: str, data: bytes) -> dict:
        """Serves `data` as the file of `url`; returns its checksums for `with_checksums`."""
        path = self.path_of(url)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
        return {"md5": hashlib.md5(data).hexdigest(), "size": len(data)}


@pytest.fixture
def mirror(tmp_path, monkeypatch):
    m = Mirror(tmp_path / "mirror")
    monkeypatch.setenv(sources.MIRROR_ENV, m.url)
    monkeypatch.setattr(fetch, "CACHE_DATA_DIR", str(tmp_path / "cache"))  # never the user's cache
    yield m
    m.server.shutdown()


# ----------------------------------------------------------------------------------------
# Official formats, written from a local dataset folder


def _zip(folder: str, prefix: str) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr(prefix, "")  # BEIR's zips list the folder itself too
        for dirpath, _, names in os.walk(folder):
            for name in sorted(names):
                path = os.path.join(dirpath, name)
                z.write(path, prefix + os.path.relpath(path, folder))
    return buf.getvalue()


def _tar_gz(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _read(path) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _records(result) -> dict:
    return {split: list(builders.read_split(result, split)) for split in sorted(result.splits)}


def _same_records(builder, dataset, local_root, fetched_root, tmp_path) -> dict:
    """Builds from the local folder and from the fetched one; returns the records after
    checking they are equal."""
    want = builders.build(builder, dataset, str(local_root / dataset), str(tmp_path / "build_local"))
    got = builders.build(builder, dataset, str(fetched_root / dataset), str(tmp_path / "build_fetched"))
    assert _records(got) == _records(want)
    return _records(got)


# ----------------------------------------------------------------------------------------
# The three builders fetch from the mirror and build what they build from local files


def test_beir_zip_builds_the_same_records(tmp_path, mirror, monkeypatch):
    write_beir(tmp_path / "local", "scifact")
    zip_bytes = _zip(str(tmp_path / "local" / "scifact"), "scifact/")
    sums = mirror.put(sources.BEIR_URL.format(name="scifact"), zip_bytes)
    monkeypatch.setitem(sources.BEIR_MD5, "scifact", sums["md5"])
    # The build of a missing folder fetches it (what a run does with no local copy).
    records = _same_records("beir", "scifact", tmp_path / "local", tmp_path / "data", tmp_path)
    assert len(records["corpus"]) == 8 and [q["id"] for q in records["test"]] == ["t0", "t1"]
    fetched = tmp_path / "data" / "scifact"
    assert sorted(os.listdir(fetched)) == [fetch.MANIFEST_FILE, "corpus.jsonl", "qrels", "queries.jsonl"]
    assert _read(fetched / "qrels" / "train.tsv") == _read(tmp_path / "local" / "scifact" / "qrels" / "train.tsv")
    manifest = json.loads(_read(fetched / fetch.MANIFEST_FILE))
    assert manifest["files"][sources.BEIR_URL.format(name="scifact")]["md5"] == sums["md5"]
    # Nothing but the dataset is left in the data dir (archives and staging folders go).
    assert sorted(os.listdir(tmp_path / "data")) == [".downloads", fetch.CHECKSUMS_FILE, "scifact"]
    assert os.listdir(tmp_path / "data" / ".downloads") == []
    # A second fetch finds it and downloads nothing.
    n = len(mirror.requests)
    assert fetch.fetch("beir", "scifact", str(tmp_path / "data")) == str(fetched)
    assert len(mirror.requests) == n


def test_msmarco_tar_builds_the_same_records(tmp_path, mirror, monkeypatch):
    local = tmp_path / "local" / "msmarco"
    files = {
        "collection.tsv": b"0\tThe capital of France is Paris.\n1\tParis has the Eiffel tower.\n2\tBerlin is in Germany.\n3\tTea.\n",
        "queries.train.tsv": b"1185869\twhat is the capital of france\n1185868\twhere is berlin\n",
        "qrels.train.tsv": b"1185869\t0\t0\t1\n1185868\t0\t2\t1\n",
        "queries.dev.small.tsv": b"1048585\twhat is tea\n",
        "qrels.dev.small.tsv": b"1048585\t0\t3\t1\n",
    }
    for name, data in files.items():
        os.makedirs(local, exist_ok=True)
        (local / name).write_bytes(data)
    # The official archive also holds files the builder does not read (left out when unpacked).
    archive = _tar_gz({**files, "queries.eval.tsv": b"9\tan eval query\n"})
    (res,) = sources.MSMARCO_PASSAGE.resources
    sums = mirror.put(res.url, archive)
    monkeypatch.setattr(sources, "MSMARCO_PASSAGE", sources.MSMARCO_PASSAGE.with_checksums({res.filename: sums}))
    records = _same_records("msmarco_passage", "msmarco", tmp_path / "local", tmp_path / "data", tmp_path)
    assert [q["id"] for q in records["dev"]] == ["1048585"] and records["dev"][0]["doc_ids"] == ["3"]
    assert sorted(os.listdir(tmp_path / "data" / "msmarco")) == sorted([*files, fetch.MANIFEST_FILE])
    # The official host wants its version header (ranged reads of large files).
    assert mirror.requests[-1][0].endswith("/msmarcoranking/collectionandqueries.tar.gz")
    assert mirror.headers[-1]["X-Ms-Version"] == "2019-12-12"


def _write_nq(folder):
    os.makedirs(folder, exist_ok=True)
    (folder / "psgs_w100.tsv").write_text(
        'id\ttext\ttitle\n1\t"Aaron ( or ; ""Ahärôn"") is a prophet"\tAaron\n2\tGod at Sinai granted Aaron\tAaron\n'
        "3\tThe Moon orbits the Earth\tMoon\n"
    )
    ctx = lambda pid: {"title": "t", "text": "x", "score": 1.0, "title_score": 0, "passage_id": str(pid)}  # noqa: E731
    train = [
        {"question": "who is aaron", "answers": ["a prophet"], "positive_ctxs": [ctx(1)], "negative_ctxs": [],
         "hard_negative_ctxs": [ctx(2)]},
        {"question": "what orbits the earth", "answers": ["the Moon"], "positive_ctxs": [ctx(3)], "negative_ctxs": [],
         "hard_negative_ctxs": []},
    ]  # fmt: skip
    (folder / "biencoder-nq-train.json").write_text(json.dumps(train, indent=4))
    (folder / "biencoder-nq-dev.json").write_text(json.dumps(train[1:], indent=4))
    (folder / "nq-test.qa.csv").write_text("who got the first nobel prize in physics\t['Wilhelm Conrad Röntgen']\n")


def _serve_nq(mirror, folder):
    for res in sources.NQ_DPR.resources:
        ((_, name),) = res.files
        data = _read(folder / name)
        mirror.put(res.url, gzip.compress(data) if res.kind == "gz" else data)


def test_nq_gz_builds_the_same_records_and_records_the_first_sha256(tmp_path, mirror):
    _write_nq(tmp_path / "local" / "nq")
    _serve_nq(mirror, tmp_path / "local" / "nq")
    records = _same_records("nq_dpr", "nq", tmp_path / "local", tmp_path / "data", tmp_path)
    assert [q["id"] for q in records["test"]] == ["test-0"] and records["train"][0]["neg_ids"] == ["2"]
    # DPR publishes no checksum: the first download's sha256 is recorded in the data dir ...
    recorded = json.loads(_read(tmp_path / "data" / fetch.CHECKSUMS_FILE))
    psgs = sources.NQ_DPR.resources[0]
    assert recorded[psgs.url]["sha256"] == hashlib.sha256(_read(mirror.path_of(psgs.url))).hexdigest()
    # ... and a later download into the same data dir that differs is refused.
    os.rename(tmp_path / "data" / "nq", tmp_path / "nq_moved")
    mirror.put(psgs.url, gzip.compress(b"id\ttext\ttitle\n1\tsomething else\tX\n"))
    with pytest.raises(fetch.ChecksumError, match=r"psgs_w100.tsv.gz: sha256 \(recorded at its first download"):
        fetch.fetch("nq_dpr", "nq", str(tmp_path / "data"), progress=False)
    assert not os.path.exists(tmp_path / "data" / "nq")


# ----------------------------------------------------------------------------------------
# Refusals and interruptions


def test_wrong_checksum_is_refused_and_nothing_is_left(tmp_path, mirror):
    write_beir(tmp_path / "local", "scifact")
    mirror.put(sources.BEIR_URL.format(name="scifact"), _zip(str(tmp_path / "local" / "scifact"), "scifact/"))
    data = tmp_path / "data"
    # The real declaration: BEIR's published md5, which this small zip does not have.
    with pytest.raises(fetch.ChecksumError, match=r"scifact.zip: md5 \(published by the dataset's authors\) is [0-9a-f]{32}.*"
                       r"but 5f7d1de60b170fc8027bb7898e2efca1"):  # fmt: skip
        fetch.fetch("beir", "scifact", str(data), progress=False)
    assert sorted(os.listdir(data)) == [".downloads"] and os.listdir(data / ".downloads") == []


def test_interrupted_download_resumes_and_leaves_no_half_dataset(tmp_path, mirror):
    write_beir(tmp_path / "local", "scifact")
    url = sources.BEIR_URL.format(name="scifact")
    sums = mirror.put(url, _zip(str(tmp_path / "local" / "scifact"), "scifact/"))
    source = sources.beir("scifact").with_checksums({"scifact.zip": sums})
    path = urlsplit(sources.Resource(url, "zip").location(mirror.url)).path
    mirror.cut[path] = sums["size"] // 2
    data = tmp_path / "data"
    with pytest.raises(fetch.DataError, match="stopped at .* run the same command again to resume"):
        fetch.fetch("beir", "scifact", str(data), source=source, progress=False)
    assert not (data / "scifact").exists() and not [n for n in os.listdir(data) if "incomplete" in n]
    assert os.path.getsize(data / ".downloads" / "scifact.zip.part") == sums["size"] // 2
    # The same command again asks for the rest only and completes the dataset.
    fetch.fetch("beir", "scifact", str(data), source=source, progress=False)
    assert mirror.requests[-1] == (path, f"bytes={sums['size'] // 2}-")
    assert fetch.holds_dataset(str(data), "beir", "scifact")


def test_archive_without_the_declared_members_is_refused(tmp_path, mirror):
    (res,) = sources.MSMARCO_PASSAGE.resources
    sums = mirror.put(res.url, _tar_gz({"collection.tsv": b"0\tx\n"}))
    source = sources.MSMARCO_PASSAGE.with_checksums({res.filename: sums})
    with pytest.raises(fetch.DataError, match="collectionandqueries.tar.gz lacks qrels.dev.small.tsv, qrels.train.tsv"):
        fetch.fetch("msmarco_passage", "msmarco", str(tmp_path / "data"), source=source, progress=False)
    assert not (tmp_path / "data" / "msmarco").exists()


def test_zip_member_outside_the_folder_is_refused(tmp_path, mirror):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("evil/../../escaped.txt", "x")
    sums = mirror.put(sources.BEIR_URL.format(name="evil"), buf.getvalue())
    source = sources.DatasetSource("beir", (sources.Resource(sources.BEIR_URL.format(name="evil"), "zip", strip="evil/", **sums),), "", "")
    with pytest.raises(fetch.DataError, match="outside"):
        fetch.fetch("beir", "evil", str(tmp_path / "data"), source=source, progress=False)
    assert not (tmp_path / "escaped.txt").exists()


def test_sources_are_declared_for_every_builder():
    for name in ("scifact", "nfcorpus", "msmarco"):
        (res,) = sources.source_for("beir", name).resources
        assert res.url == f"https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/{name}.zip" and len(res.md5) == 32
    assert sources.source_for("beir", "robust04") is None  # BEIR does not redistribute it
    assert sources.source_for("msmarco_passage", "msmarco").resources[0].md5 == "31644046b18952c1386cd4564ba2ae69"
    assert [r.filename for r in sources.source_for("nq_dpr", "nq").resources] == [
        "psgs_w100.tsv.gz", "biencoder-nq-train.json.gz", "biencoder-nq-dev.json.gz", "nq-test.qa.csv"]  # fmt: skip
    assert all(not r.verified for r in sources.NQ_DPR.resources)  # DPR publishes none: recorded at first download
    for cls in builders.BUILDERS.values():
        assert cls.SOURCE_FILES == sources.REQUIRED_FILES[cls.name]
    assert builders.Beir.source("scifact") == sources.beir("scifact")
    res = sources.beir("scifact").resources[0]
    assert res.location("http://m:1/") == "http://m:1/public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/scifact.zip"


# ----------------------------------------------------------------------------------------
# The command line (the launcher's interface) and the run's data check


def _cli(*args, env=None):
    env = dict(os.environ if env is None else env, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
    code = "import sys, runpy; runpy.run_module('md2pr_jax.data.fetch', run_name='__main__'); "
    # Report the modules loaded, to show that --check imports neither JAX nor TFDS.
    wrapper = (
        "import atexit, sys\n"
        "atexit.register(lambda: print('MODULES', sorted({m.split('.')[0] for m in sys.modules} & "
        "{'jax', 'jaxlib', 'tensorflow_datasets', 'tensorflow'}), file=sys.stderr))\n" + code
    )
    return subprocess.run([sys.executable, "-c", wrapper, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=120)  # fmt: skip


def test_check_exit_status_and_no_jax(tmp_path):
    write_beir(tmp_path / "data", "toy")
    cfg = os.path.join(ROOT, "configs", "scifact_minilm.py")
    ok = _cli("--config", cfg, "--data_dir", str(tmp_path / "data"), "--config.data.dataset=toy", "--check")
    assert ok.returncode == 0 and ok.stdout.startswith(f"present: {tmp_path}/data/toy"), ok.stderr
    assert "MODULES []" in ok.stderr
    fetchable = _cli("--config", os.path.join(ROOT, "configs", "msmarco_bert_base.py"), "--data_dir", "gs://no-such-bucket-md2pr/x",
                     "--check", env=dict(os.environ, NO_GCE_CHECK="true"))  # fmt: skip
    assert fetchable.returncode == 0 and "collectionandqueries.tar.gz" in fetchable.stdout, fetchable.stderr
    missing = _cli("--config", cfg, "--data_dir", str(tmp_path / "data"), "--config.data.dataset=robust04", "--check")
    assert missing.returncode == 2 and "data: dataset 'robust04' (builder 'beir') is not in" in missing.stderr
    assert "no download source is known" in missing.stderr and "MODULES []" in missing.stderr


def test_cli_fetches_into_the_data_dir(tmp_path, mirror):
    """The command the launcher runs, end to end against the mirror: NQ (no published checksum,
    so the real declaration applies), then --check finds it; SciFact with BEIR's md5, which the
    mirror's small zip does not match, is refused with exit status 1 and nothing left."""
    _write_nq(tmp_path / "local" / "nq")
    _serve_nq(mirror, tmp_path / "local" / "nq")
    env = dict(os.environ, **{sources.MIRROR_ENV: mirror.url})
    nq_cfg = os.path.join(ROOT, "configs", "nq_bert_base.py")
    out = _cli("--config", nq_cfg, "--data_dir", str(tmp_path / "d"), env=env)
    assert out.returncode == 0 and out.stdout.strip().endswith(f"{tmp_path}/d/nq"), out.stderr[-2000:]
    assert "psgs_w100.tsv.gz" in out.stderr and "B/s" in out.stderr  # the progress bars
    for name in ("psgs_w100.tsv", "biencoder-nq-train.json", "biencoder-nq-dev.json", "nq-test.qa.csv"):
        assert _read(tmp_path / "d" / "nq" / name) == _read(tmp_path / "local" / "nq" / name)
    check = _cli("--config", nq_cfg, "--data_dir", str(tmp_path / "d"), "--check")
    assert check.returncode == 0 and check.stdout.startswith(f"present: {tmp_path}/d/nq")

    write_beir(tmp_path / "local", "scifact")
    mirror.put(sources.BEIR_URL.format(name="scifact"), _zip(str(tmp_path / "local" / "scifact"), "scifact/"))
    out = _cli("--config", os.path.join(ROOT, "configs", "scifact_minilm.py"), "--data_dir", str(tmp_path / "d"), env=env)
    assert out.returncode == 1, out.stderr[-2000:]
    assert "data: https://public.ukp.informatik.tu-darmstadt.de/thakur/BEIR/datasets/scifact.zip: md5" in out.stderr
    assert not (tmp_path / "d" / "scifact").exists()


def test_ensure_data_prefers_the_data_dir_then_the_cache_then_fetches(tmp_path, mirror, monkeypatch):
    from tests.conftest import make_tiny_config

    write_beir(tmp_path / "given", "toy")
    config = make_tiny_config()
    config.data.dir, config.data.dataset = str(tmp_path / "given"), "toy"
    assert fetch.ensure_data(config) == str(tmp_path / "given")
    # A data dir without it, no source: one clear error naming both places looked in.
    config.data.dir = str(tmp_path / "empty")
    with pytest.raises(fetch.DataError, match=r"'toy' \(builder 'beir'\) is not in .*empty/toy/ or .*cache/toy/"):
        fetch.ensure_data(config)
    # With a source (here served by the mirror), it is fetched into the local cache, once.
    write_beir(tmp_path / "local", "toy")
    sums = mirror.put(sources.BEIR_URL.format(name="toy"), _zip(str(tmp_path / "local" / "toy"), "toy/"))
    monkeypatch.setitem(sources.BEIR_MD5, "toy", sums["md5"])
    assert fetch.ensure_data(config) == fetch.CACHE_DATA_DIR
    assert fetch.holds_dataset(fetch.CACHE_DATA_DIR, "beir", "toy")
    n = len(mirror.requests)
    assert fetch.ensure_data(config) == fetch.CACHE_DATA_DIR and len(mirror.requests) == n


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("case", ["both", "one"])
def test_two_processes_stop_together_on_missing_data(tmp_path, case):
    """Both processes of a 2-process run reach the data check and exit with the same message,
    at once: no process waits at a barrier for one that failed. 'one': only process 0 has the
    dataset (in its own home's cache, as on hosts that share no disk); both still stop."""
    port = _free_port()
    dataset = "robust04" if case == "both" else "toy"
    write_beir(tmp_path / "home0" / ".cache" / "md2pr_jax" / "data", "toy")
    procs, t0 = [], time.time()
    for pid in range(2):
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, HOME=str(tmp_path / f"home{pid}"),
                   MD2PR_COORDINATOR=f"127.0.0.1:{port}", MD2PR_NUM_PROCESSES="2", MD2PR_PROCESS_ID=str(pid),
                   MD2PR_DATA_DIR=str(tmp_path / "nodata"))  # fmt: skip
        cmd = [sys.executable, "-m", "md2pr_jax.main", "--config", os.path.join(ROOT, "configs", "debug.py"),
               "--workdir", str(tmp_path / "wd"), "--mode", "pipeline", f"--config.data.dataset={dataset}"]  # fmt: skip
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    seconds = time.time() - t0
    lacking = "[0, 1]" if case == "both" else "[1]"
    for p, out in zip(procs, outs):
        assert p.returncode == 1, out[-3000:]
        assert f"md2pr: process(es) {lacking} of 2: dataset {dataset!r} (builder 'beir') is not in" in out, out[-3000:]
        assert "no download source is known" in out and "Traceback" not in out
    assert seconds < 120, f"{seconds:.0f} s: a process waited for the other"
    assert not os.path.exists(tmp_path / "wd" / "config.json")  # stopped before the first stage


def test_fetch_into_a_bucket(tmp_path, mirror, gcs):
    """`fetch --data_dir gs://...` (what a pod's data step runs) against fake-gcs-server: the
    files land in the bucket beside the recorded checksums, and a bucket folder still marked as
    being uploaded does not count as a dataset."""
    _write_nq(tmp_path / "local" / "nq")
    _serve_nq(mirror, tmp_path / "local" / "nq")
    env = dict(_env(gcs, tmp_path / "home"), **{sources.MIRROR_ENV: mirror.url})
    out = _cli("--config", os.path.join(ROOT, "configs", "nq_bert_base.py"), "--data_dir", f"gs://{DATA_BUCKET}/fetched",
               env=env)  # fmt: skip
    assert out.returncode == 0 and out.stdout.strip() == f"gs://{DATA_BUCKET}/fetched/nq", out.stderr[-3000:]
    names = gcs.names(DATA_BUCKET, "fetched/")
    assert sorted(names) == sorted(["fetched/" + fetch.CHECKSUMS_FILE, "fetched/nq/" + fetch.MANIFEST_FILE] + [
        f"fetched/nq/{f}" for f in ("psgs_w100.tsv", "biencoder-nq-train.json", "biencoder-nq-dev.json", "nq-test.qa.csv")])
    assert gcs.get(DATA_BUCKET, "fetched/nq/psgs_w100.tsv") == _read(tmp_path / "local" / "nq" / "psgs_w100.tsv")
    # A dataset without a source is looked for in the bucket: present, or half-uploaded.
    for folder, marked in (("whole", False), ("half", True)):
        gcs.put(DATA_BUCKET, f"{folder}/toy/corpus.jsonl", b'{"_id": "d0", "text": "x"}\n')
        gcs.put(DATA_BUCKET, f"{folder}/toy/queries.jsonl", b'{"_id": "q0", "text": "y"}\n')
        if marked:
            gcs.put(DATA_BUCKET, f"{folder}/toy/{fetch.INCOMPLETE_FILE}", b"")
        check = _cli("--config", os.path.join(ROOT, "configs", "scifact_minilm.py"), "--data_dir", f"gs://{DATA_BUCKET}/{folder}",
                     "--config.data.dataset=toy", "--check", env=env)  # fmt: skip
        assert check.returncode == (2 if marked else 0), check.stderr[-2000:]


def test_main_fetches_scifact_into_the_cache_for_a_new_user(tmp_path, mirror, monkeypatch):
    """The README's main command (configs/scifact_minilm.py) with MD2PR_DATA_DIR holding no
    scifact/: the run's data check fetches it into the local cache and points the config there;
    a dataset with no source stops the run with one line."""
    from md2pr_jax import main
    from md2pr_jax.config import load_config

    write_beir(tmp_path / "local", "scifact")
    sums = mirror.put(sources.BEIR_URL.format(name="scifact"), _zip(str(tmp_path / "local" / "scifact"), "scifact/"))
    monkeypatch.setitem(sources.BEIR_MD5, "scifact", sums["md5"])  # the mirror's small zip stands in for BEIR's
    config = load_config(os.path.join(ROOT, "configs", "scifact_minilm.py"), [f"data.dir={tmp_path / 'mine'}"])
    main.check_data(config)
    assert config.data.dir == fetch.CACHE_DATA_DIR and fetch.holds_dataset(config.data.dir, "beir", "scifact")
    config.data.dataset = "robust04"
    with pytest.raises(SystemExit, match=r"^md2pr: dataset 'robust04' \(builder 'beir'\) is not in"):
        main.check_data(config)


def test_a_failed_fetch_keeps_its_whole_downloads(tmp_path, mirror):
    """NQ's last file breaks off: the next fetch downloads the rest of it only, not the three
    files before it."""
    _write_nq(tmp_path / "local" / "nq")
    _serve_nq(mirror, tmp_path / "local" / "nq")
    last = sources.NQ_DPR.resources[-1]
    path = urlsplit(last.location(mirror.url)).path
    mirror.cut[path] = 10
    with pytest.raises(fetch.DataError, match="nq-test.qa.csv stopped at"):
        fetch.fetch("nq_dpr", "nq", str(tmp_path / "data"), progress=False)
    assert not (tmp_path / "data" / "nq").exists()
    n = len(mirror.requests)
    fetch.fetch("nq_dpr", "nq", str(tmp_path / "data"), progress=False)
    assert mirror.requests[n:] == [(path, "bytes=10-")]
    assert _read(tmp_path / "data" / "nq" / "nq-test.qa.csv") == _read(tmp_path / "local" / "nq" / "nq-test.qa.csv")
