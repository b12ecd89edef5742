// Torch glue of the CoRA CUDA kernels: argument checks, workspace planning, and the op
// registrations under the namespace `llmrec_kernels_cuda` (torch.ops.llmrec_kernels_cuda.*),
// plus a tiny pybind11 module so the library imports as `llmrec_kernels._C`.
//
// Ops (schemas are part of the interface; tests/ops/test_cuda_backend.py checks them):
//   cora_forward(x, weight, lora_a, lora_b, bias?, scaling) -> (y, s)
//   cora_backward(dy, x, weight, lora_a, lora_b, s_scaled, scaling, need_dx, need_da, need_db)
//       -> (dx, dA, dB)
//   shrink(x, lora_a, scaling) -> s                       s = scaling * x A, fp32
//   lowrank_linear(x, weight, bias?, s, lora_b) -> y      y = x W^T + bias + s B^T
// The CPU registrations run the same argument checks and then refuse (the kernels need a
// GPU); the Meta registrations give shapes for fake tensors.
//
// Test build: with LLMREC_HOST_EMULATION defined (tests/ops/test_cuda_backend.py builds it with
// the kernels compiled against csrc/host_emu), the ops take CPU tensors and run the emulated
// kernels, under the namespace LLMREC_OPS_NAMESPACE, so this glue is exercised without a GPU.
#include <algorithm>
#include <cstdint>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include <ATen/ATen.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>
#ifdef LLMREC_HOST_EMULATION
#include <cstdlib>
#else
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "cora_kernels.h"

#ifndef LLMREC_OPS_NAMESPACE
#define LLMREC_OPS_NAMESPACE llmrec_kernels_cuda
#endif
// One more macro level so that LLMREC_OPS_NAMESPACE is expanded before TORCH_LIBRARY pastes it.
#define LLMREC_LIBRARY(ns, m) TORCH_LIBRARY(ns, m)
#define LLMREC_LIBRARY_IMPL(ns, key, m) TORCH_LIBRARY_IMPL(ns, key, m)
#define LLMREC_STR2(x) #x
#define LLMREC_STR(x) LLMREC_STR2(x)

