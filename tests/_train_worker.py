"""Subprocess worker for the sharding/train/checkpoint tests (not collected by pytest).

    python tests/_train_worker.py SCENARIO OUTDIR [options]

Set XLA_FLAGS (device count) and the MD2PR_* distributed variables before starting it: jax
reads them on import. Results go to OUTDIR as .npz / .json; step numbers go to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

VOCAB = 30522
CLS, SEP = 101, 102


def tiny_config(**overrides):
    from conftest import make_tiny_config

    base = {"train.lr": 1e-3, "train.warmup_steps": 0, "train.max_steps": 10, "train.weight_decay": 0.01}
    base.update(overrides)
    return make_tiny_config(**base)


def _ids(rng, n, length):
    """n rows of [CLS] tokens [SEP] pad, random lengths: (ids, mask) int32 [n, length]."""
    ids = np.zeros((n, length), np.int32)
    mask = np.zeros((n, length), np.int32)
    for i in range(n):
        real = int(rng.integers(3, length + 1))
        ids[i, :real] = rng.integers(1000, VOCAB, size=real)
        ids[i, 0], ids[i, real - 1] = CLS, SEP
        mask[i, :real] = 1
    return ids, mask


def random_batch(config, seed: int) -> dict:
    """A deterministic host batch (teacher_scores random; no teacher_attn)."""
    rng = np.random.default_rng(seed)
    b, c = config.train.batch_size, 1 + config.data.num_negatives
    lq, lp = config.data.max_query_len, config.data.max_passage_len
    q_ids, q_mask = _ids(rng, b, lq)
    p_ids, p_mask = _ids(rng, b * c, lp)
    cand_mask = np.ones((b, c), np.float32)
    cand_mask[0, -1] = 0.0  # one filtered false negative
    return dict(
        q_ids=q_ids, q_mask=q_mask,
        p_ids=p_ids.reshape(b, c, lp), p_mask=p_mask.reshape(b, c, lp),
        cand_mask=cand_mask,
        teacher_scores=rng.normal(size=(b, c)).astype(np.float32),
    )


class BatchIterator:
    """Deterministic batches with get_state/set_state (batch i is random_batch(seed + i))."""

    def __init__(self, config, seed: int = 1000, rows: slice | None = None):
        self.config, self.seed, self.index, self.rows = config, seed, 0, rows or slice(None)

    def __iter__(self):
        return self

    def __next__(self):
        batch = random_batch(self.config, self.seed + self.index)
        self.index += 1
        return {k: v[self.rows] for k, v in batch.items()}

    def get_state(self) -> dict:
        return {"index": self.index}

    def set_state(self, state: dict) -> None:
        self.index = int(state["index"])


def flat(tree) -> dict:
    import jax

    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


def run_steps(args):
    """N train steps on config.mesh over all (global) devices; saves params and losses."""
    import jax

    from md2pr_jax import sharding as shd
    from md2pr_jax.models import student_from_config, teacher_from_config
    from md2pr_jax.train import create_train_state, make_train_step, numpy_tree, place_teacher_params

    config = tiny_config(**{"mesh.data": args.mesh[0], "mesh.fsdp": args.mesh[1], "mesh.tensor": args.mesh[2]})
    config.loss.teacher_mode = "online"
    mesh = shd.make_mesh(config)
    student, teacher = student_from_config(config), teacher_from_config(config)
    state = create_train_state(config, mesh, rng=jax.random.PRNGKey(0), student=student)
    teacher_params = place_teacher_params(config, mesh, rng=jax.random.PRNGKey(1), teacher=teacher)
    step = make_train_step(config, mesh, student, teacher, total_steps=10)
    rows = shd.local_batch_slice(mesh, config.train.batch_size)
    batches = BatchIterator(config, rows=rows)
    losses = []
    for _ in range(args.steps):
        state, metrics = step(state, shd.to_global(next(batches), mesh), teacher_params)
        losses.append(float(metrics["loss"]))
    params = numpy_tree(state.params)
    if jax.process_index() == 0:
        np.savez(os.path.join(args.out, "params.npz"), **flat(params))
        with open(os.path.join(args.out, "losses.json"), "w") as f:
            json.dump({"losses": losses, "devices": jax.device_count(), "processes": jax.process_count()}, f)


def run_resumable(args):
    """Trains to step 10 with checkpoints every 5 steps, resuming from the latest one;
    prints 'step N' after each step and records each step's batch fingerprint."""
    import jax

    from md2pr_jax import checkpoint as ckpt
    from md2pr_jax import sharding as shd
    from md2pr_jax.models import student_from_config
    from md2pr_jax.train import abstract_train_state, create_train_state, make_train_step, numpy_tree, train_loop

    config = tiny_config(**{"train.checkpoint_every": 5, "train.keep_checkpoints": 3, "train.log_every": 5})
    config.loss.use_word = False  # cached mode without attention maps keeps the batch small
    mesh = shd.make_mesh(config)
    student = student_from_config(config)
    manager = ckpt.make_checkpoint_manager(os.path.join(args.out, "ckpt"), config)
    batches = BatchIterator(config)
    restored = ckpt.restore(manager, abstract_state=abstract_train_state(config, mesh, student))
    if restored is None:
        state = create_train_state(config, mesh, rng=jax.random.PRNGKey(0), student=student)
        print("start 0", flush=True)
    else:
        state = restored["state"]
        batches.set_state(restored["data"])
        print(f"resumed {restored['step']} {json.dumps(restored['host'])}", flush=True)
    log = open(os.path.join(args.out, "batches.txt"), "a")

    class Fingerprinted:
        def __next__(self):
            batch = next(batches)
            log.write(f"{int(jax.device_get(state_holder[0].step)) + 1} {int(batch['p_ids'].sum())}\n")
            log.flush()
            return batch

        def get_state(self):
            return batches.get_state()

    state_holder = [state]

    def on_step(step, new_state, metrics):
        state_holder[0] = new_state
        if step % config.train.checkpoint_every == 0:
            manager.wait_until_finished()  # the test kills us after a printed step: make saves durable first
        print(f"step {step}", flush=True)

    step_fn = make_train_step(config, mesh, student, total_steps=10)
    state, _ = train_loop(
        config, args.out, state, Fingerprinted(), step_fn, manager, {"round": 1}, 10, mesh=mesh, on_step=on_step
    )
    np.savez(os.path.join(args.out, "params.npz"), **flat(numpy_tree(state.params)))
    print("done", flush=True)


