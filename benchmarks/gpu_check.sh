#!/usr/bin/env bash
# One command for a whole GPU check of llmrec-kernels, on a GPU machine where torch and triton
# are already installed and nothing else is:
#
#   bash benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]
#
# 1. records the machine (nvidia-smi, torch, triton, CUDA) in OUT_DIR/env.txt;
# 2. installs the project without touching torch or triton (pip --no-deps; the few test
#    dependencies that are missing come from $LLMREC_WHEELHOUSE when set, for a machine
#    without a package index, else from the index) and starts building the CUDA extension
#    for the GPU's own architecture in the background (OUT_DIR/extension-compile.log);
# 3. runs the GPU-marked Triton/patching tests meanwhile (OUT_DIR/gpu-tests.log, .xml; with
#    pytest-xdist when it is installed), then, once the extension imports, the CUDA-backend
#    tests (cuda-backend-tests.log, .xml);
# 4. writes the Triton dispatcher's choices and the cost model's predicted times for this
#    GPU and H100/H200/A100 (OUT_DIR/dispatch.txt): what step 5's shrink rows check;
# 5. runs the GPU benchmark report in bf16 (OUT_DIR/bench.json, bench.md, bench.png), with
#    the shrink alone (Triton split-K vs plain vs the dispatcher's choice) over the grid;
#    records are appended to bench.partial.jsonl as they are measured, so a run cut short
#    keeps what it timed;
# 6. writes the GPU's measured dispatch table from the benchmark's records
#    (OUT_DIR/dispatch_tables/<gpu>.json: auto's choices, to be committed under
#    llmrec_kernels/dispatch_tables/) and the cost model's prediction error against them
#    (OUT_DIR/cost-model-calibration.txt);
# 7. writes OUT_DIR/summary.md: what ran, what passed, how long each step took.
#
# Every step has its own time limit (LIMIT_INSTALL 120, LIMIT_TESTS 200, LIMIT_EXTENSION 300
# from its start, LIMIT_CUDA_TESTS 100, LIMIT_BENCH 240 seconds; each can be set in the
# environment), so the whole check ends in under 10 minutes on an H100-class GPU; a failing
# step is recorded and the next one still runs. The exit status is non-zero when any step
# failed. --dry-run does the same on a CPU-only machine with nothing
# installed or built: the tests are collected, not run, and the benchmark uses toy shapes on
# the CPU (CI runs this, tests/e2e/test_gpu_check.py).
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
OUT="${OUT:-benchmarks/results/gpu-check-$(date -u +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
PYTHON="${PYTHON:-python}"
export PYTHONUNBUFFERED=1
SUMMARY="$OUT/summary.md"
FAILED=0
START=$SECONDS

printf '# GPU check\n\n| step | status | seconds |\n| --- | --- | --- |\n' > "$SUMMARY"

# run_step NAME LIMIT_S COMMAND...: runs COMMAND under a time limit, logs to OUT/NAME.log.
run_step() {
  local name="$1" limit="$2"
  shift 2
  local t0=$SECONDS status
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
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

if ! "$PYTHON" -c "import torch" 2>/dev/null; then
  echo "gpu_check.sh: torch is not importable by $PYTHON; install your CUDA build of torch first" >&2
  exit 2
fi
if [ "$DRY_RUN" -eq 0 ] && ! "$PYTHON" -c "import torch, sys; sys.exit(not torch.cuda.is_available())"; then
  echo "gpu_check.sh: no CUDA device is visible to torch (use --dry-run on a CPU)" >&2
  exit 2
fi

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
  run_step gpu-tests 300 "$PYTHON" -m pytest -q -m gpu --collect-only -p no:cacheprovider tests
  run_step dispatch 60 "$PYTHON" -m benchmarks --dispatch --out "$OUT/dispatch.txt"
  run_step bench 300 "$PYTHON" -m benchmarks --tiny --device cpu --no-progress \
    --out "$OUT/bench.json" --plot "$OUT/bench.png" --markdown "$OUT/bench.md"
  run_step dispatch-table 60 "$PYTHON" -m benchmarks.dispatch_table "$OUT/bench.json" \
    --out "$OUT/dispatch_tables"
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
    while kill -0 "$EXT_PID" 2>/dev/null; do sleep 2; done
    tail -n 20 "$OUT/extension-compile.log"
    "$PYTHON" -c "import llmrec_kernels._C; print('llmrec_kernels._C imports')"
  }
  # timeout runs programs, not shell functions: export what the functions read.
  export -f install build_extension
  export OUT PYTHON ARCH CONSTRAINTS
  # pytest-xdist spreads Triton's compilations over the cores when it is installed.
  XDIST=()
  "$PYTHON" -c "import xdist" 2>/dev/null && XDIST=(-n "${GPU_CHECK_WORKERS:-8}")
  run_step install "${LIMIT_INSTALL:-120}" bash -c install
  EXT_START=$SECONDS
  timeout --kill-after=10 "${LIMIT_EXTENSION:-300}" bash -c build_extension \
    > "$OUT/extension-compile.log" 2>&1 &
  EXT_PID=$!
  run_step gpu-tests "${LIMIT_TESTS:-200}" "$PYTHON" -m pytest -q -m gpu -p no:cacheprovider \
    "${XDIST[@]}" --ignore tests/ops/test_cuda_backend.py tests --junitxml "$OUT/gpu-tests.xml"
  export EXT_PID
  export -f wait_for_extension
  EXT_LEFT=$(( ${LIMIT_EXTENSION:-300} - (SECONDS - EXT_START) + 15 ))
  run_step extension-build "$(( EXT_LEFT > 15 ? EXT_LEFT : 15 ))" bash -c wait_for_extension
  echo "| (extension build, from its start) | | $((SECONDS - EXT_START)) |" >> "$SUMMARY"
  run_step cuda-backend-tests "${LIMIT_CUDA_TESTS:-100}" "$PYTHON" -m pytest -q -m gpu \
    -p no:cacheprovider "${XDIST[@]}" tests/ops/test_cuda_backend.py \
    --junitxml "$OUT/cuda-backend-tests.xml"
  run_step dispatch 60 "$PYTHON" -m benchmarks --dispatch --out "$OUT/dispatch.txt"
  # Records are kept in bench.partial.jsonl as they are measured, so a cut-short run keeps
  # what it timed.
  run_step bench "${LIMIT_BENCH:-240}" "$PYTHON" -m benchmarks --device cuda --dtype bfloat16 \
    --no-progress --out "$OUT/bench.json" --plot "$OUT/bench.png" --markdown "$OUT/bench.md"
  # The measured dispatch table of this GPU (auto's choices; commit it under
  # llmrec_kernels/dispatch_tables/) and the cost model's error against this run.
  run_step dispatch-table 60 "$PYTHON" -m benchmarks.dispatch_table "$OUT/bench.json" \
    --out "$OUT/dispatch_tables"
  run_step cost-model 60 "$PYTHON" -m benchmarks.calibrate_cost_model "$OUT/bench.json" \
    --out "$OUT/cost-model-calibration.txt"
fi

{
  echo
  echo "Total: $((SECONDS - START)) s. Logs, tables and plots: $OUT."
  echo
  echo '```'
  cat "$OUT/env.txt"
  echo '```'
} >> "$SUMMARY"
cat "$SUMMARY"
exit "$FAILED"
