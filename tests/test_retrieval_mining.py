"""Mining: positives removed; 2 local processes (gloo) give exactly the single-process candidates."""

import os
import socket
import subprocess
import sys

import numpy as np

N_DOCS, N_Q, DIM, K = 301, 23, 16, 12


def data():
    rng = np.random.default_rng(0)
    db = rng.normal(size=(N_DOCS, DIM)).astype(np.float32)
    db[7] = db[3]  # an exact tie across the shard boundary region
    q = rng.normal(size=(N_Q, DIM)).astype(np.float32)
    exclude = [set(rng.choice(N_DOCS, size=rng.integers(0, 4), replace=False).tolist()) for _ in range(N_Q)]
    return db, q, exclude


def test_mine_single_process_removes_positives_and_matches_exact():
    from md2pr_jax.retrieval.index import ExactIndex, exact_search
    from md2pr_jax.retrieval.mining import mine

    db, q, exclude = data()
    idx, scores = mine(q, ExactIndex(db), K, exclude)
    _, full = exact_search(q, db, N_DOCS)
    for row, ex, ref in zip(idx, exclude, full):
        assert not set(row.tolist()) & ex
        np.testing.assert_array_equal(row, [d for d in ref if d not in ex][:K])
    # Two local shards give the same lists as one index.
    shards = [(ExactIndex(db[:100]), 0), (ExactIndex(db[100:]), 100)]
    idx2, scores2 = mine(q, shards, K, exclude)
    np.testing.assert_array_equal(idx2, idx)
    np.testing.assert_allclose(scores2, scores, atol=1e-5)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    from md2pr_jax.retrieval.index import ExactIndex
    from md2pr_jax.retrieval.mining import mine

    db, q, exclude = data()
    want_idx, want_s = mine(q, ExactIndex(db), K, exclude)
    port = _free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=1")
    procs = [
        subprocess.Popen([sys.executable, __file__, str(i), str(port), str(tmp_path)], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for i in range(2)
    ]
    logs = [p.communicate(timeout=300)[0].decode() for p in procs]
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log[-3000:]
    for i in range(2):
        got = np.load(tmp_path / f"mined_{i}.npz")
        np.testing.assert_array_equal(got["idx"], want_idx)
        np.testing.assert_allclose(got["scores"], want_s, atol=1e-5)
        np.testing.assert_array_equal(got["q_all"], q)


def _worker(process_id: int, port: int, out_dir: str) -> None:
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2, process_id=process_id)
    assert jax.process_count() == 2
    from md2pr_jax.retrieval.encode import process_slice
    from md2pr_jax.retrieval.index import ExactIndex
    from md2pr_jax.retrieval.mining import gather_rows, mine

    db, q, exclude = data()
    start, stop = process_slice(N_DOCS)
    idx, scores = mine(q, ExactIndex(db[start:stop]), K, exclude, offset=start)
    qa, qb = process_slice(N_Q)
    q_all = gather_rows(q[qa:qb], N_Q)
    np.savez(os.path.join(out_dir, f"mined_{process_id}.npz"), idx=idx, scores=scores, q_all=q_all)
    jax.distributed.shutdown()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _worker(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3])


def test_excluded_mask_and_first_unexcluded_match_the_per_row_definitions():
    """The vectorised exclusion (one sorted key lookup for all rows) against np.isin row by row."""
    from md2pr_jax.retrieval.mining import excluded_mask
    from md2pr_jax.rounds.stages import first_unexcluded

    rng = np.random.default_rng(5)
    idx = rng.integers(-1, 40, (200, 12))
    exclude = [set(rng.integers(0, 40, rng.integers(0, 5)).tolist()) for _ in range(200)]
    got = excluded_mask(idx, exclude)
    want = np.array([np.isin(row, np.fromiter(e, np.int64)) & (row >= 0) for row, e in zip(idx, exclude)])
    assert got.any() and (got == want).all()
    assert not excluded_mask(idx, [set()] * 200).any()
    firsts = first_unexcluded(idx, exclude, 5)
    for row, e, f in zip(idx, exclude, firsts):
        ref = [int(d) for d in row if d >= 0 and d not in e][:5]
        assert f.tolist() == ref + [-1] * (5 - len(ref))
