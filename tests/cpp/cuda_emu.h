// A small CUDA emulator for testing kernels/prune_cuda.cu on a machine without a GPU.
//
// Every CUDA thread of a block is a fiber on one host thread; clusters of a launch run one after
// the other, in grid order or shuffled (launch; a plain launch: clusters of one block, so
// `__shared__` becomes `static`), the blocks of a cluster run together, each with its own
// dynamic shared memory (fp_dyn_smem; a cluster kernel keeps all of its shared memory there), a
// block's warps run one at a time between its barriers (so a missing one shows), __syncthreads
// is a barrier of the block's fibers and fp_cluster_sync one of the cluster's (a divergent one
// deadlocks and aborts), warp shuffles exchange through per-warp slots between two warp
// barriers, and wmma fragments are whole 16x16 tiles held by every lane (lane 0 stores). It
// checks index/bound/synchronisation logic and results; it says nothing about timing,
// memory-model subtleties across blocks that run concurrently, or the real wmma layout.
#pragma once

#include <ucontext.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
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
// 16-byte aligned as CUDA's own (a vector access elsewhere faults on the GPU): the emulator is
// built with UBSan, whose alignment check then stops at it (test_emulator_stops_at_undefined_behaviour).
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
struct alignas(16) float4 {
  float x, y, z, w;
};

using cudaStream_t = void*;
enum cudaError_t { cudaSuccess = 0, cudaErrorInvalidValue = 1 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }

