#!/usr/bin/env bash
# Creates .venv (if missing) and installs md2pr_jax with the given extras (default: test,tpu).
# Idempotent: a second run only checks that the install is complete.
#   bash launch/setup.sh            # tests + AOT compile checks
#   bash launch/setup.sh test       # tests only
#   bash launch/setup.sh test,gpu   # tests + JAX's CUDA 13 backend (NVIDIA driver >= 580)
#   PYTHON=python3.12 bash launch/setup.sh test   # Python 3.11 to 3.13 (3.12+: torch is a CUDA build)
#   MD2PR_UV_PYTHON=3.11 bash launch/setup.sh tpu # a CPython 3.11 installed by uv (TPU workers)
#
# The interpreter of a new .venv: $PYTHON if set (it must be 3.11 to 3.13); else python3 when it
# is 3.11 to 3.13; else (python3 older, as on every Cloud TPU image today: Ubuntu 22.04's 3.10)
# CPython $DEFAULT_UV_PYTHON installed by uv, as MD2PR_UV_PYTHON=V always does. uv rather than
# deadsnakes' apt packages: uv needs no root, no apt source and no particular Ubuntu release
# (its CPython builds are standalone), so it works alike on every TPU software image. uv is
# taken from $UV, from PATH, or installed with `python3 -m pip install --user` (pinned below).
# An existing .venv is kept while its Python is 3.11 to 3.13 (and MD2PR_UV_PYTHON's version,
# where that is set); one with another Python is made again.
set -euo pipefail
cd "$(dirname "$0")/.."
extras="${1:-test,tpu}"
# The version the project's tests run on (CI's python3).
DEFAULT_UV_PYTHON=3.11
UV_REQUIREMENT="uv==0.13.8"

die() {
  echo "setup.sh: $*" >&2
  exit 2
}

# "3.11" for an interpreter command; fails when it does not run.
version_of() {
  "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}

supported() {
  case "$1" in
    3.11 | 3.12 | 3.13) return 0 ;;
    *) return 1 ;;
  esac
}

# Sets uv (an array: the command that runs uv), installing uv with pip where none is found.
find_uv() {
  local base="${PYTHON:-python3}"
  if [[ -n "${UV:-}" ]]; then
    uv=("$UV")
  elif command -v uv >/dev/null 2>&1; then
    uv=(uv)
  elif "$base" -m uv --version >/dev/null 2>&1; then # installed by an earlier run
    uv=("$base" -m uv)
  else
    echo "setup.sh: installing $UV_REQUIREMENT with $base -m pip install --user"
    "$base" -m pip install --user --quiet "$UV_REQUIREMENT" || return 1
    uv=("$base" -m uv)
  fi
}

