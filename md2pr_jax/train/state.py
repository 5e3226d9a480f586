"""The train state and its creation, already sharded over the mesh.

`TrainState` is pure data (step, params, opt_state, rng): the optimizer is rebuilt from the
config by whoever needs it (`make_train_step`), so a checkpoint holds arrays only and
restores onto any mesh.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from md2pr_jax import sharding as shd
from md2pr_jax.models import student_from_config, teacher_from_config
from md2pr_jax.train.optimizer import make_optimizer


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 [], optimizer updates done
    params: Any
    opt_state: Any
    rng: jax.Array  # uint32 [2]; dropout uses fold_in(rng, step)


def _dummy_inputs(config, batch: int = 1):
    lq, lp = config.data.max_query_len, config.data.max_passage_len
    q = jnp.ones((batch, lq), jnp.int32)
    p = jnp.ones((batch, lp), jnp.int32)
    return q, q, p, p


def init_student_boxed(student: nn.Module, config, rng: jax.Array) -> Any:
    """Random student params, boxed in nn.Partitioned with their logical axis names."""
    return student.init(rng, *_dummy_inputs(config))["params"]


def init_teacher_boxed(teacher: nn.Module, config, rng: jax.Array) -> Any:
    """Random teacher params, boxed in nn.Partitioned with their logical axis names."""
    return teacher.init(rng, *_dummy_inputs(config))["params"]


def _optimizer_for_layout(config) -> optax.GradientTransformation:
    # The optimizer state's layout does not depend on the schedule's length.
    return make_optimizer(config.train, total_steps=1)


def _init_state(student, config, rng, params=None) -> TrainState:
    init_rng, state_rng = jax.random.split(rng)
    if params is None:
        params = init_student_boxed(student, config, init_rng)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=_optimizer_for_layout(config).init(params),
        rng=state_rng,
    )


def state_shardings(config, mesh: Mesh, student: nn.Module | None = None) -> TrainState:
    """NamedShardings of every leaf of the TrainState on `mesh` (optimizer moments follow
    their params; counters and the rng are replicated)."""
    student = student or student_from_config(config)
    boxed = jax.eval_shape(lambda r: _init_state(student, config, r), jax.random.PRNGKey(0))
    return shd.logical_shardings(boxed, mesh)


def abstract_train_state(config, mesh: Mesh, student: nn.Module | None = None) -> TrainState:
    """The TrainState as jax.ShapeDtypeStructs carrying their shardings on `mesh`: the target
    for checkpoint restore and the input spec for ahead-of-time compilation."""
    student = student or student_from_config(config)
    shapes = jax.eval_shape(lambda r: nn.unbox(_init_state(student, config, r)), jax.random.PRNGKey(0))
    shardings = state_shardings(config, mesh, student)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def create_train_state(
    config, mesh: Mesh, init_params: Any = None, rng: jax.Array | None = None, *, student: nn.Module | None = None
) -> TrainState:
    """A fresh TrainState whose arrays are created already sharded over `mesh`.

    Args:
      config: the experiment config (student shape, train.*).
      mesh: from `sharding.make_mesh`.
      init_params: optional pretrained student params (unboxed host numpy tree, e.g. from
        `params.init_student_params`); placed onto the same shardings as random ones would be.
      rng: PRNG key (default PRNGKey(config.seed)).
      student: the DualEncoder (default `student_from_config(config)`).
    """
    student = student or student_from_config(config)
    rng = jax.random.PRNGKey(config.seed) if rng is None else rng
    shardings = state_shardings(config, mesh, student)
    rng = shd.put_global(np.asarray(jax.device_get(rng)), shd.replicated(mesh))
    if init_params is None:
        init = jax.jit(lambda r: nn.unbox(_init_state(student, config, r)), out_shardings=shardings)
        return init(rng)
    expected = jax.tree.structure(shardings.params)
    if jax.tree.structure(init_params) != expected:
        raise ValueError(
            "init_params do not match the student built from config.student (different tree); "
            "check config.student.bert and shared_towers against the pretrained weights"
        )
    params = shd.put_global(init_params, shardings.params)
    init = jax.jit(
        lambda r, p: _init_state(student, config, r, params=p),
        in_shardings=(shd.replicated(mesh), shardings.params),
        out_shardings=shardings,
    )
    return init(rng, params)


def teacher_param_shardings(config, mesh: Mesh, teacher: nn.Module | None = None) -> Any:
    """NamedShardings of the (unboxed) teacher params on `mesh`."""
    teacher = teacher or teacher_from_config(config)
    boxed = jax.eval_shape(lambda r: init_teacher_boxed(teacher, config, r), jax.random.PRNGKey(0))
    return shd.logical_shardings(boxed, mesh)


def abstract_teacher_params(config, mesh: Mesh, teacher: nn.Module | None = None) -> Any:
    """Teacher params as ShapeDtypeStructs with shardings (AOT input spec)."""
    teacher = teacher or teacher_from_config(config)
    shapes = jax.eval_shape(lambda r: nn.unbox(init_teacher_boxed(teacher, config, r)), jax.random.PRNGKey(0))
    shardings = teacher_param_shardings(config, mesh, teacher)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def place_teacher_params(config, mesh: Mesh, params: Any = None, rng: jax.Array | None = None, *, teacher=None) -> Any:
    """Teacher params on `mesh`: `params` (host numpy, e.g. `params.init_teacher_params`) placed
    onto their shardings, or random ones created already sharded."""
    teacher = teacher or teacher_from_config(config)
    shardings = teacher_param_shardings(config, mesh, teacher)
    if params is not None:
        return shd.put_global(params, shardings)
    rng = jax.random.PRNGKey(config.seed + 1) if rng is None else rng
    return jax.jit(lambda r: nn.unbox(init_teacher_boxed(teacher, config, r)), out_shardings=shardings)(rng)
