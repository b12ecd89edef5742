#!/usr/bin/env bash
# One command for the whole GPU check of llmrec-kernels (issue 25), on a GPU machine where
# torch and triton are already installed and nothing else is; it ends within 6 minutes:
#
#   bash benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]
#
# OUT_DIR (default benchmarks/results/gpu-check-<gpu>-<date>) gets everything, ready to be
# committed as it is:
#  1. env.txt: the machine (nvidia-smi, torch, triton, CUDA);
#  2. install: the project without touching torch or triton (pip --no-deps; missing test
#     dependencies from $LLMREC_WHEELHOUSE when set, else the index); the CUDA extension is
#     built for this GPU in the background meanwhile (extension-compile.log);
#  3. gpu-tests: every test marked gpu but the CUDA backend's (CUDA-graph capture and
#     reduce-overhead decode tests included; gpu-tests.log/.xml), then extension-build
#     (waits for the build) and cuda-backend-tests;
#  4. dispatch: the Triton dispatcher's choices and the cost model's predictions (dispatch.txt);
#  5. bench: the projection workloads of the issue's "Done when" list at bf16 r 16 d 4096
#     (python -m benchmarks --gpu-check: prefill 32x512 and 8x256, training fwd+bwd 8x256,
#     decode B 32, decode q/k/v, decoder layer fwd+bwd 8x256, the shrink) with every method
#     interleaved (base F.linear, torch path, Triton, CUDA ext, factored/naive PyTorch,
#     reference), graph-replay and host time apart, L2 flushed, bandwidth measured in the
#     run (bench.json, bench.md; records appended to bench.partial.jsonl as measured);
#  6. hopper: the Hopper mainloop against cuBLAS (hopper.json, hopper.log);
#  7. whole-model: a CoRA training step and scoring pass of a LLaMA-7B-shaped model (as many
#     of its 32 layers as fit, the count in the output): ours, the reference CoRA code's
#     way, the unpatched model (whole_model.json, whole_model.md);
#  8. dispatch-table and cost-model: the GPU's measured dispatch table
#     (dispatch_tables/<gpu>.json, for llmrec_kernels/dispatch_tables/) and the cost model's
#     prediction error (cost-model-calibration.txt);
#  9. summary.md: every step's status and seconds as it ends, then the table of the issue's
#     "Done when" ratios (target, measured, pass/fail; targets.json) and the whole model's.
#
# Every step has its own time limit (seconds; each can be set in the environment):
# LIMIT_INSTALL 30, LIMIT_TESTS 100, LIMIT_EXTENSION 110 (the background build, from its
# start; the tests run meanwhile), LIMIT_CUDA_TESTS 35, LIMIT_DISPATCH 10, LIMIT_BENCH 75,
# LIMIT_HOPPER 25, LIMIT_WHOLE 50, LIMIT_TABLE 5, LIMIT_COST 5, LIMIT_SUMMARY 5: at most
# 30 + (110 + 6) + 35 + 10 + 75 + 25 + 50 + 5 + 5 + 5 = 356 s in the foreground, and no step may
# run past GPU_CHECK_TOTAL (345 s) from the start. A failing, slow or skipped step is
# recorded and the next one still runs; the summary's tables are written whatever happened,
# from what was measured. The exit status is non-zero when any step failed.
# --dry-run does the same on a CPU-only machine with nothing installed or built: the tests
# are collected, not run, the benchmarks use toy shapes on the CPU and the Hopper step checks
# its arguments (CI runs this, tests/e2e/test_gpu_check.py, in a few minutes); its limits
# are wider (840 s in all), since it checks that each step works, not how fast.
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 2
DRY_RUN=0
OUT=""
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,30p' "${BASH_SOURCE[0]}"; exit 0 ;;
    -*) echo "gpu_check.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) OUT="$arg" ;;
  esac
done
PYTHON="${PYTHON:-python}"
if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "gpu_check.sh: torch is not importable by $PYTHON; install your CUDA build of torch first" >&2
  exit 2
fi
if [ "$DRY_RUN" -eq 0 ] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check.sh: no CUDA device is visible to torch (use --dry-run on a CPU)" >&2
  exit 2
fi

if [ -z "$OUT" ]; then
  # gpu-check-<gpu>-<date>, e.g. gpu-check-h100-2026-12-07: the folder to commit as it is
  GPU_TAG="$("$PYTHON" -c "import re, torch
n = torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'
m = re.search(r'\b([A-Z]+\d+[A-Z]*)\b', n.upper())
print((m.group(1) if m else n.split()[-1]).lower())" 2>/dev/null || echo gpu)"
  OUT="benchmarks/results/gpu-check-$GPU_TAG-$(date -u +%Y-%m-%d)"
fi
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.md"
FAILED=0
START=$SECONDS
# the dry run checks that every step works on a CPU (a shared one in CI), not its speed
if [ "$DRY_RUN" -eq 0 ]; then TOTAL="${GPU_CHECK_TOTAL:-345}"; else TOTAL="${GPU_CHECK_TOTAL:-840}"; fi

printf '# GPU check\n\n| step | status | seconds |\n| --- | --- | --- |\n' > "$SUMMARY"

