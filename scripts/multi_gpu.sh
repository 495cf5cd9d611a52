#!/usr/bin/env bash
# Multi-GPU demonstration (needs >= 2 GPUs): DDP training against one GPU at the same global batch, and a
# sweep spread one run per GPU against the same sweep on one GPU. Results go to the folder given.
#
#   scripts/multi_gpu.sh OUTDIR
#
# 1. softmax and DeltaNet at the bake-off's settings on one GPU each (at once: the reference curves);
# 2. the same two under torchrun on 2 GPUs with 32 sequences per GPU (global batch 64 x 256, as in 1);
# 3. configs/sweeps/pair.toml with --devices 0, then with --devices 0,1 (wall times);
# then scripts/compare_runs.py prints the curves side by side and the tokens/s ratios.
# DeltaNet trains eagerly throughout (configs/sweeps/pair.toml says why). NVLink multicast stays off.
# Knobs: ITERS (default 3000: the trainings of 1 and 2, with the cosine schedule cut to match),
# SWEEP_DEVICES (default "0 0,1"), STEP_TIMEOUT (s per step, default 150 + ITERS/10: on a fresh machine
# FLA's first DeltaNet steps spend about a minute compiling and autotuning Triton kernels). Files are packed
# after every phase, so a run cut short still leaves what finished.
set -uo pipefail
OUTDIR=${1:?usage: scripts/multi_gpu.sh OUTDIR}
mkdir -p "$OUTDIR"
bash scripts/gpu_suite.sh "$OUTDIR" env >/dev/null 2>&1  # installs the wheels of .whl*/ once
cat "$OUTDIR/suite.log"
TMP=${TMPDIR:-/tmp}
export PYTHONPATH=$TMP/site:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
export ATTNBENCH_DATA=${ATTNBENCH_DATA:-$PWD/.gpu_data/input.txt}
RUNS=${ATTNBENCH_RUNS:-$TMP/attnbench-multi-gpu}
rm -rf "$RUNS"; mkdir -p "$RUNS"
LOG="$OUTDIR/multi_gpu.txt"
say() { echo "$*" | tee -a "$LOG"; }
train() {  # NAME CMD...: one training run into $RUNS/NAME; its wall time and last lines go to the log
  local name=$1; shift
  /usr/bin/time -f "$name: wall %e s" timeout "$STEP_TIMEOUT" "$@" --out_dir="$RUNS/$name" --progress=false \
    > "$RUNS/$name.log" 2>&1
  grep -E "wall|best val|Error|error|Traceback" "$RUNS/$name.log" | tail -4 | tee -a "$LOG"
}
pack() {
  (cd "$RUNS" && find . -name '*.log' -o -name '*.json' -o -name '*.jsonl' | grep -v /ckpt/ \
    | tar czf "$OUTDIR/multi_gpu.tar.gz" -T -)
}
ITERS=${ITERS:-3000}
STEP_TIMEOUT=${STEP_TIMEOUT:-$((150 + ITERS / 10))}
sched=(--max_iters="$ITERS" --lr_decay_iters="$ITERS")
ddp=(python3 -m torch.distributed.run --standalone --nproc_per_node 2 -m attnbench train)
say "=== 1. one GPU each ($(date +%T))"
CUDA_VISIBLE_DEVICES=0 train softmax-1gpu python3 -m attnbench train configs/shakespeare_char.toml "${sched[@]}" &
CUDA_VISIBLE_DEVICES=1 train deltanet-1gpu python3 -m attnbench train configs/deltanet.toml "${sched[@]}" --compile=false &
wait
pack
say "=== 2. DDP, 2 GPUs x 32 sequences ($(date +%T))"
train softmax-ddp2 "${ddp[@]}" configs/shakespeare_char.toml "${sched[@]}" --batch_size=32 --gradient_accumulation_steps=2
train deltanet-ddp2 "${ddp[@]}" configs/deltanet.toml "${sched[@]}" --batch_size=32 --gradient_accumulation_steps=2 --compile=false
say "=== curves ($(date +%T))"
python3 scripts/compare_runs.py "$RUNS/softmax-1gpu" "$RUNS/softmax-ddp2" | tee -a "$LOG"
python3 scripts/compare_runs.py "$RUNS/deltanet-1gpu" "$RUNS/deltanet-ddp2" | tee -a "$LOG"
pack
say "=== 3. sweep: one GPU, then one run per GPU ($(date +%T))"
for devs in ${SWEEP_DEVICES:-0 0,1}; do
  /usr/bin/time -f "sweep --devices $devs: wall %e s" timeout "$STEP_TIMEOUT" python3 -m attnbench sweep \
    configs/sweeps/pair.toml --devices "$devs" --out "$RUNS/sweep-${devs/,/-}" --no_report --status_interval 15 \
    > "$RUNS/sweep-${devs/,/-}.log" 2>&1
  grep -E "start|done|wall" "$RUNS/sweep-${devs/,/-}.log" | tee -a "$LOG"
  pack
done
echo "results in $OUTDIR"
