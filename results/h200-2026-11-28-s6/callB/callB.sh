#!/usr/bin/env bash
# session 6 call B: MPS probe (5 short seed runs with and without MPS), GPU tests, attention-dropout ablation
O=$1; mkdir -p $O
bash scripts/gpu_suite.sh $O/env env > /dev/null 2>&1
export PYTHONPATH=/tmp/site:$PWD ATTNBENCH_DATA=$PWD/.gpu_data/input.txt
{ which nvidia-cuda-mps-control nvidia-cuda-mps-server nvidia-smi; nvidia-smi -q | grep -i "compute mode"; } 2>&1 | tee $O/mps_probe.txt
SW="--no_bench --no_report --set train.max_iters=600 --set optim.lr_decay_iters=600 --set train.eval_interval=300"
/usr/bin/time -f "nomps wall %e" timeout 150 python3 -m attnbench run --preset seed --out /tmp/r-nomps $SW > $O/nomps.log 2>&1
tail -3 $O/nomps.log
export CUDA_MPS_PIPE_DIRECTORY=/tmp/mps/pipe CUDA_MPS_LOG_DIRECTORY=/tmp/mps/log
mkdir -p $CUDA_MPS_PIPE_DIRECTORY $CUDA_MPS_LOG_DIRECTORY
if timeout 20 nvidia-cuda-mps-control -d; then
  echo "mps daemon started" | tee -a $O/mps_probe.txt
  /usr/bin/time -f "mps wall %e" timeout 150 python3 -m attnbench run --preset seed --out /tmp/r-mps $SW > $O/mps.log 2>&1
  tail -3 $O/mps.log
  echo quit | timeout 20 nvidia-cuda-mps-control; sleep 2
  cp -r /tmp/mps/log $O/mps_log 2>/dev/null
else echo "mps daemon failed rc=$?" | tee -a $O/mps_probe.txt; fi
unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
(ATTNBENCH_RUNS=/tmp/rabl bash scripts/gpu_suite.sh $O/abl train:configs/shakespeare_char.toml:model.mixer_args.attn_dropout=0.0,train.compile=false,train.cuda_graph=true > $O/abl.out 2>&1) &
T=tests/gpu
GPU_TESTS_TIMEOUT=${TESTS_S:-240} bash scripts/gpu_suite.sh $O/t tests:$T/test_fla_configs_gpu.py,$T/test_delta_mixers_gpu.py,$T/test_fla_nsa_ops.py,$T/test_nsa_mixer_gpu.py,$T/test_nsa_decode_triton_gpu.py,$T/test_train_gpu.py,$T/test_bench_gpu.py,$T/test_profile_decode_gpu.py 2>&1 | tail -45
wait
(cd /tmp && tar czf $O/probe_runs.tgz --exclude=ckpt r-nomps r-mps 2>/dev/null)
cd $O && tar czf ../callB.tgz . && cd .. && rm -rf $O
