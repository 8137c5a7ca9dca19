#!/usr/bin/env bash
# The device check: everything worth knowing from a GPU machine lent for minutes, in 7 minutes
# of wall time on one H200 from a cold start, brought home as ONE archive.
#
#   OUT=/some/dir scripts/gpu_check.sh      # run from the repository root, on the GPU machine
#   python -m slope_lightning.bench unpack /some/dir/gpu-check.tar.gz   # later, on any CPU
#
# Parts, ordered by value (if time runs out, what is lost is what matters least):
#   facts -> smoke (torch primitives alone) -> pytest -m gpu -> kernels -> layers -> step
#   -> inference -> memory -> compiled step (last: the slowest and the least certain).
#
# How results survive:
# - Every part runs under its own `timeout`, clamped to what is left of the 7 minutes.
# - Every suite writes its rows as it goes (bench/common.py ResultsTable), so a part that
#   times out keeps the rows it finished; its table says "incomplete".
# - Everything lives in a scratch directory; after EVERY part it is packed into
#   $OUT/gpu-check.tar.gz (atomically: a kill mid-pack leaves the previous archive), so even a
#   kill of the whole script leaves the parts that finished. $OUT holds only the archive and
#   summary.txt: a GPU machine returns few files.
# - No PNGs here (--no-plot): `unpack` draws them on CPU afterwards.
#
# Budgets (seconds; none measured yet, as no GPU has run this code: each is argued from the
# work the part does, and parts.tsv records every part's real time so the next run can
# re-budget). The fixed budgets sum to 20+60+80+25+50+45+35+35 = 350 s. Each part's limit is
# its budget clamped to what is left of WALL less RESERVE and the kill grace, so the script
# ends within 7 minutes whatever the parts do. The compiled step, last, gets what is left
# (up to 240 s): about 2 minutes when the earlier parts take their typical time, nothing in
# the worst case (every part running to its limit), when it is recorded as skipped.
set -uo pipefail
START=$SECONDS
WALL=${GPU_CHECK_WALL_S:-420}   # the whole script: 7 minutes
RESERVE=15                      # final pack + summary
GRACE=5                         # `timeout -k`: SIGKILL this long after SIGTERM
OUT=${OUT:-benchmarks/results/gpu-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
ARCHIVE="$OUT/gpu-check.tar.gz"
WORK=$(mktemp -d "${TMPDIR:-/tmp}/slope-gpu-check.XXXXXX")
mkdir -p "$WORK/logs"
export WORK
# auto keeps its measured decisions in memory for each benchmark process (no file outside
# the run is read or written).
# The GPU image has torch, triton and lightning but no network: run from the source tree
# instead of installing (pip install -e . would try to fetch build dependencies).
export PYTHONPATH="$PWD/src:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
BENCH="python -m slope_lightning.bench"
printf 'part\trc\tseconds\tbudget_s\tlimit_s\n' > "$WORK/parts.tsv"

pack() {  # the archive of everything so far, replaced atomically
  tar -czf "$ARCHIVE.tmp" -C "$WORK" . && mv -f "$ARCHIVE.tmp" "$ARCHIVE"
}

part() {  # part NAME BUDGET_S COMMAND...: run one part under its timeout, log it, pack
  local name=$1 budget=$2
  shift 2
  local left=$((WALL - RESERVE - GRACE - (SECONDS - START)))
  local limit=$((budget < left ? budget : left))
  if ((limit < 5)); then
    printf '%s\tskipped\t0\t%s\t0\n' "$name" "$budget" >> "$WORK/parts.tsv"
    echo "== $name skipped: no time left"
    return
  fi
  local begin=$SECONDS
  timeout -k "$GRACE" "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
  local rc=$?
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - begin))" "$budget" "$limit" \
    >> "$WORK/parts.tsv"
  echo "== $name rc=$rc $((SECONDS - begin))s (budget ${budget}s, limit ${limit}s)"
  tail -n 12 "$WORK/logs/$name.log"
  pack
}

machine_facts() {  # GPU, driver, torch, CUDA, cuSPARSELt, Triton -> machine.json / .txt
  nvidia-smi > "$WORK/machine.txt" 2>&1
  python - <<'PY'
import json, os, platform, subprocess
from datetime import datetime, timezone
facts = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
         "python": platform.python_version()}
query = "--query-gpu=name,driver_version,memory.total"
try:
    smi = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=15).stdout.splitlines()
    facts["gpu"], facts["driver"], facts["gpu_memory"] = (s.strip() for s in smi[0].split(","))
    facts["gpus"] = len(smi)
except Exception as error:
    facts["nvidia_smi"] = f"failed: {error}"
import torch
facts |= {"torch": torch.__version__, "cuda": torch.version.cuda,
          "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    facts["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability())
    facts.setdefault("gpu", torch.cuda.get_device_name())
sparselt = torch.backends.cusparselt
facts["cusparselt"] = sparselt.version() if sparselt.is_available() else None
try:
    import triton
    facts["triton"] = triton.__version__
except Exception as error:
    facts["triton"] = f"missing ({type(error).__name__})"
text = json.dumps(facts, indent=1)
open(os.path.join(os.environ["WORK"], "machine.json"), "w").write(text)
print(text)
PY
}
export -f machine_facts