# run_step NAME LIMIT_S COMMAND...: runs COMMAND under a time limit (cut to what is left of
# GPU_CHECK_TOTAL), logs to OUT/NAME.log and appends its row to the summary as soon as it ends.
run_step() {
  local name="$1" limit="$2"
  shift 2
  local t0=$SECONDS status left=$((TOTAL - (SECONDS - START)))
  if [ "$left" -lt 3 ]; then
    echo "| $name | skipped: the check's ${TOTAL}s were spent | 0 |" >> "$SUMMARY"
    FAILED=1
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  status=$?
  tail -n 5 "$OUT/$name.log"
  if [ "$status" -eq 0 ]; then
    echo "| $name | ok | $((SECONDS - t0)) |" >> "$SUMMARY"
  else
    [ "$status" -eq 124 ] && status="timed out after ${limit}s" || status="failed (exit $status)"
    echo "| $name | $status | $((SECONDS - t0)) |" >> "$SUMMARY"
    FAILED=1
  fi
}

{
  echo "date: $(date -u +%FT%TZ)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  echo "dry run: $DRY_RUN"
  "$PYTHON" - <<'EOF'
import platform
import torch
print("python:", platform.python_version())
print("torch:", torch.__version__, "| CUDA runtime:", torch.version.cuda)
try:
    import triton
    print("triton:", triton.__version__)
except ImportError:
    print("triton: not installed")
if torch.cuda.is_available():
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        print(f"gpu {i}: {p.name}, sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
              f"{p.total_memory / 2**30:.0f} GiB")
EOF
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,clocks.max.sm,power.limit --format=csv
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

if [ "$DRY_RUN" -eq 1 ]; then
  run_step install 60 "$PYTHON" -c "import llmrec_kernels, benchmarks; print('importable from', llmrec_kernels.__file__)"
  run_step gpu-tests 150 "$PYTHON" -m pytest -q -m gpu --collect-only -p no:cacheprovider tests
  run_step dispatch 60 "$PYTHON" -m benchmarks --dispatch --out "$OUT/dispatch.txt"
  run_step bench 240 "$PYTHON" -m benchmarks --gpu-check --tiny --device cpu --no-progress \
    --out "$OUT/bench.json" --plot "$OUT/bench.png" --markdown "$OUT/bench.md"
  run_step hopper 30 "$PYTHON" -m benchmarks.hopper_mainloop --dry-run --json "$OUT/hopper.json"
  run_step whole-model 200 "$PYTHON" -m benchmarks.whole_model --tiny \
    --json "$OUT/whole_model.json" --markdown "$OUT/whole_model.md"
  run_step dispatch-table 60 "$PYTHON" -m benchmarks.dispatch_table "$OUT/bench.json" \
    --out "$OUT/dispatch_tables"
  run_step cost-model 60 "$PYTHON" -m benchmarks.calibrate_cost_model "$OUT/bench.json" \
    --out "$OUT/cost-model-calibration.txt"
else
  ARCH="$("$PYTHON" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")"
  # The project and the test dependencies, never torch or triton: pip gets both pinned to
  # what is installed, so nothing can replace them.
  CONSTRAINTS="$OUT/constraints.txt"
  "$PYTHON" - > "$CONSTRAINTS" <<'EOF'