#if defined(__SANITIZE_THREAD__)
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_ignore_thread_begin();
extern "C" void __tsan_ignore_thread_end();
#define EMU_TSAN 1
#else
#define EMU_TSAN 0
#endif
namespace emu {
#if EMU_TSAN
// Built with -fsanitize=thread (tests/cpp/emu_race.cpp), ThreadSanitizer checks the kernels'
// shared and global memory accesses for races whatever their values: every CUDA thread is a TSan
// fiber and a switch between fibers orders nothing, so only the barriers do (block, warp and
// cluster barriers release before arriving and acquire after, on a slot per generation parity)
// and the atomics (std::atomic_ref, seq_cst: stronger than CUDA's relaxed ones, so a missing
// fence goes unseen). The emulator's own bookkeeping is ignored. Clusters that run one after
// another are ordered (every fiber releases g_block_done at its end; a cluster's fibers acquire
// g_cluster_start, released after them, at their start), which also keeps a plain launch's
// `static` shared memory and the reused fiber stacks from reporting: races between blocks
// outside a cluster go unseen. Fibers of one cluster are not ordered by one ending before
// another starts (tests/cpp/emu_race.cpp's planted race: a warp runs to its end before the
// next one starts).
inline char g_block_done, g_cluster_start;
inline void* g_host_fiber = nullptr;
struct TsanIgnore {
  TsanIgnore() { __tsan_ignore_thread_begin(); }
  ~TsanIgnore() { __tsan_ignore_thread_end(); }
};
#endif
// Cooperative fibers (ucontext) on one host thread: a CUDA thread runs until it waits at a
// barrier, then the next one runs. A pass in which no fiber makes progress is a deadlock
// (e.g. a __syncthreads not reached by the whole block): it aborts.
// A cp.async copy not yet landed: its destination and the 16 bytes it will write, read when
// issued (a kernel issues a copy of memory another block wrote only after a barrier that orders
// that write before it).
struct AsyncCopy {
  unsigned char* dst;
  unsigned char bytes[16];
};
constexpr uint64_t kNoArrival = ~0ull;
struct Fiber {
  ucontext_t ctx;
  std::unique_ptr<char[]> stack;  // not zero-filled: untouched pages of a cluster's stacks stay free
  bool done = false;
  dim3 tid;
  int blk = 0;  // index of its block in g_blocks
  uint64_t cluster_arrival = kNoArrival;       // fp_cluster_arrive_relaxed's, until its wait
  std::vector<AsyncCopy> open;                 // cp.async copies since the last commit
  std::vector<std::vector<AsyncCopy>> groups;  // committed groups, oldest first
  void* tsan = nullptr;
  bool ignoring = false;
};
constexpr size_t kStack = 256 * 1024;

struct Barrier {
  int count = 0, arrived = 0;
  uint64_t gen = 0;
  char sync[2] = {0, 0};
};

// One running block: its index, barriers, shuffle slots and dynamic shared memory.
struct Block {
  dim3 idx;
  Barrier barrier;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> slots;  // 32 per warp
  int sync_acc = 0;
  std::vector<unsigned char> smem_buf;
  unsigned char* smem = nullptr;  // 128-byte aligned, as CUDA's dynamic shared memory
  size_t smem_bytes = 0;
};
inline dim3 g_block_dim, g_grid_dim;
inline std::vector<Fiber> g_fibers;
inline std::vector<Block> g_blocks;  // the running cluster, by rank
inline Barrier g_cluster_barrier;
inline int g_cur = 0;
inline ucontext_t g_sched;
inline std::function<void()> g_body;
inline uint64_t g_progress = 0;

inline void yield() {
#if EMU_TSAN
  __tsan_switch_to_fiber(g_host_fiber, __tsan_switch_to_fiber_no_sync);
#endif
  swapcontext(&g_fibers[g_cur].ctx, &g_sched);
}
// A barrier's two halves: arrive (returns the generation that the arrival belongs to) and wait
// until that generation has passed; wait is both.
inline uint64_t arrive(Barrier& b) {
#if EMU_TSAN
  __tsan_release(&b.sync[b.gen & 1]);
  TsanIgnore bookkeeping;
#endif
  const uint64_t my = b.gen;
  ++g_progress;
  if (++b.arrived == b.count) {
    b.arrived = 0;
    ++b.gen;
  }
  return my;
}
inline void wait_past(Barrier& b, uint64_t my) {
#if EMU_TSAN
  __tsan_ignore_thread_begin();
#endif
  while (b.gen == my) yield();
#if EMU_TSAN
  __tsan_ignore_thread_end();
  __tsan_acquire(&b.sync[my & 1]);
#endif
}
inline void wait(Barrier& b) { wait_past(b, arrive(b)); }
inline void fiber_entry() {
#if EMU_TSAN
  if (g_fibers[g_cur].ignoring) {
    g_fibers[g_cur].ignoring = false;
    __tsan_ignore_thread_end();
  }
  __tsan_acquire(&g_cluster_start);
#endif
  g_body();
  {
    const Fiber& f = g_fibers[g_cur];
    bool pending = !f.open.empty();
    for (const auto& g : f.groups) pending |= !g.empty();
    if (pending) {
      std::fprintf(stderr, "cuda_emu: thread %u ended with cp.async copies it never waited for\n", f.tid.x);
      std::abort();
    }
    if (f.cluster_arrival != kNoArrival) {
      std::fprintf(stderr, "cuda_emu: thread %u ended with a cluster arrival it never waited for\n", f.tid.x);
      std::abort();
    }
  }
#if EMU_TSAN
  __tsan_release(&g_block_done);
  __tsan_ignore_thread_begin();
  g_fibers[g_cur].ignoring = true;
#endif
  g_fibers[g_cur].done = true;
  ++g_progress;
}
inline dim3& cur_thread() { return g_fibers[g_cur].tid; }
inline Block& cur_block() { return g_blocks[g_fibers[g_cur].blk]; }

// Runs the blocks in g_blocks (one cluster) to completion, blockDim fibers each.
inline void run_cluster() {
#if EMU_TSAN
  g_host_fiber = __tsan_get_current_fiber();
  __tsan_acquire(&g_block_done);  // the clusters before this one, and the host's writes
  __tsan_release(&g_cluster_start);
#endif
  const int per = static_cast<int>(g_block_dim.x * g_block_dim.y * g_block_dim.z);
  const int nt = per * static_cast<int>(g_blocks.size());
  if (static_cast<int>(g_fibers.size()) < nt) g_fibers.resize(nt);
  for (int t = 0; t < nt; ++t) {
    Fiber& f = g_fibers[t];
    if (!f.stack) f.stack.reset(new char[kStack]);
#if EMU_TSAN
    if (!f.tsan) f.tsan = __tsan_create_fiber(0);
#endif
    f.tid = dim3(t % per, 0, 0);
    f.blk = t / per;
    f.done = false;
    f.cluster_arrival = kNoArrival;
    f.open.clear();
    f.groups.clear();
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.get();
    f.ctx.uc_stack.ss_size = kStack;
    f.ctx.uc_link = &g_sched;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  g_cluster_barrier = Barrier{nt, 0, 0};
  // Block by block: each runs as far as it can (to a cluster barrier, or to its end) before the
  // next one starts, so a read of another block's shared memory that no cluster barrier orders
  // after its writes sees the NaN fill. A block that has ended gets its shared memory refilled,
  // so a read after its owner left (no cluster barrier before the exit) sees NaN too.
  //
  // Inside a block, warp by warp: a warp runs as far as it can (to a block or cluster barrier, or
  // to its end) before the next one starts, in increasing warp order in blocks of even
  // x + y + z and decreasing in the others. So a warp's shared-memory writes that no barrier
  // orders after another warp's reads (or its reads before another's writes) land on the wrong
  // side of them, whichever warp should have come first; running every fiber to its first wait
  // in turn hid a missing barrier after a loop whose reads come before a warp shuffle.
  std::vector<bool> ended(g_blocks.size(), false);
  const int warps = (per + 31) / 32;
  for (int left = nt; left > 0;) {
    const uint64_t before = g_progress;
    for (size_t blk = 0; blk < g_blocks.size(); ++blk) {
      const dim3 bi = g_blocks[blk].idx;
      const bool down = (bi.x + bi.y + bi.z) % 2 != 0;
      for (uint64_t block_pass = g_progress + 1; block_pass != g_progress;) {
        block_pass = g_progress;
        for (int k = 0; k < warps; ++k) {
          const int w = down ? warps - 1 - k : k;
          const int t0 = static_cast<int>(blk) * per + 32 * w, t1 = std::min(t0 + 32, static_cast<int>(blk + 1) * per);
          for (uint64_t pass = g_progress + 1; pass != g_progress;) {
            pass = g_progress;
            for (int t = t0; t < t1; ++t) {
              if (g_fibers[t].done) continue;
              g_cur = t;
#if EMU_TSAN
              __tsan_switch_to_fiber(g_fibers[t].tsan, __tsan_switch_to_fiber_no_sync);
#endif
              swapcontext(&g_sched, &g_fibers[t].ctx);
#if EMU_TSAN
              if (g_fibers[t].done) __tsan_switch_to_fiber(g_host_fiber, __tsan_switch_to_fiber_no_sync);
#endif
              if (g_fibers[t].done) --left;
            }
          }
        }
      }
      bool all_done = true;
      for (int t = static_cast<int>(blk) * per; t < static_cast<int>(blk + 1) * per; ++t) all_done &= g_fibers[t].done;
      if (all_done && !ended[blk]) {
        ended[blk] = true;
        std::memset(g_blocks[blk].smem, 0xff, g_blocks[blk].smem_bytes);
      }
    }
    if (left > 0 && g_progress == before) {
      const dim3 b = g_blocks[0].idx;
      std::fprintf(stderr, "cuda_emu: deadlock in the cluster of block (%u, %u, %u)\n", b.x, b.y, b.z);
      std::abort();
    }
  }
}

// Runs every cluster of the grid in turn: cluster_y blocks along y (grid.y a multiple of it),
// smem_bytes of dynamic shared memory each, filled with 0xff bytes (NaN as floats) so that a
// read of shared memory nobody wrote shows up in the results.
//
// In grid order, or, with FASTPRUNE_EMU_BLOCK_ORDER=<seed> (not 0) in the environment, in an
// order shuffled by that seed: the GPU runs blocks in no set order, and in grid order the last
// block to arrive at a counter is always the last one of its row tile or sample, so a finishing
// step that worked only for that block would pass (test_emulated_block_order_does_not_matter).
inline int g_launches = 0;  // kernel launches so far (the tests count a call's)
inline void launch(const std::function<void()>& body, dim3 grid, dim3 block, unsigned cluster_y, size_t smem_bytes) {
  ++g_launches;
#if EMU_TSAN
  struct Done {
    ~Done() { __tsan_acquire(&g_block_done); }  // the host reads after it
  } done;
  TsanIgnore ignore_launch;
#endif
  if (cluster_y == 0 || grid.y % cluster_y != 0) {
    std::fprintf(stderr, "cuda_emu: grid.y %u is not a multiple of the cluster's %u blocks\n", grid.y, cluster_y);
    std::abort();
  }
  const int per = static_cast<int>(block.x * block.y * block.z), warps = (per + 31) / 32;
  g_block_dim = block;
  g_grid_dim = grid;
  g_body = body;
  g_blocks.assign(cluster_y, Block{});
  std::vector<dim3> origins;  // each cluster's first block
  for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y0 = 0; y0 < grid.y; y0 += cluster_y)
      for (unsigned x = 0; x < grid.x; ++x) origins.emplace_back(x, y0, z);
  const char* order = std::getenv("FASTPRUNE_EMU_BLOCK_ORDER");
  if (order != nullptr && std::strtoull(order, nullptr, 10) != 0) {
    std::mt19937_64 rng(std::strtoull(order, nullptr, 10));
    std::shuffle(origins.begin(), origins.end(), rng);
  }
  for (const dim3 o : origins) {
    for (unsigned r = 0; r < cluster_y; ++r) {
      Block& b = g_blocks[r];
      b.idx = dim3(o.x, o.y + r, o.z);
      b.barrier = Barrier{per, 0, 0};
      b.warp_barriers.assign(warps, Barrier{32, 0, 0});
      b.slots.assign(warps * 32, 0);
      b.sync_acc = 0;
      b.smem_buf.assign(smem_bytes + 128, 0xff);
      b.smem = b.smem_buf.data() + (128 - reinterpret_cast<uintptr_t>(b.smem_buf.data()) % 128);
      b.smem_bytes = smem_bytes;
    }
    run_cluster();
  }
}
}  // namespace emu

