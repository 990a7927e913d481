#!/usr/bin/env bash
# Creates .venv with Python >= 3.12 (if missing) and installs the project with its pinned versions.
# Re-running is cheap: pip is skipped when pyproject.toml has not changed since the last install.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
find_python() {
  for cand in "${PYTHON:-}" python3.12 python3.13; do
    [ -n "$cand" ] || continue
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$cand"; return 0
    fi
  done
  if command -v pyenv >/dev/null 2>&1; then
    for v in $(pyenv versions --bare 2>/dev/null | grep -E "^3\.1[2-9]" | sort -V); do
      p="$(pyenv root)/versions/$v/bin/python3"
      [ -x "$p" ] && { echo "$p"; return 0; }
    done
  fi
  return 1
}
if [ ! -x "$VENV/bin/python" ]; then
  PY=$(find_python) || { echo "error: no Python >= 3.12 found; install one (e.g. 'pyenv install 3.12' or apt install python3.12) or set PYTHON=/path/to/python3.12" >&2; exit 1; }
  echo "bootstrap: creating $VENV with $($PY --version 2>&1)"
  "$PY" -m venv "$VENV"
fi
stamp="$VENV/.installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  echo "bootstrap: installing axlearn_like and its pinned dependencies into $VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  "$VENV/bin/python" -m pip install -q -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
  "$VENV/bin/python" -c "import jax, flax, optax, orbax.checkpoint, grain" || { echo "error: dependency install failed; see the pip output above" >&2; exit 1; }
  touch "$stamp"
fi
# install_aside SPEC DIR PURPOSE SKIPPED: pip-installs SPEC (no deps) into $VENV/DIR, outside sys.path, once (a
# stamp per SPEC); a failed download is a warning naming what is skipped, not a bootstrap failure.
install_aside() {
  local spec=$1 dir="$VENV/$2" stamp="$VENV/$2/.installed-$1" log="$VENV/$2-install.log"
  [ -f "$stamp" ] && return 0
  echo "bootstrap: installing $spec into $dir ($3)"
  rm -rf "$dir"
  if "$VENV/bin/python" -m pip install -q --no-deps --target "$dir" "$spec" >"$log" 2>&1; then
    touch "$stamp"
  else
    echo "bootstrap: warning: $spec did not install (see $log): $4 are skipped" >&2
  fi
}
# libtpu, the TPU compiler (jax 0.11.2's pin), for `tools.tpu_compile --compile` and its tests: Mosaic's and
# XLA:TPU's compile on a CPU host (~220 MB download). Outside sys.path: an importable libtpu would make every JAX
# program probe for a TPU; tools/tpu_compile.py points JAX at it only to compile.
install_aside "libtpu==0.0.48.1" libtpu "TPU compiler for tools.tpu_compile" "TPU compile tests"
# triton (jax-triton's compiler, not a dependency on CPU): the Triton kernels' CPU tests run them in Triton's
# interpreter (TRITON_INTERPRET=1) from a subprocess that adds $VENV/triton (AXL_TRITON_SITE, set by `make test`).
# ~170 MB download.
install_aside "triton==3.6.0" triton "Triton interpreter tests of the GPU kernels" "Triton interpreter tests"
# --interop: also .venv-interop (Python 3.11) with pyproject.toml's `interop` extra, for the Hugging Face tests.
if [ "${1:-}" = "--interop" ]; then
  IVENV=${INTEROP_VENV:-.venv-interop}
  find_python311() {
    for cand in "${INTEROP_PYTHON:-}" python3.11; do
      [ -n "$cand" ] || continue
      if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
        echo "$cand"; return 0
      fi
    done
    if command -v pyenv >/dev/null 2>&1; then
      for v in $(pyenv versions --bare 2>/dev/null | grep -E "^3\.11" | sort -V); do
        p="$(pyenv root)/versions/$v/bin/python3"
        [ -x "$p" ] && { echo "$p"; return 0; }
      done
    fi
    return 1
  }
  if [ ! -x "$IVENV/bin/python" ]; then
    IPY=$(find_python311) || { echo "error: the interop tests need Python 3.11 (torch's CPU wheel); install it (e.g. 'pyenv install 3.11') or set INTEROP_PYTHON=/path/to/python3.11" >&2; exit 1; }
    echo "bootstrap: creating $IVENV with $($IPY --version 2>&1)"
    "$IPY" -m venv "$IVENV"
  fi
  istamp="$IVENV/.installed"
  if [ ! -f "$istamp" ] || [ pyproject.toml -nt "$istamp" ]; then
    reqs=$("$IVENV/bin/python" -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["interop"]))')
    echo "bootstrap: installing the interop extra into $IVENV: $(echo $reqs)"
    # shellcheck disable=SC2086
    "$IVENV/bin/python" -m pip install -q $reqs 2>&1 | grep -v -E "^WARNING: (Location|The directory)" || true
    "$IVENV/bin/python" -c "import torch, transformers, safetensors" || { echo "error: interop install failed; see the pip output above" >&2; exit 1; }
    touch "$istamp"
  fi
fi
