"""The persistent compilation cache: a second process reads the program the first one stored."""

import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROGRAM = textwrap.dedent("""
    import sys, time
    from md2pr_jax.compile_cache import use_compilation_cache
    assert use_compilation_cache(sys.argv[1], min_compile_s=0.0) == sys.argv[1]
    import jax, jax.numpy as jnp
    hits = []
    jax.monitoring.register_event_listener(lambda name, **kw: hits.append(name) if name.endswith("cache_hits") else None)
    f = jax.jit(lambda x: jnp.tanh(x @ x.T).sum())
    print(float(f(jnp.ones((8, 8)))), len(hits))
""")


def _run(folder, env_extra=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT, **(env_extra or {}))
    out = subprocess.run([sys.executable, "-c", PROGRAM, folder], env=env, capture_output=True, text=True, timeout=120)
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
