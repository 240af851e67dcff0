#!/bin/bash
# Benchmark suites on a machine with one NVIDIA GPU: a CUDA gate (the GPU exactness test and the smoke suite in two
# shards at once), then each suite named in SUITES as NAME:SHARDS, its shards running at once and sharing
# results/gpu (`malloc bench --shard I/N`; a training run several shards need is trained once, under its lock).
# Every process gets one CPU thread; everything stops after BUDGET seconds (default 560) and what is done stays
# done (rerun to resume). Writes results/gpu and, with OUT set, $OUT/results.tgz plus the logs' summary.
#
#   SUITES="long:1 trained:1" BUDGET=560 OUT=/tmp/out bash benchmarks/gpu_suites.sh
#
# One process per GPU is the fast setting: processes time-slice one GPU, they do not share it, so many shards on
# one GPU keep it busy without finishing sooner (README.md, "GPUs and many workers"). Shard across GPUs or nodes.
# Needs: python3 with torch (CUDA), numpy, pyyaml, tqdm, matplotlib; RecBole's wheel in .whl/ for MovieLens-100K.
set -u
t0=$(date +%s)
BUDGET=${BUDGET:-560}
SUITES=${SUITES:-"long:1"}
OUT=${OUT:-results/gpu-out}
L=results/gpu/logs
mkdir -p "$OUT" $L
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
M="python3 -m malloc"
pack() { tar czf "$OUT/results.tgz" --exclude='last.pt' results/gpu; cp $L/*.txt "$OUT/" 2>/dev/null; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $L/gpu.txt
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee -a $L/gpu.txt

# 1. the gate: exactness on the GPU, and every kind of suite item on CUDA from two shards at once
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_models.py -k gpu 2>&1 | tail -2 | tee $L/gate.txt
(for i in 0 1; do timeout 150 $M bench --suite smoke --results results/gpu --device cuda --shard $i/2 --quiet \
   > $L/smoke-$i.log 2>&1 & done; wait)
grep -h "failed:" $L/smoke-*.log | grep -v "reachable ratio" | tee -a $L/gate.txt
if grep -q "failed" $L/gate.txt || ! grep -q "passed" $L/gate.txt; then
  echo "GATE FAILED after $(( $(date +%s) - t0 )) s" | tee -a $L/gate.txt; pack; exit 1
fi
echo "gate passed after $(( $(date +%s) - t0 )) s" | tee -a $L/gate.txt

# 2. the suites until the budget
left=$(( BUDGET - ($(date +%s) - t0) - 20 ))
pids=()
for entry in $SUITES; do
  name=${entry%%:*}; shards=${entry##*:}
  for i in $(seq 0 $(( shards - 1 ))); do
    timeout $left $M bench --suite "$name" --results results/gpu --device cuda --shard $i/$shards --quiet \
      > $L/$name-$i.log 2>&1 &
    pids+=($!)
  done
done
( while sleep 30; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> $L/gpu-use.txt; done ) &
watcher=$!
wait "${pids[@]}"
kill $watcher 2>/dev/null
for f in $L/*.log; do echo "== $f: $(grep -c ' done in ' $f) items done"; grep "failed:" $f | head -5; done > $L/summary.txt
echo "elapsed $(( $(date +%s) - t0 )) s" >> $L/summary.txt
pack
