// A small CUDA emulator for testing kernels/prune_cuda.cu on a machine without a GPU.
//
// Every CUDA thread of a block is a fiber on one host thread; blocks of a launch run one after
// the other (so `__shared__` becomes `static`), __syncthreads is a barrier of the block's
// fibers (a divergent one deadlocks and aborts), warp shuffles exchange through per-warp slots
// between two warp barriers, and wmma fragments are whole 16x16 tiles held by every lane (lane
// 0 stores). It checks index/bound/synchronisation logic and results; it says nothing about
// timing, memory-model subtleties across blocks that run concurrently, or the real wmma layout.
#pragma once

#include <ucontext.h>

#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
struct alignas(16) float4 {
  float x, y, z, w;
};

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaMemsetAsync(void* p, int v, size_t n, cudaStream_t) {
  std::memset(p, v, n);
  return cudaSuccess;
}

namespace emu {
// Cooperative fibers (ucontext) on one host thread: a CUDA thread runs until it waits at a
// barrier, then the next one runs. A pass in which no fiber makes progress is a deadlock
// (e.g. a __syncthreads not reached by the whole block): it aborts.
struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  bool done = false;
  dim3 tid;
};
inline dim3 g_block_dim, g_grid_dim, g_block;
inline std::vector<Fiber> g_fibers;
inline int g_cur = 0;
inline ucontext_t g_sched;
inline std::function<void()> g_body;
inline uint64_t g_progress = 0;
inline std::vector<uint64_t> g_slots;  // 32 per warp
inline int g_sync_acc = 0;

struct Barrier {
  int count = 0, arrived = 0;
  uint64_t gen = 0;
};
inline Barrier g_block_barrier;
inline std::vector<Barrier> g_warp_barriers;

inline void yield() { swapcontext(&g_fibers[g_cur].ctx, &g_sched); }
inline void wait(Barrier& b) {
  const uint64_t my = b.gen;
  ++g_progress;
  if (++b.arrived == b.count) {
    b.arrived = 0;
    ++b.gen;
    return;
  }
  while (b.gen == my) yield();
}
inline void fiber_entry() {
  g_body();
  g_fibers[g_cur].done = true;
  ++g_progress;
}
inline dim3& cur_thread() { return g_fibers[g_cur].tid; }

// Runs one block to completion.
inline void run_block() {
  const int nt = static_cast<int>(g_fibers.size());
  for (int t = 0; t < nt; ++t) {
    Fiber& f = g_fibers[t];
    f.done = false;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = &g_sched;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  int live = nt;
  while (live > 0) {
    const uint64_t before = g_progress;
    live = 0;
    for (int t = 0; t < nt; ++t) {
      if (g_fibers[t].done) continue;
      g_cur = t;
      swapcontext(&g_sched, &g_fibers[t].ctx);
      if (!g_fibers[t].done) ++live;
    }
    if (live > 0 && g_progress == before) {
      std::fprintf(stderr, "cuda_emu: deadlock in block (%u, %u, %u)\n", g_block.x, g_block.y, g_block.z);
      std::abort();
    }
  }
}
}  // namespace emu

#define threadIdx (::emu::cur_thread())
#define blockIdx (::emu::g_block)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)

inline void __syncthreads() { emu::wait(emu::g_block_barrier); }
inline int __syncthreads_or(int p) {
  __syncthreads();
  if (p) emu::g_sync_acc = 1;
  __syncthreads();
  const int r = emu::g_sync_acc;
  __syncthreads();
  if (threadIdx.x == 0) emu::g_sync_acc = 0;
  return r;  // the next barrier of the block orders the reset before any later use
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T emu_shfl(T v, int src) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  emu::g_slots[warp * 32 + lane] = bits;
  emu::wait(emu::g_warp_barriers[warp]);
  uint64_t got = emu::g_slots[warp * 32 + src];
  emu::wait(emu::g_warp_barriers[warp]);
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int o) {
  return emu_shfl(v, (threadIdx.x & 31) ^ o);
}
template <typename T>
T __shfl_up_sync(unsigned, T v, int d) {
  const int lane = threadIdx.x & 31;
  const T got = emu_shfl(v, lane >= d ? lane - d : lane);
  return got;
}

inline int atomicAdd(int* p, int v) { return std::atomic_ref<int>(*p).fetch_add(v); }
inline int atomicMax(int* p, int v) {
  std::atomic_ref<int> r(*p);
  int cur = r.load();
  while (cur < v && !r.compare_exchange_weak(cur, v)) {
  }
  return cur;
}
inline int atomicMin(int* p, int v) {
  std::atomic_ref<int> r(*p);
  int cur = r.load();
  while (cur > v && !r.compare_exchange_weak(cur, v)) {
  }
  return cur;
}
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
  std::atomic_ref<unsigned long long> r(*p);
  unsigned long long cur = r.load();
  while (cur < v && !r.compare_exchange_weak(cur, v)) {
  }
  return cur;
}
template <typename T>
T __ldcg(const T* p) {
  if (reinterpret_cast<uintptr_t>(p) % alignof(T) != 0) {  // a vector load on the GPU faults
    std::fprintf(stderr, "emu: misaligned __ldcg of %zu bytes at %p\n", sizeof(T), static_cast<const void*>(p));
    std::abort();
  }
  return *p;
}

inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }

