"""Preparation at scale: threaded tokenization gives the same files as one thread, the prepared
key names no path or time, and several JAX processes prepare at once (each into its own cache)
or take turns through the cache folder's lock (one shared folder)."""

import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # run as a script: the worker of the multi-process tests
    sys.path.insert(0, ROOT)

from tests.conftest import make_tiny_config  # noqa: E402

N_DOCS = 61  # with chunks of 4: 16 chunks, the last one short


def write_msmarco(root, docs: int = N_DOCS) -> str:
    """An msmarco_passage dataset of `docs` passages of varied length (some over 16 words, so the
    word cut runs, one with words that vanish in normalisation, so its redo runs), 6 train and
    2 dev queries."""
    src = os.path.join(root, "msmarco")
    os.makedirs(src, exist_ok=True)
    rng = np.random.default_rng(0)
    words = ["alpha", "Beta", "gamma-ray", "naïve", "café", "3.5%", "U.S.", "tokenization", "x", "(e.g."]
    lines = []
    for i in range(docs):
        text = " ".join(rng.choice(words, int(rng.integers(1, 40))))
        if i == 7:
            text = "\x00 \ufffd " * 20 + "real words at the end"
        lines.append(f"{i}\t{text}\n")
    with open(os.path.join(src, "collection.tsv"), "w") as f:
        f.writelines(lines)
    for split, qids in (("train", range(100, 106)), ("dev", range(200, 202))):
        with open(os.path.join(src, f"queries.{split}.tsv"), "w") as f:
            f.writelines(f"{q}\twhat is {words[q % len(words)]} number {q}\n" for q in qids)
        with open(os.path.join(src, f"qrels.{split}.tsv"), "w") as f:
            f.writelines(f"{q}\t0\t{(q * 7) % docs}\t1\n" for q in qids)
    return str(root)


def _config(data_dir, cache_dir="", **overrides):
    c = make_tiny_config(**overrides)
    c.data.dir, c.data.dataset, c.data.builder, c.data.eval_split = str(data_dir), "msmarco", "msmarco_passage", "dev"
    c.data.cache_dir = str(cache_dir)
    return c


def file_hashes(path: str) -> dict:
    """sha1 of every file of a prepared folder; meta.json without its timings and the build's path."""
    out = {}
    for name in sorted(os.listdir(path)):
        with open(os.path.join(path, name), "rb") as f:
            data = f.read()
        if name == "meta.json":
            meta = json.loads(data)
            meta.pop("seconds"), meta.pop("tfds_dir")
            data = json.dumps(meta, sort_keys=True).encode()
        out[name] = hashlib.sha1(data).hexdigest()
    return out


@pytest.fixture(scope="module")
def tokenizer():
    from md2pr_jax.hf import load_tokenizer

    return load_tokenizer(make_tiny_config())


@pytest.fixture(scope="module")
def hf_tokenizer():
    from md2pr_jax.hf import load_hf_tokenizer

    return load_hf_tokenizer(make_tiny_config())


@pytest.mark.parametrize("max_docs", [0, 20])
def test_threads_give_the_same_files_as_one_thread(tmp_path, tokenizer, hf_tokenizer, monkeypatch, max_docs):
    from md2pr_jax.data import prepare
    from md2pr_jax.data.prepare import _encode, prepare_dataset

    monkeypatch.setattr(prepare, "_TOKENIZE_CHUNK", 4)  # many chunks in flight at once
    src = write_msmarco(tmp_path / "src")
    one = prepare_dataset(_config(src, **{"data.tokenize_threads": 1, "data.max_docs": max_docs}),
                          str(tmp_path / "one"), tokenizer=tokenizer)
    four = prepare_dataset(_config(src, **{"data.tokenize_threads": 4, "data.max_docs": max_docs}),
                           str(tmp_path / "four"), tokenizer=tokenizer)
    with open(os.path.join(four.path, "meta.json")) as f:
        assert json.load(f)["seconds"]["threads"] == 4
    assert file_hashes(one.path) == file_hashes(four.path)
    assert four.num_docs == (max_docs or N_DOCS) and four.doc_ids == sorted(four.doc_ids, key=int)
    # In source order, and each row the tokenizer's own ids for its text (the fast path is exact).
    texts = list(four.doc_texts)
    want = _encode(hf_tokenizer, texts, 16)
    ids, mask = four.doc_tokens(np.arange(four.num_docs))
    assert [row[: m.sum()].tolist() for row, m in zip(ids, mask)] == want
    q_ids, q_mask = four.query_tokens(np.arange(four.num_queries))
    assert [r[: m.sum()].tolist() for r, m in zip(q_ids, q_mask)] == _encode(hf_tokenizer, list(four.query_texts), 8)


