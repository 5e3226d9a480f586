#!/usr/bin/env bash
# The job on one TPU worker, detached from the ssh session that starts it. tpu_pod.sh runs this
# on every worker, in ~/md2pr_jax (the setup copy):
#
#   bash launch/pod_job.sh start COMMAND...  starts COMMAND detached, unless a job runs here already
#   bash launch/pod_job.sh alive             exits 0 while the job runs
#   bash launch/pod_job.sh status            running / finished / failed / killed, and the log's last line
#   bash launch/pod_job.sh wait              waits until the job ends; exits with its status
#   bash launch/pod_job.sh stop              SIGTERM to the job's process group (SIGKILL after STOP_SECONDS, default 60)
#   bash launch/pod_job.sh logs [--prefix]   follows the log (--prefix: each line starts with [host])
#
# Files in logs/: run.log (the job's output, appended across starts, each start headed by a
# "=== ... starting" line), run.pid (the job's process group), run.exit (its exit status,
# written when it ends; none after a SIGKILL, a preemption or a reboot).
set -euo pipefail
cd "$(dirname "$0")/.."
log=logs/run.log
pidfile=logs/run.pid
exitfile=logs/run.exit
# The wrapper's $0, so that a pid reused by another program after a reboot is not taken for the job.
marker=md2pr_pod_job
host="$(hostname)"

die() {
  echo "pod_job.sh: $*" >&2
  exit 2
}

alive() {
  local p
  p="$(cat "$pidfile" 2>/dev/null)" || return 1
  [[ -n "$p" ]] && grep -qa "$marker" "/proc/$p/cmdline" 2>/dev/null
}

# The log's last line as a terminal would show it (the last \r segment of a progress bar), cut short.
last_line() {
  tail -n 1 "$log" 2>/dev/null | tr '\r' '\n' | grep -v '^$' | tail -n 1 | cut -c1-200 || true
}

start() {
  [[ $# -gt 0 ]] || die "start needs the command to run"
  mkdir -p logs
  if alive; then
    echo "$host: the job is already running (pid $(cat "$pidfile")); not starting a second copy"
    return 0
  fi
  rm -f "$pidfile" "$exitfile"
  echo "=== $(date -u '+%Y-%m-%d %H:%M:%S') UTC $host: starting: $*" >>"$log"
  # setsid: a session and process group of its own, so the hangup that ends the ssh session's
  # group never reaches it; nohup: nor a hangup sent another way. Every stream is redirected,
  # so ssh has nothing to wait for and returns. The wrapper records the pid and the exit
  # status; its TERM trap only lets the job's own exit status be recorded after a `stop`.
  # shellcheck disable=SC2016  # the wrapper's $ are its own
  setsid nohup bash -c 'trap ":" TERM; echo "$$" >logs/run.pid; "$@"; echo "$?" >logs/run.exit' \
    "$marker" "$@" >>"$log" 2>&1 </dev/null &
  local i rc
  for ((i = 0; i < 30; i++)); do # 3 s: a job that cannot start (no .venv, a bad flag) says so here
    if [[ -f "$exitfile" ]]; then break; fi
    sleep 0.1
  done
  if [[ -f "$exitfile" ]]; then
    rc="$(cat "$exitfile")"
    echo "$host: the job ended at once with status $rc; its output (~/md2pr_jax/$log):"
    awk '/^=== .* starting: /{out=""} {out=out $0 "\n"} END{printf "%s", out}' "$log" | tail -n 20
    return "$rc"
  fi
  echo "$host: started the job (pid $(cat "$pidfile" 2>/dev/null || echo '?')); log: ~/md2pr_jax/$log"
}

status() {
  local line rc
  if alive; then
    line="running (pid $(cat "$pidfile"), for $(ps -o etime= -p "$(cat "$pidfile")" | tr -d ' '))"
  elif [[ -f "$exitfile" ]]; then
    rc="$(cat "$exitfile")"
    case "$rc" in
      0) line="finished (exit status 0)" ;;
      143) line="stopped by SIGTERM (exit status 143); 'run' resumes it" ;;
      *) line="failed (exit status $rc)" ;;
    esac
  elif [[ -f "$pidfile" ]]; then
    line="not running, and no exit status: killed, preempted or rebooted; 'run' resumes it"
  else
    line="no job started here"
  fi
  echo "$host: $line"
  if [[ -f "$log" ]]; then echo "$host:   last log line: $(last_line)"; fi
}

wait_job() {
  while alive; do sleep "${POLL_SECONDS:-30}"; done
  if [[ ! -f "$exitfile" ]]; then
    echo "$host: the job is not running and left no exit status (killed, preempted or never started)"
    return 1
  fi
  local rc
  rc="$(cat "$exitfile")"
  echo "$host: the job ended with status $rc"
  return "$rc"
}

stop() {
  if ! alive; then
    echo "$host: no job running"
    return 0
  fi
  local p i
  p="$(cat "$pidfile")"
  kill -TERM -- "-$p" 2>/dev/null || true
  for ((i = 0; i < ${STOP_SECONDS:-60} * 10; i++)); do
    if ! alive; then
      echo "$host: stopped the job (pid $p)"
      return 0
    fi
    sleep 0.1
  done
  kill -KILL -- "-$p" 2>/dev/null || true
  echo "$host: killed the job (pid $p): it did not end within ${STOP_SECONDS:-60} s of SIGTERM"
}

logs() {
  if [[ "${1:-}" == --prefix ]]; then
    tail -n "${LOG_LINES:-200}" -F "$log" | sed -u "s/^/[$host] /"
  else
    tail -n "${LOG_LINES:-200}" -F "$log"
  fi
}

case "${1:-}" in
  start) shift; start "$@" ;;
  alive) alive ;;
  status) status ;;
  wait) wait_job ;;
  stop) stop ;;
  logs) shift; logs "$@" ;;
  *) die "unknown command '${1:-}': start COMMAND..., alive, status, wait, stop or logs" ;;
esac
