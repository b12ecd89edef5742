// Host emulation of the few CUDA features the CoRA kernels use, so that their C++ source
// (csrc/*.cu, unchanged) compiles with g++ and runs on a CPU: a kernel launch runs every
// block in turn, every CUDA thread of a block as a fiber (ucontext), with __syncthreads and
// the warp-collective instructions as barriers over the fibers. Together with
// csrc/host_emu/cora_common.cuh (a functional model of mma.sync, ldmatrix and cp.async) this
// checks the kernels' index math, tiling, masking and reductions without a GPU. It does not
// check the PTX itself, timing, or memory-ordering races (copies complete immediately).
//
// Included before any kernel source (g++ -include emu_runtime.h, or prepended to a copy).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>

#undef __global__
#undef __device__
#undef __host__
#undef __shared__
#undef __forceinline__
#undef __launch_bounds__
#define __global__
#define __device__
#define __host__
#define __shared__
#define __forceinline__ inline
#define __launch_bounds__(...)

namespace emu {

struct Index3 {
  unsigned x = 0, y = 0, z = 0;
};

Index3& thread_index();
Index3& block_index();
void syncthreads();
void warp_sync();
int lane();
int warp();

// Per-warp scratch for the collective instructions.
struct WarpSlots {
  const void* addr[32];
  uint32_t a[32][4];
  uint32_t b[32][2];
};
WarpSlots& warp_slots();

// Dynamic shared memory of the running block (the kernels' `extern __shared__ smem_raw`).
constexpr size_t kSmemCapacity = 256 * 1024;
bool in_smem(const void* p, size_t bytes);  // inside the launch's dynamic shared memory
void fail(const char* fmt, ...);            // print and abort

void run_grid(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body);

template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, Args... args) {
  run_grid(grid, block, smem_bytes, [=]() { kernel(args...); });
}

}  // namespace emu

// The CUDA runtime calls of the launchers, renamed so that no CUDA runtime symbol is defined
// or needed (the emulation may live in a process that also loads libcudart).
namespace emu {
cudaError_t get_last_error();
cudaError_t get_device(int* device);
cudaError_t func_set_max_smem(int attr, int value);
template <typename F>
cudaError_t func_set_attribute(F* /*kernel*/, cudaFuncAttribute attr, int value) {
  return func_set_max_smem(static_cast<int>(attr), value);
}
}  // namespace emu
#define cudaGetLastError ::emu::get_last_error
#define cudaGetDevice ::emu::get_device
#define cudaFuncSetAttribute ::emu::func_set_attribute

namespace llmrec {
extern uint4 smem_raw[];
using std::max;
using std::min;
}  // namespace llmrec

#define threadIdx (::emu::thread_index())
#define blockIdx (::emu::block_index())
#define __syncthreads() ::emu::syncthreads()
