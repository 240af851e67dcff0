#!/usr/bin/env bash
# On a machine with a CUDA GPU: the serving-path invariant tests (the GPU ones included) and the request-latency
# benchmark on the GPU. Results go to $OUT (default ./gpu-out): gpu.txt, tests.log, latency_cuda.jsonl.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=src PYTHONUNBUFFERED=1
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
python3 -m pytest -q -p no:cacheprovider tests/test_models.py tests/test_serving_eval.py 2>&1 | tee "$OUT/tests.log" | tail -3
python3 benchmarks/latency.py --device cuda --json | tee "$OUT/latency_cuda.jsonl"
