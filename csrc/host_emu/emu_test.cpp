// Runs the CoRA kernels (csrc/*.cu, compiled for the host against emu_runtime.h) through their
// real launchers on small problems that cover every kernel variant and code path, and compares
// each result with a float64 reference computed from the same rounded inputs.
// Usage: emu_test [filter]; exit status 0 when every case passes.
#include <sys/mman.h>
#include <unistd.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cora_kernels.h"
#include "cora_types.cuh"

using llmrec::DType;
using llmrec::GemmArgs;
using llmrec::GemmConfig;
using llmrec::GemmKind;

namespace {

// A buffer that ends (up to 15 bytes of slack) right before an inaccessible page, so reads
// or writes past its end fault; `shift` bytes of misalignment on request.
class Guarded {
 public:
  Guarded(size_t bytes, size_t shift = 0) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    const size_t need = bytes + shift + 16;
    span_ = ((need + page - 1) / page + 1) * page;
    base_ = static_cast<char*>(mmap(nullptr, span_, PROT_READ | PROT_WRITE,
                                    MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    if (base_ == MAP_FAILED) std::abort();
    char* guard = base_ + span_ - page;
    mprotect(guard, page, PROT_NONE);
    uintptr_t start = reinterpret_cast<uintptr_t>(guard) - bytes - shift;
    start = (start & ~uintptr_t(15)) + shift;
    data_ = reinterpret_cast<char*>(start);
    std::memset(base_, 0x7f, static_cast<size_t>(guard - base_));  // garbage around the data
  }
  ~Guarded() { munmap(base_, span_); }
  Guarded(const Guarded&) = delete;
  Guarded& operator=(const Guarded&) = delete;
  void* data() { return data_; }

 private:
  char* base_ = nullptr;
  char* data_ = nullptr;
  size_t span_ = 0;
};

std::mt19937 rng(1234);

// Values rounded to T, kept as float for the reference, and a guarded device-like copy.
template <typename T>
struct Mat {
  std::vector<float> v;
  Guarded buf;
  Mat(size_t n, float std_dev, size_t shift = 0) : v(n), buf(n * sizeof(T) + 2, shift) {
    std::normal_distribution<float> dist(0.f, std_dev);
    T* p = static_cast<T*>(buf.data());
    for (size_t i = 0; i < n; ++i) {
      const T t = llmrec::ElemTraits<T>::from_float(dist(rng));
      p[i] = t;
      v[i] = llmrec::ElemTraits<T>::to_float(t);
    }
  }
  const void* ptr() { return buf.data(); }
};

struct MatF {
  std::vector<float> v;
  Guarded buf;
  MatF(size_t n, float std_dev) : v(n), buf(n * sizeof(float)) {
    std::normal_distribution<float> dist(0.f, std_dev);
    float* p = static_cast<float*>(buf.data());
    for (size_t i = 0; i < n; ++i) p[i] = v[i] = dist(rng);
  }
  const float* ptr() { return static_cast<const float*>(buf.data()); }
};

int failures = 0;
int cases = 0;

template <typename OutT>
float out_at(const void* c, size_t i) {
  if constexpr (std::is_same<OutT, float>::value) {
    return static_cast<const float*>(c)[i];
  } else {
    return llmrec::ElemTraits<OutT>::to_float(static_cast<const OutT*>(c)[i]);
  }
}

// |out - ref| <= tol * (|ref| + 0.05 max|ref|), over `count` values at ref index i.
void compare(const std::string& name, const std::vector<double>& ref,
             const std::function<float(size_t)>& out, double tol) {
  ++cases;
  double scale = 1e-30;
  for (double r : ref) scale = std::max(scale, std::fabs(r));
  double worst = 0;
  size_t worst_i = 0;
  for (size_t i = 0; i < ref.size(); ++i) {
    const double o = out(i);
    const double bound = tol * (std::fabs(ref[i]) + 0.05 * scale);
    const double ratio = std::isfinite(o) ? std::fabs(o - ref[i]) / bound : INFINITY;
    if (!(ratio <= worst)) {
      worst = ratio;
      worst_i = i;
    }
  }
  const bool ok = worst <= 1.0;
  std::printf("%-4s %-58s worst %.3g of tolerance (at %zu: out %.6g ref %.6g)\n",
              ok ? "ok" : "FAIL", name.c_str(), worst, worst_i,
              ref.empty() ? 0.0 : static_cast<double>(out(worst_i)),
              ref.empty() ? 0.0 : ref[worst_i]);
  if (!ok) ++failures;
}

template <typename T>
constexpr DType dtype_of() {
  return std::is_same<T, __half>::value ? DType::kHalf : DType::kBFloat16;
}

template <typename T>
const char* tname() {
  return std::is_same<T, __half>::value ? "f16" : "bf16";
}

template <typename T>
double out_tol() {
  return std::is_same<T, __half>::value ? 2e-3 : 1.6e-2;
}

// kForward{NK,KN}: C (M, N) = X (M, K) Wop + bias + S E_seg^T.
template <typename T>
void forward_case(const char* what, GemmKind kind, GemmConfig cfg, int M, int N, int K, int rank,
                  int rps, bool per_sample_e, bool bias, int pad_a, size_t shift_a) {
  const bool kn = kind == GemmKind::kForwardKN;
  const int lda = K + pad_a;
  const int ldb = kn ? N : K;
  const int segs = per_sample_e ? (M + rps - 1) / rps : 1;
  Mat<T> x(static_cast<size_t>(M) * lda, 1.f, shift_a);
  Mat<T> w(static_cast<size_t>(kn ? K : N) * ldb, 1.f / std::sqrt(static_cast<float>(K)));
  Mat<T> bs(N, 0.5f);
  MatF s(static_cast<size_t>(M) * std::max(rank, 1), 1.f);
  Mat<T> e(static_cast<size_t>(segs) * N * std::max(rank, 1), 1.f / std::sqrt(rank + 1.f));
  Guarded c(static_cast<size_t>(M) * N * sizeof(T));
  GemmArgs p;
  p.M = M;
  p.N = N;
  p.K = K;
  p.a = x.ptr();
  p.lda = lda;
  p.b = w.ptr();
  p.ldb = ldb;
  p.c = c.data();
  p.ldc = N;
  p.bias = bias ? bs.ptr() : nullptr;
  p.s = s.ptr();
  p.lds = rank;
  p.e = e.ptr();
  p.lde = rank;
  p.e_batch_stride = per_sample_e ? static_cast<int64_t>(N) * rank : 0;
  p.rank = rank;
  p.rows_per_sample = per_sample_e ? rps : M;
  const cudaError_t err = llmrec::launch_gemm(kind, cfg, dtype_of<T>(), p, nullptr);
  if (err != cudaSuccess) {
    std::printf("FAIL %s: launch returned %d\n", what, static_cast<int>(err));
    ++failures;
    return;
  }
  std::vector<double> ref(static_cast<size_t>(M) * N);
  for (int m = 0; m < M; ++m) {
    const int seg = per_sample_e ? m / rps : 0;
    for (int n = 0; n < N; ++n) {
      double acc = bias ? bs.v[n] : 0.0;
      for (int k = 0; k < K; ++k) {
        const double wv = kn ? w.v[static_cast<size_t>(k) * ldb + n] : w.v[static_cast<size_t>(n) * ldb + k];
        acc += static_cast<double>(x.v[static_cast<size_t>(m) * lda + k]) * wv;
      }
      for (int j = 0; j < rank; ++j) {
        acc += static_cast<double>(s.v[static_cast<size_t>(m) * rank + j]) *
               e.v[(static_cast<size_t>(seg) * N + n) * rank + j];
      }
      ref[static_cast<size_t>(m) * N + n] = acc;
    }
  }
  char name[160];
  std::snprintf(name, sizeof(name), "%s %s M%d N%d K%d r%d", tname<T>(), what, M, N, K, rank);
  void* cp = c.data();
  compare(name, ref, [&](size_t i) { return out_at<T>(cp, i); }, out_tol<T>());
}

// kShrinkKN: C_z (M, N) fp32 = alpha * X_b (M, K) B_b (K, N), batches and split-K partials.
template <typename T>
void shrink_case(const char* what, int batch, int M, int N, int K, int splits, int k_chunk,
                 size_t shift_a) {
  Mat<T> x(static_cast<size_t>(batch) * M * K, 1.f, shift_a);
  Mat<T> b(static_cast<size_t>(batch) * K * N, 1.f / std::sqrt(static_cast<float>(K)));
  Guarded c(static_cast<size_t>(batch) * splits * M * N * sizeof(float));
  GemmArgs p;
  p.M = M;
  p.N = N;
  p.K = K;
  p.batch = batch;
  p.splits = splits;
  p.k_chunk = k_chunk;
  p.a = x.ptr();
  p.lda = K;
  p.a_batch_stride = static_cast<int64_t>(M) * K;
  p.b = b.ptr();
  p.ldb = N;
  p.b_batch_stride = static_cast<int64_t>(K) * N;
  p.c = c.data();
  p.ldc = N;
  p.c_batch_stride = static_cast<int64_t>(M) * N;
  p.alpha = 0.75f;
  const cudaError_t err = llmrec::launch_gemm(GemmKind::kShrinkKN, GemmConfig::kLarge,
                                              dtype_of<T>(), p, nullptr);
  if (err != cudaSuccess) {
    std::printf("FAIL %s: launch returned %d\n", what, static_cast<int>(err));
    ++failures;
    return;
  }
  std::vector<double> ref(static_cast<size_t>(batch) * M * N);
  for (int bi = 0; bi < batch; ++bi)
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) {
        double acc = 0;
        for (int k = 0; k < K; ++k) {
          acc += static_cast<double>(x.v[(static_cast<size_t>(bi) * M + m) * K + k]) *
                 b.v[(static_cast<size_t>(bi) * K + k) * N + n];
        }
        ref[(static_cast<size_t>(bi) * M + m) * N + n] = 0.75 * acc;
      }
  const float* out = static_cast<const float*>(c.data());
  const size_t mn = static_cast<size_t>(M) * N;
  char name[160];
  std::snprintf(name, sizeof(name), "%s %s b%d M%d N%d K%d splits%d", tname<T>(), what, batch, M, N,
                K, splits);
  compare(name, ref,
          [&](size_t i) {
            const size_t bi = i / mn, r = i % mn;
            float sum = 0;
            for (int sp = 0; sp < splits; ++sp) sum += out[(bi * splits + sp) * mn + r];
            return sum;
          },
          1e-4);
}

// kTransSplitKN: C_z (M, N) fp32 = alpha * A_b^T B_b with A stored (K, M), B fp32 (K, N).
template <typename T>
void trans_case(const char* what, int batch, int M, int N, int K, int splits, int k_chunk,
                size_t shift_a) {
  Mat<T> a(static_cast<size_t>(batch) * K * M, 1.f, shift_a);
  MatF b(static_cast<size_t>(batch) * K * N, 1.f);
  Guarded c(static_cast<size_t>(batch) * splits * M * N * sizeof(float));
  GemmArgs p;
  p.M = M;
  p.N = N;
  p.K = K;
  p.batch = batch;
  p.splits = splits;
  p.k_chunk = k_chunk;
  p.a = a.ptr();
  p.lda = M;
  p.a_batch_stride = static_cast<int64_t>(K) * M;
  p.b = b.ptr();
  p.ldb = N;
  p.b_batch_stride = static_cast<int64_t>(K) * N;
  p.c = c.data();
  p.ldc = N;
  p.c_batch_stride = static_cast<int64_t>(M) * N;
  p.alpha = 1.0f;
  const cudaError_t err = llmrec::launch_gemm(GemmKind::kTransSplitKN, GemmConfig::kLarge,
                                              dtype_of<T>(), p, nullptr);
  if (err != cudaSuccess) {
    std::printf("FAIL %s: launch returned %d\n", what, static_cast<int>(err));
    ++failures;
    return;
  }
  std::vector<double> ref(static_cast<size_t>(batch) * M * N);
  for (int bi = 0; bi < batch; ++bi)
    for (int m = 0; m < M; ++m)
      for (int n = 0; n < N; ++n) {
        double acc = 0;
        for (int k = 0; k < K; ++k) {
          acc += static_cast<double>(a.v[(static_cast<size_t>(bi) * K + k) * M + m]) *
                 b.v[(static_cast<size_t>(bi) * K + k) * N + n];
        }
        ref[(static_cast<size_t>(bi) * M + m) * N + n] = acc;
      }
  const float* out = static_cast<const float*>(c.data());
  const size_t mn = static_cast<size_t>(M) * N;
  char name[160];
  std::snprintf(name, sizeof(name), "%s %s b%d M%d N%d K%d splits%d", tname<T>(), what, batch, M, N,
                K, splits);
  // fp32 B enters as hi + lo of T: ~2^-16 (bf16) relative per product.
  compare(name, ref,
          [&](size_t i) {
            const size_t bi = i / mn, r = i % mn;
            float sum = 0;
            for (int sp = 0; sp < splits; ++sp) sum += out[(bi * splits + sp) * mn + r];
            return sum;
          },
          std::is_same<T, __half>::value ? 1e-4 : 5e-4);
}

// Batched GEMV shrink: out[p, b, l, :] partials of alpha * x_b,l A_b.
template <typename T>
void gemv_case(const char* what, int batch, int L, int K, int rank, int splits, int k_chunk,
               size_t shift_a) {
  Mat<T> x(static_cast<size_t>(batch) * L * K, 1.f);
  Mat<T> a(static_cast<size_t>(batch) * K * rank, 1.f / std::sqrt(static_cast<float>(K)), shift_a);
  Guarded out(static_cast<size_t>(splits) * batch * L * rank * sizeof(float));
  llmrec::ShrinkArgs p;
  p.batch = batch;
  p.L = L;
  p.K = K;
  p.rank = rank;
  p.splits = splits;
  p.k_chunk = k_chunk;
  p.x = x.ptr();
  p.x_batch_stride = static_cast<int64_t>(L) * K;
  p.x_row_stride = K;
  p.a = a.ptr();
  p.a_batch_stride = static_cast<int64_t>(K) * rank;
  p.lda = rank;
  p.out = static_cast<float*>(out.data());
  p.alpha = 2.0f;
  const cudaError_t err = llmrec::launch_shrink_gemv(dtype_of<T>(), p, nullptr);
  if (err != cudaSuccess) {
    std::printf("FAIL %s: launch returned %d\n", what, static_cast<int>(err));
    ++failures;
    return;
  }
  const size_t per_split = static_cast<size_t>(batch) * L * rank;
  std::vector<double> ref(per_split);
  for (int bi = 0; bi < batch; ++bi)
    for (int l = 0; l < L; ++l)
      for (int j = 0; j < rank; ++j) {
        double acc = 0;
        for (int k = 0; k < K; ++k) {
          acc += static_cast<double>(x.v[(static_cast<size_t>(bi) * L + l) * K + k]) *
                 a.v[(static_cast<size_t>(bi) * K + k) * rank + j];
        }
        ref[(static_cast<size_t>(bi) * L + l) * rank + j] = 2.0 * acc;
      }
  const float* o = p.out;
  char name[160];
  std::snprintf(name, sizeof(name), "%s %s b%d L%d K%d r%d splits%d", tname<T>(), what, batch, L,
                K, rank, splits);
  compare(name, ref,
          [&](size_t i) {
            float sum = 0;
            for (int sp = 0; sp < splits; ++sp) sum += o[sp * per_split + i];
            return sum;
          },
          1e-4);
}

template <typename T>
void run_all() {
  const auto NK = GemmKind::kForwardNK;
  const auto KN = GemmKind::kForwardKN;
  const auto LG = GemmConfig::kLarge;
  const auto SM = GemmConfig::kSmall;
  // y = x W^T + bias + s B^T (shared B): aligned / odd sizes, both tile configs.
  forward_case<T>("fwd-NK large aligned", NK, LG, 130, 136, 72, 20, 0, false, true, 0, 0);
  forward_case<T>("fwd-NK large odd K (scalar loads)", NK, LG, 37, 45, 29, 7, 0, false, true, 0, 0);
  forward_case<T>("fwd-NK large padded rows, r48", NK, LG, 70, 64, 64, 48, 0, false, false, 24, 0);
  forward_case<T>("fwd-NK small decode", NK, SM, 5, 70, 136, 16, 0, false, true, 0, 0);
  forward_case<T>("fwd-NK small misaligned x", NK, SM, 9, 33, 64, 16, 0, false, true, 0, 2);
  forward_case<T>("fwd-NK small r128", NK, SM, 66, 40, 48, 128, 0, false, false, 0, 0);
  forward_case<T>("fwd-NK no low-rank term", NK, LG, 20, 24, 40, 0, 0, false, true, 0, 0);
  // dx = dy W + dS A_b^T: W read as (K, N), per-sample E over segments of rps rows.
  forward_case<T>("dx-KN large per-sample L45", KN, LG, 135, 72, 80, 33, 45, true, false, 0, 0);
  forward_case<T>("dx-KN large per-sample L7", KN, LG, 28, 40, 32, 16, 7, true, false, 0, 0);
  forward_case<T>("dx-KN small per-sample L1", KN, SM, 6, 40, 48, 16, 1, true, false, 0, 0);
  forward_case<T>("dx-KN small shared odd N", KN, SM, 11, 37, 40, 5, 0, false, false, 0, 0);
  // s = alpha x_b A_b, dS = alpha dy B: batches, split-K, scalar path.
  shrink_case<T>("shrink-KN batched aligned", 2, 40, 16, 128, 4, 32, 0);
  shrink_case<T>("shrink-KN odd K, splits", 3, 70, 24, 100, 2, 64, 0);
  shrink_case<T>("shrink-KN r100 misaligned", 1, 19, 100, 48, 1, 0, 2);
  // dA_b = x_b^T dS_b, dB = dy^T s: A stored (K, M), fp32 B as hi + lo.
  trans_case<T>("trans-KN batched aligned", 2, 72, 20, 50, 2, 32, 0);
  trans_case<T>("trans-KN odd M, N%4!=0", 1, 70, 5, 33, 1, 0, 0);
  trans_case<T>("trans-KN r128 splits", 1, 136, 128, 96, 3, 32, 2);
  // Decode shrink: batched GEMV, vector and scalar paths, K splits with a short tail.
  gemv_case<T>("gemv vec8", 3, 1, 300, 16, 3, 104, 0);
  gemv_case<T>("gemv L4 r100 (scalar)", 2, 4, 64, 100, 1, 64, 0);
  gemv_case<T>("gemv misaligned A", 2, 2, 40, 8, 2, 24, 2);
  gemv_case<T>("gemv r128", 1, 1, 200, 128, 2, 104, 0);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string filter = argc > 1 ? argv[1] : "";
  if (filter.empty() || filter == "f16") run_all<__half>();
  if (filter.empty() || filter == "bf16") run_all<__nv_bfloat16>();
  std::printf("%d cases, %d failed\n", cases, failures);
  return failures == 0 ? 0 : 1;
}
