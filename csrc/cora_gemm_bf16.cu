// bf16 instantiations of the tensor-core GEMM (see cora_gemm.cuh).
#include "cora_gemm.cuh"

namespace llmrec {

cudaError_t launch_gemm_bf16(GemmKind kind, GemmConfig config, const GemmArgs& args,
                             cudaStream_t stream) {
  return launch_gemm_typed<__nv_bfloat16>(kind, config, args, stream);
}

}  // namespace llmrec