import importlib.metadata as md
for name in ("torch", "triton"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
EOF
  # The project goes in without its extension (seconds); the extension is built for this
  # GPU's architecture in the background while the Triton tests run, since neither needs the
  # other, and the CUDA-backend tests wait for it.
  install() {
    local pip=("$PYTHON" -m pip install -q -c "$CONSTRAINTS")
    if [ -n "${LLMREC_WHEELHOUSE:-}" ]; then
      pip+=(--no-index --find-links "$LLMREC_WHEELHOUSE")
    fi
    LLMREC_SKIP_CUDA_BUILD=1 "$PYTHON" -m pip install -q --no-deps --no-build-isolation -e . \
      || return 1
    local missing
    missing="$("$PYTHON" -c 'import importlib.util as u
need = {"pytest": "pytest", "numpy": "numpy", "transformers": "transformers",
        "safetensors": "safetensors", "rich": "rich", "matplotlib": "matplotlib"}
print(" ".join(p for m, p in need.items() if u.find_spec(m) is None))')"
    if [ -n "$missing" ]; then
      echo "installing the missing test dependencies: $missing"
      # shellcheck disable=SC2086
      "${pip[@]}" $missing
    fi
  }
  build_extension() {
    TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-16}" \
      "$PYTHON" setup.py -q build_ext --inplace
  }
  # A sibling process cannot be waited for: poll it, then judge the build by the import.
  wait_for_extension() {
    while kill -0 "$EXT_PID" 2>/dev/null; do sleep 1; done
    tail -n 20 "$OUT/extension-compile.log"
    "$PYTHON" -c "import llmrec_kernels._C; print('llmrec_kernels._C imports')"
  }
  # timeout runs programs, not shell functions: export what the functions read.
  export -f install build_extension
  export OUT PYTHON ARCH CONSTRAINTS
  # pytest-xdist spreads Triton's compilations over the cores when it is installed.
  XDIST=()
  "$PYTHON" -c "import xdist" 2>/dev/null && XDIST=(-n "${GPU_CHECK_WORKERS:-8}")
  run_step install "${LIMIT_INSTALL:-30}" bash -c install
  EXT_START=$SECONDS
  EXT_LIMIT="${LIMIT_EXTENSION:-110}"
  timeout --kill-after=5 "$EXT_LIMIT" bash -c build_extension \
    > "$OUT/extension-compile.log" 2>&1 &
  EXT_PID=$!
  run_step gpu-tests "${LIMIT_TESTS:-100}" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider \
    "${XDIST[@]}" --ignore tests/ops/test_cuda_backend.py tests --junitxml "$OUT/gpu-tests.xml"
  export EXT_PID
  export -f wait_for_extension
  EXT_LEFT=$(( EXT_LIMIT - (SECONDS - EXT_START) + 6 ))
  run_step extension-build "$(( EXT_LEFT > 6 ? EXT_LEFT : 6 ))" bash -c wait_for_extension
  echo "| (extension build, from its start) | | $((SECONDS - EXT_START)) |" >> "$SUMMARY"
  run_step cuda-backend-tests "${LIMIT_CUDA_TESTS:-35}" "$PYTHON" -m pytest -q -m gpu \
    -p no:cacheprovider "${XDIST[@]}" tests/ops/test_cuda_backend.py \
    --junitxml "$OUT/cuda-backend-tests.xml"
  run_step dispatch "${LIMIT_DISPATCH:-10}" "$PYTHON" -m benchmarks --dispatch \
    --out "$OUT/dispatch.txt"
  # Records are kept in bench.partial.jsonl as they are measured, so a cut-short run keeps
  # what it timed (the summary reads them).
  run_step bench "${LIMIT_BENCH:-75}" "$PYTHON" -m benchmarks --gpu-check --device cuda \
    --dtype bfloat16 --no-progress --out "$OUT/bench.json" --plot "$OUT/bench.png" \
    --markdown "$OUT/bench.md"
  # A bench step cut short leaves its records in bench.partial.jsonl only: the table writer
  # and the cost model read them from a bench.json made of them (meta.partial says so).
  if [ ! -f "$OUT/bench.json" ] && [ -s "$OUT/bench.partial.jsonl" ]; then
    "$PYTHON" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
records = [json.loads(s) for s in (out / "bench.partial.jsonl").read_text().splitlines() if s.strip()]
device = next((r["device"] for r in records if r.get("device")), "")
meta = {"device": device, "partial": True, "command": "python -m benchmarks --gpu-check (cut short)"}
(out / "bench.json").write_text(json.dumps({"meta": meta, "records": records}, indent=1))
print(f"bench.json made of {len(records)} records kept by the cut-short bench step")
EOF
  fi
  run_step hopper "${LIMIT_HOPPER:-25}" "$PYTHON" -m benchmarks.hopper_mainloop \
    --shapes 8x256,32x512 --d 4096 --rank 16 --dtype bf16 --rounds 3 --json "$OUT/hopper.json"
  run_step whole-model "${LIMIT_WHOLE:-50}" "$PYTHON" -m benchmarks.whole_model \
    --json "$OUT/whole_model.json" --markdown "$OUT/whole_model.md"
  # The measured dispatch table of this GPU (auto's choices; commit it under
  # llmrec_kernels/dispatch_tables/) and the cost model's error against this run.
  run_step dispatch-table "${LIMIT_TABLE:-5}" "$PYTHON" -m benchmarks.dispatch_table \
    "$OUT/bench.json" --out "$OUT/dispatch_tables"
  # the cost model's GPU nearest to this one (its table has A100, H100, H200)
  COST_GPU="$("$PYTHON" -c "import torch
from llmrec_kernels.triton import dispatch
name = torch.cuda.get_device_name().upper()
print(next((k for k in dispatch.GPUS if k in name), 'H100'))" 2>/dev/null || echo H100)"
  run_step cost-model "${LIMIT_COST:-5}" "$PYTHON" -m benchmarks.calibrate_cost_model \
    "$OUT/bench.json" --gpu "$COST_GPU" --out "$OUT/cost-model-calibration.txt"
fi

# The verdict table only reads what the steps wrote: it gets its few seconds even when the
# check's total is spent.
TOTAL=$((TOTAL + 15))
run_step targets "${LIMIT_SUMMARY:-5}" "$PYTHON" -m benchmarks.gpu_check_summary "$OUT" \
  --append "$SUMMARY.targets"

{
  echo
  echo "Total: $((SECONDS - START)) s. Logs, tables and plots: $OUT."
  echo
  echo '```'
  cat "$OUT/env.txt"
  echo '```'
} >> "$SUMMARY"
# the ratios after the steps' rows (the step table must stay one Markdown table)
if [ -f "$SUMMARY.targets" ]; then
  cat "$SUMMARY.targets" >> "$SUMMARY"
  rm -f "$SUMMARY.targets"
fi
cat "$SUMMARY"
exit "$FAILED"
