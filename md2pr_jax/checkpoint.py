"""Checkpoints: one orbax CheckpointManager holding, per saved step,

    state  the TrainState (sharded arrays; restores onto any mesh)
    host   JSON: the step and what the caller passes (the round, or the stage)
    data   JSON: the data iterator's state (bytes are stored base64-encoded)

Saves are asynchronous; `max_to_keep` = config.train.keep_checkpoints and a step is saved
when it is a multiple of config.train.checkpoint_every (or when forced).
"""

from __future__ import annotations

import base64
from typing import Any

import orbax.checkpoint as ocp

from md2pr_jax import artifacts

ITEMS = ("state", "host", "data")
_BYTES = "__bytes_base64__"


def make_checkpoint_manager(directory: str, config, *, async_save: bool = True) -> ocp.CheckpointManager:
    """An orbax CheckpointManager in `directory` (local path or gs://) for items state/host/data."""
    path = artifacts.as_path(directory)
    every = max(int(config.train.checkpoint_every), 1)
    # Every K steps (and on a preemption signal), but not orbax's default extra save at the
    # first step of a run: a resumed run continues from the last multiple of K.
    policy = ocp.checkpoint_managers.AnySavePolicy(
        [
            ocp.checkpoint_managers.FixedIntervalPolicy(every),
            ocp.checkpoint_managers.PreemptionCheckpointingPolicy(),
        ]
    )
    options = ocp.CheckpointManagerOptions(
        max_to_keep=int(config.train.keep_checkpoints) or None,
        save_decision_policy=policy,
        enable_async_checkpointing=async_save,
        create=True,
    )
    return ocp.CheckpointManager(path, item_names=ITEMS, options=options)


def _encode_data(data: Any) -> Any:
    if isinstance(data, (bytes, bytearray)):
        return {_BYTES: base64.b64encode(bytes(data)).decode("ascii")}
    return {} if data is None else data


def _decode_data(data: Any) -> Any:
    if isinstance(data, dict) and set(data) == {_BYTES}:
        return base64.b64decode(data[_BYTES])
    return data


def save(
    manager: ocp.CheckpointManager, step: int, state: Any, host: dict | None = None, data: Any = None, *, force: bool = False
) -> bool:
    """Saves (asynchronously) if `step` is due or `force`; returns whether a save started.
    Every process must call it (orbax coordinates the hosts)."""
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        host=ocp.args.JsonSave(dict(host or {}, step=int(step))),
        data=ocp.args.JsonSave(_encode_data(data)),
    )
    return manager.save(int(step), args=args, force=force)


def restore(manager: ocp.CheckpointManager, step: int | None = None, abstract_state: Any = None) -> dict | None:
    """Restores {'state', 'host', 'data', 'step'} from `step` (default: the latest), or None
    when there is no checkpoint.

    abstract_state: the TrainState as ShapeDtypeStructs with shardings
    (`train.abstract_train_state(config, mesh)`): the arrays are restored straight onto those
    shardings, whatever mesh wrote them. None restores host numpy-like arrays as saved.
    """
    step = manager.latest_step() if step is None else int(step)
    if step is None:
        return None
    if step not in manager.all_steps():
        raise FileNotFoundError(f"no checkpoint for step {step} in {manager.directory}; have {manager.all_steps()}")
    state_args = ocp.args.StandardRestore(abstract_state) if abstract_state is not None else ocp.args.StandardRestore()
    out = manager.restore(
        step, args=ocp.args.Composite(state=state_args, host=ocp.args.JsonRestore(), data=ocp.args.JsonRestore())
    )
    return {"state": out.state, "host": out.host, "data": _decode_data(out.data), "step": step}
