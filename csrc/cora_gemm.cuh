// Tiled tensor-core GEMM (mma.sync m16n8k16, fp32 accumulate, cp.async multi-stage
// pipeline) with the CoRA low-rank term folded into the accumulator before the one store.
// Included by cora_gemm_f16.cu and cora_gemm_bf16.cu, which instantiate it per dtype.
//
// One kernel template covers every product the op needs (see GemmKind in cora_kernels.h):
//   A operand: (M, K) "MK" (K contiguous)  or  given as (K, M) "KM" (M contiguous: x^T, dy^T)
//   B operand: (N, K) "NK" (K contiguous: W in y = x W^T)  or  (K, N) "KN" (N contiguous:
//              W in dx = dy W, A_b in S = x A_b); optionally fp32 (S, dS), converted while
//              staged into shared memory as hi + lo parts of the input dtype (two MMAs), so
//              the fp32 operand keeps ~16 (bf16) or ~22 (fp16) significant bits.
//   Expand (kForward*): after the main K loop the accumulator also receives S E^T, with S
//              fp32 (split hi + lo the same way) and E (N, rank) in the input dtype, one E per
//              segment of `rows_per_sample` rows (per-sample A_b in dx) or shared (e stride 0).
//              A tile whose rows span several samples loops over them with row masks.
//
// Out-of-range rows/columns are zero-filled (cp.async src-size 0) and never stored. When a
// row stride or base pointer is not 16-byte aligned (odd K, odd N) the loaders fall back to
// element loads, decided once per launch (a_vec / b_vec).
#pragma once

#include <atomic>
#include <type_traits>

#include "cora_common.cuh"
#include "cora_kernels.h"