# 20 s: nvidia-smi (~1 s) and one python that imports torch cold (~5 s) and initialises
# CUDA for the capability and cuSPARSELt queries (~3 s).
part facts 20 bash -c machine_facts
# 60 s: the reviewed smoke script states 30-60 s on an H200 (ten checks; the largest work is
# the 14336x4096x8192 latency shapes and a 4096x14336 layer's step). It writes smoke.json
# after each check.
part smoke 60 python scripts/gpu_smoke.py --out "$WORK"
# 80 s: collecting the suite imports Lightning (~10 s); the gpu group is ~90 small tests,
# most of them Triton kernels compiled cold (~1 s per distinct signature, ~40 of them).
part pytest-gpu 80 python -m pytest -m gpu -q -p no:cacheprovider \
  --continue-on-collection-errors --junitxml="$WORK/pytest-gpu.xml" tests
# 25 s: 4 llama-3-8b shapes x 4 kernel steps, torch vs Triton at 8192 tokens; the kernels
# are already compiled by the part before (Triton's cache), each timing is milliseconds.
part kernels 25 $BENCH kernels --out "$WORK" --no-plot --dtype bfloat16 --models llama-3-8b \
  --tokens 8192
# 50 s: 4 shapes x 2 backends; per (shape, backend): compression, cuSPARSELt's algorithm
# search (dozens of GEMMs) and auto's measurement of every candidate, ~2-4 s; 4096x4096 first.
part layers 50 $BENCH layers --out "$WORK" --no-plot --dtype bfloat16 --tokens 8192 \
  --repeats 5 --models llama-3-8b --backends cusparselt,auto
# 45 s: three llama-1b models (1.2B parameters) built and pruned on the GPU (~3-5 s each),
# auto's per-shape decisions (~7 shapes, ~2 s each, once), 2 warm-up + 5 timed steps of
# ~4k tokens (~0.1 s each).
part step 45 $BENCH step --out "$WORK" --no-plot --preset llama-1b --batch 2 --dtype bfloat16 \
  --repeats 5 --backends auto --compile off
# 35 s: four llama-1b models (dense + merged SLoPe at 3 ranks, ~4 s each to build), a
# 2048-token prefill x 3 and 16 greedy tokens x 1 each.
part inference 35 $BENCH inference --out "$WORK" --no-plot --preset llama-1b --dtype bfloat16 \
  --repeats 3 --backends auto --prompt 2048 --new-tokens 16
# 35 s: exact model-state counts (three LLaMA-7B layers, llama-1b in fp32 with AdamW: ~20 GB,
# seconds on an H200), then six allocator peaks of llama-1b (3 methods x train/infer).
part memory 35 $BENCH memory --out "$WORK" --no-plot --presets llama-1b --batch 2 \
  --dtype bfloat16 --backends auto
# The rest (<= 240 s): torch.compile of three llama-1b models cold; dense compiles in ~40-60
# s, SLoPe breaks the graph at every sparse layer. Rows are written as each model finishes,
# so dense (first) is likely kept even if the others run out of time.
part step-compiled 240 $BENCH step --out "$WORK" --no-plot --preset llama-1b --batch 2 \
  --dtype bfloat16 --repeats 5 --backends auto --compile on

# Leftover device time? A second call runs these (the fuller versions of the parts above),
# with OUT set to another directory and each under its own `timeout`.
cat > "$WORK/second-call.txt" <<'SECOND_CALL'
python -m slope_lightning.bench layers --no-plot --dtype bfloat16 --tokens 2048,8192 --repeats 5 --models gpt2-small,opt-6.7b,llama-3-8b --backends cusparselt,cusparselt_tiled,cutlass,auto
python -m slope_lightning.bench step --no-plot --preset gpt2-small --batch 8 --dtype bfloat16 --repeats 5 --backends cusparselt --compile both
python -m slope_lightning.bench inference --no-plot --preset llama-1b --dtype bfloat16 --repeats 5 --backends cusparselt --prompt 2048 --new-tokens 128
python -m slope_lightning.bench memory --no-plot --presets gpt2-small,llama-1b --batch 4 --dtype bfloat16 --backends cusparselt
SECOND_CALL

{
  echo "slope-lightning device check, finished $(date -u '+%Y-%m-%d %H:%M UTC') in $((SECONDS - START)) s"
  echo "archive: $ARCHIVE"
  echo "unpack on a CPU: python -m slope_lightning.bench unpack $(basename "$ARCHIVE")"
  echo
  echo "machine:"
  sed 's/^/  /' "$WORK/machine.json" 2>/dev/null || echo "  (no machine.json)"
  echo
  echo "parts (rc 124/137: timed out; its table keeps the rows it finished):"
  { column -t -s $'\t' "$WORK/parts.tsv" 2>/dev/null || cat "$WORK/parts.tsv"; } | sed 's/^/  /'
  echo
  echo "smoke checks:"
  grep -h '^CHECK' "$WORK/logs/smoke.log" 2>/dev/null | cut -c1-160 | sed 's/^/  /'
  echo
  echo "pytest -m gpu:"
  tail -n 1 "$WORK/logs/pytest-gpu.log" 2>/dev/null | sed 's/^/  /'
  echo
  echo "second call, for leftover device time (also in second-call.txt):"
  sed 's/^/  /' "$WORK/second-call.txt"
} > "$WORK/summary.txt" 2>&1
cp "$WORK/summary.txt" "$OUT/summary.txt"
pack
cat "$OUT/summary.txt"
rm -rf "$WORK"
