"""The inner training loop: batches in, updates, metrics to TensorBoard, checkpoints."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from tqdm import tqdm

from md2pr_jax import checkpoint as ckpt
from md2pr_jax import sharding as shd


def _to_device(batch: Mapping[str, Any], mesh) -> dict:
    """Host numpy batches become global arrays; arrays already on devices pass through."""
    if mesh is None or all(isinstance(v, jax.Array) for v in batch.values()):
        return dict(batch)
    return shd.to_global(batch, mesh)


def summary_writer(folder: str):
    """tensorboardX's SummaryWriter for `folder`, imported without torch. tensorboardX's writer
    module imports torch where it is installed, only to accept torch tensors (this loop logs
    floats); that import is ~3 s of every training process. Where torch or tensorboardX is
    loaded already, a plain import."""
    if "tensorboardX" in sys.modules or "torch" in sys.modules:
        from tensorboardX import SummaryWriter
    else:
        sys.modules["torch"] = None  # `import torch` raises ImportError while tensorboardX loads
        try:
            from tensorboardX import SummaryWriter
        finally:
            del sys.modules["torch"]
    return SummaryWriter(folder)


def train_loop(
    config,
    workdir: str,
    state,
    batches: Iterator[Mapping[str, Any]],
    step_fn: Callable,
    ckpt_manager=None,
    host_state: dict | None = None,
    num_steps: int | None = None,
    *,
    mesh=None,
    teacher_params: Any = None,
    writer=None,
    tag: str = "train",
    on_step: Callable[[int, Any, dict], None] | None = None,
) -> tuple[Any, list[dict]]:
    """Runs `step_fn` from `state.step` up to step `num_steps` (an absolute step number,
    default config.train.max_steps), so a resumed state continues where it stopped.

    Args:
      batches: yields one host batch (this process's rows) per step; if it has
        `get_state()`, that state is checkpointed with each step (item 'data').
      step_fn: from `make_train_step`; called as step_fn(state, batch, teacher_params).
      ckpt_manager: from `checkpoint.make_checkpoint_manager`; saves every
        config.train.checkpoint_every steps and at the last step, with `host_state`.
      mesh: turns host batches into global arrays (`sharding.to_global`).
      writer: a tensorboardX SummaryWriter (default: one in workdir/tensorboard, process 0).
      on_step: called after every step with (step, state, metrics as device arrays).

    Returns (state, history): history holds {'step', metric: float, 'steps_per_s'} for every
    logged step (every config.train.log_every steps and the last).
    """
    num_steps = int(num_steps or config.train.max_steps)
    start = int(jax.device_get(state.step))
    log_every = max(int(config.train.log_every), 1)
    main_process = jax.process_index() == 0
    own_writer = writer is None and main_process
    if own_writer:
        writer = summary_writer(os.path.join(workdir, "tensorboard"))
    history: list[dict] = []
    get_data_state = getattr(batches, "get_state", None)
    bar = tqdm(total=num_steps, initial=start, desc=tag, disable=not main_process, dynamic_ncols=True)
    last_time, last_step = time.perf_counter(), start
    step = start
    try:
        for step in range(start + 1, num_steps + 1):
            batch = _to_device(next(batches), mesh)
            state, metrics = step_fn(state, batch, teacher_params)
            if step % log_every == 0 or step == num_steps:
                values = {k: float(v) for k, v in jax.device_get(metrics).items()}
                now = time.perf_counter()
                values["steps_per_s"] = (step - last_step) / max(now - last_time, 1e-9)
                last_time, last_step = now, step
                history.append({"step": step, **values})
                if writer is not None:
                    for k, v in values.items():
                        writer.add_scalar(f"{tag}/{k}".replace(" ", "_"), v, step)  # TB names have no spaces
                bar.set_postfix(loss=f"{values['loss']:.4f}", lr=f"{values['lr']:.2e}")
            if ckpt_manager is not None:
                data_state = get_data_state() if get_data_state else None
                ckpt.save(ckpt_manager, step, state, host_state, data_state, force=step == num_steps)
            if on_step is not None:
                on_step(step, state, metrics)
            bar.update(1)
    finally:
        bar.close()
        if ckpt_manager is not None:
            ckpt_manager.wait_until_finished()
        if own_writer:
            writer.close()
    return state, history


def numpy_tree(tree: Any) -> Any:
    """Device arrays -> host numpy (gathers sharded arrays; every process gets the full value)."""
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.tree.map(np.asarray, jax.device_get(tree))