namespace llmrec {

constexpr int kPad = 8;        // shared-memory row padding (elements): conflict-free ldmatrix
constexpr int kExpandK = 32;   // rank chunk of the expand phase

template <int BM_, int BN_, int BK_, int WARPS_M_, int WARPS_N_, int STAGES_>
struct TileCfg {
  static constexpr int BM = BM_, BN = BN_, BK = BK_;
  static constexpr int WARPS_M = WARPS_M_, WARPS_N = WARPS_N_, STAGES = STAGES_;
  static constexpr int THREADS = 32 * WARPS_M * WARPS_N;
  static constexpr int WTM = BM / WARPS_M, WTN = BN / WARPS_N;  // warp tile
  static constexpr int MI = WTM / 16, NI = WTN / 8;             // mma tiles per warp
  static_assert(WTM % 16 == 0 && WTN % 16 == 0, "warp tile must be a multiple of 16x16");
  static_assert(BK % 16 == 0 && STAGES >= 2, "BK multiple of 16, at least two stages");
};

using CfgLarge = TileCfg<128, 128, 32, 2, 4, 3>;  // prefill forward / dx
using CfgSmall = TileCfg<64, 32, 64, 4, 1, 4>;    // decode forward / dx: many blocks over N
using CfgNarrow = TileCfg<128, 64, 32, 4, 1, 3>;  // N = rank <= 128: shrink, dS, dA, dB

// Shared-memory layout of one kernel instantiation (in elements of the input dtype).
template <typename Cfg, bool A_KM, bool B_KN, bool B_F32, bool EXPAND>
struct SmemLayout {
  static constexpr int A_LD = A_KM ? Cfg::BM + kPad : Cfg::BK + kPad;
  static constexpr int A_ELEMS = (A_KM ? Cfg::BK : Cfg::BM) * A_LD;
  static constexpr int B_LD = B_KN ? Cfg::BN + kPad : Cfg::BK + kPad;
  static constexpr int B_ELEMS = (B_KN ? Cfg::BK : Cfg::BN) * B_LD;
  static constexpr int STAGE_ELEMS = A_ELEMS + B_ELEMS * (B_F32 ? 2 : 1);
  static constexpr int PIPE_ELEMS = Cfg::STAGES * STAGE_ELEMS;
  static constexpr int E_LD = kExpandK + kPad;
  static constexpr int EXPAND_ELEMS = EXPAND ? (2 * Cfg::BM + Cfg::BN) * E_LD : 0;
  static constexpr int ELEMS = PIPE_ELEMS > EXPAND_ELEMS ? PIPE_ELEMS : EXPAND_ELEMS;
  static constexpr int BYTES = ELEMS * 2;
  static_assert(A_ELEMS % 8 == 0 && B_ELEMS % 8 == 0, "tiles must keep 16-byte alignment");
};

// ---------------------------------------------------------------------------------------
// Tile loaders: ROWS x COLS of a row-major global matrix (row stride ld) into shared memory
// [ROWS][COLS + kPad]; rows >= row_lim or columns >= col_lim read as zero. The vector path
// needs 16-byte aligned rows and col_lim % 8 == 0 (checked by the host).
// ---------------------------------------------------------------------------------------
template <typename T, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void load_tile_async(T* smem, const T* g, int64_t ld, int row0,
                                                int row_lim, int col0, int col_lim, bool vec) {
  constexpr int LD = COLS + kPad;
  constexpr int CPR = COLS / 8;  // 16-byte chunks per row
  constexpr int CHUNKS = ROWS * CPR;
  static_assert(COLS % 8 == 0 && CHUNKS % THREADS == 0, "tile must split evenly into chunks");
  if (vec) {
#pragma unroll
    for (int i = 0; i < CHUNKS / THREADS; ++i) {
      const int c = threadIdx.x + i * THREADS;
      const int r = c / CPR, cc = (c % CPR) * 8;
      const int gr = row0 + r, gc = col0 + cc;
      const bool valid = gr < row_lim && gc < col_lim;
      const T* src = valid ? g + static_cast<int64_t>(gr) * ld + gc : g;
      cp_async_16(smem + r * LD + cc, src, valid);
    }
  } else {
    const uint16_t* gb = reinterpret_cast<const uint16_t*>(g);
    uint16_t* sb = reinterpret_cast<uint16_t*>(smem);
#pragma unroll
    for (int i = 0; i < CHUNKS / THREADS; ++i) {
      const int c = threadIdx.x + i * THREADS;
      const int r = c / CPR, cc = (c % CPR) * 8;
      const int gr = row0 + r, gc = col0 + cc;
      const bool row_ok = gr < row_lim;
#pragma unroll
      for (int e = 0; e < 8; ++e) {
        const bool ok = row_ok && gc + e < col_lim;
        sb[r * LD + cc + e] = ok ? gb[static_cast<int64_t>(gr) * ld + gc + e] : uint16_t(0);
      }
    }
  }
}

// fp32 (ROWS x COLS, row stride ld) -> two shared tiles hi/lo of T with hi + lo ~= value.
template <typename T, int ROWS, int COLS, int THREADS>
__device__ __forceinline__ void load_tile_f32_split(T* hi, T* lo, const float* g, int64_t ld,
                                                    int row0, int row_lim, int col0, int col_lim,
                                                    bool vec) {
  constexpr int LD = COLS + kPad;
  constexpr int CPR = COLS / 4;  // float4 chunks per row
  constexpr int CHUNKS = ROWS * CPR;
  static_assert(COLS % 4 == 0 && CHUNKS % THREADS == 0, "tile must split evenly into chunks");
#pragma unroll
  for (int i = 0; i < CHUNKS / THREADS; ++i) {
    const int c = threadIdx.x + i * THREADS;
    const int r = c / CPR, cc = (c % CPR) * 4;
    const int gr = row0 + r, gc = col0 + cc;
    float v[4] = {0.f, 0.f, 0.f, 0.f};
    if (gr < row_lim) {
      const float* src = g + static_cast<int64_t>(gr) * ld + gc;
      if (vec) {
        if (gc < col_lim) {
          const float4 q = *reinterpret_cast<const float4*>(src);
          v[0] = q.x;
          v[1] = q.y;
          v[2] = q.z;
          v[3] = q.w;
        }
      } else {
#pragma unroll
        for (int e = 0; e < 4; ++e) v[e] = gc + e < col_lim ? src[e] : 0.f;
      }
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const T h = from_float<T>(v[e]);
      hi[r * LD + cc + e] = h;
      lo[r * LD + cc + e] = from_float<T>(v[e] - to_float(h));
    }
  }
}

// ---------------------------------------------------------------------------------------
// Fragment loads (see cora_common.cuh for the register layouts).
// ---------------------------------------------------------------------------------------
// A fragment of the 16x16 block at (row0, k0) from a tile stored [rows][k] (MK) or [k][rows].
template <bool KM>
__device__ __forceinline__ void load_frag_a(uint32_t (&a)[4], const void* tile, int ld, int row0,
                                            int k0, int lane) {
  const uint16_t* t = static_cast<const uint16_t*>(tile);
  if constexpr (!KM) {
    const int row = row0 + (lane & 15), col = k0 + (lane >> 4) * 8;
    ldmatrix_x4(a, t + row * ld + col);
  } else {
    const int k = k0 + (lane & 7) + ((lane >> 4) << 3);
    const int row = row0 + ((lane >> 3) & 1) * 8;
    ldmatrix_x4_trans(a, t + k * ld + row);
  }
}

// B fragments of two adjacent 16x8 blocks (columns n0..n0+15) at k0, from a tile stored
// [n][k] (NK) or [k][n] (KN). b[0], b[1]: first block; b[2], b[3]: second block.
template <bool KN>
__device__ __forceinline__ void load_frag_b2(uint32_t (&b)[4], const void* tile, int ld, int n0,
                                             int k0, int lane) {
  const uint16_t* t = static_cast<const uint16_t*>(tile);
  if constexpr (!KN) {
    const int n = n0 + (lane & 7) + ((lane >> 4) << 3);
    const int k = k0 + ((lane >> 3) & 1) * 8;
    ldmatrix_x4(b, t + n * ld + k);
  } else {
    const int k = k0 + (lane & 7) + ((lane >> 3) & 1) * 8;
    const int n = n0 + (lane >> 4) * 8;
    ldmatrix_x4_trans(b, t + k * ld + n);
  }
}

// acc += A_tile(16*MI rows of this warp) x B_tile(8*NI columns) over one k16 step.
template <typename T, typename Cfg, bool A_KM, bool B_KN>
__device__ __forceinline__ void warp_mma_k16(float (&acc)[Cfg::MI][Cfg::NI][4], const T* a_tile,
                                             int a_ld, const T* b_tile, int b_ld, int wm0,
                                             int wn0, int k0, int lane) {
  uint32_t af[Cfg::MI][4];
#pragma unroll
  for (int mi = 0; mi < Cfg::MI; ++mi) load_frag_a<A_KM>(af[mi], a_tile, a_ld, wm0 + mi * 16, k0, lane);
#pragma unroll
  for (int nj = 0; nj < Cfg::NI / 2; ++nj) {
    uint32_t bf[4];
    load_frag_b2<B_KN>(bf, b_tile, b_ld, wn0 + nj * 16, k0, lane);
#pragma unroll
    for (int mi = 0; mi < Cfg::MI; ++mi) {
      Mma<T>::run(acc[mi][2 * nj], af[mi], bf[0], bf[1]);
      Mma<T>::run(acc[mi][2 * nj + 1], af[mi], bf[2], bf[3]);
    }
  }
}

// Packs two values into one 32-bit store (output pairs are column-adjacent).
template <typename OutT>
struct PairStore;

template <>
struct PairStore<float> {
  static __device__ __forceinline__ void store(float* p, float v0, float v1) {
    *reinterpret_cast<float2*>(p) = make_float2(v0, v1);
  }
};

template <>
struct PairStore<__half> {
  static __device__ __forceinline__ void store(__half* p, float v0, float v1) {
    *reinterpret_cast<__half2*>(p) = __floats2half2_rn(v0, v1);
  }
};

template <>
struct PairStore<__nv_bfloat16> {
  static __device__ __forceinline__ void store(__nv_bfloat16* p, float v0, float v1) {
    *reinterpret_cast<__nv_bfloat162*>(p) = __floats2bfloat162_rn(v0, v1);
  }
};

// ---------------------------------------------------------------------------------------
// The kernel. Grid: (N tiles, M tiles, batch * splits); N tiles vary fastest so blocks that
// run together share the rows of A (x is streamed once, W stays in L2).
// ---------------------------------------------------------------------------------------
template <typename T, typename Cfg, bool A_KM, bool B_KN, bool B_F32, bool EXPAND, typename OutT>
__global__ void __launch_bounds__(Cfg::THREADS)
    cora_gemm_kernel(const GemmArgs p, const bool a_vec, const bool b_vec) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync bf16, ldmatrix and cp.async need sm_80; the host refuses older GPUs
#else
  using L = SmemLayout<Cfg, A_KM, B_KN, B_F32, EXPAND>;
  constexpr int BM = Cfg::BM, BN = Cfg::BN, BK = Cfg::BK, STAGES = Cfg::STAGES;
  constexpr int THREADS = Cfg::THREADS, MI = Cfg::MI, NI = Cfg::NI;
  extern __shared__ uint4 smem_raw[];
  T* smem = reinterpret_cast<T*>(smem_raw);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm0 = (warp / Cfg::WARPS_N) * Cfg::WTM;  // warp's first row inside the tile
  const int wn0 = (warp % Cfg::WARPS_N) * Cfg::WTN;
  const int n0 = blockIdx.x * BN, m0 = blockIdx.y * BM;
  const int z = blockIdx.z, bidx = z / p.splits, split = z - bidx * p.splits;
  const int k_begin = p.splits > 1 ? split * p.k_chunk : 0;
  const int k_end = p.splits > 1 ? min(p.K, k_begin + p.k_chunk) : p.K;
  const int num_k_tiles = k_end > k_begin ? ceil_div(k_end - k_begin, BK) : 0;