// fp16 / bf16 storage types (bit-compatible with CUDA's).
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};
inline float __half2float(__half h) {
  _Float16 f;
  std::memcpy(&f, &h.bits, 2);
  return static_cast<float>(f);
}
inline __half __float2half(float x) {
  const _Float16 f = static_cast<_Float16>(x);
  __half h;
  std::memcpy(&h.bits, &f, 2);
  return h;
}
inline float __bfloat162float(__nv_bfloat16 h) {
  const uint32_t u = static_cast<uint32_t>(h.bits) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  __nv_bfloat16 h;
  if ((u & 0x7fffffffu) > 0x7f800000u) {
    h.bits = static_cast<uint16_t>((u >> 16) | 0x40u);
  } else {
    u += 0x7fffu + ((u >> 16) & 1u);
    h.bits = static_cast<uint16_t>(u >> 16);
  }
  return h;
}
inline float emu_to_f32(float x) { return x; }
inline float emu_to_f32(__half x) { return __half2float(x); }
inline float emu_to_f32(__nv_bfloat16 x) { return __bfloat162float(x); }

namespace nvcuda {
namespace wmma {
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
namespace precision {
struct tf32 {};
}  // namespace precision
enum layout_t { mem_row_major, mem_col_major };
// Every lane holds the whole tile, row-major [rows][cols] of the operand (A: M x K, B: K x N,
// accumulator: M x N); `x` / `num_elements` allow the element-wise updates real code makes.
template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static constexpr int num_elements = 16 * 16;
  float x[16 * 16];
};
template <typename F>
void fill_fragment(F& f, float v) {
  for (float& e : f.x) e = v;
}
// tf32: round to nearest (ties away from zero) to 10 mantissa bits, as cvt.rna.tf32.f32.
inline float __float_to_tf32(float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u = (u + 0x1000u) & ~0x1fffu;
  std::memcpy(&v, &u, 4);
  return v;
}
// CUDA requires 256-bit aligned fragment pointers (and ldm a multiple of 16 bytes).
inline void check_fragment_address(const void* p, unsigned ldm_bytes) {
  if (reinterpret_cast<uintptr_t>(p) % 32 != 0 || ldm_bytes % 16 != 0) {
    std::fprintf(stderr, "emu: misaligned wmma fragment address %p or ldm %u bytes\n", p, ldm_bytes);
    std::abort();
  }
}
template <typename T>
void load_matrix_sync(fragment<matrix_a, 16, 16, 16, T, row_major>& f, const T* p, unsigned ldm) {
  check_fragment_address(p, ldm * sizeof(T));
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 16; ++k) f.x[i * 16 + k] = emu_to_f32(p[i * ldm + k]);
}
template <typename T>
void load_matrix_sync(fragment<matrix_b, 16, 16, 16, T, col_major>& f, const T* p, unsigned ldm) {
  check_fragment_address(p, ldm * sizeof(T));
  for (int k = 0; k < 16; ++k)
    for (int n = 0; n < 16; ++n) f.x[k * 16 + n] = emu_to_f32(p[n * ldm + k]);
}
inline void load_matrix_sync(fragment<matrix_a, 16, 16, 8, precision::tf32, row_major>& f, const float* p,
                             unsigned ldm) {
  check_fragment_address(p, ldm * 4);
  for (int i = 0; i < 16; ++i)
    for (int k = 0; k < 8; ++k) f.x[i * 8 + k] = p[i * ldm + k];
}
inline void load_matrix_sync(fragment<matrix_b, 16, 16, 8, precision::tf32, col_major>& f, const float* p,
                             unsigned ldm) {
  check_fragment_address(p, ldm * 4);
  for (int k = 0; k < 8; ++k)
    for (int n = 0; n < 16; ++n) f.x[k * 16 + n] = p[n * ldm + k];
}
template <int K, typename TA, typename TB, typename LA, typename LB>
void mma_sync(fragment<accumulator, 16, 16, K, float>& d, const fragment<matrix_a, 16, 16, K, TA, LA>& a,
              const fragment<matrix_b, 16, 16, K, TB, LB>& b, const fragment<accumulator, 16, 16, K, float>& c) {
  float out[256];
  for (int i = 0; i < 16; ++i)
    for (int n = 0; n < 16; ++n) {
      float s = c.x[i * 16 + n];
      for (int k = 0; k < K; ++k) s += a.x[i * K + k] * b.x[k * 16 + n];
      out[i * 16 + n] = s;
    }
  std::memcpy(d.x, out, sizeof(out));
}
template <int K>
void store_matrix_sync(float* p, const fragment<accumulator, 16, 16, K, float>& f, unsigned ldm, layout_t) {
  check_fragment_address(p, ldm * 4);
  if ((threadIdx.x & 31) == 0)
    for (int i = 0; i < 16; ++i)
      for (int n = 0; n < 16; ++n) p[i * ldm + n] = f.x[i * 16 + n];
  emu::wait(emu::g_warp_barriers[threadIdx.x >> 5]);  // warp-collective
}
}  // namespace wmma
}  // namespace nvcuda

namespace fastprune_cuda {
// Runs every block of the grid in turn, each with blockDim fibers.
template <typename... Params, typename... Actual>
void fp_launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t, bool /*pdl: launches are in order here*/,
               Actual... args) {
  const int nt = static_cast<int>(block.x * block.y * block.z);
  emu::g_block_dim = block;
  emu::g_grid_dim = grid;
  emu::g_fibers.resize(nt);
  for (int t = 0; t < nt; ++t) {
    emu::g_fibers[t].tid = dim3(t, 0, 0);
    emu::g_fibers[t].stack.resize(256 * 1024);
  }
  emu::g_block_barrier = emu::Barrier{nt, 0, 0};
  emu::g_warp_barriers.assign((nt + 31) / 32, emu::Barrier{32, 0, 0});
  emu::g_slots.assign(((nt + 31) / 32) * 32, 0);
  emu::g_body = [&] { kernel(args...); };
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
      for (unsigned x = 0; x < grid.x; ++x) {
        emu::g_block = dim3(x, y, z);
        emu::run_block();
      }
}
}  // namespace fastprune_cuda
