"""Ahead-of-time compilation of the real train step for a TPU topology, on a CPU machine.

    python -m md2pr_jax.main --config configs/X.py --workdir W --mode aot --topology v5e:4x4

Builds the mesh from `config.mesh` over the topology's (compile-only) devices, lowers the
jitted train step on abstract inputs (ShapeDtypeStructs carrying their shardings) and
compiles it with libtpu. Prints ONE JSON line — topology, chips, bytes per chip (arguments,
temporaries, outputs, total), FLOPs per step, the chip's HBM and whether the step fits — and
writes it to WORKDIR/aot/<topology with ':' as '_'>.json. Needs the `tpu` extra (libtpu).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp

from md2pr_jax import sharding as shd

GIB = 1024**3
# HBM per chip (bytes), by the topology name's generation.
HBM_BYTES = {"v4": 32 * GIB, "v5e": 16 * GIB, "v5p": 95 * GIB, "v6e": 32 * GIB}
# v4 and v5p chips have two TensorCores that XLA drives as one device ("megacore").
MEGACORE = ("v4", "v5p")
_TOPOLOGY = re.compile(r"^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$")


def parse_topology(name: str) -> tuple[str, tuple[int, ...]]:
    """'v5e:4x4' -> ('v5e', (4, 4)); ValueError naming the accepted forms otherwise."""
    m = _TOPOLOGY.match(name or "")
    if not m:
        raise ValueError(
            f"TPU topology {name!r} not understood; use GENERATION:AxB[xC] with generation one of "
            f"{sorted(HBM_BYTES)}, e.g. v5e:2x2, v5e:4x4, v6e:4x4, v4:2x2x4, v5p:2x2x2"
        )
    return m.group(1), tuple(int(x) for x in m.group(2).split("x"))


def topology_devices(name: str) -> list:
    """The compile-only devices (one per chip) of a TPU topology, via libtpu."""
    generation, dims = parse_topology(name)
    if importlib.util.find_spec("libtpu") is None:
        raise RuntimeError(
            "--mode aot needs libtpu, which is not installed: install the tpu extra: pip install -e '.[tpu]'"
        )
    from jax.experimental import topologies

    host_bounds = (min(dims[0], 2), min(dims[1], 2), 1)
    desc = topologies.get_topology_desc(
        platform="tpu",
        topology_name=name,
        chip_config_name="megacore" if generation in MEGACORE else "default",
        chips_per_host_bounds=host_bounds,
        num_slices=1,
    )
    return list(desc.devices)


def abstract_batch(config, mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global training batch (TEAM_CONTRACTS) as ShapeDtypeStructs with the batch sharding."""
    from md2pr_jax.train.step import word_candidates

    b, c = int(config.train.batch_size), 1 + int(config.data.num_negatives)
    lq, lp = int(config.data.max_query_len), int(config.data.max_passage_len)
    shapes = {
        "q_ids": ((b, lq), jnp.int32),
        "q_mask": ((b, lq), jnp.int32),
        "p_ids": ((b, c, lp), jnp.int32),
        "p_mask": ((b, c, lp), jnp.int32),
        "cand_mask": ((b, c), jnp.float32),
        "teacher_scores": ((b, c), jnp.float32),
    }
    if config.loss.teacher_mode == "cached" and config.loss.use_word:
        pairs, k = len(config.loss.layer_pairs), word_candidates(config, c)
        shapes["teacher_attn"] = ((b, pairs, k, lq, lp), jnp.bfloat16)
    sharding = shd.batch_sharding(mesh)
    return {k: jax.ShapeDtypeStruct(s, d, sharding=sharding) for k, (s, d) in shapes.items()}


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def compile_report(config, topology: str) -> dict[str, Any]:
    """Compiles the train step for `topology` and returns the report (see module doc)."""
    from md2pr_jax.models import student_from_config, teacher_from_config
    from md2pr_jax.train import abstract_teacher_params, abstract_train_state, make_train_step

    generation, _ = parse_topology(topology)
    devices = topology_devices(topology)
    mesh = shd.make_mesh(config, devices)
    online = config.loss.teacher_mode == "online"
    student = student_from_config(config)
    teacher = teacher_from_config(config) if online else None
    step = make_train_step(config, mesh, student, teacher, total_steps=max(int(config.train.max_steps), 1))
    args = (
        abstract_train_state(config, mesh, student),
        abstract_batch(config, mesh),
        abstract_teacher_params(config, mesh, teacher) if online else None,
    )
    t0 = time.perf_counter()
    compiled = step.lower(*args).compile()
    seconds = time.perf_counter() - t0
    mem = compiled.memory_analysis()
    arguments, outputs = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    temporaries, alias = int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes)
    code = int(getattr(mem, "generated_code_size_in_bytes", 0))
    total = arguments + outputs - alias + temporaries + code  # donated outputs reuse their inputs
    flops_per_chip = float(_cost(compiled).get("flops", 0.0))
    hbm = HBM_BYTES[generation]
    return {
        "topology": topology,
        "chips": len(devices),
        "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape),
        "batch_size": int(config.train.batch_size),
        "candidates": 1 + int(config.data.num_negatives),
        "teacher_mode": config.loss.teacher_mode,
        "bytes_per_chip": {
            "arguments": arguments,
            "temporaries": temporaries,
            "outputs": outputs,
            "aliased": alias,
            "code": code,
            "total": total,
        },
        "gib_per_chip": round(total / GIB, 3),
        "flops_per_chip": flops_per_chip,
        "flops_per_step": flops_per_chip * len(devices),
        "hbm_bytes_per_chip": hbm,
        "fits": total <= hbm,
        "compile_s": round(seconds, 1),
    }


def aot_mode(config, workdir: str) -> dict[str, Any]:
    """`--mode aot`: compile for config.aot.topology (or --topology), print and save the report."""
    if not config.aot.topology:
        raise ValueError("--mode aot needs a TPU topology: pass --topology v5e:2x2 or set config.aot.topology")
    report = compile_report(config, config.aot.topology)
    line = json.dumps(report, sort_keys=False)
    print(line, flush=True)
    if jax.process_index() == 0:
        out_dir = os.path.join(workdir, "aot")
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, config.aot.topology.replace(":", "_") + ".json"), "w") as f:
            f.write(line + "\n")
    return report
