"""The entry points' allocator choice (md2pr_jax/allocator.py): which environment a process
re-executes with, and the re-execution itself in a real child process."""

from __future__ import annotations

import ctypes.util
import json
import os
import subprocess
import sys

import pytest

from md2pr_jax import allocator
from md2pr_jax.allocator import AllocatorError, preload_env

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def finder_with(**libs):
    return lambda name: libs.get(name)


def test_auto_preloads_tcmalloc_before_what_was_preloaded():
    env, line = preload_env({"LD_PRELOAD": "libfoo.so", "X": "1"}, finder_with(tcmalloc="libtcmalloc_minimal.so.4"))
    assert line is None
    assert env["LD_PRELOAD"] == "libtcmalloc_minimal.so.4:libfoo.so"
    assert env["X"] == "1"
    assert env[allocator._DONE_VAR] == "tcmalloc (libtcmalloc_minimal.so.4)"
    assert int(env["TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD"]) >= 1 << 40
    # the re-executed process does not re-execute again, and says what it runs under
    again, line = preload_env(env, finder_with(tcmalloc="libtcmalloc_minimal.so.4"))
    assert again is None and line == "allocator: tcmalloc (libtcmalloc_minimal.so.4)"


def test_auto_without_tcmalloc_runs_as_is_and_names_the_package():
    env, line = preload_env({}, finder_with(jemalloc="libjemalloc.so.2"))
    assert env is None
    assert "libtcmalloc-minimal4" in line and "MD2PR_ALLOCATOR=glibc" in line


def test_glibc_and_an_allocator_already_preloaded_change_nothing():
    found = finder_with(tcmalloc="libtcmalloc_minimal.so.4")
    assert preload_env({"MD2PR_ALLOCATOR": "glibc"}, found) == (None, None)
    env, line = preload_env({"LD_PRELOAD": "/usr/lib/libjemalloc.so.2"}, found)
    assert env is None and "jemalloc" in line


def test_a_named_allocator_that_is_missing_or_unknown_is_an_error(tmp_path):
    with pytest.raises(AllocatorError, match="apt-get install libjemalloc2"):
        preload_env({"MD2PR_ALLOCATOR": "jemalloc"}, finder_with(tcmalloc="libtcmalloc_minimal.so.4"))
    with pytest.raises(AllocatorError, match="choose one of auto, glibc, tcmalloc, jemalloc"):
        preload_env({"MD2PR_ALLOCATOR": "mimalloc"}, finder_with())
    with pytest.raises(AllocatorError, match="no such file"):
        preload_env({"MD2PR_ALLOCATOR": str(tmp_path / "libnone.so")}, finder_with())


def run_child(env: dict) -> subprocess.CompletedProcess:
    """A child that calls the entry points' re-exec, then prints its pid before and after, its
    argv and the shared libraries it has mapped."""
    code = ("import os, sys, json; before = int(os.environ.setdefault('PID_BEFORE', str(os.getpid())));"
            "from md2pr_jax.allocator import reexec_under_preferred_allocator as r; r();"
            "maps = open('/proc/self/maps').read();"
            "print(json.dumps({'before': before, 'pid': os.getpid(), 'argv': sys.argv, 'maps': maps}))")
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MD2PR_ALLOCATOR", "LD_PRELOAD"))}
    return subprocess.run([sys.executable, "-c", code, "arg1"], env={**base, "PYTHONPATH": REPO, **env},
                          capture_output=True, text=True, cwd=REPO, timeout=120)


def test_reexec_loads_the_library_in_the_same_process_with_the_same_arguments():
    # Any preloadable library shows the mechanism on every machine: libm, given by path.
    libm = ctypes.util.find_library("m")
    path = next((os.path.join(d, libm) for d in ("/lib/x86_64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
                                                 "/lib/aarch64-linux-gnu", "/usr/lib/aarch64-linux-gnu", "/lib64", "/usr/lib64")
                 if libm and os.path.isfile(os.path.join(d, libm))), None)
    if path is None:
        pytest.skip("no libm shared library at a known path")
    out = run_child({"MD2PR_ALLOCATOR": path})
    assert out.returncode == 0, out.stderr
    child = json.loads(out.stdout)
    assert child["pid"] == child["before"]  # execve: the same process
    assert child["argv"] == ["-c", "arg1"]
    assert f"allocator: {os.path.basename(path)} ({path})" in out.stderr
    assert out.stderr.count("allocator:") == 1


def test_reexec_runs_under_tcmalloc_where_it_is_installed():
    if not allocator.find("tcmalloc"):
        pytest.skip("tcmalloc is not installed (apt-get install libtcmalloc-minimal4)")
    out = run_child({})
    assert out.returncode == 0, out.stderr
    assert "libtcmalloc" in json.loads(out.stdout)["maps"]
    glibc = run_child({"MD2PR_ALLOCATOR": "glibc"})
    assert glibc.returncode == 0 and "libtcmalloc" not in json.loads(glibc.stdout)["maps"]
    assert "allocator:" not in glibc.stderr


def test_a_bad_choice_stops_the_entry_point_before_it_starts():
    out = run_child({"MD2PR_ALLOCATOR": "tcmaloc"})
    assert out.returncode != 0 and "MD2PR_ALLOCATOR='tcmaloc'" in out.stderr and not out.stdout
