"""The device mesh, the logical-axis rules, and the shardings of params, batches and state.

One mesh with axes (data, fsdp, tensor) serves every scale: 1 CPU device, N forced host
devices, N local processes and a TPU pod differ only in `config.mesh`. Parameters carry
logical axis names (models/bert.py); `LOGICAL_RULES` maps them to mesh axes:

    batch  -> (data, fsdp)   the global batch is split over both data-parallel axes
    embed  -> fsdp           params are split along the hidden size (ZeRO-3 style)
    heads, mlp, vocab -> tensor
    length -> replicated

Activations are constrained to ('batch', 'length', 'embed'); since 'fsdp' already holds the
batch, flax leaves their 'embed' unsharded (rules are applied in order, a mesh axis once).
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Mapping

import flax.linen as nn
import jax
import numpy as np
from flax.linen import partitioning as nn_partitioning
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from md2pr_jax.config import mesh_shape

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

LOGICAL_RULES = [
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("length", None),
]


def make_mesh(config, devices=None) -> Mesh:
    """A Mesh with axes ('data', 'fsdp', 'tensor') sized by `config.mesh` over `devices`
    (default: all devices of all processes). Uses the topology-aware device order of
    `mesh_utils.create_device_mesh` where it applies (TPU), plain order otherwise."""
    devices = list(jax.devices() if devices is None else devices)
    shape = mesh_shape(config, len(devices))
    try:
        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        grid = np.asarray(devices, dtype=object).reshape(shape)
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


@contextlib.contextmanager
def activation_context(mesh: Mesh) -> Iterator[None]:
    """Makes the model's logical activation constraints bind to `mesh`.

    Enter it inside the function being traced (a jitted step), so that it is active at
    trace time; it works inside `jax.jit`, unlike `jax.set_mesh`."""
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn_partitioning.axis_rules(LOGICAL_RULES):
        yield


def gather_lookup_params(params: Any, mesh: Mesh) -> Any:
    """Constrains embedding tables and 1-D params (biases, LayerNorm) to be whole on every
    device where they are used.

    With 'embed' over 'fsdp', XLA's SPMD partitioner otherwise propagates the hidden-dim
    sharding of these params into the embedding gather and the LayerNorms, and then cannot
    turn those activations back into batch-sharded ones without replicating them (an
    'involuntary full rematerialization' of [B, L, D]). Gathering the params instead, as
    FSDP does for every weight, costs one all-gather of the table and the vectors. Call it
    inside the step on the params before `model.apply`; gradients are reduce-scattered
    back to the params' own sharding."""
    whole = NamedSharding(mesh, P())

    def constrain(path, x):
        keys = [p.key for p in path if isinstance(p, jax.tree_util.DictKey)]
        if x.ndim == 1 or (keys and keys[-1] == "embedding"):
            return jax.lax.with_sharding_constraint(x, whole)
        return x

    return jax.tree_util.tree_map_with_path(constrain, params)


def _fit_spec(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
    """Drops the mesh axes of a dim that they do not divide (e.g. vocab 30522 over tensor=4):
    that dim is replicated instead of failing to compile."""
    out = []
    for i, axes in enumerate(tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        names = (axes,) if isinstance(axes, str) else tuple(axes)
        size = int(np.prod([mesh.shape[a] for a in names]))
        out.append(axes if shape[i] % size == 0 else None)
    return P(*out)


def logical_shardings(abstract_boxed: Any, mesh: Mesh, rules=LOGICAL_RULES) -> Any:
    """NamedShardings for a tree whose leaves are (abstract) arrays, some boxed in
    `nn.Partitioned` with logical names; unboxed leaves are replicated. The result has the
    structure of the unboxed tree."""
    specs = nn.get_partition_spec(abstract_boxed)
    shardings = nn.logical_to_mesh_sharding(specs, mesh, rules)
    shapes = nn.unbox(abstract_boxed)

    def fit(sharding, leaf):
        return NamedSharding(mesh, _fit_spec(sharding.spec, tuple(leaf.shape), mesh))

    return jax.tree.map(fit, shardings, shapes)


def param_shardings(abstract_boxed_params: Any, mesh: Mesh) -> Any:
    """Shardings of the (unboxed) params from `jax.eval_shape(model.init, ...)['params']`."""
    return logical_shardings(abstract_boxed_params, mesh)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dim over ('data', 'fsdp'), the rest replicated; a prefix for any batch dict."""
    return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def batch_shards(mesh: Mesh) -> int:
    """How many ways the batch dim is split (data x fsdp)."""
    return mesh.shape["data"] * mesh.shape["fsdp"]


def local_batch_slice(mesh: Mesh, global_batch: int) -> slice:
    """The rows [start, stop) of the global batch that this process must supply to
    `to_global`. Each process's devices hold one contiguous block of rows (the mesh puts
    a process's devices together along the batch axes)."""
    if global_batch % batch_shards(mesh):
        raise ValueError(
            f"global batch {global_batch} is not divisible by data*fsdp={batch_shards(mesh)}; "
            "change config.train.batch_size or config.mesh"
        )
    idx = batch_sharding(mesh).addressable_devices_indices_map((global_batch,))
    starts = sorted({s[0].start or 0 for s in idx.values()})
    stops = sorted({global_batch if s[0].stop is None else s[0].stop for s in idx.values()})
    start, stop = starts[0], stops[-1]
    if (stop - start) * jax.process_count() != global_batch:
        raise ValueError(
            f"this process's devices hold rows {start}..{stop} of {global_batch}, not one "
            "contiguous 1/process_count block; put each host's devices together in the mesh"
        )
    return slice(start, stop)


def to_global(batch: Mapping[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Host batch (this process's rows of every array, see `local_batch_slice`) -> global
    jax arrays sharded by `batch_sharding(mesh)`. With one process, pass the whole batch."""
    sharding = batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in batch.items()}


def put_global(tree: Any, shardings: Any) -> Any:
    """Host arrays that every process holds in full (e.g. pretrained params) -> global arrays
    with `shardings`; works with several processes, unlike a plain device_put."""

    def put(x, s):
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, s, lambda index: x[index])

    return jax.tree.map(put, tree, shardings)
