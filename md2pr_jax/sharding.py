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


def barrier(name: str) -> None:
    """All processes meet here (a no-op with one process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def make_mesh(config, devices=None) -> Mesh:
    """A Mesh with axes ('data', 'fsdp', 'tensor') sized by `config.mesh` over `devices`
    (default: all devices of all processes), in the order of `device_grid`."""
    devices = list(jax.devices() if devices is None else devices)
    grid = device_grid(mesh_shape(config, len(devices)), devices)
    axis_types = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return Mesh(grid, MESH_AXES, axis_types=axis_types)


def device_grid(shape: tuple[int, int, int], devices) -> np.ndarray:
    """`devices` arranged as a (data, fsdp, tensor) array: process-major, so that each host's
    devices are one contiguous block along the flattened data x fsdp axes, and within a host
    in the topology-aware order of `mesh_utils.create_device_mesh` (plain order where that
    does not apply, e.g. CPU devices).

    Why this order: a process can only put data on its own devices, and the input pipeline
    and `to_global` hand each process one contiguous block of rows of the global batch
    (`local_batch_slice`). `create_device_mesh` over a whole multi-host slice optimises
    only the physical torus and interleaves the hosts along the batch axes on real TPU
    device orders (v4-32: process index along fsdp 0,1,2,3,0,1,2,3,...), which leaves no
    process a contiguous block. Building the global batch from global indices instead would
    change the pipeline's contract and the rows each host reads; ordering the mesh keeps it.
    Each host's devices form a physically compact block (2x2 chips on v4, v5e, v6e hosts),
    so the host blocks keep neighbouring chips together and a host's block is ordered for
    its ICI links by `create_device_mesh`.

    The tensor axis (innermost, the most communication) stays within a host when it divides
    the host's device count; when it is a multiple of it, a tensor group spans whole hosts,
    which then hold (and feed) the same rows. With one process this is
    `create_device_mesh(shape)` over all devices."""
    devices = list(devices)
    groups: dict[int, list] = {}
    for d in devices:
        groups.setdefault(int(getattr(d, "process_index", 0)), []).append(d)
    if len(groups) == 1:
        return _ici_grid(tuple(shape), devices)
    sizes = {len(g) for g in groups.values()}
    if len(sizes) != 1:
        raise ValueError(
            f"processes hold different numbers of devices ({sorted(sizes)}); a mesh over "
            "several processes needs the same number of devices on each"
        )
    local, tensor = sizes.pop(), int(shape[2])
    if local % tensor == 0:
        local_shape: tuple[int, ...] = (local // tensor, tensor)
    elif tensor % local == 0:
        local_shape = (local,)
    else:
        raise ValueError(
            f"config.mesh.tensor={tensor} neither divides nor is a multiple of the {local} "
            "devices per process; choose a tensor size that does"
        )
    blocks = [_ici_grid(local_shape, groups[p]).reshape(-1) for p in sorted(groups)]
    return np.concatenate(blocks).reshape(shape)


def _ici_grid(shape: tuple[int, ...], devices: list) -> np.ndarray:
    """`devices` as an array of `shape` in `create_device_mesh`'s topology-aware order where
    it applies (TPU), plain order otherwise."""
    try:
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except (ValueError, NotImplementedError, AssertionError):
        return np.asarray(devices, dtype=object).reshape(shape)


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


def process_batch_rows(mesh: Mesh, global_batch: int, process_index: int) -> slice:
    """The rows [start, stop) of the global batch that the devices of process
    `process_index` hold under `batch_sharding(mesh)`: what that process must supply to
    `to_global`. A pure function of the mesh (the devices carry their process index), so
    it can be computed for any process, e.g. on a topology's compile-only devices.

    ValueError if the batch does not divide over data x fsdp, if the process has no device
    in the mesh, or if its devices' rows are not one contiguous block (a mesh that
    interleaves hosts along the batch axes; `make_mesh` never builds one)."""
    if global_batch % batch_shards(mesh):
        raise ValueError(
            f"global batch {global_batch} is not divisible by data*fsdp={batch_shards(mesh)}; "
            "change config.train.batch_size or config.mesh"
        )
    index = batch_sharding(mesh).devices_indices_map((global_batch,))
    held = set()
    for device, idx in index.items():
        if int(getattr(device, "process_index", 0)) == process_index:
            rows = idx[0]
            held.update(range(rows.start or 0, global_batch if rows.stop is None else rows.stop))
    if not held:
        raise ValueError(f"process {process_index} holds no device of the mesh")
    start, stop = min(held), max(held) + 1
    if len(held) != stop - start:
        raise ValueError(
            f"process {process_index}'s devices hold {len(held)} rows spread over {start}..{stop} of "
            f"{global_batch}, not one contiguous block; build the mesh with sharding.make_mesh, which "
            "puts each host's devices together along the batch axes"
        )
    return slice(start, stop)


def local_batch_slice(mesh: Mesh, global_batch: int) -> slice:
    """The rows [start, stop) of the global batch that this process must supply to
    `to_global` (`process_batch_rows` for `jax.process_index()`). With the tensor axis
    inside a host (the usual case) this is this process's 1/process_count of the batch."""
    return process_batch_rows(mesh, global_batch, jax.process_index())


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