#define threadIdx (::emu::cur_thread())
#define blockIdx (::emu::cur_block().idx)
#define blockDim (::emu::g_block_dim)
#define gridDim (::emu::g_grid_dim)

inline void __syncthreads() { emu::wait(emu::cur_block().barrier); }
inline int __syncthreads_or(int p) {
  __syncthreads();
#if EMU_TSAN
  __tsan_ignore_thread_begin();
#endif
  if (p) emu::cur_block().sync_acc = 1;
#if EMU_TSAN
  __tsan_ignore_thread_end();
#endif
  __syncthreads();
  const int r = emu::cur_block().sync_acc;
  __syncthreads();
  if (threadIdx.x == 0) emu::cur_block().sync_acc = 0;
  return r;  // the next barrier of the block orders the reset before any later use
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }

template <typename T>
T emu_shfl(T v, int src) {
  static_assert(sizeof(T) <= 8, "shuffle of at most 8 bytes");
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  emu::Block& blk = emu::cur_block();
  blk.slots[warp * 32 + lane] = bits;
  emu::wait(blk.warp_barriers[warp]);
  uint64_t got = blk.slots[warp * 32 + src];
  emu::wait(blk.warp_barriers[warp]);
  T out;
  std::memcpy(&out, &got, sizeof(T));
  return out;
}
template <typename T>
T __shfl_xor_sync(unsigned, T v, int o) {
  return emu_shfl(v, (threadIdx.x & 31) ^ o);
}
// Every lane of the warp takes part (a full mask), as in the kernels.
inline unsigned __ballot_sync(unsigned, int p) {
  const int warp = threadIdx.x >> 5;
  emu::Block& blk = emu::cur_block();
  blk.slots[threadIdx.x] = p != 0;
  emu::wait(blk.warp_barriers[warp]);
  unsigned bits = 0u;
  for (int l = 0; l < 32; ++l) bits |= blk.slots[warp * 32 + l] != 0 ? 1u << l : 0u;
  emu::wait(blk.warp_barriers[warp]);
  return bits;
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
inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) {
  return std::atomic_ref<unsigned long long>(*p).fetch_add(v);
}
inline unsigned long long atomicCAS(unsigned long long* p, unsigned long long expect, unsigned long long desired) {
  std::atomic_ref<unsigned long long>(*p).compare_exchange_strong(expect, desired);
  return expect;  // the word found: the old value either way
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
inline float __int_as_float(int i) {
  float f;
  std::memcpy(&f, &i, 4);
  return f;
}
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
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
  emu::wait(emu::cur_block().warp_barriers[threadIdx.x >> 5]);  // warp-collective
}
}  // namespace wmma
}  // namespace nvcuda

