// fp16 instantiations of the tensor-core GEMM (see cora_gemm.cuh).
#include "cora_gemm.cuh"

namespace llmrec {

cudaError_t launch_gemm_f16(GemmKind kind, GemmConfig config, const GemmArgs& args,
                            cudaStream_t stream) {
  return launch_gemm_typed<__half>(kind, config, args, stream);
}

}  // namespace llmrec
