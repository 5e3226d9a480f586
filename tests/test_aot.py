"""Ahead-of-time compile of the train step for a TPU topology (libtpu, on this CPU)."""

import json
import os
import subprocess
import sys

import pytest

from md2pr_jax import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _aot_debug(workdir, *overrides):
    """The report of `--mode aot --topology v5e:2x2` on configs/debug.py (one JSON line)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", MD2PR_COMPILATION_CACHE=os.path.join(workdir, "xla"))
    cmd = [sys.executable, "-m", "md2pr_jax.main", "--config", "configs/debug.py", "--workdir", str(workdir),
           "--mode", "aot", "--topology", "v5e:2x2", *overrides]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout
    return json.loads(lines[0])


def test_mode_aot_on_debug_config(tmp_path):
    report = _aot_debug(tmp_path)
    assert report["topology"] == "v5e:2x2" and report["chips"] == 4
    assert report["device_kind"] == "TPU v5 lite"
    b = report["bytes_per_chip"]
    assert b["arguments"] > 0 and b["temporaries"] > 0 and b["outputs"] > 0
    assert b["total"] == b["arguments"] + b["outputs"] - b["aliased"] + b["temporaries"] + b["code"]
    assert report["flops_per_step"] > 0 and report["hbm_bytes_per_chip"] == 16 * 2**30
    assert report["fits"] is True
    with open(os.path.join(tmp_path, "aot", "v5e_2x2.json")) as f:
        assert json.loads(f.read()) == report
    # Nothing in the persistent compilation cache: it cannot load a compile-only executable.
    assert not any("train_step" in name for name in os.listdir(tmp_path / "xla"))
    # The float32 debug config: every dot gives f32. (At the default matmul precision the TPU
    # compiler feeds some of them bf16 operands, converted in the producing fusion.)
    assert report["dtype"] == "float32" and all(k.endswith("->f32") for k in report["dots"]), report["dots"]
    assert sum(f["count"] for f in report["f32_dots"]) == sum(report["dots"].values())


def test_bf16_step_has_f32_dots_only_in_the_loss(tmp_path):
    """The TPU compiler keeps a bf16 step's matmuls in bf16: the only dots that take or give
    f32 are the losses' own (losses.py computes its scores and attention logits in f32)."""
    report = _aot_debug(tmp_path, "--config.model.dtype=bfloat16")
    dots = report["dots"]
    assert dots.get("bf16,bf16->bf16", 0) > 0.9 * sum(dots.values()), dots
    sources = {f["source"].split(":")[0] for f in report["f32_dots"]}
    assert sources == {"md2pr_jax/losses.py"}, report["f32_dots"]


def test_topology_names_and_missing_libtpu(monkeypatch):
    assert aot.parse_topology("v4:2x2x4") == ("v4", (2, 2, 4))
    assert aot.parse_topology("v5e:4x4") == ("v5e", (4, 4))
    with pytest.raises(ValueError, match="GENERATION:AxB"):
        aot.parse_topology("v5litepod-16")
    real = aot.importlib.util.find_spec
    monkeypatch.setattr(aot.importlib.util, "find_spec", lambda name: None if name == "libtpu" else real(name))
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[tpu\]'"):
        aot.topology_devices("v5e:2x2")