// Distributed shared memory: the cluster kernel's dynamic shared memory, a cluster-wide
// barrier, and a pointer into this block's dynamic shared memory mapped to block `rank` of the
// cluster (it must point into that memory: the GPU maps only shared-memory addresses).
inline unsigned char* fp_dyn_smem() { return emu::cur_block().smem; }
// The halves of the cluster barrier (fp_cluster_arrive_relaxed, then fp_cluster_wait): a thread
// with an arrival pending may not arrive again, nor wait without one.
inline uint64_t& emu_cluster_arrival() { return emu::g_fibers[emu::g_cur].cluster_arrival; }
inline void emu_cluster_misuse(const char* what) {
  std::fprintf(stderr, "emu: thread %u of block rank %d: %s\n", threadIdx.x, emu::g_fibers[emu::g_cur].blk, what);
  std::abort();
}
inline void fp_cluster_sync() {
  if (emu_cluster_arrival() != emu::kNoArrival) emu_cluster_misuse("cluster barrier with an arrival pending");
  emu::wait(emu::g_cluster_barrier);
}
inline void fp_cluster_sync_relaxed() { fp_cluster_sync(); }
inline void fp_cluster_arrive_relaxed() {
  if (emu_cluster_arrival() != emu::kNoArrival) emu_cluster_misuse("cluster arrive with an arrival pending");
  emu_cluster_arrival() = emu::arrive(emu::g_cluster_barrier);
}
inline void fp_cluster_wait() {
  if (emu_cluster_arrival() == emu::kNoArrival) emu_cluster_misuse("cluster wait without an arrival");
  emu::wait_past(emu::g_cluster_barrier, emu_cluster_arrival());
  emu_cluster_arrival() = emu::kNoArrival;
}
template <typename X>
X* fp_cluster_map(X* p, int rank) {
  const emu::Block& own = emu::cur_block();
  const auto* c = reinterpret_cast<const unsigned char*>(p);
  if (c < own.smem || c >= own.smem + own.smem_bytes || rank < 0 || rank >= static_cast<int>(emu::g_blocks.size())) {
    std::fprintf(stderr, "emu: fp_cluster_map of %p to rank %d: not in this block's shared memory\n",
                 static_cast<const void*>(p), rank);
    std::abort();
  }
  return reinterpret_cast<X*>(emu::g_blocks[rank].smem + (c - own.smem));
}

