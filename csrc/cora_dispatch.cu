// Dtype dispatch of the GEMM launchers, tile sizes for host-side planning, build facts.
#include "cora_gemm.cuh"
#include "cora_kernels.h"

namespace llmrec {

cudaError_t launch_gemm_f16(GemmKind kind, GemmConfig config, const GemmArgs& args,
                            cudaStream_t stream);
cudaError_t launch_gemm_bf16(GemmKind kind, GemmConfig config, const GemmArgs& args,
                             cudaStream_t stream);

cudaError_t launch_gemm(GemmKind kind, GemmConfig config, DType dtype, const GemmArgs& args,
                        cudaStream_t stream) {
  switch (dtype) {
    case DType::kHalf:
      return launch_gemm_f16(kind, config, args, stream);
    case DType::kBFloat16:
      return launch_gemm_bf16(kind, config, args, stream);
  }
  return cudaErrorInvalidValue;
}

namespace {
template <typename Cfg>
int pick(int what) {
  return what == 0 ? Cfg::BM : what == 1 ? Cfg::BN : Cfg::BK;
}
int tile_dim(GemmKind kind, GemmConfig config, int what) {
  if (kind == GemmKind::kShrinkKN || kind == GemmKind::kTransSplitKN) return pick<CfgNarrow>(what);
  return config == GemmConfig::kLarge ? pick<CfgLarge>(what) : pick<CfgSmall>(what);
}
}  // namespace

int gemm_block_m(GemmKind kind, GemmConfig config) { return tile_dim(kind, config, 0); }
int gemm_block_n(GemmKind kind, GemmConfig config) { return tile_dim(kind, config, 1); }
int gemm_block_k(GemmKind kind, GemmConfig config) { return tile_dim(kind, config, 2); }

int compiled_archs(int* out, int max_count) {
#ifdef __CUDA_ARCH_LIST__
  static const int archs[] = {__CUDA_ARCH_LIST__};
  const int n = static_cast<int>(sizeof(archs) / sizeof(archs[0]));
  for (int i = 0; i < n && i < max_count; ++i) out[i] = archs[i];
  return n;
#else
  (void)out;
  (void)max_count;
  return 0;
#endif
}

}  // namespace llmrec
