"""One source of import truth: the project's modules import each other without a cycle, and
`config.py`, which every module reads, imports nothing of the project."""

import ast
import os
import subprocess
import sys

import pytest
from conftest import ROOT

PACKAGE = os.path.join(ROOT, "md2pr_jax")


def _modules() -> dict[str, str]:
    """module name -> file, for every module of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".").removesuffix(".__init__")
                out[name] = path
    return out


def import_graph() -> dict[str, set[str]]:
    """module -> the project modules it imports anywhere in its file (inside functions too: a
    deferred import only hides a cycle until the function runs)."""
    mods = _modules()
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                subs = {f"{node.module}.{a.name}" for a in node.names} & mods.keys()
                deps |= subs if len(subs) == len(node.names) else subs | {node.module}
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle of `graph` as [a, b, ..., a], or None when it is acyclic (depth-first search)."""
    state: dict[str, int] = {}  # 1 on the current path, 2 done
    path: list[str] = []

    def visit(v):
        state[v] = 1
        path.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return path[path.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        path.pop()
        return None

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_find_cycle_finds_the_old_config_cycle():
    old = {"md2pr_jax.config": {"md2pr_jax.data.pseudo"}, "md2pr_jax.data.pseudo": {"md2pr_jax.data.prepare"},
           "md2pr_jax.data.prepare": {"md2pr_jax.hf"}, "md2pr_jax.hf": {"md2pr_jax.config"}}
    assert find_cycle(old) == ["md2pr_jax.config", "md2pr_jax.data.pseudo", "md2pr_jax.data.prepare",
                               "md2pr_jax.hf", "md2pr_jax.config"]
    old["md2pr_jax.config"] = set()
    assert find_cycle(old) is None


def test_project_import_graph_is_acyclic():
    graph = import_graph()
    assert "md2pr_jax.data.pseudo" in graph and "md2pr_jax.config" in graph["md2pr_jax.data.pseudo"]
    cycle = find_cycle(graph)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_config_imports_nothing_of_the_project():
    assert import_graph()["md2pr_jax.config"] == set()


@pytest.mark.parametrize("first", ["md2pr_jax.data.pseudo", "md2pr_jax.data.prepare", "md2pr_jax.hf", "md2pr_jax.config"])
def test_modules_import_in_any_order_in_a_fresh_interpreter(first):
    """Each module of the old cycle imported first, then the others, then a config validated
    (validate() used to import data/pseudo for its KINDS), in a new interpreter."""
    order = [first] + [m for m in ("md2pr_jax.config", "md2pr_jax.hf", "md2pr_jax.data.prepare",
                                   "md2pr_jax.data.pseudo") if m != first]
    code = "; ".join(f"import {m}" for m in order) + (
        "; from md2pr_jax.config import base_config, validate, PSEUDO_KINDS; validate(base_config())"
        "; import md2pr_jax.data.pseudo as p; assert p.KINDS is PSEUDO_KINDS")
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
