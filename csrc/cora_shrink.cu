// Batched-GEMV shrink for decode (Punica BGMV style): S_b = alpha * x_b A_b for a few tokens
// per sample, each sample with its own A_b (d_in x rank). Memory bound on A: every element
// of A_b is read once, in 16-byte vectors when possible, and used for all L <= 4 tokens of
// its sample; fp32 accumulation. K is split across blocks so that small batches still fill
// the GPU; each split writes its own fp32 partial (no atomics: deterministic), and the host
// sums the splits.
#include "cora_common.cuh"
#include "cora_kernels.h"

namespace llmrec {

constexpr int kShrinkThreads = 256;

constexpr size_t shrink_smem_bytes(int vec) {
  return sizeof(float) * (static_cast<size_t>(kShrinkMaxTokens) * kShrinkMaxChunk +
                          static_cast<size_t>(kShrinkThreads) * vec);
}
static_assert(shrink_smem_bytes(8) <= 48 * 1024, "the GEMV shrink must fit the default 48 KiB");

template <typename T, int VEC>
__device__ __forceinline__ void shrink_load_vec(float (&v)[VEC], const T* src) {
  if constexpr (VEC == 8) {
    const uint4 q = *reinterpret_cast<const uint4*>(src);
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = element_of<T>(q, i);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = to_float(src[i]);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kShrinkThreads) shrink_gemv_kernel(const ShrinkArgs p) {
  constexpr int LMAX = kShrinkMaxTokens;
  // Dynamic shared memory: x of this split as fp32 [LMAX][kShrinkMaxChunk], then the
  // reduction buffer [kShrinkThreads * VEC].
  extern __shared__ uint4 smem_raw[];
  float(*xs)[kShrinkMaxChunk] = reinterpret_cast<float(*)[kShrinkMaxChunk]>(smem_raw);
  float* red = reinterpret_cast<float*>(smem_raw) + LMAX * kShrinkMaxChunk;

  const int tid = threadIdx.x;
  const int b = blockIdx.y, split = blockIdx.x;
  const int k0 = split * p.k_chunk, k1 = min(p.K, k0 + p.k_chunk);
  const int kc = max(k1 - k0, 0);
  const T* x = static_cast<const T*>(p.x) + static_cast<int64_t>(b) * p.x_batch_stride;
  const T* a = static_cast<const T*>(p.a) + static_cast<int64_t>(b) * p.a_batch_stride;

  for (int i = tid; i < p.L * kc; i += kShrinkThreads) {
    const int l = i / kc, kk = i - l * kc;
    xs[l][kk] = to_float(x[static_cast<int64_t>(l) * p.x_row_stride + k0 + kk]);
  }
  __syncthreads();

  // Thread layout: `groups` threads cover one row of A_b (VEC columns each); the block
  // covers `rows_pp` rows per pass. rank <= 128 and VEC divides rank, so rows_pp >= 2.
  const int groups = p.rank / VEC;
  const int rows_pp = kShrinkThreads / groups;
  const int g = tid % groups, rr = tid / groups;
  const bool active = rr < rows_pp;

  float acc[LMAX][VEC];
#pragma unroll
  for (int l = 0; l < LMAX; ++l)
#pragma unroll
    for (int v = 0; v < VEC; ++v) acc[l][v] = 0.f;

  auto fma_row = [&](const float (&av)[VEC], int k) {
#pragma unroll
    for (int l = 0; l < LMAX; ++l) {
      if (l < p.L) {
        const float xv = xs[l][k - k0];
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[l][v] = fmaf(xv, av[v], acc[l][v]);
      }
    }
  };

  if (active) {
    const T* acol = a + g * VEC;
    int k = k0 + rr;
    // Four rows in flight per thread, then the remainder.
    for (; k + 3 * rows_pp < k1; k += 4 * rows_pp) {
      float a0[VEC], a1[VEC], a2[VEC], a3[VEC];
      shrink_load_vec<T, VEC>(a0, acol + static_cast<int64_t>(k) * p.lda);
      shrink_load_vec<T, VEC>(a1, acol + static_cast<int64_t>(k + rows_pp) * p.lda);
      shrink_load_vec<T, VEC>(a2, acol + static_cast<int64_t>(k + 2 * rows_pp) * p.lda);
      shrink_load_vec<T, VEC>(a3, acol + static_cast<int64_t>(k + 3 * rows_pp) * p.lda);
      fma_row(a0, k);
      fma_row(a1, k + rows_pp);
      fma_row(a2, k + 2 * rows_pp);
      fma_row(a3, k + 3 * rows_pp);
    }
    for (; k < k1; k += rows_pp) {
      float a0[VEC];
      shrink_load_vec<T, VEC>(a0, acol + static_cast<int64_t>(k) * p.lda);
      fma_row(a0, k);
    }
  }

  // Reduce the rows_pp partial sums of every column, one token at a time.
#pragma unroll
  for (int l = 0; l < LMAX; ++l) {
    if (l < p.L) {
      __syncthreads();
      if (active) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) red[rr * p.rank + g * VEC + v] = acc[l][v];
      }
      __syncthreads();
      float* out = p.out + ((static_cast<int64_t>(split) * p.batch + b) * p.L + l) * p.rank;
      for (int j = tid; j < p.rank; j += kShrinkThreads) {
        float s = 0.f;
        for (int q = 0; q < rows_pp; ++q) s += red[q * p.rank + j];
        out[j] = p.alpha * s;
      }
    }
  }
}

namespace {

template <typename T>
cudaError_t launch_shrink_typed(const ShrinkArgs& p, cudaStream_t stream) {
  const dim3 grid(p.splits, p.batch);
  const bool vec8 = p.rank % 8 == 0 && reinterpret_cast<uintptr_t>(p.a) % 16 == 0 &&
                    p.lda % 8 == 0 && p.a_batch_stride % 8 == 0;
  auto kernel = vec8 ? shrink_gemv_kernel<T, 8> : shrink_gemv_kernel<T, 1>;
  const size_t smem = shrink_smem_bytes(vec8 ? 8 : 1);
  LLMREC_LAUNCH(kernel, grid, kShrinkThreads, smem, stream, p);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_shrink_gemv(DType dtype, const ShrinkArgs& p, cudaStream_t stream) {
  if (p.batch <= 0 || p.L <= 0 || p.rank <= 0) return cudaSuccess;
  if (p.L > kShrinkMaxTokens || p.rank > kMaxRank || p.splits < 1 || p.k_chunk <= 0 ||
      p.k_chunk > kShrinkMaxChunk || static_cast<int64_t>(p.splits) * p.k_chunk < p.K ||
      p.batch > 65535) {
    return cudaErrorInvalidValue;
  }
  switch (dtype) {
    case DType::kHalf:
      return launch_shrink_typed<__half>(p, stream);
    case DType::kBFloat16:
      return launch_shrink_typed<__nv_bfloat16>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace llmrec
