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
# The GPU image has torch, triton and lightning but no network: run from the source tree
# instead of installing (pip install -e . would try to fetch build dependencies).
export PYTHONPATH="$PWD/src:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
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
  timeout -k 5 "$seconds" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$OUT/parts.txt"
  tail -25 "$OUT/$name.log"
}

# Budget: 90+30+90+60+110+50+40 = 470 s. Each part writes its results only when it ends, so
# the compiled step runs apart from the eager one (a slow compile must not lose the eager rows).
part pytest-gpu 90 python -m pytest -m gpu -q -p no:cacheprovider \
  --continue-on-collection-errors tests
part kernels 30 $BENCH kernels --out "$OUT" --dtype bfloat16 --models llama-3-8b --tokens 8192
part layers 90 $BENCH layers --out "$OUT" --dtype bfloat16 --tokens 2048,8192 --repeats 5 \
  --models gpt2-small,opt-6.7b,llama-3-8b --backends cusparselt,cusparselt+tiled,cutlass,auto
part step 60 $BENCH step --out "$OUT" --preset llama-1b --batch 2 --dtype bfloat16 \
  --repeats 5 --backends auto --compile off
part step-compiled 110 $BENCH step --out "$OUT/compiled" --preset llama-1b --batch 2 \
  --dtype bfloat16 --repeats 5 --backends auto --compile on
part inference 50 $BENCH inference --out "$OUT" --preset llama-1b --dtype bfloat16 \
  --repeats 5 --backends auto --prompt 2048
part memory 40 $BENCH memory --out "$OUT" --presets llama-1b --batch 2 --dtype bfloat16 \
  --backends auto
echo "done: $(date -u)" >> "$OUT/parts.txt"
