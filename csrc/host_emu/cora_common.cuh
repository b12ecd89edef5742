// Host-emulation replacement of csrc/cora_common.cuh: the same names, with a functional CPU
// model of each PTX instruction (see emu_runtime.h). Element types come from the real
// csrc/cora_types.cuh. Every shared-memory access of a modelled instruction is checked to lie
// inside the launch's dynamic shared memory, and 16-byte accesses to be 16-byte aligned.
#pragma once

#include <cstdint>
#include <cstring>

#include "cora_types.cuh"

#define LLMREC_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ((void)(stream), ::emu::launch(kernel, dim3(grid), dim3(block), (smem), __VA_ARGS__))

namespace llmrec {

inline void cp_async_16(void* smem_dst, const void* gmem_src, bool valid) {
  if (reinterpret_cast<uintptr_t>(smem_dst) % 16 != 0 || !emu::in_smem(smem_dst, 16)) {
    emu::fail("cp.async: shared destination %p misaligned or outside shared memory", smem_dst);
  }
  if (valid) {
    if (reinterpret_cast<uintptr_t>(gmem_src) % 16 != 0) {
      emu::fail("cp.async: global source %p is not 16-byte aligned", gmem_src);
    }
    std::memcpy(smem_dst, gmem_src, 16);
  } else {
    std::memset(smem_dst, 0, 16);
  }
}

inline void cp_async_commit() {}

template <int N>
inline void cp_async_wait() {}

namespace emu_detail {

inline void ldmatrix(uint32_t (&r)[4], const void* row, bool trans) {
  emu::WarpSlots& s = emu::warp_slots();
  const int lane = emu::lane();
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0 || !emu::in_smem(row, 16)) {
    emu::fail("ldmatrix: row address %p misaligned or outside shared memory (lane %d)", row, lane);
  }
  s.addr[lane] = row;
  emu::warp_sync();
  for (int i = 0; i < 4; ++i) {
    uint16_t lo, hi;
    if (!trans) {  // lane gets (row lane/4, cols 2*(lane%4), +1) of matrix i
      const uint16_t* p = static_cast<const uint16_t*>(s.addr[8 * i + lane / 4]);
      lo = p[2 * (lane % 4)];
      hi = p[2 * (lane % 4) + 1];
    } else {  // lane gets (rows 2*(lane%4), +1; col lane/4) of matrix i
      lo = static_cast<const uint16_t*>(s.addr[8 * i + 2 * (lane % 4)])[lane / 4];
      hi = static_cast<const uint16_t*>(s.addr[8 * i + 2 * (lane % 4) + 1])[lane / 4];
    }
    r[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
  }
  emu::warp_sync();
}

template <typename T>
inline float half_of(uint32_t word, int which) {
  const uint16_t bits = static_cast<uint16_t>(which ? word >> 16 : word & 0xffffu);
  T v;
  std::memcpy(static_cast<void*>(&v), &bits, 2);
  return to_float(v);
}

// D = A B + C for one m16n8k16 tile, from the fragments held by the 32 lanes.
template <typename T>
inline void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu::WarpSlots& s = emu::warp_slots();
  const int lane = emu::lane();
  std::memcpy(s.a[lane], a, sizeof(s.a[lane]));
  s.b[lane][0] = b0;
  s.b[lane][1] = b1;
  emu::warp_sync();
  auto A = [&](int row, int k) {  // a0 (g, 2t..), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
    const int src = (row % 8) * 4 + (k % 8) / 2;
    const int reg = (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0);
    return half_of<T>(s.a[src][reg], k % 2);
  };
  auto B = [&](int k, int n) {  // b0 (k 2t.., n g), b1 (k 2t+8.., n g)
    const int src = n * 4 + (k % 8) / 2;
    return half_of<T>(s.b[src][k >= 8 ? 1 : 0], k % 2);
  };
  const int g = lane / 4, t = lane % 4;
  for (int q = 0; q < 4; ++q) {
    const int row = g + (q >= 2 ? 8 : 0), col = 2 * t + (q % 2);
    float acc = c[q];
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    c[q] = acc;
  }
  emu::warp_sync();
}

}  // namespace emu_detail

inline void ldmatrix_x4(uint32_t (&r)[4], const void* smem_row) {
  emu_detail::ldmatrix(r, smem_row, false);
}

inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem_row) {
  emu_detail::ldmatrix(r, smem_row, true);
}

template <typename T>
struct Mma {
  static inline void run(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    emu_detail::mma<T>(c, a, b0, b1);
  }
};

}  // namespace llmrec
