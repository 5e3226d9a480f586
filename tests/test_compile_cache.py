"""The persistent compilation cache: a second process reads the program the first one stored."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAM = textwrap.dedent("""
    import sys, time
    from md2pr_jax.compile_cache import use_compilation_cache
    min_s = None if sys.argv[2:] == ["env"] else 0.0  # "env": the minimum from MD2PR_COMPILATION_CACHE_MIN_S
    assert use_compilation_cache(sys.argv[1], min_compile_s=min_s) == sys.argv[1]
    import jax, jax.numpy as jnp
    hits = []
    jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    print(float(f(jnp.ones((8, 8)))), len(hits))
""")


def _run(folder, env_extra=None, *args):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **(env_extra or {}))
    out = subprocess.run([sys.executable, "-c", PROGRAM, folder, *args], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip()


def test_second_process_hits_the_cache(tmp_path):
    folder = str(tmp_path / "xla")
    value, hits = _run(folder).split()
    assert os.listdir(folder), "the first process stored nothing"
    assert hits == "0"
    value2, hits2 = _run(folder).split()
    assert value2 == value and int(hits2) >= 1  # read back from the cache, not compiled again


def test_off_disables_it(tmp_path, monkeypatch):
    from md2pr_jax.compile_cache import use_compilation_cache

    monkeypatch.setenv("MD2PR_COMPILATION_CACHE", "off")
    assert use_compilation_cache() is None


def test_the_minimum_compile_time_defaults_to_a_second_and_the_environment_lowers_it(tmp_path):
    """A program that compiles in well under a second is not stored by default; with
    MD2PR_COMPILATION_CACHE_MIN_S=0 (as the test suite sets) it is, and read back."""
    default, lowered = str(tmp_path / "default"), str(tmp_path / "lowered")
    _run(default, {"MD2PR_COMPILATION_CACHE_MIN_S": ""}, "env")
    assert not [f for f in os.listdir(default) if not f.startswith(".")]
    _run(lowered, {"MD2PR_COMPILATION_CACHE_MIN_S": "0"}, "env")
    assert os.listdir(lowered)
    assert int(_run(lowered, {"MD2PR_COMPILATION_CACHE_MIN_S": "0"}, "env").split()[1]) >= 1
