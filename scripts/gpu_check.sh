#!/usr/bin/env bash
# GPU validation in one go (under 8 minutes on one H200): the `gpu` test group (real 2:4
# kernels, compiled Triton kernels, the transposable baseline), then reduced bf16 benchmarks:
# kernels vs torch, layers, a training step with and without torch.compile, inference and
# peak memory. Everything is written under $OUT (default benchmarks/results/gpu); each part
# has its own timeout so one slow part cannot eat the others' time.
# Run from the repository root on a machine with a CUDA GPU: OUT=/some/dir scripts/gpu_check.sh
set -uo pipefail
OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export SLOPE_AUTOTUNE_FILE="$OUT/autotune.json"
BENCH="python -m slope_lightning.bench"
{
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  python -c "import triton; print('triton', triton.__version__)" || true
  date -u
} > "$OUT/machine.txt" 2>&1

part() {  # part NAME SECONDS COMMAND...: run one part, log it, record how it ended
  local name=$1 seconds=$2
  shift 2
  local start=$SECONDS
  timeout "$seconds" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/parts.txt"
  tail -25 "$OUT/$name.log"
}

part pytest-gpu 110 python -m pytest -m gpu -q -p no:cacheprovider tests
part kernels 30 $BENCH kernels --out "$OUT" --dtype bfloat16 --models llama-3-8b --tokens 8192
part layers 100 $BENCH layers --out "$OUT" --dtype bfloat16 --tokens 2048,8192 --repeats 10 \
  --models gpt2-small,gpt2-medium,opt-6.7b,opt-13b,llama-3-8b \
  --backends cusparselt,cusparselt+tiled,cutlass,cutlass+tiled,auto
part step 150 $BENCH step --out "$OUT" --preset llama-1b --batch 2 --dtype bfloat16 \
  --repeats 5 --backends auto --compile both
part inference 40 $BENCH inference --out "$OUT" --preset llama-1b --dtype bfloat16 \
  --repeats 5 --backends auto --prompt 2048
part memory 40 $BENCH memory --out "$OUT" --presets llama-1b --batch 2 --dtype bfloat16 \
  --backends auto
echo "done: $(date -u)" >> "$OUT/parts.txt"