  const T* ga = static_cast<const T*>(p.a) + static_cast<int64_t>(bidx) * p.a_batch_stride;
  using BElem = typename std::conditional<B_F32, float, T>::type;
  const BElem* gb = static_cast<const BElem*>(p.b) + static_cast<int64_t>(bidx) * p.b_batch_stride;

  auto load_stage = [&](int stage, int k0) {
    T* sa = smem + stage * L::STAGE_ELEMS;
    T* sb = sa + L::A_ELEMS;
    if constexpr (!A_KM) {
      load_tile_async<T, BM, BK, THREADS>(sa, ga, p.lda, m0, p.M, k0, k_end, a_vec);
    } else {
      load_tile_async<T, BK, BM, THREADS>(sa, ga, p.lda, k0, k_end, m0, p.M, a_vec);
    }
    if constexpr (B_F32) {
      static_assert(B_KN, "fp32 B operand is only supported in the (K, N) layout");
      load_tile_f32_split<T, BK, BN, THREADS>(sb, sb + L::B_ELEMS, gb, p.ldb, k0, k_end, n0, p.N,
                                              b_vec);
    } else if constexpr (!B_KN) {
      load_tile_async<T, BN, BK, THREADS>(sb, gb, p.ldb, n0, p.N, k0, k_end, b_vec);
    } else {
      load_tile_async<T, BK, BN, THREADS>(sb, gb, p.ldb, k0, k_end, n0, p.N, b_vec);
    }
  };

