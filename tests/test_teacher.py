"""The teacher's fine-tuning step (sharded, with gradient accumulation) and its batches; the
scorer's params resident on every local device; a killed scoring pass resumes from its last chunk."""

import json
import os
import signal
import subprocess
import sys

import jax
import numpy as np
from conftest import make_tiny_config

from md2pr_jax import sharding as shd
from md2pr_jax.models import teacher_from_config
from md2pr_jax.params import init_teacher_params
from md2pr_jax.teacher import TeacherBatches, create_teacher_state, make_teacher_train_step
from md2pr_jax.train import numpy_tree


class _Tokens:
    """Token rows: query row q is all q+1, doc row d is all d+1 (ids stay inside the vocabulary)."""

    def query_tokens(self, rows):
        rows = np.asarray(rows)
        return np.broadcast_to(rows[..., None] + 1, (*rows.shape, 8)).astype(np.int32), np.ones((*rows.shape, 8), np.int32)

    def doc_tokens(self, rows, max_len=None):
        rows = np.asarray(rows)
        return np.broadcast_to(rows[..., None] + 1, (*rows.shape, max_len or 16)).astype(np.int32), np.ones((*rows.shape, max_len or 16), np.int32)


def _lists(epoch):
    qs = np.arange(8) + 10 * epoch
    return qs, np.stack([qs + 100, qs + 200, qs + 300], axis=1)


def test_teacher_batches_walk_epochs_and_resume():
    batches = TeacherBatches(_lists, _Tokens(), global_batch=4, rows=slice(None), steps_per_epoch=2)
    seen = [next(batches)["q_ids"][:, 0] - 1 for _ in range(3)]
    assert [s.tolist() for s in seen] == [[0, 1, 2, 3], [4, 5, 6, 7], [10, 11, 12, 13]]
    assert batches.get_state() == {"step": 3}
    resumed = TeacherBatches(_lists, _Tokens(), 4, slice(2, 4), 2, start=3)  # the second of two processes
    batch = next(resumed)
    assert (batch["q_ids"][:, 0] - 1).tolist() == [16, 17] and batch["p_ids"].shape == (2, 3, 16)
    assert batch["cand_mask"].tolist() == [[1, 1, 1]] * 2


def test_teacher_step_accumulation_matches_one_batch():
    out = {}
    for accum in (1, 2):
        config = make_tiny_config(**{"teacher_train.grad_accum": accum, "teacher_train.warmup_steps": 0})
        mesh = shd.make_mesh(config)
        teacher = teacher_from_config(config)
        step, tx, shardings = make_teacher_train_step(config, mesh, teacher, total_steps=4)
        state = create_teacher_state(config, mesh, init_teacher_params(config), tx, shardings)
        batch = next(TeacherBatches(_lists, _Tokens(), 4, slice(None), 2))
        state, metrics = step(state, shd.to_global(batch, mesh), None)
        out[accum] = (jax.device_get(metrics), numpy_tree(state.params))
        assert int(state.step) == 1
    (m1, p1), (m2, p2) = out[1], out[2]
    assert set(m1) >= {"loss", "loss_list", "loss_point", "acc", "grad_norm", "lr"}
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-5)
    np.testing.assert_allclose(m1["grad_norm"], m2["grad_norm"], rtol=1e-4)
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, atol=1e-6)


HERE = os.path.dirname(os.path.abspath(__file__))
SCORE_WORKER = os.path.join(HERE, "_score_worker.py")


def _worker_env(devices: int = 1, **extra) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
                PYTHONPATH=os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]), **extra)


