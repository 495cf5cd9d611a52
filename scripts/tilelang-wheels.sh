#!/usr/bin/env bash
# Wheels for FLA's TileLang backend, which runs FLA's gated chunk backward (Gated DeltaNet, Gated
# DeltaProduct) on Hopper, where FLA 0.6.0's Triton kernels refuse it with 3.4 <= triton < 3.7.1 (FLA issue
# #640; attnbench/ops/backend.py, gated_backward_route, picks the route), for CPython 3.12 manylinux x86_64
# GPU hosts without network access. .whl_tl1/ gets tilelang (~50 MB), .whl_tl2/ its dependencies (~33 MB):
# two folders, each under 64 MB, for copy tools that cap a transfer. scripts/gpu_suite.sh installs every
# .whl*/ folder it finds (pip install --no-index --no-deps --target "$TMPDIR/site" .whl_tl1/*.whl ...).
# Usage, from the project root: scripts/tilelang-wheels.sh
set -euo pipefail
EXCLUDE=$(git rev-parse --git-path info/exclude 2>/dev/null || true)  # .git/info/exclude (worktrees too)
for d in .whl_tl1 .whl_tl2; do
  if [ -n "$EXCLUDE" ]; then grep -qx "/$d/" "$EXCLUDE" 2>/dev/null || echo "/$d/" >> "$EXCLUDE"; fi
  mkdir -p "$d"
done
dl() {
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$@"
}
dl .whl_tl1 tilelang==0.1.15                      # ~50 MB
dl .whl_tl2 "apache-tvm-ffi>=0.1.11,<0.1.13" "z3-solver>=4.13.0,<4.15.5" torch-c-dlpack-ext   # ~33 MB
du -sh .whl_tl1 .whl_tl2