  float acc[MI][NI][4];
#pragma unroll
  for (int mi = 0; mi < MI; ++mi)
#pragma unroll
    for (int ni = 0; ni < NI; ++ni)
#pragma unroll
      for (int q = 0; q < 4; ++q) acc[mi][ni][q] = 0.f;

  // ---- main loop: STAGES-deep cp.async pipeline --------------------------------------
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < num_k_tiles) load_stage(s, k_begin + s * BK);
    cp_async_commit();
  }
  for (int kt = 0; kt < num_k_tiles; ++kt) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();
    const int pf = kt + STAGES - 1;
    if (pf < num_k_tiles) load_stage(pf % STAGES, k_begin + pf * BK);
    cp_async_commit();

    const T* sa = smem + (kt % STAGES) * L::STAGE_ELEMS;
    const T* sb = sa + L::A_ELEMS;
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      warp_mma_k16<T, Cfg, A_KM, B_KN>(acc, sa, L::A_LD, sb, L::B_LD, wm0, wn0, kk, lane);
      if constexpr (B_F32) {
        warp_mma_k16<T, Cfg, A_KM, B_KN>(acc, sa, L::A_LD, sb + L::B_ELEMS, L::B_LD, wm0, wn0, kk,
                                         lane);
      }
    }
  }
  cp_async_wait<0>();
  __syncthreads();

  if (p.alpha != 1.0f) {
#pragma unroll
    for (int mi = 0; mi < MI; ++mi)
#pragma unroll
      for (int ni = 0; ni < NI; ++ni)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[mi][ni][q] *= p.alpha;
  }

  // ---- expand: acc += S E_seg^T (fp32 S as hi + lo), before the single store -----------
  if constexpr (EXPAND) {
    if (p.rank > 0 && m0 < p.M && split == 0) {
      constexpr int ELD = L::E_LD;
      T* s_hi = smem;
      T* s_lo = smem + BM * ELD;
      T* e_s = smem + 2 * BM * ELD;
      const int m_hi = min(m0 + BM, p.M);
      const int rps = p.rows_per_sample;
      const int seg_first = m0 / rps, seg_last = (m_hi - 1) / rps;
      for (int seg = seg_first; seg <= seg_last; ++seg) {
        const int r_lo = max(m0, seg * rps), r_hi = min(m_hi, (seg + 1) * rps);
        const T* ge = static_cast<const T*>(p.e) + static_cast<int64_t>(seg) * p.e_batch_stride;
        for (int r0 = 0; r0 < p.rank; r0 += kExpandK) {
          for (int i = tid; i < BM * kExpandK; i += THREADS) {
            const int row = i / kExpandK, col = i % kExpandK;
            const int gm = m0 + row, gr = r0 + col;
            const float v = (gm >= r_lo && gm < r_hi && gr < p.rank)
                                ? p.s[static_cast<int64_t>(gm) * p.lds + gr]
                                : 0.f;
            const T h = from_float<T>(v);
            s_hi[row * ELD + col] = h;
            s_lo[row * ELD + col] = from_float<T>(v - to_float(h));
          }
          const uint16_t* geb = reinterpret_cast<const uint16_t*>(ge);
          uint16_t* esb = reinterpret_cast<uint16_t*>(e_s);
          for (int i = tid; i < BN * kExpandK; i += THREADS) {
            const int row = i / kExpandK, col = i % kExpandK;
            const int gn = n0 + row, gr = r0 + col;
            esb[row * ELD + col] =
                (gn < p.N && gr < p.rank) ? geb[static_cast<int64_t>(gn) * p.lde + gr] : uint16_t(0);
          }
          __syncthreads();
#pragma unroll
          for (int kk = 0; kk < kExpandK; kk += 16) {
            if (r0 + kk < p.rank) {
              warp_mma_k16<T, Cfg, false, false>(acc, s_hi, ELD, e_s, ELD, wm0, wn0, kk, lane);
              warp_mma_k16<T, Cfg, false, false>(acc, s_lo, ELD, e_s, ELD, wm0, wn0, kk, lane);
            }
          }
          __syncthreads();
        }
      }
    }
  }

  // ---- epilogue: bias, round once, store ------------------------------------------------
  OutT* gc = static_cast<OutT*>(p.c) + static_cast<int64_t>(z) * p.c_batch_stride;
  const T* bias = EXPAND ? static_cast<const T*>(p.bias) : nullptr;
  const bool pair_ok = (reinterpret_cast<uintptr_t>(gc) % (2 * sizeof(OutT)) == 0) &&
                       (p.ldc % 2 == 0) && (p.c_batch_stride % 2 == 0);
  const int g = lane >> 2, t4 = lane & 3;
