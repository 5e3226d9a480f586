"""Encoding: bucketed batches equal one unpadded forward per text; save/load round trip."""

import flax.linen as nn
import jax
import numpy as np
import pytest

from md2pr_jax.config import base_config, bert_shape
from md2pr_jax.models import student_from_config
from md2pr_jax.retrieval import encode as E


def tiny_student():
    cfg = base_config()
    cfg.student.bert = bert_shape(vocab_size=100, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    student = student_from_config(cfg)
    x = np.ones((1, 8), np.int32)
    params = nn.unbox(student.init(jax.random.PRNGKey(0), x, x, x, x)["params"])
    return student, params


def random_tokens(rng, n=37, width=70):
    lengths = rng.integers(3, width + 1, size=n)
    ids = np.zeros((n, width), np.int32)
    mask = np.zeros((n, width), np.int32)
    for r, length in enumerate(lengths):
        ids[r, :length] = rng.integers(1, 100, size=length)
        mask[r, :length] = 1
    return ids, mask


def test_bucketed_encoding_matches_single_forward():
    student, params = tiny_student()
    ids, mask = random_tokens(np.random.default_rng(0))
    fn = E.student_apply_fn(student, params, "passage")
    src = E.ArrayTokens(ids, mask)
    subset = np.array([5, 0, 36, 17, 2, 9, 30, 11, 12, 13, 1])
    got = E.encode(fn, src, subset, batch_size=4, bucket_step=32, progress=False)
    assert got.shape == (len(subset), 32) and got.dtype == np.float32
    # Reference: the same rows at full width (padding is masked, so buckets change nothing).
    want = np.asarray(fn(ids[subset], mask[subset]))
    np.testing.assert_allclose(got, want, atol=1e-5)
    length = int(mask[subset[0]].sum())  # and one row with no padding at all
    alone = np.asarray(fn(ids[subset[:1], :length], mask[subset[:1], :length]))[0]
    np.testing.assert_allclose(got[0], alone, atol=1e-5)
    full = E.encode(fn, src, batch_size=4, bucket_step=32, progress=False)
    np.testing.assert_allclose(full[subset], got, atol=1e-5)
    q_fn = E.student_apply_fn(student, params, "query")  # shared towers: the same embeddings
    np.testing.assert_allclose(np.asarray(q_fn(ids[:4], mask[:4])), full[:4], atol=1e-5)
    with pytest.raises(ValueError, match="tower"):
        E.student_apply_fn(student, params, "doc")


def test_buckets_and_slices():
    assert E.bucket_lengths(128, 32) == [32, 64, 96, 128]
    assert E.bucket_lengths(100, 32) == [32, 64, 96, 100]
    slices = [E.process_slice(10, i, 3) for i in range(3)]
    assert slices == [(0, 4), (4, 8), (8, 10)]
    assert E.process_slice(10) == (0, 10)


def test_callable_tokens_and_save_load(tmp_path):
    student, params = tiny_student()
    ids, mask = random_tokens(np.random.default_rng(1), n=9, width=20)
    src = E.CallableTokens(lambda idx: (ids[idx], mask[idx]), mask.sum(1))
    emb = E.encode(E.student_apply_fn(student, params), src, batch_size=4, progress=False)
    path = str(tmp_path / "emb" / "corpus.npy")
    E.save_embeddings(path, emb, [f"d{i}" for i in range(9)])
    back, got_ids = E.load_embeddings(path)
    assert isinstance(back, np.memmap) and got_ids[3] == "d3"
    np.testing.assert_array_equal(back, emb)
    with pytest.raises(ValueError, match="ids for"):
        E.save_embeddings(path, emb, ["x"])


_FOUR_DEVICES = r"""
import json, sys
import jax, numpy as np
sys.path.insert(0, sys.argv[1])
from test_retrieval_encode import random_tokens, tiny_student
from md2pr_jax.retrieval import encode as E

student, params = tiny_student()
ids, mask = random_tokens(np.random.default_rng(2), n=21, width=40)
fn = E.student_apply_fn(student, params, "passage")
one = E.student_apply_fn(student, params, "passage", devices=jax.local_devices()[:1])
out = fn(ids[:8], mask[:8])
shards = sorted((s.device.id, s.data.shape[0]) for s in out.addressable_shards)
sharded = E.encode(fn, E.ArrayTokens(ids, mask), batch_size=6, progress=False)
single = E.encode(one, E.ArrayTokens(ids, mask), batch_size=6, progress=False)
odd = np.asarray(fn(ids[:5], mask[:5]))  # 5 rows on 4 devices: padded, then cut
print(json.dumps({"devices": len(jax.local_devices()), "num_devices": fn.num_devices, "shards": shards,
                  "param_devices": len(jax.tree.leaves(fn.params)[0].sharding.device_set),
                  "max_diff": float(np.abs(sharded - single).max()),
                  "odd_diff": float(np.abs(odd - single[:5]).max()), "odd_shape": list(odd.shape)}))
"""


def test_encoding_splits_each_batch_over_every_local_device():
    """On 4 forced host devices every batch is split 4 ways (2 rows each of 8) with the params
    on all 4, and the embeddings equal those of one device."""
    import json
    import os
    import subprocess
    import sys

    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=4",
               PYTHONPATH=os.pathsep.join([os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", _FOUR_DEVICES, here], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["devices"] == 4 and got["num_devices"] == 4 and got["param_devices"] == 4
    assert got["shards"] == [[0, 2], [1, 2], [2, 2], [3, 2]]
    assert got["max_diff"] <= 1e-5 and got["odd_diff"] <= 1e-5 and got["odd_shape"] == [5, 32]
