#!/usr/bin/env bash
# The device check: what is worth knowing from a GPU lent for 15 minutes (machine start
# included), in TWO calls ordered by value, each bringing home its own archive.
#
#   OUT=/some/dir scripts/gpu_check.sh            # call 1 (<= 300 s): the measurements that matter
#   OUT=/some/dir scripts/gpu_check.sh --call 2   # call 2 (<= 270 s, optional): memory, decode, compile
#   OUT=/some/dir scripts/gpu_check.sh --dry-run  # both calls on this CPU: emulated backend, tiny shapes
#   scripts/gpu_check.sh --list [--call N] [--dry-run]   # the parts, budgets and commands; runs nothing
#   python -m slope_lightning.bench unpack /some/dir/gpu-check-call1.tar.gz   # later, on any CPU
#
# Call 1, in order of value: facts (environment: python, torch, CUDA, cuSPARSELt, triton,
#   pytest, C compiler, Python.h) -> smoke (torch's primitives alone, then the project on them;
#   needs no pytest) -> the `gpu` tests, one pytest per file -> layers (LLaMA-3-8B widths
#   4096-14336, fwd+bwd+update then forward) -> the training step of a model at those widths
#   in bf16-mixed, SLoPe against dense and against the transposable baseline.
# Call 2: facts -> memory (bf16-mixed training and inference peaks) -> inference (prefill and
#   KV-cache decode) -> the compiled step (last: the slowest and least certain).
#
# How results survive:
# - Every part runs under its own `timeout`, clamped to what is left of the call's WALL.
# - Every benchmark writes its rows as it goes (ResultsTable), so a part that times out keeps
#   the rows it finished; its table says "incomplete". Each pytest file writes its own junit
#   XML and, with -v -rA, its log line by line: a killed file loses only itself.
# - After EVERY part the scratch directory is packed into $OUT/gpu-check-call<N>.tar.gz
#   (atomically), so a kill of the whole script keeps every part that finished. $OUT holds
#   only the archives and summary.txt: a GPU machine returns few files.
#
# Budgets (seconds; none measured on a GPU yet: each is argued from the work the part does,
# sized for an H100, whose HBM3 (3.35 TB/s) is slower than the H200's HBM3e (4.8 TB/s); an
# H200 runs each part in at most the same time). parts.tsv records every part's real time so
# the next run can re-budget. Budgets + RESERVE + GRACE <= WALL for each call (checked by
# tests/test_gpu_check.py through --list):
#   call 1: 15+50+15+20+15+15+45+45+60 = 280, + 10 + 5 = 295 <= 300
#   call 2: 15+60+50+120 = 245, + 10 + 5 = 260 <= 270
# Machine start (~1-3 min) + call 1 + call 2 fit 15 minutes of device time; call 2 is the one
# to drop when the start was slow.
set -uo pipefail

CALLS=""
DRY=0
LIST=0
while (($#)); do
  case $1 in
    --call) CALLS=$2; shift 2 ;;
    --dry-run) DRY=1; shift ;;
    --list) LIST=1; shift ;;
    *) echo "gpu_check.sh: unknown argument '$1'; use --call 1|2, --dry-run, --list" >&2; exit 2 ;;
  esac
done
if [[ -z $CALLS ]]; then CALLS=$([[ $DRY == 1 ]] && echo "1 2" || echo "1"); fi
for call in $CALLS; do
  [[ $call == 1 || $call == 2 ]] || { echo "gpu_check.sh: --call $call: choose 1 or 2" >&2; exit 2; }
done

RESERVE=10   # final pack + summary
GRACE=5      # `timeout -k`: SIGKILL this long after SIGTERM
# The dry run runs on a shared CPU, where importing Lightning alone takes ~15 s: its limits
# are the device budgets times SCALE (it checks that every part runs and writes its files;
# the budgets themselves are checked by --list).
SCALE=$([[ $DRY == 1 ]] && echo "${GPU_CHECK_DRY_SCALE:-4}" || echo 1)
# The GPU image has torch, triton and lightning but no network: run from the source tree
# instead of installing (pip install -e . would try to fetch build dependencies).
export PYTHONPATH="$PWD/src:$PWD/kernels${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1   # logs line by line: a killed part keeps what it printed
BENCH="python -m slope_lightning.bench"

