#!/usr/bin/env bash
# Wheels of FLA's kernels (fla-core and flash-linear-attention 0.6.0, the versions attnbench is tested
# with) for GPU hosts without network access: CPython 3.12, manylinux x86_64, downloaded into .whl/ (kept
# out of git through .git/info/exclude). Copy the project with .whl/ to the GPU host; scripts/gpu_suite.sh
# installs them there (pip install --no-index --no-deps --target "$TMPDIR/site" .whl/*.whl).
# Usage, from the project root: scripts/gpu_wheels.sh [EXTRA_REQUIREMENT ...]
# Extra requirements (e.g. "einops==0.8.1") are downloaded into .whl/ as well, with the same options.
set -euo pipefail
D=.whl
if EXCLUDE=$(git rev-parse --git-path info/exclude 2>/dev/null); then  # .git/info/exclude (worktrees too)
  mkdir -p "$(dirname "$EXCLUDE")"
  grep -qx "/$D/" "$EXCLUDE" 2>/dev/null || echo "/$D/" >> "$EXCLUDE"
fi
mkdir -p "$D"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$D" \
  fla-core==0.6.0 flash-linear-attention==0.6.0 "$@"
ls -l "$D"
