#!/usr/bin/env bash
# A TPU pod in miniature: N processes of md2pr_jax.main on this host, joined by
# jax.distributed (coordinator on 127.0.0.1, gloo CPU collectives), each with its own CPU
# devices. Same code path as a pod: main.maybe_initialize_distributed() reads
# MD2PR_COORDINATOR / MD2PR_NUM_PROCESSES / MD2PR_PROCESS_ID.
#
#   bash launch/multihost_local.sh N [CONFIG] [WORKDIR] [MODE] [--config.key=value ...]
#   bash launch/multihost_local.sh 2                         # configs/debug.py, /tmp/md2pr_multihost, pipeline
#   bash launch/multihost_local.sh 2 configs/debug.py /tmp/w pipeline --config.rounds.num_rounds=1
#
# Environment:
#   PYTHON            interpreter (default: .venv/bin/python of the repo, else python3)
#   DEVICES_PER_PROC  CPU devices per process (XLA_FLAGS=--xla_force_host_platform_device_count; default 1)
#   MD2PR_PORT        coordinator port (default: a free port)
#   MD2PR_DATA_DIR    data root (default: ../shared/data next to the repo, if it exists)
#   LOG_DIR           per-process logs (default: WORKDIR/logs, or logs/multihost in the repo
#                     when WORKDIR is a URL such as gs://bucket/run); process 0 is also echoed here
#   HOME_ROOT         process i runs with HOME=HOME_ROOT/process_i: its own ~/.cache, as each
#                     host of a pod has its own disk (default: the shared HOME)
#   KILL_AFTER_S      seconds between SIGTERM and SIGKILL when stopping the others (default 10)
#
# Exit status: 0 when every process succeeds; otherwise the first failure's status (the
# other processes are then stopped, as a pod's preemption would: SIGTERM, then SIGKILL).
# The workdir is never wiped: a rerun resumes.
set -euo pipefail

usage() { sed -n '2,26p' "$0" | sed 's/^# \{0,1\}//'; }

if [[ $# -lt 1 || "$1" == "-h" || "$1" == "--help" ]]; then
  usage
  exit 2
fi
num="$1"
shift
if ! [[ "$num" =~ ^[1-9][0-9]*$ ]]; then
  echo "multihost_local.sh: N must be a positive integer, got '$num'" >&2
  exit 2
fi
repo="$(cd "$(dirname "$0")/.." && pwd)"
config="${1:-configs/debug.py}"
workdir="${2:-/tmp/md2pr_multihost}"
mode="${3:-pipeline}"
shift $(($# < 3 ? $# : 3))
extra=("$@")

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$repo/.venv/bin/python" ]]; then PYTHON="$repo/.venv/bin/python"; else PYTHON=python3; fi
fi
if [[ -z "${MD2PR_DATA_DIR:-}" && -d "$repo/../shared/data" ]]; then
  MD2PR_DATA_DIR="$(cd "$repo/../shared/data" && pwd)"
  export MD2PR_DATA_DIR
fi
port="${MD2PR_PORT:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
devices="${DEVICES_PER_PROC:-1}"
kill_after="${KILL_AFTER_S:-10}"
if [[ "$workdir" == *://* ]]; then
  # A bucket: md2pr_jax creates it; a local mkdir would make a folder named gs:.
  log_dir="${LOG_DIR:-$repo/logs/multihost}"
else
  log_dir="${LOG_DIR:-$workdir/logs}"
  mkdir -p "$workdir"
fi
mkdir -p "$log_dir"

pids=()
stopping_since=""
cleanup() {
  local pid
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  stopping_since="${stopping_since:-$SECONDS}"
}
trap cleanup INT TERM

echo "multihost_local: $num processes, coordinator 127.0.0.1:$port, $devices CPU device(s) each, logs in $log_dir"
for ((i = 0; i < num; i++)); do
  log="$log_dir/process_$i.log"
  (
    cd "$repo"
    export MD2PR_COORDINATOR="127.0.0.1:$port" MD2PR_NUM_PROCESSES="$num" MD2PR_PROCESS_ID="$i"
    export JAX_PLATFORMS=cpu XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices"
    if [[ -n "${HOME_ROOT:-}" ]]; then
      export HOME="$HOME_ROOT/process_$i"
      mkdir -p "$HOME"
    fi
    exec "$PYTHON" -m md2pr_jax.main --config "$config" --workdir "$workdir" --mode "$mode" "${extra[@]}"
  ) >"$log" 2>&1 &
  pids+=("$!")
done
if [[ -z "${QUIET:-}" ]]; then
  tail -n +1 -F "$log_dir/process_0.log" 2>/dev/null &
  tail_pid=$!
fi

# Wait for all; on the first failure stop the others (a dead peer would leave them hanging
# in a collective until the coordinator's heartbeat timeout). jax.distributed's preemption
# notifier catches SIGTERM (it only marks a preemption), so whoever outlives the grace
# period gets SIGKILL: no process of the job outlives this script.
# (Polling with kill -0, then `wait PID` for its status: `wait -n` can miss a child that
# exited before it was called.)
status=0
declare -A running=()
for ((i = 0; i < num; i++)); do running[${pids[$i]}]=$i; done
while ((${#running[@]} > 0)); do
  for pid in "${!running[@]}"; do
    if kill -0 "$pid" 2>/dev/null; then continue; fi
    set +e
    wait "$pid"
    rc=$?
    set -e
    i="${running[$pid]}"
    unset "running[$pid]"
    if ((rc != 0 && status == 0)); then
      status=$rc
      echo "multihost_local: process $i failed with status $rc (log: $log_dir/process_$i.log); stopping the others" >&2
      cleanup
    fi
  done
  if ((${#running[@]} > 0)); then
    if [[ -n "$stopping_since" ]] && ((SECONDS - stopping_since >= kill_after)); then
      for pid in "${!running[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
      done
    fi
    sleep 1
  fi
done
if [[ -n "${tail_pid:-}" ]]; then
  kill "$tail_pid" 2>/dev/null || true
fi
if ((status != 0)); then
  for ((i = 0; i < num; i++)); do
    echo "---- tail of $log_dir/process_$i.log" >&2
    tail -n 15 "$log_dir/process_$i.log" >&2 || true
  done
fi
exit "$status"
