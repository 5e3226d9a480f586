"""Ahead-of-time compile of the train step for a TPU topology (libtpu, on this CPU)."""

import json
import os
import subprocess
import sys

import pytest

from md2pr_jax import aot

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_mode_aot_on_debug_config(tmp_path):
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    cmd = [sys.executable, "-m", "md2pr_jax.main", "--config", "configs/debug.py", "--workdir", str(tmp_path),
           "--mode", "aot", "--topology", "v5e:2x2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, proc.stdout
    report = json.loads(lines[0])
    assert report["topology"] == "v5e:2x2" and report["chips"] == 4
    assert report["device_kind"] == "TPU v5 lite"
    b = report["bytes_per_chip"]
    assert b["arguments"] > 0 and b["temporaries"] > 0 and b["outputs"] > 0
    assert b["total"] == b["arguments"] + b["outputs"] - b["aliased"] + b["temporaries"] + b["code"]
    assert report["flops_per_step"] > 0 and report["hbm_bytes_per_chip"] == 16 * 2**30
    assert report["fits"] is True
    with open(os.path.join(tmp_path, "aot", "v5e_2x2.json")) as f:
        assert json.loads(f.read()) == report


def test_topology_names_and_missing_libtpu(monkeypatch):
    assert aot.parse_topology("v4:2x2x4") == ("v4", (2, 2, 4))
    assert aot.parse_topology("v5e:4x4") == ("v5e", (4, 4))
    with pytest.raises(ValueError, match="GENERATION:AxB"):
        aot.parse_topology("v5litepod-16")
    real = aot.importlib.util.find_spec
    monkeypatch.setattr(aot.importlib.util, "find_spec", lambda name: None if name == "libtpu" else real(name))
    with pytest.raises(RuntimeError, match=r"pip install -e '\.\[tpu\]'"):
        aot.topology_devices("v5e:2x2")
