"""The memory allocator the entry points run under on the host.

XLA's CPU runtime allocates each step's large activation buffers with malloc. glibc's malloc
serves every allocation above its mmap threshold (at most 32 MiB) with a fresh mmap() and unmaps
it at free(), so each step maps its buffers anew and touches them page by page: minor page
faults and system time on every step (`benchmarks/allocator.py` measures it). tcmalloc keeps
freed pages for reuse. So `python -m md2pr_jax.main` (and `ablation`, `dev_tune`) re-executes
itself once, at start, with tcmalloc in LD_PRELOAD where the library is installed (Debian and
Ubuntu: `apt-get install libtcmalloc-minimal4`; the Cloud TPU images preload it already).

MD2PR_ALLOCATOR chooses: `auto` (the default: tcmalloc if installed, else glibc's malloc with a
one-line hint), `tcmalloc` or `jemalloc` (that one, or an error naming its package when it is
missing), `glibc` (no change), or the path of an allocator's shared library. An LD_PRELOAD that
already names tcmalloc or jemalloc is kept.
"""

from __future__ import annotations

import ctypes.util
import os
import sys

ENV_VAR = "MD2PR_ALLOCATOR"
# Set in the re-executed process, so that it never re-executes again.
_DONE_VAR = "MD2PR_ALLOCATOR_APPLIED"
# allocator -> (the name find_library looks up, the Debian/Ubuntu package that installs it)
LIBRARIES = {"tcmalloc": ("tcmalloc_minimal", "libtcmalloc-minimal4"),
             "jemalloc": ("jemalloc", "libjemalloc2")}
CHOICES = ("auto", "glibc", *LIBRARIES)


class AllocatorError(ValueError):
    pass


def find(name: str) -> str | None:
    """The soname of allocator `name` for LD_PRELOAD (the loader finds it on its own path), or None."""
    return ctypes.util.find_library(LIBRARIES[name][0])


def preload_env(environ: dict, finder=find) -> tuple[dict | None, str | None]:
    """(the environment to re-execute with, or None to run as is; the line to print, or None)."""
    choice = environ.get(ENV_VAR, "auto").strip() or "auto"
    if "/" in choice:  # a path to an allocator's shared library
        if not os.path.isfile(choice):
            raise AllocatorError(f"{ENV_VAR}={choice}: no such file")
    elif choice.lower() not in CHOICES:
        raise AllocatorError(f"{ENV_VAR}={choice!r}: choose one of {', '.join(CHOICES)}, or give the path "
                             "of an allocator's shared library")
    else:
        choice = choice.lower()
    if environ.get(_DONE_VAR):  # the re-executed process (or a child of it)
        return None, f"allocator: {environ[_DONE_VAR]}"
    if choice == "glibc":
        return None, None
    preload = environ.get("LD_PRELOAD", "")
    present = [name for name, (lib, _) in LIBRARIES.items() if lib in preload]
    if present:
        return None, f"allocator: {present[0]} (already in LD_PRELOAD)"
    if "/" in choice:
        name, lib = os.path.basename(choice), choice
    else:
        name = "tcmalloc" if choice == "auto" else choice
        lib = finder(name)
    if lib:
        env = dict(environ, LD_PRELOAD=f"{lib}:{preload}" if preload else lib, **{_DONE_VAR: f"{name} ({lib})"})
        # tcmalloc reports every allocation above 1 GiB on stderr; a passage index of a large corpus
        # makes several.
        env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(1 << 40))
        return env, None
    package = LIBRARIES[name][1]
    if choice != "auto":
        raise AllocatorError(f"{ENV_VAR}={choice}: its library is not installed (Debian/Ubuntu: "
                             f"apt-get install {package}); {ENV_VAR}=glibc runs with glibc's malloc")
    return None, (f"allocator: glibc malloc; install tcmalloc (Debian/Ubuntu: apt-get install {package}) "
                  f"for faster CPU steps (benchmarks/allocator.py), or set {ENV_VAR}=glibc to silence this")


def reexec_under_preferred_allocator() -> None:
    """Called first in an entry point's `__main__`: replaces this process by the same command
    under the chosen allocator (same pid, same arguments), or returns to run as is. The process
    that runs says on stderr which allocator it has."""
    try:
        env, line = preload_env(dict(os.environ))
    except AllocatorError as e:
        sys.exit(str(e))
    if line:
        print(line, file=sys.stderr, flush=True)
    if env is not None:
        sys.stdout.flush()
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
