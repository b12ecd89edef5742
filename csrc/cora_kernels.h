// Host-side interface of the CoRA CUDA kernels. Plain C++ plus the CUDA runtime: no torch
// headers, so the kernel files compile with plain nvcc and the torch glue (bindings.cpp)
// only sees these declarations.
//
// Conventions: every matrix is row-major with an explicit row stride in elements (the
// innermost dimension is contiguous); "batch" strides are in elements too. Launchers return
// the cudaError_t of the launch (cudaSuccess on success) and never synchronise.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace llmrec {

enum class DType : int { kHalf = 0, kBFloat16 = 1 };

// Which GEMM variant. All accumulate in fp32 on tensor cores (mma.sync m16n8k16).
//   kForwardNK:   C = alpha*(A B^T) + bias + S E_seg^T, A (M,K), B given as (N,K) [y = x W^T]
//   kForwardKN:   same, B given as (K,N)                              [dx = dy W + dS A_b^T]
//   kShrinkKN:    C(fp32) = alpha * A B, A (M,K), B given as (K,N)    [S = s x A_b, dS = s dy B]
//   kTransSplitKN C(fp32) = alpha * A^T B, A given as (K,M), B fp32 (K,N) split into hi+lo
//                 parts of the input dtype                            [dA = x^T dS, dB = dy^T S]
enum class GemmKind : int { kForwardNK = 0, kForwardKN = 1, kShrinkKN = 2, kTransSplitKN = 3 };

// Tile configuration for the kForward* kinds (the fp32-output kinds use a fixed narrow tile).
//   kLarge: 128x128x32, 8 warps, 3 stages (prefill)
//   kSmall: 64x32x64, 4 warps, 4 stages (decode: few rows, many blocks over N)
enum class GemmConfig : int { kLarge = 0, kSmall = 1 };

struct GemmArgs {
  int M = 0, N = 0, K = 0;
  int batch = 1;    // independent problems (grid z), each with its own A/B/C
  int splits = 1;   // split-K factor: C holds batch*splits partial results (fp32 kinds only)
  int k_chunk = 0;  // K per split (a multiple of the tile's BK when splits > 1)

  const void* a = nullptr;  // input dtype
  int64_t lda = 0, a_batch_stride = 0;
  const void* b = nullptr;  // input dtype, or float for kTransSplitKN
  int64_t ldb = 0, b_batch_stride = 0;
  void* c = nullptr;  // input dtype for kForward*, float otherwise
  int64_t ldc = 0, c_batch_stride = 0;  // c_batch_stride: between the batch*splits slices
  float alpha = 1.0f;

  // kForward* only: per-column bias (input dtype) and the low-rank term S E^T added to the
  // fp32 accumulator before the single store. S fp32 (M, rank); E (N, rank) in the input
  // dtype, one per segment of rows_per_sample consecutive rows (e_batch_stride = 0: shared).
  const void* bias = nullptr;
  const float* s = nullptr;
  int64_t lds = 0;
  const void* e = nullptr;
  int64_t lde = 0, e_batch_stride = 0;
  int rank = 0;
  int rows_per_sample = 1;
};

// Tile sizes the host needs for split-K planning.
int gemm_block_k(GemmKind kind, GemmConfig config);
int gemm_block_m(GemmKind kind, GemmConfig config);
int gemm_block_n(GemmKind kind, GemmConfig config);

cudaError_t launch_gemm(GemmKind kind, GemmConfig config, DType dtype, const GemmArgs& args,
                        cudaStream_t stream);

// Batched GEMV shrink for few tokens per sample (decode): for every sample b, token l < L,
// split p: out[p, b, l, :] = alpha * sum_{k in split p} x[b, l, k] * A_b[k, :], fp32.
// A_b = a + b * a_batch_stride (0: shared), rows of length `rank` with row stride lda.
struct ShrinkArgs {
  int batch = 0, L = 0, K = 0, rank = 0;
  int splits = 1, k_chunk = 0;
  const void* x = nullptr;
  int64_t x_batch_stride = 0, x_row_stride = 0;
  const void* a = nullptr;
  int64_t a_batch_stride = 0, lda = 0;
  float* out = nullptr;  // (splits, batch, L, rank) contiguous
  float alpha = 1.0f;
};

constexpr int kShrinkMaxTokens = 4;    // L <= this uses the GEMV shrink
constexpr int kShrinkMaxChunk = 1024;  // k_chunk limit (shared-memory staging of x)
constexpr int kMaxRank = 128;

cudaError_t launch_shrink_gemv(DType dtype, const ShrinkArgs& args, cudaStream_t stream);

// The SM architectures the kernels were compiled for (e.g. 800, 900), from nvcc's
// __CUDA_ARCH_LIST__; writes at most max_count and returns how many there are.
int compiled_archs(int* out, int max_count);

}  // namespace llmrec