def run_ckpt_save(args):
    """Creates a state on this process's mesh, saves it at step 3, writes its params."""
    import jax

    from md2pr_jax import checkpoint as ckpt
    from md2pr_jax import sharding as shd
    from md2pr_jax.train import create_train_state, numpy_tree

    config = tiny_config(**{"mesh.data": args.mesh[0], "mesh.fsdp": args.mesh[1], "mesh.tensor": args.mesh[2]})
    mesh = shd.make_mesh(config)
    state = create_train_state(config, mesh, rng=jax.random.PRNGKey(args.seed))
    manager = ckpt.make_checkpoint_manager(os.path.join(args.out, "ckpt"), config)
    ckpt.save(manager, 3, state, {"round": 2, "tau": [0.9, 0.85]}, b"\x00grain-state", force=True)
    manager.wait_until_finished()
    np.savez(os.path.join(args.out, "saved.npz"), **flat(numpy_tree(state)))


def run_ckpt_restore(args):
    """Restores the step-3 checkpoint onto this process's mesh; checks shardings, writes params."""
    from md2pr_jax import checkpoint as ckpt
    from md2pr_jax import sharding as shd
    from md2pr_jax.train import abstract_train_state, numpy_tree

    config = tiny_config(**{"mesh.data": args.mesh[0], "mesh.fsdp": args.mesh[1], "mesh.tensor": args.mesh[2]})
    mesh = shd.make_mesh(config)
    abstract = abstract_train_state(config, mesh)
    manager = ckpt.make_checkpoint_manager(os.path.join(args.out, "ckpt"), config)
    out = ckpt.restore(manager, abstract_state=abstract)
    import jax

    for a, r in zip(jax.tree.leaves(abstract), jax.tree.leaves(out["state"])):
        assert r.sharding == a.sharding, (r.sharding, a.sharding)
    np.savez(os.path.join(args.out, f"restored_{jax.device_count()}.npz"), **flat(numpy_tree(out["state"])))
    with open(os.path.join(args.out, f"restored_{jax.device_count()}.json"), "w") as f:
        json.dump({"host": out["host"], "data": out["data"].decode("latin1"), "step": out["step"]}, f)


# (data, fsdp, tensor) over 2 processes x 2 devices: tensor inside a host, and across hosts.
ROWS_MESHES = [(1, 2, 2), (2, 1, 2), (4, 1, 1), (1, 1, 4), (2, 2, 1)]


def run_rows(args):
    """For each of ROWS_MESHES: this process feeds its `local_batch_slice` of a global batch
    through `to_global`; checks every local shard holds the global rows the sharding assigns
    it, and writes the slices to rows_p<process>.json."""
    import jax

    from md2pr_jax import sharding as shd

    batch = 8
    full = np.arange(batch * 3, dtype=np.int32).reshape(batch, 3)
    out = {}
    for shape in ROWS_MESHES:
        mesh = shd.make_mesh(tiny_config(**{"mesh.data": shape[0], "mesh.fsdp": shape[1], "mesh.tensor": shape[2]}))
        rows = shd.local_batch_slice(mesh, batch)
        x = shd.to_global({"x": full[rows]}, mesh)["x"]
        assert x.shape == full.shape, (shape, x.shape)
        for shard in x.addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index], err_msg=str(shape))
        out["x".join(map(str, shape))] = [rows.start, rows.stop]
    with open(os.path.join(args.out, f"rows_p{jax.process_index()}.json"), "w") as f:
        json.dump(out, f)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["steps", "resumable", "ckpt_save", "ckpt_restore", "rows"])
    parser.add_argument("out")
    parser.add_argument("--mesh", type=int, nargs=3, default=(-1, 1, 1))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if os.environ.get("MD2PR_COORDINATOR"):
        from md2pr_jax.main import maybe_initialize_distributed

        maybe_initialize_distributed(None)
    os.makedirs(args.out, exist_ok=True)
    {"steps": run_steps, "resumable": run_resumable, "ckpt_save": run_ckpt_save, "ckpt_restore": run_ckpt_restore,
     "rows": run_rows}[
        args.scenario
    ](args)


if __name__ == "__main__":
    main()