namespace {

using at::Tensor;
using llmrec::DType;
using llmrec::GemmArgs;
using llmrec::GemmConfig;
using llmrec::GemmKind;

constexpr int64_t kMaxRows = 65535LL * 64;  // grid.y limit times the smallest BM

std::string shape_str(const Tensor& t) {
  std::ostringstream os;
  os << "(";
  for (int64_t i = 0; i < t.dim(); ++i) os << (i ? ", " : "") << t.size(i);
  os << ")";
  return os.str();
}

bool is_float(const Tensor& t) { return at::isFloatingType(t.scalar_type()); }

struct Dims {
  int64_t B = 0, L = 0, d_in = 0, d_out = 0, r = 0;
  bool per_sample = false;
};

// Shape/dtype checks shared by the ops; the same wording as llmrec_kernels/_validation.py.
// weight / lora_a / lora_b may be null for ops that do not take them (shrink,
// lowrank_linear): then d_out, resp. r, come from `d_out_hint` / `rank_hint`.
Dims check_linear_args(const char* op, const Tensor& x, const Tensor* weight,
                       const Tensor* lora_a, const Tensor* lora_b,
                       const c10::optional<Tensor>& bias, int64_t d_out_hint = 0,
                       int64_t rank_hint = 0) {
  TORCH_CHECK(x.dim() == 3, op, ": x must be (B, L, d_in), got a ", x.dim(),
              "-D tensor of shape ", shape_str(x));
  Dims d;
  d.B = x.size(0);
  d.L = x.size(1);
  d.d_in = x.size(2);
  d.d_out = d_out_hint;
  d.r = rank_hint;
  TORCH_CHECK(x.scalar_type() == at::kHalf || x.scalar_type() == at::kBFloat16, op,
              ": backend='cuda' supports float16 and bfloat16, got x of dtype ",
              x.scalar_type(), " (use backend='triton' or backend='torch' for other dtypes)");
  if (weight != nullptr) {
    TORCH_CHECK(weight->dim() == 2 && weight->size(1) == d.d_in, op,
                ": weight must be (d_out, d_in) = (d_out, ", d.d_in,
                ") to match x's last dimension, got ", shape_str(*weight));
    d.d_out = weight->size(0);
    TORCH_CHECK(weight->scalar_type() == x.scalar_type(), op,
                ": weight must have the dtype of x (", x.scalar_type(), "), got ",
                weight->scalar_type());
  }
  if (lora_a != nullptr) {
    TORCH_CHECK(is_float(*lora_a), op, ": lora_a must be a floating-point tensor, got ",
                lora_a->scalar_type());
    if (lora_a->dim() == 3) {
      TORCH_CHECK(lora_a->size(0) == d.B && lora_a->size(1) == d.d_in, op,
                  ": lora_a must be (B, d_in, r) = (", d.B, ", ", d.d_in,
                  ", r) with one A per sample of x, or (d_in, r) = (", d.d_in,
                  ", r) shared by all samples; got ", shape_str(*lora_a));
      d.per_sample = true;
    } else {
      TORCH_CHECK(lora_a->dim() == 2 && lora_a->size(0) == d.d_in, op,
                  ": lora_a must be (B, d_in, r) or (d_in, r) = (", d.d_in, ", r), got ",
                  shape_str(*lora_a));
    }
    d.r = lora_a->size(-1);
  }
  TORCH_CHECK(d.r >= 1 && d.r <= llmrec::kMaxRank, op,
              ": backend='cuda' supports ranks 1..", llmrec::kMaxRank, ", got r = ", d.r);
  if (lora_b != nullptr) {
    TORCH_CHECK(is_float(*lora_b), op, ": lora_b must be a floating-point tensor, got ",
                lora_b->scalar_type());
    TORCH_CHECK(lora_b->dim() == 2 && lora_b->size(0) == d.d_out && lora_b->size(1) == d.r, op,
                ": lora_b must be (d_out, r) = (", d.d_out, ", ", d.r, "), got ",
                shape_str(*lora_b));
  }
  if (bias.has_value()) {
    const Tensor& b = *bias;
    TORCH_CHECK(is_float(b), op, ": bias must be a floating-point tensor, got ",
                b.scalar_type());
    TORCH_CHECK(b.dim() == 1 && b.size(0) == d.d_out, op, ": bias must be (d_out,) = (",
                d.d_out, ",), got ", shape_str(b));
  }
  TORCH_CHECK(d.B * d.L <= kMaxRows, op, ": at most ", kMaxRows,
              " tokens (B * L) per call, got ", d.B * d.L);
  TORCH_CHECK(d.B <= 65535, op, ": at most 65535 samples per call, got B = ", d.B);
  TORCH_CHECK(d.d_in < (1LL << 30) && d.d_out < (1LL << 30), op,
              ": d_in and d_out must be below 2^30");
  const auto dev = x.device();
  auto same = [&](const char* name, const Tensor* t) {
    if (t == nullptr) return;
    TORCH_CHECK(t->device() == dev, op, ": all tensors must be on one device: x is on ", dev,
                " but ", name, " is on ", t->device());
  };
  same("weight", weight);
  same("lora_a", lora_a);
  same("lora_b", lora_b);
  if (bias.has_value()) same("bias", &*bias);
  return d;
}

void check_s(const char* op, const char* name, const Tensor& s, const Dims& d,
             const Tensor& x) {
  TORCH_CHECK(s.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ",
              s.scalar_type());
  TORCH_CHECK(s.dim() == 3 && s.size(0) == d.B && s.size(1) == d.L && s.size(2) == d.r, op, ": ",
              name, " must be (B, L, r) = (", d.B, ", ", d.L, ", ", d.r, "), got ",
              shape_str(s));
  TORCH_CHECK(s.device() == x.device(), op, ": all tensors must be on one device: x is on ",
              x.device(), " but ", name, " is on ", s.device());
}

// The device checks come after the shape checks so the CPU registration reports bad shapes
// first. Returns the SM count. (Device attributes through the CUDA runtime: ATen's
// CUDAContext.h would pull in cuBLAS/cuSPARSE headers that a minimal toolkit lacks.)
int require_gpu(const char* op, const Tensor& x) {
#ifdef LLMREC_HOST_EMULATION
  TORCH_CHECK(x.device().is_cpu(), op, ": the host-emulation build takes CPU tensors, got ",
              x.device());
  const char* sms = std::getenv("LLMREC_EMU_SMS");  // drives the tile and split-K choices
  return sms != nullptr ? std::max(1, std::atoi(sms)) : 4;
#else
  TORCH_CHECK(x.is_cuda(), op, ": backend='cuda' needs CUDA tensors, got tensors on ",
              x.device());
  const int dev = x.get_device();
  int major = 0, minor = 0, sms = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, dev));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  TORCH_CHECK(major >= 8, op, ": backend='cuda' needs a GPU of compute capability 8.0 or "
              "newer (mma.sync bf16, cp.async), got ", major, ".", minor);
  return sms;