def test_pair_scorer_keeps_params_on_every_local_device_and_splits_batches():
    """On 4 forced devices: params placed once on all 4, each batch of 8 pairs split 2 per
    device, and the logits equal those of a one-device scorer."""
    proc = subprocess.run([sys.executable, SCORE_WORKER, "devices"], env=_worker_env(4), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["devices"] == 4 and got["param_devices"] == 4 and got["params_on_device"]
    assert got["batch_shards"] == [2, 2, 2, 2] and got["score_shards"] == 4
    assert got["max_diff"] <= 1e-5


def test_sigkill_during_scoring_resumes_from_the_last_chunk(tmp_path):
    """A scoring pass killed after a few chunks, started again, scores only the chunks not yet
    written and gives the same logits as an uninterrupted pass."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    cmd = lambda folder: [sys.executable, SCORE_WORKER, "chunks", str(folder), str(folder) + ".npy"]  # noqa: E731
    out = subprocess.run(cmd(full), env=_worker_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    info = json.loads(out.stdout.strip().splitlines()[-1].split(" ", 1)[1])
    assert info == {"chunks": 200, "resumed": 0, "scored_pairs": 12800, "chunk": 64}

    proc = subprocess.Popen(cmd(killed), env=_worker_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line.strip())
            if line.strip() == "chunk 3":
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL and not any(s.startswith("done") for s in seen), seen
    written = [p for p in killed.glob("pairs-*/c*.npz")]
    assert 3 <= len(written) < 200, len(written)  # "chunk 3" is printed once chunks 0..2 are written
    assert not (tmp_path / "killed.npy").exists()

    out = subprocess.run(cmd(killed), env=_worker_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    info = json.loads(lines[-1].split(" ", 1)[1])
    assert info["resumed"] == len(written) and info["scored_pairs"] == 64 * (200 - len(written))
    assert sum(line.startswith("chunk ") for line in lines) == 200 - len(written)  # only the rest was scored
    np.testing.assert_array_equal(np.load(tmp_path / "killed.npy"), np.load(tmp_path / "full.npy"))


def test_two_processes_split_the_chunks_and_the_bm25_queries(tmp_path):
    """2 processes x 2 devices (gloo): the 10 chunks of 600 pairs alternate between the processes
    (5 each: 320 and 280 pairs), each gets all the logits, equal to scoring them all alone; BM25's
    queries split across the two and gathered equal the whole search."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        coordinator = f"127.0.0.1:{s.getsockname()[1]}"
    procs = [subprocess.Popen([sys.executable, SCORE_WORKER, "processes", str(tmp_path / "chunks")],
                              env=_worker_env(2, MD2PR_COORDINATOR=coordinator, MD2PR_NUM_PROCESSES="2",
                                              MD2PR_PROCESS_ID=str(i)),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    got = sorted((json.loads(out.strip().splitlines()[-1]) for out, _ in outs), key=lambda g: g["process"])
    assert [g["processes"] for g in got] == [2, 2]
    assert [g["info"]["scored_pairs"] for g in got] == [320, 280] and got[0]["info"]["chunks"] == 10
    for g in got:
        assert g["logits_diff"] <= 1e-5
        assert g["bm25_idx_equal"] and g["bm25_scores_equal"] and g["bm25_shape"] == [53, 7]
        assert g["bm25_idx_dtype"] == "int64"


def test_a_chunked_pass_moves_its_bar_with_every_batch(tmp_path, monkeypatch):
    """One chunk holding the whole pass (a 65k-pair chunk at SciFact's size) still moves the
    progress bar batch by batch, by the pairs each batch scored; chunks of one batch each give
    the same logits, bit for bit (the chunk size is bookkeeping: ablation.BOOKKEEPING_KEYS)."""
    from md2pr_jax import teacher as teacher_mod

    updates = []

    class Bar:  # tqdm's interface as the scorer uses it: a bar to update, or an iterable to wrap
        def __init__(self, iterable=(), **kwargs):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable)

        def update(self, k):
            updates.append(k)

        def close(self):
            pass

    monkeypatch.setattr(teacher_mod, "tqdm", Bar)
    config = make_tiny_config(**{"teacher_train.score_batch_size": 16})
    scorer = teacher_mod.TeacherScorer(config, teacher_from_config(config), _Tokens(), [init_teacher_params(config)],
                                       batch_size=16)
    q, d = np.arange(40) % 5, np.arange(40) % 7
    logits, info = teacher_mod.score_in_chunks(scorer, q, d, tmp_path / "chunks", chunk=1024)
    assert info["chunks"] == 1 and updates == [16, 16, 8]
    np.testing.assert_allclose(logits, scorer.score(q, d, progress=False), atol=1e-6)
    small, info = teacher_mod.score_in_chunks(scorer, q, d, tmp_path / "small_chunks", chunk=16)
    assert info["chunks"] == 3 and np.array_equal(small, logits)