# Makes .venv with CPython $1 from uv (downloaded once into uv's cache, ~/.local/share/uv).
uv_venv() {
  local v="$1" uv=()
  if ! find_uv; then
    die "$found_msg, and uv could not be installed ('${PYTHON:-python3} -m pip install --user $UV_REQUIREMENT' failed: no pip?).
  Either install uv (https://docs.astral.sh/uv/getting-started/installation/) or put it in UV=/path/to/uv,
  or name an installed Python 3.11 to 3.13: PYTHON=python3.12 bash launch/setup.sh $extras"
  fi
  echo "setup.sh: installing CPython $v with uv"
  "${uv[@]}" python install "$v" || die "$found_msg, and 'uv python install $v' failed (see above); name an installed Python 3.11 to 3.13 instead: PYTHON=python3.12 bash launch/setup.sh $extras"
  # --seed: a venv with pip (uv's own venvs have none), which the install below uses.
  "${uv[@]}" venv --seed --python "$v" .venv
}

want_uv="${MD2PR_UV_PYTHON:-}"
if [[ -n "$want_uv" ]] && ! supported "$want_uv"; then
  die "MD2PR_UV_PYTHON=$want_uv: md2pr_jax supports Python 3.11 to 3.13 (setup.py's python_requires)"
fi
if [[ -e .venv || -L .venv ]]; then
  have="$(version_of .venv/bin/python || echo none)"
  if ! supported "$have" || [[ -n "$want_uv" && "$have" != "$want_uv" ]]; then
    echo "setup.sh: .venv has Python $have, not ${want_uv:-3.11 to 3.13}; making it again"
    rm -rf .venv
  fi
fi
if [[ ! -x .venv/bin/python ]]; then
  python="${PYTHON:-python3}"
  found="$(version_of "$python" || echo none)"
  found_msg="$python is Python $found (md2pr_jax needs 3.11 to 3.13)"
  if [[ "$found" == none ]]; then found_msg="$python does not run here (md2pr_jax needs Python 3.11 to 3.13)"; fi
  if [[ -n "$want_uv" ]]; then
    found_msg="MD2PR_UV_PYTHON=$want_uv asks uv for CPython $want_uv ($python is Python $found)"
    uv_venv "$want_uv"
  elif supported "$found"; then
    "$python" -m venv .venv
  elif [[ -n "${PYTHON:-}" ]]; then
    die "$found_msg. Name one that is (PYTHON=python3.12), or unset PYTHON to have uv install CPython $DEFAULT_UV_PYTHON"
  else
    echo "setup.sh: $found_msg; provisioning CPython $DEFAULT_UV_PYTHON with uv"
    uv_venv "$DEFAULT_UV_PYTHON"
  fi
fi
# System packages, best effort, with apt-get: shellcheck (the tests lint the launch scripts; that
# test skips without it) and tcmalloc (the entry points re-exec under it where it is installed:
# md2pr_jax/allocator.py; without it they print a hint and run under glibc malloc). As root (CI,
# containers); otherwise only with MD2PR_APT_SUDO=1 (tpu_pod.sh setup sets it: TPU VMs give
# passwordless sudo), and never with a password prompt. MD2PR_SETUP_LIBDIR: where tcmalloc is
# looked for (default /usr/lib and its multiarch folders).
apt_packages=()
command -v shellcheck >/dev/null 2>&1 || apt_packages+=(shellcheck)
libdir="${MD2PR_SETUP_LIBDIR:-/usr/lib}"
compgen -G "$libdir/libtcmalloc_minimal.so.4" >/dev/null || compgen -G "$libdir/*/libtcmalloc_minimal.so.4" >/dev/null ||
  apt_packages+=(libtcmalloc-minimal4)
if [[ ${#apt_packages[@]} -gt 0 ]] && command -v apt-get >/dev/null 2>&1; then
  apt=()
  if [[ "$(id -u)" == 0 ]]; then
    apt=(apt-get)
  elif [[ "${MD2PR_APT_SUDO:-0}" == 1 ]] && sudo -n true 2>/dev/null; then
    apt=(sudo -n apt-get)
  fi
  if [[ ${#apt[@]} -gt 0 ]]; then
    ("${apt[@]}" update -qq && "${apt[@]}" install -y -qq "${apt_packages[@]}") >/dev/null 2>&1 ||
      echo "setup.sh: apt-get could not install ${apt_packages[*]} (shellcheck's test will skip; the entry points run under glibc malloc)" >&2
  fi
fi
stamp=".venv/.md2pr_installed_${extras//,/_}"
if [[ ! -f "$stamp" || setup.py -nt "$stamp" ]]; then
  .venv/bin/python -m pip install --quiet --upgrade pip
  # torch is pinned in setup.py to the CPU build on this machine's disk (no CUDA download on
  # Python 3.11; PyPI has only CUDA builds of that torch for 3.12 and 3.13).
  # --no-compile: no byte-compiling of all ~18k installed modules (~1.5 min of CPU here); Python
  # compiles the few thousand a run imports the first time it imports them.
  .venv/bin/python -m pip install --quiet --no-compile -e ".[${extras}]"
  touch "$stamp"
fi