#endif
}

// The device of the call: a device guard and its current stream (nothing in emulation).
struct OnDevice {
#ifdef LLMREC_HOST_EMULATION
  explicit OnDevice(const Tensor& /*x*/) {}
  cudaStream_t stream() const { return nullptr; }
#else
  explicit OnDevice(const Tensor& x) : guard(x.device()) {}
  cudaStream_t stream() const { return c10::cuda::getCurrentCUDAStream(); }
  c10::cuda::CUDAGuard guard;
#endif
};

const char* error_string(cudaError_t err) {
#ifdef LLMREC_HOST_EMULATION
  return err == cudaSuccess ? "no error" : "emulated launch error";
#else
  return cudaGetErrorString(err);
#endif
}

DType dtype_of(const Tensor& x) {
  return x.scalar_type() == at::kHalf ? DType::kHalf : DType::kBFloat16;
}

void check_launch(cudaError_t err, const char* op, const char* what) {
  TORCH_CHECK(err == cudaSuccess, op, ": launching the ", what, " kernel failed: ",
              error_string(err));
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// A (B, L, K) or (M, K) tensor as rows of K contiguous elements with one row stride; a copy
// only when its strides do not allow that.
struct Rows {
  Tensor t;
  int64_t ld;
};

Rows as_rows(const Tensor& t) {
  const int64_t K = t.size(-1);
  if (t.numel() > 0 && (K == 1 || t.stride(-1) == 1)) {
    if (t.dim() == 2) {
      const int64_t ld = t.size(0) > 1 ? t.stride(0) : K;
      if (ld >= K) return {t, ld};
    } else if (t.dim() == 3) {
      const int64_t B = t.size(0), L = t.size(1);
      const int64_t ld = L > 1 ? t.stride(1) : (B > 1 ? t.stride(0) : K);
      const bool collapses = B == 1 || L == 1 || t.stride(0) == L * t.stride(1);
      if (collapses && ld >= K) return {t, ld};
    }
  }
  return {t.contiguous(), K};
}

// fp32-output GEMM (shrink, dS, dA, dB) with split-K planned to fill the GPU; the splits are
// summed here in fp32. Returns (batch, M, N).
Tensor run_f32_gemm(const char* op, GemmKind kind, DType dt, GemmArgs g,
                    const at::TensorOptions& fopts, cudaStream_t stream, int sms) {
  const int bm = llmrec::gemm_block_m(kind, GemmConfig::kLarge);
  const int bn = llmrec::gemm_block_n(kind, GemmConfig::kLarge);
  const int bk = llmrec::gemm_block_k(kind, GemmConfig::kLarge);
  const int64_t tiles = cdiv(g.M, bm) * cdiv(g.N, bn) * g.batch;
  int64_t splits = 1;
  const int64_t target = 2LL * sms;
  if (tiles > 0 && tiles < target && g.K > 4 * bk) {
    splits = std::min<int64_t>(cdiv(target, tiles), cdiv(g.K, 4 * bk));
    splits = std::max<int64_t>(1, std::min<int64_t>(splits, 65535 / g.batch));
  }
  int64_t k_chunk = 0;
  if (splits > 1) {
    k_chunk = cdiv(cdiv(g.K, splits), bk) * bk;
    splits = cdiv(g.K, k_chunk);
  }
  Tensor ws = at::empty({g.batch * splits, g.M, g.N}, fopts);
  g.splits = static_cast<int>(splits);
  g.k_chunk = static_cast<int>(k_chunk);
  g.c = ws.data_ptr();
  g.ldc = g.N;
  g.c_batch_stride = static_cast<int64_t>(g.M) * g.N;
  check_launch(llmrec::launch_gemm(kind, GemmConfig::kLarge, dt, g, stream), op,
               "fp32 GEMM");
  if (splits == 1) return ws;
  return ws.view({g.batch, splits, g.M, g.N}).sum(1);
}

// Tile shape for the forward-style GEMMs: large tiles when they alone fill the GPU.
GemmConfig choose_config(int64_t M, int64_t N, int sms) {
  const int bm = llmrec::gemm_block_m(GemmKind::kForwardNK, GemmConfig::kLarge);
  const int bn = llmrec::gemm_block_n(GemmKind::kForwardNK, GemmConfig::kLarge);
  return cdiv(M, bm) * cdiv(N, bn) >= sms ? GemmConfig::kLarge : GemmConfig::kSmall;
}

// s = scaling * x A as (B, L, r) fp32. x given as rows; a (B, d_in, r) or (d_in, r) in x's
// dtype, contiguous.
Tensor shrink_rows(const char* op, const Rows& xr, const Dims& d, const Tensor& a,
                   double scaling, DType dt, cudaStream_t stream, int sms) {
  const auto fopts = xr.t.options().dtype(at::kFloat);
  if (d.B * d.L == 0) return at::zeros({d.B, d.L, d.r}, fopts);
  if (d.per_sample && d.L <= llmrec::kShrinkMaxTokens) {
    // Decode with one A_b per sample: batched GEMV, K split across blocks. (A shared A goes
    // through the GEMM below, which reads it once for all rows.)
    llmrec::ShrinkArgs p;
    p.batch = static_cast<int>(d.B);
    p.L = static_cast<int>(d.L);
    p.K = static_cast<int>(d.d_in);
    p.rank = static_cast<int>(d.r);
    const int64_t min_splits = std::max<int64_t>(1, cdiv(d.d_in, llmrec::kShrinkMaxChunk));
    const int64_t want = cdiv(2LL * sms, d.B);
    const int64_t max_splits = std::max<int64_t>(1, cdiv(d.d_in, 128));
    int64_t splits = std::max(min_splits, std::min(want, max_splits));
    int64_t k_chunk = std::max<int64_t>(8, cdiv(cdiv(d.d_in, splits), 8) * 8);
    k_chunk = std::min<int64_t>(k_chunk, llmrec::kShrinkMaxChunk);
    splits = std::max<int64_t>(1, cdiv(d.d_in, k_chunk));
    p.splits = static_cast<int>(splits);
    p.k_chunk = static_cast<int>(k_chunk);
    p.x = xr.t.data_ptr();
    p.x_row_stride = xr.ld;
    p.x_batch_stride = d.L * xr.ld;
    p.a = a.data_ptr();
    p.lda = d.r;
    p.a_batch_stride = d.per_sample ? d.d_in * d.r : 0;
    p.alpha = static_cast<float>(scaling);
    Tensor ws = at::empty({splits, d.B, d.L, d.r}, fopts);
    p.out = ws.data_ptr<float>();
    check_launch(llmrec::launch_shrink_gemv(dt, p, stream), op, "batched-GEMV shrink");
    return splits == 1 ? ws.select(0, 0) : ws.sum(0);
  }
  // Prefill: per-sample tensor-core GEMM S_b = scaling * x_b A_b.
  GemmArgs g;
  g.N = static_cast<int>(d.r);
  g.K = static_cast<int>(d.d_in);
  g.a = xr.t.data_ptr();
  g.lda = xr.ld;
  g.b = a.data_ptr();
  g.ldb = d.r;
  g.alpha = static_cast<float>(scaling);
  if (d.per_sample) {
    g.M = static_cast<int>(d.L);
    g.batch = static_cast<int>(d.B);
    g.a_batch_stride = d.L * xr.ld;
    g.b_batch_stride = d.d_in * d.r;
  } else {
    g.M = static_cast<int>(d.B * d.L);
  }
  return run_f32_gemm(op, GemmKind::kShrinkKN, dt, g, fopts, stream, sms)
      .view({d.B, d.L, d.r});
}

// out (M, N) = A (M rows, row stride lda) B + bias + s E_seg^T through a kForward* kernel.
void forward_gemm(const char* op, GemmKind kind, DType dt, const Rows& ar, int64_t M, int64_t N,
                  int64_t K, const Rows& br, const Tensor& bias, const Tensor& s,
                  const Tensor& e, int64_t e_batch_stride, int64_t rows_per_sample, int64_t r,
                  Tensor& out, cudaStream_t stream, int sms) {
  GemmArgs g;
  g.M = static_cast<int>(M);
  g.N = static_cast<int>(N);
  g.K = static_cast<int>(K);
  g.a = ar.t.data_ptr();
  g.lda = ar.ld;
  g.b = br.t.data_ptr();
  g.ldb = br.ld;
  g.c = out.data_ptr();
  g.ldc = N;
  g.bias = bias.defined() ? bias.data_ptr() : nullptr;
  g.s = s.data_ptr<float>();
  g.lds = r;
  g.e = e.data_ptr();
  g.lde = r;
  g.e_batch_stride = e_batch_stride;
  g.rank = static_cast<int>(r);
  g.rows_per_sample = static_cast<int>(std::max<int64_t>(1, rows_per_sample));
  check_launch(llmrec::launch_gemm(kind, choose_config(M, N, sms), dt, g, stream), op,
               kind == GemmKind::kForwardNK ? "fused forward GEMM" : "fused dx GEMM");
}

// ------------------------------------------------------------------------------------------
// Ops
// ------------------------------------------------------------------------------------------
Tensor shrink_op(const Tensor& x, const Tensor& lora_a, double scaling) {
  const char* op = "llmrec_kernels_cuda::shrink";
  TORCH_CHECK(x.dim() == 3, op, ": x must be (B, L, d_in), got a ", x.dim(),
              "-D tensor of shape ", shape_str(x));
  const Dims d = check_linear_args(op, x, nullptr, &lora_a, nullptr, c10::nullopt);
  const int sms = require_gpu(op, x);
  const OnDevice on(x);
  const cudaStream_t stream = on.stream();
  const Tensor a = lora_a.to(x.scalar_type()).contiguous();
  return shrink_rows(op, as_rows(x), d, a, scaling, dtype_of(x), stream, sms);
}

Tensor lowrank_linear_op(const Tensor& x, const Tensor& weight, const c10::optional<Tensor>& bias,
                         const Tensor& s, const Tensor& lora_b) {
  const char* op = "llmrec_kernels_cuda::lowrank_linear";
  TORCH_CHECK(s.dim() == 3, op, ": s must be (B, L, r), got a ", s.dim(),
              "-D tensor of shape ", shape_str(s));
  TORCH_CHECK(x.dim() == 3, op, ": x must be (B, L, d_in), got a ", x.dim(),
              "-D tensor of shape ", shape_str(x));
  const Dims d = check_linear_args(op, x, &weight, nullptr, &lora_b, bias, 0, s.size(2));
  check_s(op, "s", s, d, x);
  const int sms = require_gpu(op, x);
  const OnDevice on(x);
  const cudaStream_t stream = on.stream();
  const auto dt = x.scalar_type();
  const Tensor bm = lora_b.to(dt).contiguous();
  const Tensor bs = bias.has_value() ? bias->to(dt).contiguous() : Tensor();
  Tensor y = at::empty({d.B, d.L, d.d_out}, x.options());
  forward_gemm(op, GemmKind::kForwardNK, dtype_of(x), as_rows(x), d.B * d.L, d.d_out, d.d_in,
               as_rows(weight), bs, s.contiguous(), bm, 0, d.B * d.L, d.r, y, stream, sms);
  return y;
}

std::tuple<Tensor, Tensor> cora_forward(const Tensor& x, const Tensor& weight,
                                        const Tensor& lora_a, const Tensor& lora_b,
                                        const c10::optional<Tensor>& bias, double scaling) {
  const char* op = "llmrec_kernels_cuda::cora_forward";
  const Dims d = check_linear_args(op, x, &weight, &lora_a, &lora_b, bias);
  const int sms = require_gpu(op, x);
  const OnDevice on(x);
  const cudaStream_t stream = on.stream();
  const auto dt = x.scalar_type();
  const DType kdt = dtype_of(x);
  const Rows xr = as_rows(x);
  const Tensor a = lora_a.to(dt).contiguous();
  const Tensor bm = lora_b.to(dt).contiguous();
  const Tensor bs = bias.has_value() ? bias->to(dt).contiguous() : Tensor();
  const Tensor s = shrink_rows(op, xr, d, a, scaling, kdt, stream, sms).contiguous();
  Tensor y = at::empty({d.B, d.L, d.d_out}, x.options());
  forward_gemm(op, GemmKind::kForwardNK, kdt, xr, d.B * d.L, d.d_out, d.d_in, as_rows(weight), bs,
               s, bm, 0, d.B * d.L, d.r, y, stream, sms);
  return {y, s};
}

std::tuple<Tensor, Tensor, Tensor> cora_backward(const Tensor& dy, const Tensor& x,
                                                 const Tensor& weight, const Tensor& lora_a,
                                                 const Tensor& lora_b, const Tensor& s_scaled,
                                                 double scaling, bool need_dx, bool need_da,
                                                 bool need_db) {
  const char* op = "llmrec_kernels_cuda::cora_backward";
  const Dims d = check_linear_args(op, x, &weight, &lora_a, &lora_b, c10::nullopt);
  TORCH_CHECK(dy.dim() == 3 && dy.size(0) == d.B && dy.size(1) == d.L && dy.size(2) == d.d_out,
              op, ": dy must be (B, L, d_out) = (", d.B, ", ", d.L, ", ", d.d_out, "), got ",
              shape_str(dy));
  TORCH_CHECK(dy.scalar_type() == x.scalar_type(), op, ": dy must have the dtype of x (",
              x.scalar_type(), "), got ", dy.scalar_type());
  TORCH_CHECK(dy.device() == x.device(), op, ": all tensors must be on one device: x is on ",
              x.device(), " but dy is on ", dy.device());
  check_s(op, "s_scaled", s_scaled, d, x);
  const int sms = require_gpu(op, x);
  const OnDevice on(x);
  const cudaStream_t stream = on.stream();
  const auto dt = x.scalar_type();
  const DType kdt = dtype_of(x);
  const auto fopts = x.options().dtype(at::kFloat);
  const int64_t M = d.B * d.L;

  Tensor dx = x.new_empty({0}), da = x.new_empty({0}), db = x.new_empty({0});
  if (!(need_dx || need_da || need_db)) return {dx, da, db};
  const Rows dyr = as_rows(dy);
  const Tensor a = lora_a.to(dt).contiguous();
  const Tensor bm = lora_b.to(dt).contiguous();

  Tensor ds;  // (M, r) fp32 = scaling * dy B
  if (need_dx || need_da) {
    GemmArgs g;
    g.M = static_cast<int>(M);
    g.N = static_cast<int>(d.r);
    g.K = static_cast<int>(d.d_out);
    g.a = dyr.t.data_ptr();
    g.lda = dyr.ld;
    g.b = bm.data_ptr();
    g.ldb = d.r;
    g.alpha = static_cast<float>(scaling);
    ds = run_f32_gemm(op, GemmKind::kShrinkKN, kdt, g, fopts, stream, sms).view({M, d.r});
  }
  if (need_dx) {
    // dx = dy W + dS A_b^T: W read as (K = d_out, N = d_in); E = A_b per sample of L rows.
    dx = at::empty({d.B, d.L, d.d_in}, x.options());
    forward_gemm(op, GemmKind::kForwardKN, kdt, dyr, M, d.d_in, d.d_out, as_rows(weight),
                 Tensor(), ds, a, d.per_sample ? d.d_in * d.r : 0, d.per_sample ? d.L : M, d.r,
                 dx, stream, sms);
  }
  if (need_da) {
    // dA_b = x_b^T dS_b: A operand x read as (K = tokens, M = d_in).
    const Rows xr = as_rows(x);
    GemmArgs g;
    g.M = static_cast<int>(d.d_in);
    g.N = static_cast<int>(d.r);
    g.a = xr.t.data_ptr();
    g.lda = xr.ld;
    g.b = ds.data_ptr();
    g.ldb = d.r;
    if (d.per_sample) {
      g.K = static_cast<int>(d.L);
      g.batch = static_cast<int>(d.B);
      g.a_batch_stride = d.L * xr.ld;
      g.b_batch_stride = d.L * d.r;
    } else {
      g.K = static_cast<int>(M);
    }
    Tensor out = run_f32_gemm(op, GemmKind::kTransSplitKN, kdt, g, fopts, stream, sms);
    da = (d.per_sample ? out : out.select(0, 0)).to(lora_a.scalar_type());
  }
  if (need_db) {
    // dB = dy^T S (S already scaled): A operand dy read as (K = tokens, M = d_out).
    const Tensor sc = s_scaled.contiguous();
    GemmArgs g;
    g.M = static_cast<int>(d.d_out);
    g.N = static_cast<int>(d.r);
    g.K = static_cast<int>(M);
    g.a = dyr.t.data_ptr();
    g.lda = dyr.ld;
    g.b = sc.data_ptr();
    g.ldb = d.r;
    Tensor out = run_f32_gemm(op, GemmKind::kTransSplitKN, kdt, g, fopts, stream, sms);
    db = out.select(0, 0).to(lora_b.scalar_type());
  }
  return {dx, da, db};
}

// ------------------------------------------------------------------------------------------
// Meta (fake-tensor) implementations: shapes only.
// ------------------------------------------------------------------------------------------
std::tuple<Tensor, Tensor> cora_forward_meta(const Tensor& x, const Tensor& weight,
                                             const Tensor& lora_a, const Tensor& /*lora_b*/,
                                             const c10::optional<Tensor>& /*bias*/,
                                             double /*scaling*/) {
  TORCH_CHECK(x.dim() == 3 && weight.dim() == 2 && lora_a.dim() >= 2,
              "llmrec_kernels_cuda::cora_forward: x must be 3-D, weight 2-D, lora_a 2-D or 3-D");
  Tensor y = at::empty_symint({x.sym_size(0), x.sym_size(1), weight.sym_size(0)}, x.options());
  Tensor s = at::empty_symint({x.sym_size(0), x.sym_size(1), lora_a.sym_size(-1)},
                              x.options().dtype(at::kFloat));
  return {y, s};
}

std::tuple<Tensor, Tensor, Tensor> cora_backward_meta(const Tensor& /*dy*/, const Tensor& x,
                                                      const Tensor& /*weight*/,
                                                      const Tensor& lora_a,
                                                      const Tensor& lora_b,
                                                      const Tensor& /*s_scaled*/,
                                                      double /*scaling*/, bool need_dx,
                                                      bool need_da, bool need_db) {
  Tensor dx = need_dx ? at::empty_symint(x.sym_sizes(), x.options()) : x.new_empty({0});
  Tensor da = need_da ? at::empty_symint(lora_a.sym_sizes(), lora_a.options()) : x.new_empty({0});
  Tensor db = need_db ? at::empty_symint(lora_b.sym_sizes(), lora_b.options()) : x.new_empty({0});
  return {dx, da, db};
}

Tensor shrink_meta(const Tensor& x, const Tensor& lora_a, double /*scaling*/) {
  TORCH_CHECK(x.dim() == 3 && lora_a.dim() >= 2,
              "llmrec_kernels_cuda::shrink: x must be 3-D, lora_a 2-D or 3-D");
  return at::empty_symint({x.sym_size(0), x.sym_size(1), lora_a.sym_size(-1)},
                          x.options().dtype(at::kFloat));
}

Tensor lowrank_linear_meta(const Tensor& x, const Tensor& weight,
                           const c10::optional<Tensor>& /*bias*/, const Tensor& /*s*/,
                           const Tensor& /*lora_b*/) {
  TORCH_CHECK(x.dim() == 3 && weight.dim() == 2,
              "llmrec_kernels_cuda::lowrank_linear: x must be 3-D, weight 2-D");
  return at::empty_symint({x.sym_size(0), x.sym_size(1), weight.sym_size(0)}, x.options());
}

}  // namespace

