"""The single entry point.

    python -m md2pr_jax.main --config configs/X.py --workdir DIR --mode MODE [--config.key=value ...]

Each mode is a function `fn(config, workdir)` in the module that owns that stage, imported
only when it runs (so `--mode aot` never loads ScaNN, and `--mode evaluate` never builds an
optimizer).
"""

from __future__ import annotations

import importlib
import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

MODES = {
    "export_hf": "md2pr_jax.params:export_mode",
    "teacher": "md2pr_jax.rounds.runner:teacher_mode",
    "student": "md2pr_jax.rounds.runner:student_mode",
    "pipeline": "md2pr_jax.rounds.runner:pipeline_mode",
    "evaluate": "md2pr_jax.retrieval.evaluate:evaluate_mode",
    "aot": "md2pr_jax.aot:aot_mode",
    "prepare": "md2pr_jax.data:prepare_mode",
}
DATA_MODES = ("teacher", "student", "pipeline", "evaluate", "prepare")  # modes that read config.data.dataset

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, artifacts and reports (local or gs://).")
_MODE = flags.DEFINE_enum("mode", "pipeline", sorted(MODES), "What to run.")
_TOPOLOGY = flags.DEFINE_string("topology", None, "TPU topology for --mode aot, e.g. v5e:2x2 (overrides config.aot.topology).")
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", None, "Call jax.distributed.initialize() (default: when a TPU pod or MD2PR_COORDINATOR is set)."
)


def maybe_initialize_distributed(force: bool | None) -> None:
    """Joins a multi-process run. On a TPU pod the settings come from the TPU environment;
    locally from MD2PR_COORDINATOR, MD2PR_NUM_PROCESSES and MD2PR_PROCESS_ID (gloo on CPU)."""
    import jax

    coord = os.environ.get("MD2PR_COORDINATOR")
    if force is False or (force is None and not coord and not os.environ.get("TPU_WORKER_HOSTNAMES")):
        return
    if coord:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            coordinator_address=coord,
            num_processes=int(os.environ["MD2PR_NUM_PROCESSES"]),
            process_id=int(os.environ["MD2PR_PROCESS_ID"]),
        )
    else:
        jax.distributed.initialize()
    logging.info("process %d of %d, %d local devices", jax.process_index(), jax.process_count(), jax.local_device_count())


def resolve_mode(mode: str):
    module, _, fn = MODES[mode].partition(":")
    return getattr(importlib.import_module(module), fn)


def main(argv) -> None:
    del argv
    from md2pr_jax.logs import quiet_library_logs

    quiet_library_logs()
    from md2pr_jax.config import validate

    if _CONFIG.value is None or _WORKDIR.value is None:
        sys.exit("--config and --workdir are required")
    config = _CONFIG.value
    if _TOPOLOGY.value:
        config.aot.topology = _TOPOLOGY.value
    validate(config)
    from md2pr_jax.compile_cache import use_compilation_cache

    use_compilation_cache()
    maybe_initialize_distributed(_DISTRIBUTED.value)
    if _MODE.value in DATA_MODES:
        check_data(config)
    resolve_mode(_MODE.value)(config, _WORKDIR.value)


def check_data(config) -> None:
    """Every process checks (one fetches) the dataset before the mode's first barrier; a missing
    dataset stops all of them with the same one-line message instead of a traceback or a hang."""
    from md2pr_jax.data.fetch import DataError, ensure_data

    try:
        config.data.dir = ensure_data(config)
    except DataError as e:
        sys.exit(f"md2pr: {e}")


def run() -> None:
    app.run(main)


if __name__ == "__main__":
    from md2pr_jax.allocator import reexec_under_preferred_allocator

    reexec_under_preferred_allocator()
    run()