// cp.async: 16 bytes from global memory (zeros where !pred) into this block's dynamic shared
// memory, landing when the thread waits for its group (poison until then), so that a read that
// no wait (own copies) or wait and barrier (others' copies) orders after it sees NaN.
inline void fp_cp_async16(void* smem, const void* gmem, bool pred) {
  emu::Block& own = emu::cur_block();
  auto* dst = static_cast<unsigned char*>(smem);
  if (dst < own.smem || dst + 16 > own.smem + own.smem_bytes || reinterpret_cast<uintptr_t>(dst) % 16 != 0 ||
      (pred && reinterpret_cast<uintptr_t>(gmem) % 16 != 0)) {
    std::fprintf(stderr, "emu: cp.async from %p to %p: not 16-byte aligned or not in dynamic shared memory\n", gmem,
                 smem);
    std::abort();
  }
  emu::AsyncCopy c;
  c.dst = dst;
  if (pred) std::memcpy(c.bytes, gmem, 16);
  else std::memset(c.bytes, 0, 16);
  std::memset(dst, 0xff, 16);
  emu::g_fibers[emu::g_cur].open.push_back(c);
}
inline void fp_cp_async_commit() {
  emu::Fiber& f = emu::g_fibers[emu::g_cur];
  f.groups.push_back(std::move(f.open));
  f.open.clear();
}
// The groups a wait completes land newest first: nothing orders copies of different groups to
// one address, so an older one landing last must not break the kernel.
template <int kPending>
void fp_cp_async_wait() {
  auto& groups = emu::g_fibers[emu::g_cur].groups;
  const int land = static_cast<int>(groups.size()) - kPending;
  for (int g = land - 1; g >= 0; --g)
    for (const emu::AsyncCopy& c : groups[g]) std::memcpy(c.dst, c.bytes, 16);
  if (land > 0) groups.erase(groups.begin(), groups.begin() + land);
}

