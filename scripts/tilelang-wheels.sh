#!/usr/bin/env bash
# Wheels for FLA's TileLang backend, which takes FLA's gated chunk backward (Gated DeltaNet, Gated
# DeltaProduct) on Hopper where triton 3.4-3.7.0 makes FLA refuse it (FLA_NOTES.md section 0).
# About 82 MB: over one device call's 64 MiB, so they travel in two folders over two calls on a warm
# machine (the second call within the machine's idle window), both installed into /tmp/site:
#   call 1 (carry .whl .whl_tl1 .gpu_data): pip install --no-index --no-deps --target /tmp/site .whl/*.whl .whl_tl1/*.whl
#   call 2 (carry .whl_tl2):                pip install --no-index --no-deps --target /tmp/site .whl_tl2/*.whl, then the work
# Usage, from the project root: scripts/tilelang-wheels.sh
set -euo pipefail
for d in .whl_tl1 .whl_tl2; do
  grep -qx "/$d/" .git/info/exclude 2>/dev/null || echo "/$d/" >> .git/info/exclude
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
