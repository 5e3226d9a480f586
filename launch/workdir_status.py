"""Which stages of a workdir are finished and which one runs: tpu_pod.sh's `status` runs this
on worker 0 (the workdir is shared, so one worker's view is every worker's).

    .venv/bin/python launch/workdir_status.py --workdir gs://BUCKET/run

Prints the finished stages in pipeline order with their wall time (timings.json), the first
unfinished one ("running" when its folder exists, else "next"), and whether results.json is
written. Reads only DONE files, config.json and timings.json: cheap on a bucket.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

# Worker 0's TPU belongs to the running job: nothing here may open it (md2pr_jax imports jax).
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from md2pr_jax.layout import ROUND0_STAGES, Layout, round_stages  # noqa: E402


def pipeline_stages(num_rounds: int) -> list[str]:
    """The stages of `--mode pipeline` in the order it runs them."""
    return [*ROUND0_STAGES, *(s for r in range(1, num_rounds + 1) for s in round_stages(r))]


def _read_json(path) -> dict:
    return json.loads(path.read_text()) if path.exists() else {}


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.2f} h"


def describe(workdir: str) -> list[str]:
    """Lines saying how far the run in `workdir` has come."""
    layout = Layout.at(workdir)
    config = _read_json(layout.config_json)
    if not config:
        return [f"workdir {layout}: no config.json yet (the job writes it once its data is prepared)"]
    num_rounds = int(config.get("rounds", {}).get("num_rounds", 0))
    timings = _read_json(layout.timings)
    stages = pipeline_stages(num_rounds)
    done = [s for s in stages if layout.done(s)]
    lines = [f"workdir {layout}: {len(done)} of {len(stages)} pipeline stages done "
             f"(config {config.get('name', '?')}, {num_rounds} rounds)"]
    if done:
        times = [f"{s} {_duration(timings[s])}" if s in timings else s for s in done]
        lines.append("  done: " + ", ".join(times))
    pending = [s for s in stages if s not in done]
    if pending:
        now = pending[0]
        lines.append(f"  {'running' if layout.stage(now).exists() else 'next'}: {now}")
    lines.append(f"  results.json: {'written' if layout.results.exists() else 'not yet'}")
    return lines


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="the job's workdir (a gs:// path or a shared mount)")
    args = parser.parse_args(argv)
    print("\n".join(describe(args.workdir)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
