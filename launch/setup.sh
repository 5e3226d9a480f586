#!/usr/bin/env bash
# Creates .venv (if missing) and installs md2pr_jax with the given extras (default: test,tpu).
# Idempotent: a second run only checks that the install is complete.
#   bash launch/setup.sh            # tests + AOT compile checks
#   bash launch/setup.sh test       # tests only
#   bash launch/setup.sh test,gpu   # tests + JAX's CUDA 13 backend (NVIDIA driver >= 580)
#   PYTHON=python3.12 bash launch/setup.sh test   # Python 3.11 to 3.13 (3.12+: torch is a CUDA build)
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test,tpu}"
python="${PYTHON:-python3}"
if [[ ! -x .venv/bin/python ]]; then
  "$python" -m venv .venv
fi
# The tests lint the launch scripts with shellcheck; installing it is best effort (that test skips without it).
if ! command -v shellcheck >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
  (apt-get update -qq && apt-get install -y -qq shellcheck) >/dev/null 2>&1 || echo "setup.sh: shellcheck not installed (its test will skip)" >&2
fi
stamp=".venv/.md2pr_installed_${extras//,/_}"
if [[ ! -f "$stamp" || setup.py -nt "$stamp" ]]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch is pinned in setup.py to the CPU build on this machine's disk (no CUDA download on
  # Python 3.11; PyPI has only CUDA builds of that torch for 3.12 and 3.13).
  .venv/bin/python -m pip install --quiet -e ".[${extras}]"
  touch "$stamp"
fi
