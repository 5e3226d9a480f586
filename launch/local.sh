#!/usr/bin/env bash
# Single-host debug mode: one process on this machine's GPU if JAX can use one, else the CPU.
#
#   bash launch/local.sh [CONFIG] [WORKDIR] [MODE] [--config.key=value ...]
#   bash launch/local.sh                                   # configs/debug.py, /tmp/md2pr_debug, pipeline
#   bash launch/local.sh configs/scifact_minilm.py /tmp/scifact pipeline --config.rounds.num_rounds=1
#
# - Creates .venv with launch/setup.sh if it is missing (extras: $SETUP_EXTRAS, default test).
# - GPU: when `nvidia-smi` works and JAX has no CUDA backend yet, installs setup.py's `gpu` extra
#   (launch/setup.sh "$SETUP_EXTRAS,gpu"); then runs with JAX_PLATFORMS=cuda when JAX sees a GPU,
#   else (the install failed, e.g. offline or an old driver) says so and uses the CPU.
#   JAX_PLATFORMS set by the caller wins (and installs nothing).
# - MD2PR_DATA_DIR defaults to ../shared/data next to the repo when that folder exists.
# - The workdir is never wiped: running the same command again resumes.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
config="${1:-configs/debug.py}"
workdir="${2:-/tmp/md2pr_debug}"
mode="${3:-pipeline}"
shift $(($# < 3 ? $# : 3))

cd "$repo"
if [[ ! -x .venv/bin/python ]]; then
  echo "local.sh: no .venv; creating it with launch/setup.sh ${SETUP_EXTRAS:-test}"
  bash launch/setup.sh "${SETUP_EXTRAS:-test}"
fi
python=.venv/bin/python

if [[ -z "${MD2PR_DATA_DIR:-}" && -d "$repo/../shared/data" ]]; then
  MD2PR_DATA_DIR="$(cd "$repo/../shared/data" && pwd)"
  export MD2PR_DATA_DIR
fi

if [[ -z "${JAX_PLATFORMS:-}" ]]; then
  platform=cpu
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    jax_sees_gpu() { JAX_PLATFORMS=cuda "$python" -c 'import jax; assert jax.devices("gpu")' >/dev/null 2>&1; }
    if ! jax_sees_gpu; then
      extras="${SETUP_EXTRAS:-test}"
      [[ ",$extras," == *,gpu,* ]] || extras="$extras,gpu"
      echo "local.sh: nvidia-smi sees a GPU; installing JAX's CUDA backend: bash launch/setup.sh $extras" >&2
      bash launch/setup.sh "$extras" || echo "local.sh: installing the gpu extra failed" >&2
    fi
    if jax_sees_gpu; then
      platform=cuda
    else
      jax_version="$("$python" -c 'import jax; print(jax.__version__)')"
      echo "local.sh: nvidia-smi sees a GPU but JAX has no CUDA backend; the gpu extra (CUDA 13) needs" >&2
      echo "    NVIDIA driver >= 580; on an older driver: $python -m pip install \"jax[cuda12]==$jax_version\"" >&2
      echo "local.sh: running on the CPU" >&2
    fi
  fi
  export JAX_PLATFORMS="$platform"
fi
echo "local.sh: JAX_PLATFORMS=$JAX_PLATFORMS config=$config workdir=$workdir mode=$mode"
exec "$python" -m md2pr_jax.main --config "$config" --workdir "$workdir" --mode "$mode" "$@"
