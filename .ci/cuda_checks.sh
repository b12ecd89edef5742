#!/usr/bin/env bash
# CUDA checks that need no GPU (README, "CUDA extension"):
#   1. every csrc/*.cu compiles with nvcc for sm_80 and sm_90 (-Xptxas -v), with no warning
#      and no register spill; the same sources run on the CPU under csrc/host_emu against a
#      float64 reference;
#   2. the full extension builds against the CUDA 13.0 build of torch 2.14.1, in a separate
#      virtual environment (cached), imports without a GPU and registers its ops with the
#      expected schemas;
#   3. the torch glue plus the kernels, built for the CPU over csrc/host_emu, pass the same
#      forward/backward comparisons and torch.library.opcheck as on a GPU.
# Both are tests in tests/ops/test_cuda_backend.py, run here with the CUDA torch; its GPU tests
# are skipped on a machine without a GPU. Exits non-zero on any failure.
#
# Environment (all optional):
#   LLMREC_CUDA_VENV        the virtual environment (default ~/.cache/llmrec-cuda-venv; reused)
#   LLMREC_CUDA_TORCH       the torch requirement (default torch==2.14.1)
#   LLMREC_CUDA_CI_DIR      build cache: source copy + ninja objects (default ~/.cache/llmrec-cuda-ci)
#   TORCH_CUDA_ARCH_LIST    archs of the extension build (default "8.0;9.0")
#   CUDA_HOME               the CUDA toolkit (default: /usr/local/cuda, newest /usr/local/cuda-*, nvcc on PATH)
#   MAX_JOBS                parallel compile jobs (default 2)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${LLMREC_CUDA_VENV:-$HOME/.cache/llmrec-cuda-venv}"
TORCH_REQ="${LLMREC_CUDA_TORCH:-torch==2.14.1}"
CI_DIR="${LLMREC_CUDA_CI_DIR:-$HOME/.cache/llmrec-cuda-ci}"
export MAX_JOBS="${MAX_JOBS:-2}"
export TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-8.0;9.0}"
PYTHON="${PYTHON:-python3}"

log() { printf '\n== %s (%ss)\n' "$*" "$SECONDS"; }

# --- CUDA toolkit ------------------------------------------------------------------------
# /usr/local/bin/nvcc may be a wrapper script, so a toolkit root is only accepted when it
# has both bin/nvcc and include/cuda_runtime.h.
find_cuda_home() {
  local cand
  local nvcc_path
  nvcc_path="$(command -v nvcc || true)"
  for cand in "${CUDA_HOME:-}" /usr/local/cuda $(ls -d /usr/local/cuda-* 2>/dev/null | sort -rV) \
              "${nvcc_path:+$(dirname "$(dirname "$(readlink -f "$nvcc_path")")")}"; do
    if [[ -n "$cand" && -x "$cand/bin/nvcc" && -f "$cand/include/cuda_runtime.h" ]]; then
      echo "$cand"
      return 0
    fi
  done
  return 1
}
log "CUDA toolkit"
if ! CUDA_HOME="$(find_cuda_home)"; then
  echo "no CUDA toolkit found (set CUDA_HOME)" >&2
  exit 1
fi
export CUDA_HOME
export PATH="$CUDA_HOME/bin:$PATH"
echo "CUDA_HOME=$CUDA_HOME"
nvcc --version | tail -n 2

# --- virtual environment with the CUDA build of torch -------------------------------------
log "virtual environment $VENV"
if ! "$VENV/bin/python" -c "import torch, pybind11, ninja, pytest; assert torch.version.cuda" \
    >/dev/null 2>&1; then
  rm -rf "$VENV"
  mkdir -p "$(dirname "$VENV")"
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    "$TORCH_REQ" pybind11 ninja pytest numpy
fi
"$VENV/bin/python" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda)"

# --- build the extension in a copy of the tree (never in the checkout) --------------------
log "build llmrec_kernels._C for TORCH_CUDA_ARCH_LIST=$TORCH_CUDA_ARCH_LIST"
SRC="$CI_DIR/src"
rm -rf "$SRC"
mkdir -p "$SRC" "$CI_DIR/build-temp"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  (cd "$ROOT" && git ls-files -z -co --exclude-standard | xargs -0 cp -p --parents -t "$SRC")
else
  (cd "$ROOT" && tar --exclude=./.venv --exclude=./build --exclude=./.git -cf - .) | tar -xf - -C "$SRC"
fi
rm -f "$SRC"/llmrec_kernels/_C*.so
(cd "$SRC" && "$VENV/bin/python" setup.py build_ext --inplace --build-temp "$CI_DIR/build-temp" \
  2>&1 | { grep -vE "^(copying|creating|running)" || true; } )
ls "$SRC"/llmrec_kernels/_C*.so >/dev/null

# --- the checks ---------------------------------------------------------------------------
log "tests/ops/test_cuda_backend.py (compile checks, host emulation, extension import and schemas)"
expect_archs="$(echo "$TORCH_CUDA_ARCH_LIST" | tr ';' '\n' | sed -E 's/[^0-9.]//g; s/\.//' \
  | awk 'NF {printf "%s%s0", sep, $0; sep=","}')"
(cd "$SRC" && LLMREC_REQUIRE_NVCC=1 LLMREC_REQUIRE_CUDA_EXT=1 LLMREC_CUDA_JIT=0 \
  LLMREC_SKIP_CUDA_CHECKS=0 LLMREC_EXPECT_CUDA_ARCHS="$expect_archs" \
  LLMREC_EMU_BUILD_DIR="$CI_DIR/emu-build" \
  "$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider tests/ops/test_cuda_backend.py)
log "CUDA checks passed"
