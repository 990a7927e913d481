#!/usr/bin/env bash
# bash scripts/fetch_anchors.sh MIRROR_GIT_DIR
# Extracts the `mamba_ssm` package subtree (and its LICENSE) of a state-spaces/mamba git mirror (a bare git dir,
# e.g. the search tool's `fetch github:state-spaces/mamba`) into .anchors/mamba/, with the commit in
# .anchors/mamba/COMMIT. .anchors/ is git-ignored: the sources are a benchmark anchor imported at run time by
# tools.bench_mamba_torch, never part of the project. Carry it to the device machine (run tool: carry
# [".whl", ".anchors"]); `python -m tools.bench_train --all` then adds the PyTorch + mamba_ssm row.
set -euo pipefail
cd "$(dirname "$0")/.."
git_dir=${1:-}
if [ -z "$git_dir" ] || ! git --git-dir="$git_dir" rev-parse --verify -q HEAD >/dev/null 2>&1; then
  echo "usage: $0 MIRROR_GIT_DIR (a git dir of state-spaces/mamba; got '${git_dir}')" >&2; exit 2
fi
if ! git --git-dir="$git_dir" rev-parse --verify -q HEAD:mamba_ssm/modules/mamba2.py >/dev/null; then
  echo "error: $git_dir has no mamba_ssm/modules/mamba2.py at HEAD (not a state-spaces/mamba mirror?)" >&2; exit 2
fi
rm -rf .anchors/mamba
mkdir -p .anchors/mamba
paths=(mamba_ssm)
git --git-dir="$git_dir" rev-parse --verify -q HEAD:LICENSE >/dev/null && paths+=(LICENSE)
git --git-dir="$git_dir" archive HEAD "${paths[@]}" | tar -x -C .anchors/mamba
git --git-dir="$git_dir" rev-parse HEAD >.anchors/mamba/COMMIT
echo "mamba_ssm $(cut -c1-12 .anchors/mamba/COMMIT) -> .anchors/mamba ($(du -sh .anchors/mamba | cut -f1))"
