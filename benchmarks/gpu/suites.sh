#!/bin/bash
# The GPU suites in one go, on one machine with one NVIDIA GPU and 16 cores: a CUDA gate (the GPU test and the
# smoke suite, sharded), then the `long`, `synthetic4k` and `trained` suites, each sharded over processes that
# share results/gpu (`malloc bench --shard I/N`; a training run several shards need is trained once, under its
# lock). Every process gets one CPU thread; the whole call stops after BUDGET seconds (default 560), what is done
# stays done (the suites resume). Writes results/gpu and, with OUT set, $OUT/results.tgz and the logs.
#
#   BUDGET=560 OUT=/tmp/out bash benchmarks/gpu/suites.sh
#
# Needs: python3 with torch (CUDA), numpy, pyyaml, tqdm, matplotlib; RecBole's wheel in .whl/ for MovieLens-100K.
set -u
t0=$(date +%s)
BUDGET=${BUDGET:-560}
OUT=${OUT:-results/gpu-out}
mkdir -p "$OUT" results/gpu/logs
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
fi
export PYTHONPATH=$PWD/src:/tmp/site PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
M="python3 -m malloc"
L=results/gpu/logs
pack() { tar czf "$OUT/results.tgz" --exclude='last.pt' results/gpu; cp $L/*.txt "$OUT/" 2>/dev/null; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee $L/gpu.txt
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" | tee -a $L/gpu.txt

# 1. the gate: exactness on the GPU and every kind of suite item on CUDA, two shards at once
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_models.py -k gpu 2>&1 | tail -2 | tee $L/gate.txt
(for i in 0 1; do timeout 150 $M bench --suite smoke --results results/gpu --device cuda --shard $i/2 --quiet \
   > $L/smoke-$i.log 2>&1 & done; wait)
grep -h "failed:" $L/smoke-*.log | grep -v "reachable ratio" | tee -a $L/gate.txt
if grep -q "failed:\|failed\b" $L/gate.txt || ! grep -q "passed" $L/gate.txt; then
  echo "GATE FAILED after $(( $(date +%s) - t0 )) s" | tee -a $L/gate.txt; tail -30 $L/smoke-0.log > $L/smoke-tail.txt; pack; exit 1
fi
echo "gate passed after $(( $(date +%s) - t0 )) s" | tee -a $L/gate.txt

# 2. the suites, sharded, until the budget
left=$(( BUDGET - ($(date +%s) - t0) - 20 ))
run() {  # suite shards
  for i in $(seq 0 $(( $2 - 1 ))); do
    timeout $left $M bench --suite $1 --results results/gpu --device cuda --shard $i/$2 --quiet > $L/$1-$i.log 2>&1 &
  done
}
run long 4; run synthetic4k 6; run trained 5
( while sleep 30; do nvidia-smi --query-gpu=utilization.gpu,memory.used --format=csv,noheader >> $L/gpu-use.txt; done ) &
watcher=$!
wait $(jobs -p | grep -v "^$watcher$")
kill $watcher 2>/dev/null
for f in $L/*.log; do echo "== $f"; grep -c " done in " $f; grep "failed:\|FAILED\|Error" $f | head -5; done > $L/summary.txt
echo "elapsed $(( $(date +%s) - t0 )) s" >> $L/summary.txt
pack