if [[ $DRY == 1 ]]; then  # the same parts on this CPU: emulated 2:4 ops, tiny shapes
  SMOKE_ARGS=(--dry-run)
  LAYER_ARGS=(--shapes 64x64,128x64,64x128 --tokens 64 --dtype float32 --repeats 1
              --backends emulated,emulated_tiled,auto --phases fwd+bwd+update,forward)
  STEP_ARGS=(--preset micro --batch 1 --precision bf16-mixed --repeats 1 --backends emulated)
  MEMORY_ARGS=(--presets micro --batch 1 --precision bf16-mixed --backends emulated)
  INFER_ARGS=(--preset micro --dtype float32 --repeats 1 --backends emulated --prompt 32
              --new-tokens 4)
  COMPILE_ARGS=(--compile-backend eager)   # Dynamo's graphs and breaks, no code generation
else
  SMOKE_ARGS=()
  # 3 shapes x 2 backends at 8192 tokens; per (shape, backend): compression, cuSPARSELt's
  # algorithm search, auto's measurement of every candidate (and its Triton kernels).
  LAYER_ARGS=(--shapes 4096x4096,14336x4096,4096x14336 --tokens 8192 --dtype bfloat16
              --repeats 5 --backends cusparselt,auto --phases fwd+bwd+update,forward)
  # llama-8b-4l: LLaMA-3-8B widths in 4 layers (~1.0B parameters; fp32 master values and
  # AdamW state ~16 GB), 2048 tokens per step.
  STEP_ARGS=(--preset llama-8b-4l --batch 1 --precision bf16-mixed --repeats 5 --backends auto)
  MEMORY_ARGS=(--presets llama-8b-4l --batch 1 --precision bf16-mixed --backends auto)
  # prompt 1024 + 16 new tokens < seq_len 2048: the decode times the KV-cache path.
  INFER_ARGS=(--preset llama-8b-4l --dtype bfloat16 --repeats 3 --backends auto --prompt 1024
              --new-tokens 16)
  COMPILE_ARGS=(--compile-backend inductor)
fi
GPU_TEST_FILES=(test_gpu_step test_gpu_backends test_transposable test_kernel_ops test_kernels)

machine_facts() {  # python, GPU, driver, torch, CUDA, cuSPARSELt, Triton, pytest, compiler
  nvidia-smi > "$WORK/machine.txt" 2>&1 || echo "nvidia-smi: not available" >> "$WORK/machine.txt"
  python - <<'PY'
import json, os, platform, shutil, subprocess, sysconfig
from datetime import datetime, timezone
from importlib import util
facts = {"date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
         "call": int(os.environ["CALL"]), "dry_run": os.environ["DRY"] == "1",
         "python": platform.python_version()}
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                          "--format=csv,noheader"], capture_output=True, text=True,
                         timeout=15).stdout.splitlines()
    facts["gpu"], facts["driver"], facts["gpu_memory"] = (s.strip() for s in smi[0].split(","))
    facts["gpus"] = len(smi)
except Exception as error:
    facts["nvidia_smi"] = f"failed: {type(error).__name__}: {error}"
compiler = next((shutil.which(c) for c in ("cc", "gcc", "clang") if shutil.which(c)), None)
python_h = os.path.join(sysconfig.get_paths()["include"], "Python.h")
facts |= {"pytest": util.find_spec("pytest") is not None, "c_compiler": compiler,
          "python_h": os.path.exists(python_h)}
