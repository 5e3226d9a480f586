"""Ahead-of-time compilation of the real train step for a TPU topology, on a CPU machine.

    python -m md2pr_jax.main --config configs/X.py --workdir W --mode aot --topology v5e:4x4

Builds the mesh from `config.mesh` over the topology's (compile-only) devices, lowers the
jitted train step on abstract inputs (ShapeDtypeStructs carrying their shardings) and
compiles it with libtpu. Prints ONE JSON line — topology, chips, bytes per chip (arguments,
temporaries, outputs, total), FLOPs per step, the chip's HBM, whether the step fits, and the
dtypes of every dot and convolution in the optimised HLO with the source lines of those that
take or give f32 (a bf16 step should have them only in losses.py) — and writes it to
WORKDIR/aot/<topology with ':' as '_'>.json. Needs the `tpu` extra (libtpu).

    ... --mode aot --config.model.dtype=float32     # the same step computed in f32
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
    # A compile-only topology opens no TPU: skip libtpu's one-process-per-machine lock file,
    # which any other JAX process here that loaded libtpu (a CPU job without
    # JAX_PLATFORMS=cpu) holds, and which would abort this compile.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
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
    from md2pr_jax.data.pipeline import online_teacher_passage_len

    lt = online_teacher_passage_len(config)
    if lt:
        shapes["teacher_p_ids"] = ((b, c, lt), jnp.int32)
        shapes["teacher_p_mask"] = ((b, c, lt), jnp.int32)
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


def compile_step(config, mesh):
    """Lowers and compiles the real train step of `config` on `mesh` (over a topology's
    compile-only TPU devices, or local ones); returns (compiled, seconds)."""
    from md2pr_jax.models import student_from_config, teacher_from_config
    from md2pr_jax.train import abstract_teacher_params, abstract_train_state, make_train_step

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
    return compiled, time.perf_counter() - t0


# An HLO instruction's definition: `%name = TYPE[dims]{layout} opcode(%a, %b), attrs...`
# (a tuple-shaped one opens with "(" instead of TYPE). The optimised module prints operands
# by name only, so their dtypes come from their own definitions.
_DEF = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(?:([a-z][a-z0-9]*)\[|\()")
_DOT = re.compile(r"\s(dot|convolution)\(([^)]*)\)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_FRAME = re.compile(r"stack_frame_id=(\d+)")
_TABLE_ROW = re.compile(r"^(\d+) (.*)$")


def _source_tables(hlo_text: str) -> dict[str, dict[int, str]]:
    """The FileNames / FunctionNames / FileLocations / StackFrames tables that head a module's
    text (a title line, then `ID ROW` lines up to a blank one), each as {id: row}."""
    tables: dict[str, dict[int, str]] = {}
    current = None
    for line in hlo_text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            current = tables.setdefault(line, {})
        elif current is not None and (m := _TABLE_ROW.match(line)):
            current[int(m.group(1))] = m.group(2)
        else:
            current = None
    return tables


def _frame_source(tables: dict[str, dict[int, str]], frame: int) -> str:
    """'path.py:line (function)' of a stack frame (the innermost one jax recorded), the path
    cut to start at the package (md2pr_jax/..., flax/...)."""

    def field(row: str, key: str) -> int:
        return int(re.search(key + r"=(\d+)", row).group(1))

    try:
        loc = tables["FileLocations"][field(tables["StackFrames"][frame], "file_location_id")]
        path = tables["FileNames"][field(loc, "file_name_id")].strip('"')
        func = tables["FunctionNames"][field(loc, "function_name_id")].strip('"')
    except (KeyError, AttributeError):
        return ""
    if "/site-packages/" in path:
        path = path.split("/site-packages/")[-1]
    elif "/md2pr_jax/" in path:
        path = "md2pr_jax/" + path.rsplit("/md2pr_jax/", 1)[-1]
    return f"{path}:{field(loc, 'line')} ({func})"


def dot_dtypes(hlo_text: str) -> dict[str, Any]:
    """The dtypes of every dot and convolution in an (optimised) HLO module's text.

    Returns {"counts": {"bf16,bf16->bf16": n, ...}, "f32": [{"dtypes", "source", "count",
    "op_name"} ...]}: counts by operand and result dtype over every computation (fused ones
    included, each as written once), and the dots and convolutions with an f32 operand or
    result grouped by dtypes and source line (from their metadata), with the jax op name of the
    first one. (XLA folds exact converts into a dot: f32(bf16) x f32(bf16) becomes bf16 x bf16
    -> f32, so an f32 computation can show only in the result type.)
    """
    types: dict[str, str] = {}
    for line in hlo_text.splitlines():
        m = _DEF.match(line)
        if m:
            types[m.group(1)] = m.group(2) or "tuple"
    tables = _source_tables(hlo_text)
    counts: dict[str, int] = {}
    f32: dict[tuple[str, str], dict[str, Any]] = {}
    for line in hlo_text.splitlines():
        d, op = _DEF.match(line), _DOT.search(line)
        if not d or not op or not d.group(2):
            continue
        operands = [types.get(o.strip().lstrip("%"), "?") for o in op.group(2).split(",") if o.strip()]
        key = ",".join(operands) + "->" + d.group(2)
        counts[key] = counts.get(key, 0) + 1
        if "f32" in operands or d.group(2) == "f32":
            name, frame = _OP_NAME.search(line), _FRAME.search(line)
            src = _frame_source(tables, int(frame.group(1))) if frame else ""
            entry = f32.setdefault((key, src), {"dtypes": key, "source": src, "count": 0,
                                                "op_name": name.group(1) if name else ""})
            entry["count"] += 1
    return {"counts": dict(sorted(counts.items())), "f32": [f32[k] for k in sorted(f32)]}


def memory_report(compiled) -> dict[str, int]:
    """Bytes per chip of a compiled step: arguments, temporaries, outputs, aliased, code, total."""
    mem = compiled.memory_analysis()
    arguments, outputs = int(mem.argument_size_in_bytes), int(mem.output_size_in_bytes)
    temporaries, alias = int(mem.temp_size_in_bytes), int(mem.alias_size_in_bytes)
    code = int(getattr(mem, "generated_code_size_in_bytes", 0))
    total = arguments + outputs - alias + temporaries + code  # donated outputs reuse their inputs
    return {
        "arguments": arguments,
        "temporaries": temporaries,
        "outputs": outputs,
        "aliased": alias,
        "code": code,
        "total": total,
    }


def compile_report(config, topology: str) -> dict[str, Any]:
    """Compiles the train step for `topology` and returns the report (see module doc). A step
    that XLA finds too big for the chip's HBM gives a report with fits=false and XLA's message
    under "out_of_memory" (no bytes, FLOPs or dots: nothing was compiled)."""
    generation, _ = parse_topology(topology)
    devices = topology_devices(topology)
    mesh = shd.make_mesh(config, devices)
    hbm = HBM_BYTES[generation]
    report = {
        "topology": topology,
        "chips": len(devices),
        "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape),
        "batch_size": int(config.train.batch_size),
        "candidates": 1 + int(config.data.num_negatives),
        "teacher_mode": config.loss.teacher_mode,
        "dtype": config.model.dtype,
        "param_dtype": config.model.param_dtype,
        "hbm_bytes_per_chip": hbm,
    }
    t0 = time.perf_counter()
    try:
        compiled, seconds = compile_step(config, mesh)
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # e.g. "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for
        # HLO temporaries (17.84G) exceeds available HBM (15.75G)."
        message = str(e).strip().splitlines()[0]
        return {**report, "fits": False, "out_of_memory": message, "compile_s": round(time.perf_counter() - t0, 1)}
    mem = memory_report(compiled)
    flops_per_chip = float(_cost(compiled).get("flops", 0.0))
    dots = dot_dtypes(compiled.as_text())
    return {
        **report,
        "bytes_per_chip": mem,
        "gib_per_chip": round(mem["total"] / GIB, 3),
        "flops_per_chip": flops_per_chip,
        "flops_per_step": flops_per_chip * len(devices),
        "fits": mem["total"] <= hbm,
        "compile_s": round(seconds, 1),
        "dots": dots["counts"],
        "f32_dots": dots["f32"],
    }


def aot_mode(config, workdir: str) -> dict[str, Any]:
    """`--mode aot`: compile for config.aot.topology (or --topology), print and save the report."""
    if not config.aot.topology:
        raise ValueError("--mode aot needs a TPU topology: pass --topology v5e:2x2 or set config.aot.topology")
    # JAX's persistent cache cannot load an executable compiled for compile-only devices (no
    # client): storing it would only push the host's usable programs out of the cache.
    jax.config.update("jax_enable_compilation_cache", False)
    report = compile_report(config, config.aot.topology)
    line = json.dumps(report, sort_keys=False)
    print(line, flush=True)
    if jax.process_index() == 0:
        out_dir = os.path.join(workdir, "aot")
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, config.aot.topology.replace(":", "_") + ".json"), "w") as f:
            f.write(line + "\n")
    return report
