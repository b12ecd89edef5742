// Fiber scheduler of the host emulation (see emu_runtime.h) and the CUDA runtime calls the
// kernel launchers make.
#include "emu_runtime.h"

#include <ucontext.h>

#include <cstdarg>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <vector>

namespace llmrec {
// Dynamic shared memory, followed by room for a canary that detects overflowing writes.
alignas(16) uint4 smem_raw[(emu::kSmemCapacity + 4096) / sizeof(uint4)];
}  // namespace llmrec

namespace emu {
namespace {

enum class State { kRunnable, kWarpWait, kBlockWait, kDone };

constexpr size_t kStackBytes = 256 * 1024;
constexpr unsigned char kCanary = 0x5a;

struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;
  State state = State::kRunnable;
};

struct Run {
  std::vector<Fiber> fibers;
  std::vector<WarpSlots> slots;
  std::vector<int> warp_waiting;
  int block_waiting = 0;
  int done = 0;
  int current = -1;
  ucontext_t scheduler;
  const std::function<void()>* body = nullptr;
  size_t smem_bytes = 0;
};

Run* g_run = nullptr;
Index3 g_thread, g_block;

void fiber_entry() {
  (*g_run->body)();
  g_run->fibers[g_run->current].state = State::kDone;
  g_run->done += 1;
  // returning resumes uc_link, the scheduler
}

void block_wait(State why) {
  Fiber& f = g_run->fibers[g_run->current];
  f.state = why;
  if (swapcontext(&f.ctx, &g_run->scheduler) != 0) fail("swapcontext failed");
}

int lanes_in_warp(int w) {
  const int n = static_cast<int>(g_run->fibers.size());
  return std::min(32, n - 32 * w);
}

}  // namespace

Index3& thread_index() { return g_thread; }
Index3& block_index() { return g_block; }
int lane() { return g_run->current % 32; }
int warp() { return g_run->current / 32; }
WarpSlots& warp_slots() { return g_run->slots[warp()]; }

void syncthreads() {
  g_run->block_waiting += 1;
  block_wait(State::kBlockWait);
}

void warp_sync() {
  g_run->warp_waiting[warp()] += 1;
  block_wait(State::kWarpWait);
}

bool in_smem(const void* p, size_t bytes) {
  const char* base = reinterpret_cast<const char*>(llmrec::smem_raw);
  const char* q = static_cast<const char*>(p);
  return g_run != nullptr && q >= base && q + bytes <= base + g_run->smem_bytes;
}

void fail(const char* fmt, ...) {
  va_list args;
  va_start(args, fmt);
  std::fprintf(stderr, "EMULATION FAILURE: ");
  std::vfprintf(stderr, fmt, args);
  if (g_run != nullptr) {
    std::fprintf(stderr, " [block (%u, %u, %u), thread %d]", g_block.x, g_block.y, g_block.z,
                 g_run->current);
  }
  std::fprintf(stderr, "\n");
  va_end(args);
  std::exit(2);
}

// Runs every fiber of the current block to completion (kept out of run_grid's loops:
// variables live across swapcontext must not be the caller's loop counters).
__attribute__((noinline)) void run_block(Run& run) {
  const int n = static_cast<int>(run.fibers.size());
  const size_t smem_bytes = run.smem_bytes;
  unsigned char* smem = reinterpret_cast<unsigned char*>(llmrec::smem_raw);
  // Uninitialised shared memory reads as NaN (0xff bytes) for fp16, bf16 and fp32.
  std::memset(smem, 0xff, smem_bytes);
  std::memset(smem + smem_bytes, kCanary, 4096);
  run.warp_waiting.assign(run.slots.size(), 0);
  run.block_waiting = 0;
  run.done = 0;
  for (Fiber& f : run.fibers) {
    f.state = State::kRunnable;
    if (getcontext(&f.ctx) != 0) fail("getcontext failed");
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStackBytes;
    f.ctx.uc_link = &run.scheduler;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  while (run.done < n) {
    bool progressed = false;
    for (int i = 0; i < n; ++i) {
      if (run.fibers[i].state != State::kRunnable) continue;
      progressed = true;
      run.current = i;
      g_thread = {static_cast<unsigned>(i), 0, 0};
      if (swapcontext(&run.scheduler, &run.fibers[i].ctx) != 0) fail("swapcontext failed");
      const int w = i / 32;
      if (run.warp_waiting[w] == lanes_in_warp(w)) {
        run.warp_waiting[w] = 0;
        for (int l = 32 * w; l < 32 * w + lanes_in_warp(w); ++l) {
          run.fibers[l].state = State::kRunnable;
        }
      }
      if (run.block_waiting > 0 && run.block_waiting + run.done == n) {
        run.block_waiting = 0;
        for (Fiber& f : run.fibers) {
          if (f.state == State::kBlockWait) f.state = State::kRunnable;
        }
      }
    }
    if (!progressed) {
      run.current = -1;
      fail("deadlock: a barrier or warp-collective instruction is not reached by all "
           "threads (%d done, %d at __syncthreads)", run.done, run.block_waiting);
    }
  }
  for (int i = 0; i < 4096; ++i) {
    if (smem[smem_bytes + i] != kCanary) {
      run.current = -1;
      fail("write %d bytes past the end of the %zu bytes of dynamic shared memory", i,
           smem_bytes);
    }
  }
}

void run_grid(dim3 grid, dim3 block, size_t smem_bytes, const std::function<void()>& body) {
  if (block.y != 1 || block.z != 1 || block.x == 0 || block.x % 32 != 0) {
    fail("block (%u, %u, %u): only 1-D blocks of whole warps are emulated", block.x, block.y,
         block.z);
  }
  if (smem_bytes > kSmemCapacity) fail("%zu bytes of shared memory requested", smem_bytes);
  const int n = static_cast<int>(block.x);
  Run run;
  run.fibers.resize(n);
  for (Fiber& f : run.fibers) f.stack.reset(new char[kStackBytes]);
  run.slots.resize((n + 31) / 32);
  run.body = &body;
  run.smem_bytes = smem_bytes;
  g_run = &run;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        g_block = {x, y, z};
        run_block(run);
      }
    }
  }
  g_run = nullptr;
}

}  // namespace emu

namespace emu {

cudaError_t get_last_error() { return cudaSuccess; }

cudaError_t get_device(int* device) {
  *device = 0;
  return cudaSuccess;
}

cudaError_t func_set_max_smem(int attr, int value) {
  if (attr == static_cast<int>(cudaFuncAttributeMaxDynamicSharedMemorySize) &&
      static_cast<size_t>(value) > kSmemCapacity) {
    return cudaErrorInvalidValue;
  }
  return cudaSuccess;
}

}  // namespace emu