import torch
facts |= {"torch": torch.__version__, "cuda": torch.version.cuda,
          "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    facts["capability"] = "sm_{}{}".format(*torch.cuda.get_device_capability())
    facts.setdefault("gpu", torch.cuda.get_device_name())
sparselt = torch.backends.cusparselt
facts["cusparselt"] = sparselt.version() if sparselt.is_available() else None
facts["cusparselt_mm_search"] = hasattr(getattr(torch._C, "_cusparselt", None), "mm_search")
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

pack() {  # the call's archive of everything so far, replaced atomically
  tar -czf "$ARCHIVE.tmp" -C "$WORK" . && mv -f "$ARCHIVE.tmp" "$ARCHIVE"
}

record() {  # record NAME RC SECONDS BUDGET LIMIT NOTE
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >> "$WORK/parts.tsv"
}

skip() {  # skip NAME BUDGET REASON: a part that cannot run here, recorded with why
  BUDGETS=$((BUDGETS + $2))
  if [[ $LIST == 1 ]]; then printf '%s\t%s\tskip: %s\n' "$1" "$2" "$3"; return; fi
  record "$1" skipped 0 "$2" 0 "$3"
  echo "== $1 skipped: $3"
}

part() {  # part NAME BUDGET_S COMMAND...: run one part under its timeout, log it, pack
  local name=$1 budget=$2
  shift 2
  BUDGETS=$((BUDGETS + budget))
  if [[ $LIST == 1 ]]; then printf '%s\t%s\t%s\n' "$name" "$budget" "$*"; return; fi
  local left=$((WALL * SCALE - RESERVE - GRACE - (SECONDS - START)))
  local want=$((budget * SCALE))
  local limit=$((want < left ? want : left))
  if ((limit < 5)); then
    record "$name" skipped 0 "$budget" 0 "no time left"
    echo "== $name skipped: no time left"
    return
  fi
  local begin=$SECONDS
  timeout -k "$GRACE" "$limit" "$@" > "$WORK/logs/$name.log" 2>&1
  local rc=$?
  record "$name" "$rc" "$((SECONDS - begin))" "$budget" "$limit" ""
  echo "== $name rc=$rc $((SECONDS - begin))s (budget ${budget}s, limit ${limit}s)"
  tail -n 8 "$WORK/logs/$name.log"
  pack
}

fact() {  # fact KEY: a value of machine.json (empty when missing)
  python -c "import json,sys; print(json.load(open(sys.argv[1])).get(sys.argv[2]) or '')" \
    "$WORK/machine.json" "$1" 2>/dev/null
}

call_1() {
  # 15 s: nvidia-smi (~1 s), one python importing torch cold (~5 s), CUDA init (~3 s).
  part facts 15 bash -c machine_facts
  # 50 s: eleven checks; the largest work is four latency shapes up to 14336x4096x8192
  # and one 4096->14336 layer's step (Triton and cuSPARSELt searches cold).
  part smoke 50 python scripts/gpu_smoke.py --out "$WORK" "${SMOKE_ARGS[@]}"
  # One pytest per file, each with its own junit XML and timeout (imports ~5 s each on the
  # device), in order of value; test_kernels compiles ~60 Triton kernels cold (~0.5-1 s each).
  local budgets=(15 20 15 15 45) i=0
  for file in "${GPU_TEST_FILES[@]}"; do
    local name="pytest-${file#test_}" budget=${budgets[i]}
    name=${name//_/-}
    i=$((i + 1))
    if [[ $LIST == 0 && $(fact pytest) != True ]]; then
      skip "$name" "$budget" "pytest is not installed (the smoke part ran the no-pytest GPU checks)"
      continue
    fi
    part "$name" "$budget" python -m pytest -m gpu -v -rA -p no:cacheprovider \
      --junitxml="$WORK/pytest/$file.xml" "tests/$file.py"
  done
  # 45 s: 3 shapes x 2 backends (+ dense) x 2 phases, 5 repeats of milliseconds each; per
  # (shape, backend) a compression, an algorithm search and auto's measurements (~2-5 s).
  part layers 45 $BENCH layers --out "$WORK" --no-plot "${LAYER_ARGS[@]}"
  # 60 s: three ~1.0B-parameter models built and pruned on the GPU (~3 s each), auto's
  # decisions for 4 shapes (~3 s each, once), 2 warm-up + 5 timed steps (~0.1 s each).
  part step 60 $BENCH step --out "$WORK" --no-plot "${STEP_ARGS[@]}" --compile off
}

call_2() {
  part facts 15 bash -c machine_facts
  # 60 s: layer and model state counts (LLaMA-7B layers), then 6 allocator peaks of
  # llama-8b-4l (3 methods x training/inference), one model build each (~3-5 s).
  part memory 60 $BENCH memory --out "$WORK" --no-plot "${MEMORY_ARGS[@]}"
  # 50 s: four models (dense + merged SLoPe at 3 ranks), 3 prefills of 1024 tokens and one
  # 16-token decode each, auto deciding again for 1-token GEMMs.
  part inference 50 $BENCH inference --out "$WORK" --no-plot "${INFER_ARGS[@]}"
  # 120 s: torch.compile of three models cold; dense compiles in ~40-60 s, SLoPe breaks the
  # graph at every sparse layer. Rows are written as each model finishes.
  if [[ $LIST == 0 && $DRY == 0 && ( -z $(fact c_compiler) || $(fact python_h) != True ) ]]; then
    skip step-compiled 120 "no C compiler or Python.h: inductor cannot build its kernels"
  else
    part step-compiled 120 $BENCH step --out "$WORK" --no-plot "${STEP_ARGS[@]}" --compile on \
      "${COMPILE_ARGS[@]}"
  fi
}

summary() {  # the call's summary.txt, inside the archive and appended to $OUT/summary.txt
  {
    echo "slope-lightning device check, call $CALL$([[ $DRY == 1 ]] && echo " (DRY RUN on CPU)"), finished $(date -u '+%Y-%m-%d %H:%M UTC') in $((SECONDS - START)) s"
    echo "archive: $(basename "$ARCHIVE")   unpack on a CPU: python -m slope_lightning.bench unpack $(basename "$ARCHIVE")"
    echo "budgets: parts $BUDGETS s + reserve $RESERVE s + grace $GRACE s = $((BUDGETS + RESERVE + GRACE)) s <= wall $WALL s (x$SCALE in a dry run); sized for an H100, an H200 is at least as fast"
    echo "cuSPARSELt: $(fact cusparselt || true)${DRY:+}$([[ -z $(fact cusparselt) ]] && echo "none (no CUDA)") on $(fact gpu) $(fact capability)"
    echo "  (0.8.0, version 800, has a Hopper slowdown on CUDA 13 that 0.8.1 fixes, pytorch/pytorch#177456: say which ran)"
    echo
    echo "machine:"
    sed 's/^/  /' "$WORK/machine.json" 2>/dev/null || echo "  (no machine.json)"
    echo
    echo "parts (rc 124/137: timed out; its table keeps the rows it finished):"
    { column -t -s $'\t' "$WORK/parts.tsv" 2>/dev/null || cat "$WORK/parts.tsv"; } | sed 's/^/  /'
    echo
    if [[ -f $WORK/smoke.json ]]; then
      echo "smoke checks:"
      grep -h '^CHECK' "$WORK/logs/smoke.log" 2>/dev/null | cut -c1-160 | sed 's/^/  /'
      echo
    fi
    for log in "$WORK"/logs/pytest-*.log; do
      [[ -f $log ]] || continue
      echo "$(basename "$log" .log): $(tail -n 1 "$log")"
    done
    echo
  } > "$WORK/summary.txt" 2>&1
  cat "$WORK/summary.txt" >> "$OUT/summary.txt"
}

OUT=${OUT:-benchmarks/results/gpu-check}
if [[ $LIST == 0 ]]; then
  mkdir -p "$OUT"
  OUT=$(cd "$OUT" && pwd)
  : > "$OUT/summary.txt"
fi
for CALL in $CALLS; do
  export CALL DRY
  WALL=$([[ $CALL == 1 ]] && echo 300 || echo 270)
  WALL=${GPU_CHECK_WALL_S:-$WALL}
  START=$SECONDS
  BUDGETS=0
  if [[ $LIST == 1 ]]; then
    WORK='$WORK'  # printed as is
    echo "# call $CALL: wall $WALL s, reserve $RESERVE s, grace $GRACE s"
    "call_$CALL"
    echo "# call $CALL: budgets $BUDGETS s"
    continue
  fi
  ARCHIVE="$OUT/gpu-check-call$CALL.tar.gz"
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/slope-gpu-check.XXXXXX")
  export WORK
  mkdir -p "$WORK/logs" "$WORK/pytest"
  printf 'part\trc\tseconds\tbudget_s\tlimit_s\tnote\n' > "$WORK/parts.tsv"
  "call_$CALL"
  summary
  pack
  rm -rf "$WORK"
done
[[ $LIST == 1 ]] || cat "$OUT/summary.txt"