#pragma unroll
  for (int mi = 0; mi < MI; ++mi) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = m0 + wm0 + mi * 16 + g + half * 8;
      if (row >= p.M) continue;
      OutT* crow = gc + static_cast<int64_t>(row) * p.ldc;
#pragma unroll
      for (int ni = 0; ni < NI; ++ni) {
        const int col = n0 + wn0 + ni * 8 + 2 * t4;
        float v0 = acc[mi][ni][2 * half], v1 = acc[mi][ni][2 * half + 1];
        if (bias != nullptr) {
          if (col < p.N) v0 += to_float(bias[col]);
          if (col + 1 < p.N) v1 += to_float(bias[col + 1]);
        }
        if (pair_ok && col + 1 < p.N) {
          PairStore<OutT>::store(crow + col, v0, v1);
        } else {
          if (col < p.N) crow[col] = from_float<OutT>(v0);
          if (col + 1 < p.N) crow[col + 1] = from_float<OutT>(v1);
        }
      }
    }
  }
#endif
}

// ---------------------------------------------------------------------------------------
// Host side: launch one instantiation.
// ---------------------------------------------------------------------------------------
inline bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T, typename Cfg, bool A_KM, bool B_KN, bool B_F32, bool EXPAND, typename OutT>
cudaError_t launch_gemm_instance(const GemmArgs& p, cudaStream_t stream) {
  using L = SmemLayout<Cfg, A_KM, B_KN, B_F32, EXPAND>;
  if (p.M <= 0 || p.N <= 0 || p.batch <= 0) return cudaSuccess;
  if (p.splits < 1 || (p.splits > 1 && (p.k_chunk <= 0 || p.k_chunk % Cfg::BK != 0))) {
    return cudaErrorInvalidValue;
  }
  if (EXPAND && p.rank > 0 && (p.s == nullptr || p.e == nullptr || p.rows_per_sample <= 0)) {
    return cudaErrorInvalidValue;
  }
  // Vector (16-byte) loads need aligned rows and a contiguous extent that is a multiple of 8
  // elements (so a chunk is either entirely inside or entirely outside the matrix).
  const int a_extent = A_KM ? p.M : p.K;
  const bool a_vec = aligned16(p.a) && p.lda % 8 == 0 && p.a_batch_stride % 8 == 0 &&
                     a_extent % 8 == 0;
  bool b_vec;
  if (B_F32) {
    b_vec = aligned16(p.b) && p.ldb % 4 == 0 && p.b_batch_stride % 4 == 0 && p.N % 4 == 0;
  } else {
    const int b_extent = B_KN ? p.N : p.K;
    b_vec = aligned16(p.b) && p.ldb % 8 == 0 && p.b_batch_stride % 8 == 0 && b_extent % 8 == 0;
  }
  auto kernel = cora_gemm_kernel<T, Cfg, A_KM, B_KN, B_F32, EXPAND, OutT>;
  if (L::BYTES > 48 * 1024) {
    // Opt in to more than 48 KiB of dynamic shared memory, once per device (a driver call
    // per launch would cost microseconds on the decode path).
    static std::atomic<unsigned long long> configured{0};
    int device = 0;
    cudaError_t err = cudaGetDevice(&device);
    if (err != cudaSuccess) return err;
    const unsigned long long bit = device < 64 ? (1ull << device) : 0ull;
    if (bit == 0 || (configured.load(std::memory_order_acquire) & bit) == 0) {
      err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, L::BYTES);
      if (err != cudaSuccess) return err;
      configured.fetch_or(bit, std::memory_order_acq_rel);
    }
  }
  const dim3 grid(ceil_div(p.N, Cfg::BN), ceil_div(p.M, Cfg::BM), p.batch * p.splits);
  if (grid.y > 65535u || grid.z > 65535u) return cudaErrorInvalidConfiguration;
  LLMREC_LAUNCH(kernel, grid, Cfg::THREADS, L::BYTES, stream, p, a_vec, b_vec);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_gemm_typed(GemmKind kind, GemmConfig config, const GemmArgs& p,
                              cudaStream_t stream) {
  switch (kind) {
    case GemmKind::kForwardNK:
      return config == GemmConfig::kLarge
                 ? launch_gemm_instance<T, CfgLarge, false, false, false, true, T>(p, stream)
                 : launch_gemm_instance<T, CfgSmall, false, false, false, true, T>(p, stream);
    case GemmKind::kForwardKN:
      return config == GemmConfig::kLarge
                 ? launch_gemm_instance<T, CfgLarge, false, true, false, true, T>(p, stream)
                 : launch_gemm_instance<T, CfgSmall, false, true, false, true, T>(p, stream);
    case GemmKind::kShrinkKN:
      return launch_gemm_instance<T, CfgNarrow, false, true, false, false, float>(p, stream);
    case GemmKind::kTransSplitKN:
      return launch_gemm_instance<T, CfgNarrow, true, true, true, false, float>(p, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace llmrec
