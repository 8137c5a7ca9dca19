#!/usr/bin/env bash
# GPU validation in one go (< 8 minutes on one H200): the `gpu` test group, the Triton kernels
# compiled for real, and a reduced layer benchmark, everything written under $OUT (default
# benchmarks/results/gpu). Run from the repository root on a machine with a CUDA GPU.
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export SLOPE_AUTOTUNE_FILE="$OUT/autotune.json"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  python -c "import triton; print('triton', triton.__version__)" || true
  date -u
} > "$OUT/machine.txt" 2>&1

timeout 300 python -m pytest -m gpu -q -p no:cacheprovider tests 2>&1 | tee "$OUT/pytest-gpu.txt" | tail -20

timeout 240 python -m slope_lightning.bench layers --out "$OUT" --dtype bfloat16 --tokens 8192 \
  --repeats 10 --backends reference,cusparselt,cutlass,auto \
  --shapes 4096x4096,14336x4096,4096x14336,768x768,3072x768 2>&1 | tail -30

timeout 150 python -m slope_lightning.bench step --out "$OUT" --preset llama-1b --batch 2 \
  --dtype bfloat16 --repeats 5 --backends auto 2>&1 | tail -8

timeout 90 python -m slope_lightning.bench inference --out "$OUT" --preset gpt2-small \
  --dtype bfloat16 --repeats 5 --backends auto 2>&1 | tail -8
