"""JAX's persistent compilation cache for the command-line programs.

Each process of a run compiles the same programs (the train steps, the encoder at every length
bucket, the teacher's scoring pass); a resumed run, another round's process or the next run of
the same config compiles them again. With the cache, a program compiled once on a host is read
back from disk (on the 2-core CPU: the 8 encoder buckets of SciFact at length 256 took 13 s to
compile cold). Programs that compile in under a second are not stored.

`MD2PR_COMPILATION_CACHE`: the cache folder (default `~/.cache/md2pr_jax/xla`, a local disk on
every host of a pod); `off` disables it. `MD2PR_COMPILATION_CACHE_MIN_S`: store only programs
that took at least this long to compile (default 1 s; the test suite sets 0, since its tiny
programs compile in well under a second each but dozens of processes compile the same ones).
"""

from __future__ import annotations

import os

DEFAULT = os.path.join("~", ".cache", "md2pr_jax", "xla")
MAX_BYTES = 2 * 1024**3  # least recently used programs are evicted beyond this


def use_compilation_cache(folder: str | None = None, min_compile_s: float | None = None) -> str | None:
    """Points JAX's persistent compilation cache at `folder` (default: $MD2PR_COMPILATION_CACHE,
    else ~/.cache/md2pr_jax/xla), storing programs that took `min_compile_s` or more to compile
    (default: $MD2PR_COMPILATION_CACHE_MIN_S, else 1 s); returns the folder, or None when
    disabled. Call it before the process compiles anything: JAX sets its cache up at the first
    compile."""
    folder = folder or os.environ.get("MD2PR_COMPILATION_CACHE") or DEFAULT
    if folder.lower() == "off":
        return None
    import jax

    if min_compile_s is None:
        min_compile_s = float(os.environ.get("MD2PR_COMPILATION_CACHE_MIN_S") or 1.0)
    folder = os.path.expanduser(folder)
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", folder)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
    # A size cap turns on JAX's file lock around reads and writes: the processes of a
    # multi-process run store the same programs at the same moment.
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return folder