LLMREC_LIBRARY(LLMREC_OPS_NAMESPACE, m) {
  m.def(
      "cora_forward(Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, Tensor? bias, "
      "float scaling) -> (Tensor, Tensor)");
  m.def(
      "cora_backward(Tensor dy, Tensor x, Tensor weight, Tensor lora_a, Tensor lora_b, "
      "Tensor s_scaled, float scaling, bool need_dx, bool need_da, bool need_db) "
      "-> (Tensor, Tensor, Tensor)");
  m.def("shrink(Tensor x, Tensor lora_a, float scaling) -> Tensor");
  m.def("lowrank_linear(Tensor x, Tensor weight, Tensor? bias, Tensor s, Tensor lora_b) -> Tensor");
}

#ifndef LLMREC_HOST_EMULATION
LLMREC_LIBRARY_IMPL(LLMREC_OPS_NAMESPACE, CUDA, m) {
  m.impl("cora_forward", &cora_forward);
  m.impl("cora_backward", &cora_backward);
  m.impl("shrink", &shrink_op);
  m.impl("lowrank_linear", &lowrank_linear_op);
}

#endif

// CPU tensors: the same argument checks, then a clear refusal (no CPU kernels here); in the
// host-emulation build, the emulated kernels.
LLMREC_LIBRARY_IMPL(LLMREC_OPS_NAMESPACE, CPU, m) {
  m.impl("cora_forward", &cora_forward);
  m.impl("cora_backward", &cora_backward);
  m.impl("shrink", &shrink_op);
  m.impl("lowrank_linear", &lowrank_linear_op);
}