HLO_SNIPPET = """HloModule jit_train_step, is_scheduled=true

FileNames
1 "/home/u/md2pr_jax/md2pr_jax/losses.py"
2 "/venv/lib/python3.12/site-packages/flax/linen/linear.py"

FunctionNames
1 "contrastive_loss"
2 "Dense.__call__"

FileLocations
1 {file_name_id=1 function_name_id=1 line=84 end_line=84 column=4 end_column=4}
2 {file_name_id=2 function_name_id=2 line=287 end_line=287 column=9 end_column=9}

StackFrames
1 {file_location_id=1 parent_frame_id=1}
2 {file_location_id=2 parent_frame_id=1}

%fused_computation (param_0.1: bf16[8,32]) -> bf16[8,32] {
  %param_0.1 = bf16[8,32]{1,0} parameter(0)
  ROOT %dot.3 = bf16[8,32]{1,0} dot(%param_0.1, %param_0.1), lhs_contracting_dims={1}, metadata={op_name="jit(train_step)/q/dot_general" stack_frame_id=2}
}

ENTRY %main (p0: bf16[8,32], p1: f32[8,32]) -> (f32[8,8], bf16[8,32]) {
  %p0 = bf16[8,32]{1,0} parameter(0)
  %p1 = f32[8,32]{1,0} parameter(1)
  %fusion.1 = bf16[8,32]{1,0:T(8,128)(2,1)} fusion(%p0), kind=kOutput, calls=%fused_computation
  %tuple.2 = (f32[8,32]{1,0}, bf16[8,32]{1,0}) tuple(%p1, %fusion.1)
  %gte.3 = f32[8,32]{1,0} get-tuple-element(%tuple.2), index=0
  %convolution.4 = f32[8,8]{0,1:T(8,128)} convolution(%gte.3, %p1), dim_labels=bf_oi->bf, metadata={op_name="jit(train_step)/jvp()/dot_general" stack_frame_id=1}
  %convolution-base-dilated.5 = f32[8,8]{0,1} convolution(%fusion.1, %gte.3), window={size=1}, dim_labels=bf_oi->bf, metadata={op_name="jit(train_step)/transpose(jvp())/dot_general" stack_frame_id=1}
  %dot.6 = f32[8,8]{1,0} dot(%fusion.1, %fusion.1), lhs_contracting_dims={1}, rhs_contracting_dims={1}
  ROOT %tuple.7 = (f32[8,8]{1,0}, bf16[8,32]{1,0}) tuple(%convolution.4, %fusion.1)
}
"""


def test_dot_dtypes_read_operand_types_from_their_definitions():
    """Operands are printed by name in the optimised module: their dtypes come from where they
    are defined (parameters, fusions, get-tuple-elements); f32 dots are traced to source lines."""
    report = aot.dot_dtypes(HLO_SNIPPET)
    assert report["counts"] == {"bf16,bf16->bf16": 1, "bf16,bf16->f32": 1, "bf16,f32->f32": 1, "f32,f32->f32": 1}
    assert report["f32"] == [
        {"dtypes": "bf16,bf16->f32", "source": "", "count": 1, "op_name": ""},
        {"dtypes": "bf16,f32->f32", "source": "md2pr_jax/losses.py:84 (contrastive_loss)", "count": 1,
         "op_name": "jit(train_step)/transpose(jvp())/dot_general"},
        {"dtypes": "f32,f32->f32", "source": "md2pr_jax/losses.py:84 (contrastive_loss)", "count": 1,
         "op_name": "jit(train_step)/jvp()/dot_general"},
    ]
    assert aot.dot_dtypes("HloModule m\n")["counts"] == {}


def test_a_step_too_big_for_hbm_reports_fits_false(monkeypatch):
    """XLA refuses to compile a step whose temporaries exceed the chip's HBM: the report says
    so (fits=false, XLA's message) instead of the run dying with a traceback."""
    import jax

    from md2pr_jax.config import load_config

    message = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO temporaries "
               "(17.84G) exceeds available HBM (15.75G).")

    def too_big(config, mesh):
        raise jax.errors.JaxRuntimeError(message + "\n(traceback of the compiler)")

    monkeypatch.setattr(aot, "topology_devices", lambda name: jax.devices("cpu")[:1])
    monkeypatch.setattr(aot, "compile_step", too_big)
    report = aot.compile_report(load_config(os.path.join(ROOT, "configs", "debug.py")), "v5e:2x2")
    assert report["fits"] is False and report["out_of_memory"] == message
    assert report["hbm_bytes_per_chip"] == 16 * 2**30 and "bytes_per_chip" not in report

    def other_error(config, mesh):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(aot, "compile_step", other_error)
    with pytest.raises(jax.errors.JaxRuntimeError, match="something else"):
        aot.compile_report(load_config(os.path.join(ROOT, "configs", "debug.py")), "v5e:2x2")