namespace fastprune_cuda {
template <typename... Params, typename... Actual>
void fp_launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t, bool /*pdl: launches are in order here*/,
               Actual... args) {
  emu::launch([&] { kernel(args...); }, grid, block, 1, 0);
}
// A launch the GPU refuses aborts here: more dynamic shared memory than the kernel's opt-in
// (smem_max), an opt-in past sm_90's 227 KB per block, or a cluster past the 16 blocks of the
// non-portable opt-in (fp_launch_cluster gives it past 8).
template <typename... Params, typename... Actual>
void fp_launch_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, unsigned cluster_y, size_t smem_bytes,
                       size_t smem_max, cudaStream_t, Actual... args) {
  if (smem_bytes > smem_max || smem_max > 227 * 1024 || cluster_y > 16) {
    std::fprintf(stderr, "emu: cluster launch refused: %zu bytes of shared memory (opt-in %zu), %u blocks a cluster\n",
                 smem_bytes, smem_max, cluster_y);
    std::abort();
  }
  emu::launch([&] { kernel(args...); }, grid, block, cluster_y, smem_bytes);
}
// The GPU places a cluster where a GPC has that many SMs free; here every launch it takes fits,
// up to FASTPRUNE_EMU_MAX_CLUSTER blocks where that is set (a GPU whose GPCs are smaller).
template <typename... Params>
bool fp_cluster_fits(void (*)(Params...), dim3, unsigned cluster_y, size_t smem_bytes, size_t smem_max, cudaStream_t) {
  const char* most = std::getenv("FASTPRUNE_EMU_MAX_CLUSTER");
  const unsigned limit = most != nullptr ? static_cast<unsigned>(std::strtoul(most, nullptr, 10)) : 16u;
  return cluster_y <= limit && cluster_y <= 16 && smem_bytes <= smem_max && smem_max <= 227 * 1024;
}
}  // namespace fastprune_cuda