LLMREC_LIBRARY_IMPL(LLMREC_OPS_NAMESPACE, Meta, m) {
  m.impl("cora_forward", &cora_forward_meta);
  m.impl("cora_backward", &cora_backward_meta);
  m.impl("shrink", &shrink_meta);
  m.impl("lowrank_linear", &lowrank_linear_meta);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() =
      "CoRA CUDA kernels; the ops are registered as torch.ops.llmrec_kernels_cuda.* when this "
      "module is imported.";
  m.def(
      "build_info",
      []() {
        int archs[16];
        const int n = llmrec::compiled_archs(archs, 16);
        pybind11::list arch_list;
        for (int i = 0; i < n && i < 16; ++i) arch_list.append(archs[i]);
        pybind11::dict info;
        info["archs"] = arch_list;
        info["cuda_runtime_version"] = CUDART_VERSION;
        info["max_rank"] = llmrec::kMaxRank;
        info["gemv_shrink_max_tokens"] = llmrec::kShrinkMaxTokens;
        info["namespace"] = LLMREC_STR(LLMREC_OPS_NAMESPACE);
#ifdef LLMREC_HOST_EMULATION
        info["host_emulation"] = true;
#endif
        return info;
      },
      "Facts fixed at build time: compiled SM architectures, CUDA runtime version, limits.");
}
