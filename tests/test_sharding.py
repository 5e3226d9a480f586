"""Mesh, logical rules and the same train step across device counts and processes.

The multi-device checks run tests/_train_worker.py in subprocesses: XLA_FLAGS (forced host
devices) and jax.distributed must be set before jax is imported.
"""

import json
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from md2pr_jax import sharding as shd
from md2pr_jax.config import ConfigError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _train_worker import tiny_config  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_train_worker.py")


def _env(devices: int, **extra) -> dict:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    env.update(extra)
    return env


def _run(args, env, timeout=600):
    proc = subprocess.run([sys.executable, WORKER, *args], env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _load(out):
    with open(os.path.join(out, "losses.json")) as f:
        info = json.load(f)
    return info, dict(np.load(os.path.join(out, "params.npz")))


def _assert_same(a_dir, b_dir, tol):
    (ia, pa), (ib, pb) = _load(a_dir), _load(b_dir)
    np.testing.assert_allclose(ia["losses"], ib["losses"], rtol=0, atol=tol)
    assert pa.keys() == pb.keys()
    worst = max(float(np.abs(pa[k] - pb[k]).max()) for k in pa)
    assert worst <= tol, worst
    return ia, ib


def test_mesh_and_rules_on_one_device():
    config = tiny_config()
    mesh = shd.make_mesh(config)
    assert mesh.axis_names == ("data", "fsdp", "tensor") and mesh.devices.shape == (1, 1, 1)
    assert shd.batch_sharding(mesh).spec == P(("data", "fsdp"))
    assert shd.local_batch_slice(mesh, 4) == slice(0, 4)
    with pytest.raises(ConfigError, match="does not divide"):
        shd.make_mesh(tiny_config(**{"mesh.data": 2}))
    rules = dict(shd.LOGICAL_RULES)
    assert rules["batch"] == ("data", "fsdp") and rules["embed"] == "fsdp" and rules["length"] is None
    assert rules["heads"] == rules["mlp"] == rules["vocab"] == "tensor"


def test_param_specs_follow_the_logical_names():
    """On an abstract 2x2x2 mesh: kernels split over fsdp x tensor; undividable dims replicated."""
    import flax.linen as nn

    from md2pr_jax.models import student_from_config

    config = tiny_config()
    mesh = jax.sharding.AbstractMesh((2, 2, 2), shd.MESH_AXES)
    student = student_from_config(config)
    q = np.ones((1, 8), np.int32)
    boxed = jax.eval_shape(lambda r: student.init(r, q, q, q, q)["params"], jax.random.PRNGKey(0))
    specs = jax.tree.map(lambda s: s.spec, shd.param_shardings(boxed, mesh))
    layer = specs["encoder"]["layer_0"]
    assert layer["self"]["query"]["kernel"] == P("fsdp", "tensor")
    assert layer["self"]["query"]["bias"] == P("tensor")
    assert layer["output_dense_ffn"]["kernel"] == P("tensor", "fsdp")
    assert specs["encoder"]["embeddings"]["word_embeddings"]["embedding"] == P("tensor", "fsdp")
    assert specs["encoder"]["embeddings"]["token_type_embeddings"]["embedding"] == P(None, "fsdp")
    # vocab 30522 is not divisible by 4: that dim falls back to replicated.
    mesh4 = jax.sharding.AbstractMesh((1, 2, 4), shd.MESH_AXES)
    spec4 = shd.param_shardings(boxed, mesh4)["encoder"]["embeddings"]["word_embeddings"]["embedding"].spec
    assert spec4 == P(None, "fsdp")
    assert nn.unbox(boxed)["encoder"]["layer_0"]["self"]["query"]["kernel"].shape == (32, 32)


def test_one_device_equals_eight_forced_devices(tmp_path):
    one, eight = str(tmp_path / "one"), str(tmp_path / "eight")
    _run(["steps", one, "--steps", "3"], _env(1))
    _run(["steps", eight, "--steps", "3", "--mesh", "2", "2", "2"], _env(8))
    info_one, info_eight = _assert_same(one, eight, 1e-5)
    assert (info_one["devices"], info_eight["devices"]) == (1, 8)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(args, timeout=600):
    """Runs the worker as 2 processes x 2 CPU devices (gloo); asserts both exit 0."""
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, *args],
            env=_env(2, MD2PR_COORDINATOR=coordinator, MD2PR_NUM_PROCESSES="2", MD2PR_PROCESS_ID=str(i)),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-4000:]


def test_each_process_feeds_the_rows_its_devices_hold(tmp_path):
    """2 processes x 2 devices: with the tensor axis inside a host each process feeds its half
    of the batch; with tensor=4 (across both hosts) both feed all of it. In every case each
    local shard of to_global's array is the global rows the sharding assigns it."""
    _two_processes(["rows", str(tmp_path)], timeout=300)
    rows = [json.loads((tmp_path / f"rows_p{i}.json").read_text()) for i in range(2)]
    for shape in ("1x2x2", "2x1x2", "4x1x1", "2x2x1"):
        assert (rows[0][shape], rows[1][shape]) == ([0, 4], [4, 8]), shape
    assert rows[0]["1x1x4"] == rows[1]["1x1x4"] == [0, 8]


def test_two_processes_equal_one_process_with_four_devices(tmp_path):
    """2 processes x 2 devices (gloo) vs 1 process x 4 devices, mesh data=1, fsdp=2, tensor=2;
    each process feeds its half of the global batch."""
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    mesh = ["--mesh", "1", "2", "2"]
    _two_processes(["steps", multi, "--steps", "3", *mesh])
    _run(["steps", single, "--steps", "3", *mesh], _env(4))
    info_single, info_multi = _assert_same(single, multi, 1e-5)
    assert info_multi["processes"] == 2 and info_multi["devices"] == 4 and info_single["processes"] == 1


def _fake_devices(processes: int, per_process: int):
    """CPU-like devices without coordinates, listed interleaved across processes."""
    return [
        SimpleNamespace(id=i * processes + p, process_index=p, platform="cpu", device_kind="cpu")
        for i in range(per_process)
        for p in range(processes)
    ]


def test_device_grid_groups_processes_without_coordinates():
    grid = shd.device_grid((2, 2, 2), _fake_devices(2, 4))
    assert [d.process_index for d in grid.reshape(-1)] == [0, 0, 0, 0, 1, 1, 1, 1]
    with pytest.raises(ValueError, match="tensor=3 neither divides nor is a multiple of the 2 devices"):
        shd.device_grid((1, 2, 3), _fake_devices(3, 2))
    uneven = _fake_devices(2, 2) + [SimpleNamespace(id=9, process_index=0, platform="cpu", device_kind="cpu")]
    with pytest.raises(ValueError, match="different numbers of devices"):
        shd.device_grid((1, 5, 1), uneven)