def test_prepared_key_names_no_path_or_time(tmp_path, tokenizer):
    """Two caches prepared from the same files (two hosts) give the same folder name and bytes;
    a changed source file changes the name."""
    from md2pr_jax.data import prepare_dataset

    src = write_msmarco(tmp_path / "src")
    a = prepare_dataset(_config(src, tmp_path / "host_a"), str(tmp_path / "wa"), tokenizer=tokenizer)
    b = prepare_dataset(_config(src, tmp_path / "host_b"), str(tmp_path / "wb"), tokenizer=tokenizer)
    assert os.path.basename(a.path) == os.path.basename(b.path) and a.path != b.path
    assert file_hashes(a.path) == file_hashes(b.path)
    with open(os.path.join(src, "msmarco", "qrels.dev.tsv"), "a") as f:
        f.write("200\t0\t3\t1\n")
    c = prepare_dataset(_config(src, tmp_path / "host_a"), str(tmp_path / "wa"), tokenizer=tokenizer)
    assert os.path.basename(c.path) != os.path.basename(a.path) and not c.from_cache
    assert c.qrels["dev"]["200"] == {str(200 * 7 % N_DOCS): 1, "3": 1}


def test_cache_lock_serialises_sharers(tmp_path):
    """The lock of one cache folder is held by one process at a time (another process probes it)."""
    from md2pr_jax.data.prepare import cache_lock

    probe = ("import fcntl, sys\nf = open(sys.argv[1], 'a')\n"
             "try:\n    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)\n")
    lock = str(tmp_path / "locks" / "msmarco_passage.lock")
    with cache_lock(str(tmp_path), "msmarco_passage"):
        assert subprocess.run([sys.executable, "-c", probe, lock]).returncode == 3  # held
    assert subprocess.run([sys.executable, "-c", probe, lock]).returncode == 0  # released


def test_tokenize_threads_is_validated():
    from md2pr_jax.config import ConfigError, validate

    with pytest.raises(ConfigError, match="tokenize_threads must be an integer >= 0"):
        validate(make_tiny_config(**{"data.tokenize_threads": -1}))
    assert validate(make_tiny_config(**{"data.tokenize_threads": 3})).data.tokenize_threads == 3


# ----------------------------------------------------------------------------------------
# Two JAX processes (gloo), as on a pod of two hosts


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_two(tmp_path, scenario: str) -> list[dict]:
    src = write_msmarco(tmp_path / "src")
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [subprocess.Popen([sys.executable, __file__, scenario, str(i), str(port), src, str(tmp_path)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for i in range(2)]
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    out = []
    for i in range(2):
        with open(tmp_path / f"result_{i}.json") as f:
            out.append(json.load(f))
    return out


def test_two_hosts_prepare_at_once_and_agree(tmp_path):
    """Each process its own cache (a pod's hosts): process 0 starts only once process 1 is
    building or done, so process 1 cannot be waiting for process 0's build (the old barrier
    would deadlock here); both build, into folders of the same name with the same bytes."""
    r0, r1 = _run_two(tmp_path, "own_cache")
    assert not r0["from_cache"] and not r1["from_cache"]
    assert r0["waited_for_peer"] and r0["path"] != r1["path"]
    assert os.path.basename(r0["path"]) == os.path.basename(r1["path"])
    assert r0["hashes"] == r1["hashes"] and r0["docs"] == r1["docs"] == N_DOCS


def test_two_processes_sharing_a_cache_build_once(tmp_path):
    """One cache folder for both: the lock lets one build; the other loads its result."""
    r0, r1 = _run_two(tmp_path, "shared_cache")
    assert sorted([r0["from_cache"], r1["from_cache"]]) == [False, True]
    assert r0["path"] == r1["path"] and r0["hashes"] == r1["hashes"]
    prepared = os.listdir(tmp_path / "shared" / "prepared")
    assert prepared == [os.path.basename(r0["path"])]  # one folder, no leftover .incomplete-*
    assert os.listdir(tmp_path / "shared" / "tfds" / "msmarco_passage" / "msmarco") == ["1.1.0"]


def _worker(scenario: str, process_id: int, port: int, src: str, out_dir: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    from md2pr_jax.data import prepare

    cache = os.path.join(out_dir, "shared" if scenario == "shared_cache" else f"host{process_id}")
    config = _config(src, cache, **{"data.tokenize_threads": 2})
    waited = False
    if scenario == "own_cache" and process_id == 0:
        real = prepare._prepare_dataset

        def after_peer(*args, **kwargs):
            # Past the data check's all-gather: wait until process 1 holds its lock or is done.
            nonlocal waited
            peer, deadline = os.path.join(out_dir, "host1"), time.time() + 120
            while not (_lock_held(os.path.join(peer, "locks", "msmarco_passage.lock")) or _prepared(peer)):
                if time.time() > deadline:
                    raise TimeoutError("process 1 never started preparing: it waits for process 0")
                time.sleep(0.05)
            waited = True
            return real(*args, **kwargs)

        prepare._prepare_dataset = after_peer
    ds = prepare.prepare_dataset(config, os.path.join(out_dir, f"work{process_id}"))
    result = {"path": ds.path, "from_cache": ds.from_cache, "hashes": file_hashes(ds.path), "docs": ds.num_docs,
              "waited_for_peer": waited}
    with open(os.path.join(out_dir, f"result_{process_id}.json"), "w") as f:
        json.dump(result, f)
    jax.distributed.shutdown()


def _lock_held(path: str) -> bool:
    import fcntl

    if not os.path.exists(path):
        return False
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def _prepared(cache: str) -> bool:
    folder = os.path.join(cache, "prepared")
    names = os.listdir(folder) if os.path.isdir(folder) else []
    return any(os.path.exists(os.path.join(folder, n, "meta.json")) for n in names)


if __name__ == "__main__":
    _worker(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
