#!/usr/bin/env bash
# Set up a fresh clone for `make run` and `make test`: .venv with the pinned dependencies (dev extra),
# then the default model. Idempotent: the install is skipped while a stamp keyed on pyproject.toml, this
# script and the checkout's path matches, and `specserve pull` does nothing when a verified copy is cached.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

readonly venv=.venv
readonly stamp=$venv/.bootstrap-stamp

die() {
  echo "bootstrap: $*" >&2
  exit 1
}

is_supported_python() {
  "$1" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null
}

# $PYTHON if set, else python3.11, else python3. A pyenv shim for a version that is not installed fails to
# run, so a candidate counts only if it runs.
find_python() {
  local candidates=(python3.11 python3) py
  [[ -n ${PYTHON:-} ]] && candidates=("$PYTHON")
  for py in "${candidates[@]}"; do
    if is_supported_python "$py"; then
      echo "$py"
      return 0
    fi
  done
  die "specserve needs Python >= 3.11; tried ${candidates[*]} (set PYTHON=/path/to/python3.11)"
}

ensure_venv() {
  [[ -x $venv/bin/python ]] && is_supported_python "$venv/bin/python" && return 0
  local python
  python=$(find_python)
  echo "bootstrap: creating $venv with $("$python" --version)"
  rm -rf "$venv"
  "$python" -m venv "$venv" || die "could not create $venv (on Debian/Ubuntu: apt-get install python3-venv)"
}

pip_install() {
  local flags=(--no-input --disable-pip-version-check)
  [[ -t 1 ]] || flags+=(--progress-bar off)
  "$venv/bin/python" -m pip install "${flags[@]}" "$@"
}

# torch comes from pip's local wheel dirs (find-links) only: resolved against the index, the same pin is a
# CUDA build of several GB on Linux.
install_torch() {
  local pin
  pin=$("$venv/bin/python" -c 'import tomllib
deps = tomllib.load(open("pyproject.toml", "rb"))["project"]["dependencies"]
print(next(d for d in deps if d.startswith("torch==")))')
  pip_install --no-index --no-deps "$pin" && return 0
  [[ ${SPECSERVE_TORCH_FROM_INDEX:-} == 1 ]] ||
    die "$pin is not in pip's local wheel dirs; set SPECSERVE_TORCH_FROM_INDEX=1 to fetch it from the index (a multi-GB CUDA build on Linux)"
}

ensure_python_deps() {
  local key
  key=$({ cat pyproject.toml scripts/bootstrap.sh; pwd; } | sha256sum | cut -d' ' -f1)
  if [[ -f $stamp && $(<"$stamp") == "$key" ]]; then
    echo "bootstrap: $venv is up to date"
    return 0
  fi
  rm -f "$stamp"
  install_torch
  pip_install -e '.[dev]'
  "$venv/bin/python" -m pip check --disable-pip-version-check
  echo "$key" >"$stamp"
}

ensure_model() {
  "$venv/bin/specserve" pull
}

# System packages (apt-get) go first, as their own idempotent step, when a later issue needs them.
ensure_venv
ensure_python_deps
ensure_model
