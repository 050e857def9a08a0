// CUDA C++ kernels of fastprune::select / prune / prune_padded (see prune_cuda.h for the
// pipeline). Raw pointers and a cudaStream_t only: no ATen/c10/torch header, so this file
// compiles with plain `nvcc -arch=sm_90` / `-arch=sm_80`.
//
// FASTPRUNE_CUDA_EMU (tests only): compiled as plain C++ against tests/cpp/cuda_emu.h, which
// runs every CUDA thread of a block as a host thread, so the index, bound and synchronisation
// logic of these kernels is exercised on the CPU.
#include "prune_cuda.h"

#ifndef FASTPRUNE_CUDA_EMU
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>
#endif

#include <climits>
#include <cmath>
#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <tuple>
#include <type_traits>

#ifndef FASTPRUNE_CUDA_EMU
namespace fastprune_cuda {
// kernel<<<grid, block, smem_bytes, stream>>>(args...) with one launch attribute.
template <typename... Params, typename... Actual>
void fp_launch_attr(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem_bytes, cudaStream_t stream,
                    cudaLaunchAttribute attr, Actual... args) {
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem_bytes;
  cfg.stream = stream;
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  cudaLaunchKernelEx(&cfg, kernel, args...);  // errors surface through cudaGetLastError()
}

// kernel<<<grid, block, 0, stream>>>(args...), or with `pdl` a programmatic dependent launch
// (sm_90+): the kernel may start while the previous kernel of the stream is still running, and
// waits for it in pdl_wait(). The emulator provides its own fp_launch.
template <typename... Params, typename... Actual>
void fp_launch(void (*kernel)(Params...), dim3 grid, dim3 block, cudaStream_t stream, bool pdl, Actual... args) {
  if (!pdl) {
    kernel<<<grid, block, 0, stream>>>(args...);
    return;
  }
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  fp_launch_attr(kernel, grid, block, 0, stream, attr, args...);
}

// The kernel's opt-ins for clusters of cluster_y blocks, given once per kernel and device: dynamic
// shared memory past 48 KB, up to smem_max bytes, and past the portable 8 blocks a cluster the
// non-portable sizes (sm_90 takes 16). They are no stream work, so they need not (and inside
// CUDA-graph capture may not) be repeated per launch.
template <typename... Params>
bool fp_opt_in(void (*kernel)(Params...), size_t smem_max, unsigned cluster_y) {
  static std::mutex mu;
  static std::set<std::tuple<const void*, int, bool>> opted;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) return false;
  const bool non_portable = cluster_y > 8;
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), device, non_portable);
  if (opted.count(key) == 0) {
    if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem_max)) !=
            cudaSuccess ||
        (non_portable && cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1) != cudaSuccess))
      return false;
    opted.insert(key);
  }
  return true;
}

cudaLaunchAttribute cluster_attr(unsigned cluster_y) {
  cudaLaunchAttribute attr{};
  attr.id = cudaLaunchAttributeClusterDimension;
  attr.val.clusterDim.x = 1;
  attr.val.clusterDim.y = cluster_y;
  attr.val.clusterDim.z = 1;
  return attr;
}

// kernel<<<grid, block, smem_bytes, stream>>>(args...) as thread block clusters of cluster_y
// blocks along y (sm_90+; grid.y a multiple of it), after the kernel's opt-ins (fp_opt_in).
template <typename... Params, typename... Actual>
void fp_launch_cluster(void (*kernel)(Params...), dim3 grid, dim3 block, unsigned cluster_y, size_t smem_bytes,
                       size_t smem_max, cudaStream_t stream, Actual... args) {
  if (!fp_opt_in(kernel, smem_max, cluster_y)) return;  // errors surface through cudaGetLastError()
  fp_launch_attr(kernel, grid, block, smem_bytes, stream, cluster_attr(cluster_y), args...);
}

// Whether the device places one cluster of cluster_y blocks of `kernel` with smem_bytes of
// dynamic shared memory each (cudaOccupancyMaxActiveClusters: a GPC with that many free SMs),
// asked once per kernel, device and shape. A refused query leaves no launch error behind. Not
// yet asked while `stream` is being captured into a CUDA graph: false, without asking (the
// opt-ins and the query are no stream work, and a capture in global mode may refuse calls it
// does not know to be safe).
template <typename... Params>
bool fp_cluster_fits(void (*kernel)(Params...), dim3 block, unsigned cluster_y, size_t smem_bytes, size_t smem_max,
                     cudaStream_t stream) {
  static std::mutex mu;
  static std::map<std::tuple<const void*, int, unsigned, size_t>, bool> known;
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_tuple(reinterpret_cast<const void*>(kernel), device, cluster_y, smem_bytes);
  const auto at = known.find(key);
  if (at != known.end()) return at->second;
  cudaStreamCaptureStatus capturing = cudaStreamCaptureStatusNone;
  if (cudaStreamIsCapturing(stream, &capturing) != cudaSuccess || capturing != cudaStreamCaptureStatusNone ||
      !fp_opt_in(kernel, smem_max, cluster_y)) {
    (void)cudaGetLastError();
    return false;
  }
  cudaLaunchConfig_t cfg{};
  cfg.gridDim = dim3(1, cluster_y, 1);
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem_bytes;
  cudaLaunchAttribute attr = cluster_attr(cluster_y);
  cfg.attrs = &attr;
  cfg.numAttrs = 1;
  int clusters = 0;
  const bool fits = cudaOccupancyMaxActiveClusters(&clusters, kernel, &cfg) == cudaSuccess && clusters >= 1;
  (void)cudaGetLastError();
  known[key] = fits;
  return fits;
}

// Distributed shared memory of a thread block cluster (sm_90+; the emulator has its own): the
// block's dynamic shared memory; a barrier of every thread of the cluster that releases the
// block's earlier writes and acquires the others' (its arrive compiles to MEMBAR.ALL.GPU first,
// sm_90 SASS); the same barrier without the release, for a block that only waits until the
// others are done reading its shared memory, whole or as its two halves (arrive once done reading
// the others' shared memory, wait before leaving); and p, a pointer into this block's shared memory,
// mapped to the same place in block `rank` of the cluster. Code compiled for an older
// architecture traps: the host launches the cluster kernel only on kernels built for sm_90.
__device__ __forceinline__ unsigned char* fp_dyn_smem() {
  extern __shared__ __align__(128) unsigned char fp_smem_dyn[];
  return fp_smem_dyn;
}
__device__ __forceinline__ void fp_cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void fp_cluster_arrive_relaxed() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void fp_cluster_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.wait.aligned;" ::: "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void fp_cluster_sync_relaxed() {
  fp_cluster_arrive_relaxed();
  fp_cluster_wait();
}
template <typename X>
__device__ __forceinline__ X* fp_cluster_map(X* p, int rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return static_cast<X*>(__cluster_map_shared_rank(static_cast<void*>(p), static_cast<unsigned>(rank)));
#else
  __trap();
  return p;
#endif
}

// cp.async (sm_80+): a 16-byte copy from global to shared memory that does not pass through
// registers. With `pred` false it reads nothing and writes 16 zero bytes (src-size 0). A thread's
// copies are committed in groups; fp_cp_async_wait<n>() returns once at most n of its groups are
// pending. A thread then sees its own copies; other threads' copies need a __syncthreads after
// their waits. Only the one-cluster kernel (sm_90) uses them; the emulator has its own.
__device__ __forceinline__ void fp_cp_async16(void* smem, const void* gmem, bool pred) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(static_cast<unsigned>(__cvta_generic_to_shared(smem))),
               "l"(gmem), "r"(pred ? 16 : 0)
               : "memory");
#else
  __trap();
#endif
}
__device__ __forceinline__ void fp_cp_async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;" ::: "memory");
#else
  __trap();
#endif
}
template <int kPending>
__device__ __forceinline__ void fp_cp_async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;" ::"n"(kPending) : "memory");
#else
  __trap();
#endif
}
}  // namespace fastprune_cuda
#endif

// Tensor-core MMA for S = P Tn^T on fp16/bf16 inputs (wmma, sm_80+); fp32 inputs and older
// architectures use fp32 FMA.
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(FASTPRUNE_EMU_MMA)
#define FP_HAVE_MMA 1
#else
#define FP_HAVE_MMA 0
#endif

namespace fastprune_cuda {
namespace {

constexpr int kThreads = 256;  // every kernel; 8 warps
constexpr int kWarps = kThreads / 32;
constexpr int kBM = 64;   // rows (patches j or i) per tile, kernels A and B
constexpr int kBT = 64;   // prompt tokens per tile, kernel A
constexpr int kBU = 64;   // prompt tokens per shared-memory step, kernel B
constexpr int kChunkAlign = 64;  // D slices of kernel A are multiples of this
constexpr float kEps = 1e-6f;
constexpr unsigned kFull = 0xffffffffu;

// ------------------------------------------------------------------------------------------
// Element types
template <typename T>
__device__ __forceinline__ float to_f32(T x);
template <>
__device__ __forceinline__ float to_f32<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_f32<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_f32<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T zero_of();
template <>
__device__ __forceinline__ float zero_of<float>() { return 0.f; }
template <>
__device__ __forceinline__ __half zero_of<__half>() { return __float2half(0.f); }
template <>
__device__ __forceinline__ __nv_bfloat16 zero_of<__nv_bfloat16>() { return __float2bfloat16(0.f); }

// ------------------------------------------------------------------------------------------
// Arguments shared by kernels A and B (passed by value).
struct Args {
  int64_t B, N, T, D;
  const void* patches;
  int64_t p_sb, p_sr;
  const void* task;
  int64_t t_sb, t_sr;
  const bool* task_mask;
  const bool* patch_mask;
  int mask_voters;
  int64_t row_tiles, ts, kchunk;
  int ksplit;
  float inv_d, inv_sqrt_d;
  float s_scale;  // 2^-k with |S| * s_scale <= 32768: the fp16 halves of S (1 up to D = 32768)
  // workspace
  unsigned long long* counters_a;  // [B * row_tiles][2], tagged (arrive_tagged)
  int* counters_b;
  float* part;
  float* psq;
  float* tsq;
  float* S;
  float* A;
  unsigned long long* keys;
  int* trange;
  int* anyp;
  int* votes;
  int* hist;
  int* list;
  // outputs and options
  int64_t* idx_out;     // select: [B, N] or nullptr
  int64_t* counts_out;  // keep: [B] or nullptr
  int want_keep;
  int64_t keep_tokens;  // <= 0: implicit
  int64_t max_tokens;   // <= 0: no cap
  int oc_rows;          // the one-cluster kernel's rows a block (a multiple of 16, at most 64)
};

template <typename X>
__device__ __forceinline__ X mn(X a, X b) { return a < b ? a : b; }
template <typename X>
__device__ __forceinline__ X mx(X a, X b) { return a > b ? a : b; }

// Programmatic dependent launch. pdl_wait(): block until the previous kernel in the stream has
// finished and its writes are visible; it must come before the first access to anything that
// kernel writes. pdl_launch_dependents(): let the next kernel's blocks be scheduled once every
// block of this one has called it (they then wait in pdl_wait). Both are no-ops for a plain
// launch and below sm_90.
__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// A block's arrival at a last-block-done counter, by one thread after a __syncthreads (the
// barrier orders the whole block's writes before it): one gpu-scope acq_rel atomic, a release of
// those writes and, for the last block, an acquire of everyone's (readers follow the next
// __syncthreads; partials are read with __ldcg). This replaces a __threadfence in every thread
// before and after, which compiles to MEMBAR.SC.GPU (a sequentially consistent fence, more than
// the pattern needs), as CUTLASS's semaphores do. The emulator's atomicAdd is seq_cst.
// T: int, or unsigned long long (arrive_tagged's first word).
template <typename T>
__device__ __forceinline__ T arrive(T* counter) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  T prev;
  if constexpr (sizeof(T) == 8)
    asm volatile("atom.acq_rel.gpu.global.add.u64 %0, [%1], 1;" : "=l"(prev) : "l"(counter) : "memory");
  else
    asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;" : "=r"(prev) : "l"(counter) : "memory");
  return prev;
#else
  return atomicAdd(counter, T{1});
#endif
}

// Kernel A's row-tile counters are pairs of tagged words kArrivalTag << 16 | arrivals, so that no
// memset has to zero them before the kernel: a word without the tag counts as no arrival, and
// the last block stores kFreshCounter back into both (the protocol of kernels/prune_triton.py's
// _arrive_tagged, with the same tag). Other data carries the tag with odds of 2^-48 per word; a
// word with the tag and a nonzero count could only be left by a call still running, whose
// workspace no other call is given.
constexpr unsigned long long kArrivalTag = 0x5A17C3E90B6Dull;
constexpr unsigned long long kFreshCounter = kArrivalTag << 16;

__device__ __forceinline__ unsigned long long cas_acq_rel(unsigned long long* p, unsigned long long expect,
                                                          unsigned long long desired) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 700
  unsigned long long seen;
  asm volatile("atom.acq_rel.gpu.global.cas.b64 %0, [%1], %2, %3;"
               : "=l"(seen)
               : "l"(p), "l"(expect), "l"(desired)
               : "memory");
  return seen;
#else
  return atomicCAS(p, expect, desired);
#endif
}

// Kernel B's arrival counter of sample b, zeroed by kernel A: kernel B reads it after kernel A (in
// stream order, or after its pdl_wait).
__device__ __forceinline__ void zero_b_counter(const Args& a, int64_t b) { a.counters_b[b] = 0; }

// arrive() on the tagged counter counter[0..1] of n arrivals: whether this one is the last, which
// leaves both words fresh for the next call on this workspace (a CUDA-graph replay). An atomic
// add on the first word counts the arrivals where it was fresh, as the previous call left it: one
// round trip. Where it lacked the tag, every block of the call finds it so (an add reaches the
// top bits only by a carry), and they count on the second word by compare-and-swap instead: one
// expecting a fresh word, then with the word found, until it lands.
__device__ __forceinline__ bool arrive_tagged(unsigned long long* counter, int n) {
  unsigned long long seen = arrive(counter);
  int before;
  if ((seen >> 16) == kArrivalTag) {
    before = static_cast<int>(seen & 0xFFFFu);
  } else {
    unsigned long long expect = kFreshCounter, desired = kFreshCounter + 1;
    seen = cas_acq_rel(counter + 1, expect, desired);
    while (seen != expect) {
      expect = seen;
      desired = (seen >> 16) == kArrivalTag ? seen + 1 : kFreshCounter + 1;
      seen = cas_acq_rel(counter + 1, expect, desired);
    }
    before = static_cast<int>(desired & 0xFFFFu) - 1;
  }
  const bool last = before == n - 1;
  if (last) counter[0] = counter[1] = kFreshCounter;
  return last;
}

// A 16-byte load through L2 (as __ldcg), or zeros where `pred` is false: a predicated load,
// which the compiler leaves where it is written. Loads with __ldcg whose results were used
// behind a branch, or in a select, were moved next to that use, one L2 round trip each where a
// batch of them was meant to be in flight (sm_90 SASS).
__device__ __forceinline__ float4 ldcg_if(const float* p, bool pred) {
#if defined(__CUDA_ARCH__)
  float4 v;
  asm volatile(
      "{\n\t.reg .pred q;\n\tsetp.ne.b32 q, %5, 0;\n\t"
      "mov.b32 %0, 0;\n\tmov.b32 %1, 0;\n\tmov.b32 %2, 0;\n\tmov.b32 %3, 0;\n\t"
      "@q ld.global.cg.v4.f32 {%0, %1, %2, %3}, [%4];\n\t}"
      : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
      : "l"(p), "r"(static_cast<int>(pred)));
  return v;
#else
  return pred ? __ldcg(reinterpret_cast<const float4*>(p)) : float4{0.f, 0.f, 0.f, 0.f};
#endif
}

// One byte (a bool mask entry) as an int, or 0 where `pred` is false, as a predicated load that
// stays where it is written (see ldcg_if). A plain load of the kernel A finishing step's token
// flags was moved above the partials' loads and turned into a predicate there, so warps 0-1
// waited an L2 round trip before issuing them (sm_90 SASS).
__device__ __forceinline__ int ld_u8_if(const bool* p, bool pred) {
#if defined(__CUDA_ARCH__)
  int v;
  asm volatile("{\n\t.reg .pred q;\n\tsetp.ne.b32 q, %2, 0;\n\tmov.b32 %0, 0;\n\t@q ld.global.u8 %0, [%1];\n\t}"
               : "=r"(v)
               : "l"(p), "r"(static_cast<int>(pred)));
  return v;
#else
  return pred ? static_cast<int>(*p) : 0;
#endif
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
  return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(kFull, v, o));
  return v;
}

// Block-wide exclusive prefix sum of one value per thread (all kThreads threads must call it).
// *total gets the block sum. s_warp: kWarps values of shared memory, reusable after return.
template <typename I>
__device__ I block_excl_scan(I v, I* s_warp, I* total) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  I x = v;
#pragma unroll
  for (int o = 1; o < 32; o <<= 1) {
    const I y = __shfl_up_sync(kFull, x, o);
    if (lane >= o) x += y;
  }
  if (lane == 31) s_warp[warp] = x;
  __syncthreads();
  if (warp == 0) {
    I w = lane < kWarps ? s_warp[lane] : I(0);
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
      const I y = __shfl_up_sync(kFull, w, o);
      if (lane >= o) w += y;
    }
    if (lane < kWarps) s_warp[lane] = w;  // inclusive warp prefixes
  }
  __syncthreads();
  const I before = warp > 0 ? s_warp[warp - 1] : I(0);
  *total = s_warp[kWarps - 1];
  __syncthreads();  // s_warp is free again
  return before + x - v;
}

// Packed argmax key: a higher score wins, then a lower index; NaN ranks below -inf, so it never
// beats a number; -0 and +0 are one value. 0 is below every key (the initial value).
__device__ __forceinline__ unsigned long long pack_key(float s, int64_t j) {
  unsigned u = __float_as_uint(s);
  unsigned hi;
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0u) {
    hi = 0u;  // NaN
  } else {
    if ((u & 0x7fffffffu) == 0u) u = 0u;
    hi = (u & 0x80000000u) ? ~u : (u | 0x80000000u);
  }
  return (static_cast<unsigned long long>(hi) << 32) |
         static_cast<unsigned long long>(0xffffffffu - static_cast<unsigned>(j));
}

// The column j of a row's best key (pack_key's low word); 0 for a row with no key, which cannot
// happen: every row has an allowed column.
__device__ __forceinline__ int key_column(unsigned long long key, int n) {
  const int j = static_cast<int>(0xffffffffu - static_cast<unsigned>(key & 0xffffffffull));
  return j < n ? j : 0;
}

__device__ __forceinline__ unsigned long long max_u64(unsigned long long a, unsigned long long b) {
  return a > b ? a : b;
}

// S (times Args::s_scale) and A' rows in the workspace as fp16 halves x = hi + lo: hi = fp16(x) and
// lo = fp16(x - hi) hold 22 significant bits in fp16's normal range (an absolute error under 3e-8
// below it). A row's ts float slots hold its ts hi halves, then its ts lo halves (ts % 8 == 0, so
// every 8 tokens of a plane are 16 bytes, aligned). Kernel A splits each value once, as it writes
// it; kernel B copies the halves into its tiles as they are (PERF_LOG v69).
__device__ __forceinline__ void put_pair(float* row, int64_t ts, int u, float x) {
  __half* h = reinterpret_cast<__half*>(row);
  const __half hi = __float2half(x);
  h[u] = hi;
  h[ts + u] = __float2half(x - __half2float(hi));
}
// put_pair of the 8 tokens u0 .. u0 + 7 (u0 % 8 == 0): one 16-byte store per plane.
__device__ __forceinline__ void put_pair8(float* row, int64_t ts, int u0, const float (&x)[8]) {
  __align__(16) __half hi[8];
  __align__(16) __half lo[8];
#pragma unroll
  for (int e = 0; e < 8; ++e) {
    hi[e] = __float2half(x[e]);
    lo[e] = __float2half(x[e] - __half2float(hi[e]));
  }
  __half* h = reinterpret_cast<__half*>(row);
  *reinterpret_cast<uint4*>(h + u0) = *reinterpret_cast<const uint4*>(hi);
  *reinterpret_cast<uint4*>(h + ts + u0) = *reinterpret_cast<const uint4*>(lo);
}
__device__ __forceinline__ float get_pair(const float* row, int64_t ts, int u) {
  const __half* h = reinterpret_cast<const __half*>(row);
  return __half2float(h[u]) + __half2float(h[ts + u]);
}

// ------------------------------------------------------------------------------------------
// Kernel A: partial S over a slice of D, then (last block per row tile) S and A'.
//
// Tile: 64 patch rows (j) x 64 prompt tokens (u = t - t_lo) x kBK of D per step. Loads: thread
// (warp w, lane l) holds rows k*8 + w (k < 8) at columns l + 32 h (h < kBK / 32), so each row's
// partial sum of squares stays inside one warp.
template <typename T>
struct ATile {
  static constexpr int kBK = sizeof(T) == 2 ? 64 : 32;
  static constexpr int kH = kBK / 32;
  static constexpr int kLds = sizeof(T) == 2 ? kBK + 8 : kBK + 1;  // wmma: ldm % 8 == 0
};

// One D step's patch and prompt tiles.
template <typename T>
struct StepTiles {
  alignas(128) T ps[kBM][ATile<T>::kLds];
  alignas(128) T ts[kBT][ATile<T>::kLds];
};

template <typename T>
struct SmemA {
  // D steps alternate between two tile buffers, so that one barrier per step suffices: a step's
  // stores go to the buffer that the product two steps back read, and every thread has passed
  // the previous step's barrier after that product. (One buffer took a second barrier per step,
  // after the product: run 12's ncu put 14 % of the B=64 kernel's warp samples on barriers.)
  // The product's output tile cs is written after the loop over D, when the buffers are dead,
  // so it overlays them: 1 KB more than one buffer and cs side by side (16-bit inputs).
  union {
    StepTiles<T> buf[2];
    float cs[kBM][kBT + 4];
  };
  float invp[kBM], rowm[kBM];
  float invt[kBT];
  float psq_part[kThreads / kBM][kBM], tsq_part[kThreads / kBT][kBT];  // norm sums per group
  int tok[kBT];
  int t_lo, t_hi, is_last;
};

// Accumulator of one 64 x 64 output tile: fp32 FMA (every type, every architecture).
template <typename T, bool kMma>
struct AccA {
  float v[4][4];
  __device__ __forceinline__ void zero() {
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) v[r][c] = 0.f;
  }
  // Thread (ty, tx) = (tid / 16, tid % 16) owns rows ty + 16 r, columns tx + 16 c.
  __device__ __forceinline__ void step(const StepTiles<T>& sm, int /*u0*/, int /*tr*/) {
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll 8
    for (int k = 0; k < ATile<T>::kBK; ++k) {
      float a[4], b[4];
#pragma unroll
      for (int r = 0; r < 4; ++r) a[r] = to_f32(sm.ps[ty + 16 * r][k]);
#pragma unroll
      for (int c = 0; c < 4; ++c) b[c] = to_f32(sm.ts[tx + 16 * c][k]);
#pragma unroll
      for (int r = 0; r < 4; ++r)
#pragma unroll
        for (int c = 0; c < 4; ++c) v[r][c] = fmaf(a[r], b[c], v[r][c]);
    }
  }
  __device__ __forceinline__ void store(float (*cs)[kBT + 4]) {
    const int tx = threadIdx.x & 15, ty = threadIdx.x >> 4;
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) cs[ty + 16 * r][tx + 16 * c] = v[r][c];
  }
};

#if FP_HAVE_MMA
// wmma::load_matrix_sync of a fragment from a shared-memory tile. Its bf16 form hands the pointer
// to wmma.load as a generic address (its fp16 form does not), and ptxas then loads the fragment
// with 32-bit generic loads: 96 LD.E per two D steps in kernel A's bf16 loop, where the fp16 loop
// has 24 LDSM (sm_90 SASS). Here that form issues the same wmma.load, so the same fragment
// registers, in the .shared state space.
template <typename Frag, typename E>
__device__ __forceinline__ void load_frag(Frag& f, const E* p, unsigned ldm) {
#if defined(__CUDA_ARCH__)
  using namespace nvcuda::wmma;
  constexpr bool a_bf16 = std::is_same_v<Frag, fragment<matrix_a, 16, 16, 16, __nv_bfloat16, row_major>>;
  constexpr bool b_bf16 = std::is_same_v<Frag, fragment<matrix_b, 16, 16, 16, __nv_bfloat16, col_major>>;
  if constexpr (a_bf16 || b_bf16) {
    static_assert(sizeof(f.x) == 16, "these fragments are 4 registers");
    int* x = reinterpret_cast<int*>(&f.x[0]);
    const unsigned at = static_cast<unsigned>(__cvta_generic_to_shared(p));
#define FP_WMMA_LOAD4(op) \
  asm volatile(op " {%0, %1, %2, %3}, [%4], %5;" : "=r"(x[0]), "=r"(x[1]), "=r"(x[2]), "=r"(x[3]) : "r"(at), "r"(ldm))
    if constexpr (a_bf16) FP_WMMA_LOAD4("wmma.load.a.sync.aligned.row.m16n16k16.shared.bf16");
    else FP_WMMA_LOAD4("wmma.load.b.sync.aligned.col.m16n16k16.shared.bf16");
#undef FP_WMMA_LOAD4
    return;
  }
#endif
  nvcuda::wmma::load_matrix_sync(f, p, ldm);
}

// Tensor cores (fp16/bf16 in, fp32 accumulate): warp w owns rows 16 (w % 4) .. +16 and token
// columns 32 (w / 4) .. +32 as two 16 x 16 accumulators. Column blocks at or past the valid
// range are skipped (warp-uniform) and stay zero.
template <typename T>
struct AccA<T, true> {
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2];
  __device__ __forceinline__ void zero() {
    nvcuda::wmma::fill_fragment(acc[0], 0.f);
    nvcuda::wmma::fill_fragment(acc[1], 0.f);
  }
  __device__ __forceinline__ void step(const StepTiles<T>& sm, int u0, int tr) {
    using namespace nvcuda;
    const int warp = threadIdx.x >> 5;
    const int ra = 16 * (warp & 3), cb = 32 * (warp >> 2);
#pragma unroll
    for (int kk = 0; kk < ATile<T>::kBK; kk += 16) {
      // The fragments load unconditionally (a column block past the range is read, unused), so
      // that the three loads of a step go out together; only the products are skipped.
      wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> fb[2];
      load_frag(fa, &sm.ps[ra][kk], ATile<T>::kLds);
#pragma unroll
      for (int c = 0; c < 2; ++c) load_frag(fb[c], &sm.ts[cb + 16 * c][kk], ATile<T>::kLds);  // B = Tn^T, column-major
#pragma unroll
      for (int c = 0; c < 2; ++c)
        if (u0 + cb + 16 * c < tr) wmma::mma_sync(acc[c], fa, fb[c], acc[c]);
    }
  }
  __device__ __forceinline__ void store(float (*cs)[kBT + 4]) {
    using namespace nvcuda;
    const int warp = threadIdx.x >> 5;
    const int ra = 16 * (warp & 3), cb = 32 * (warp >> 2);
    wmma::store_matrix_sync(&cs[ra][cb], acc[0], kBT + 4, wmma::mem_row_major);
    wmma::store_matrix_sync(&cs[ra][cb + 16], acc[1], kBT + 4, wmma::mem_row_major);
  }
};
template <typename T>
struct UseMma {
  static constexpr bool value = sizeof(T) == 2;
};
#else
template <typename T>
struct UseMma {
  static constexpr bool value = false;
};
#endif

// Global -> registers -> shared loads of one 64 x kBK step of the patch and task tiles, with
// the sums of squares of the rows on the way (load_p / load_q fill the registers, store moves
// them to shared memory). Each thread owns kSlots rows (row(k)); a row's partial sums live in
// the lanes that reduce() combines, and leader() holds the result.
//
// Scalar variant (any alignment): rows k * 8 + warp, columns lane + 32 h.
template <typename T, bool kVec>
struct Loader {
  static constexpr int kH = ATile<T>::kH, kSlots = 8;
  T p[8][kH], q[8][kH];
  __device__ __forceinline__ static int row(int k) { return k * 8 + (threadIdx.x >> 5); }
  // Rows first + row(k) below `rows` of a row-major array (row stride sr), columns [d, d1).
  __device__ __forceinline__ static void load_rows(T (&dst)[8][kH], const T* base, int64_t first, int64_t rows,
                                                   int64_t sr, int64_t d, int64_t d1) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int64_t r = first + row(k);
#pragma unroll
      for (int h = 0; h < kH; ++h) {
        const int64_t dd = d + lane + 32 * h;
        dst[k][h] = (r < rows && dd < d1) ? base[r * sr + dd] : zero_of<T>();
      }
    }
  }
  __device__ __forceinline__ void load_p(const T* P, const Args& a, int64_t j0, int64_t d, int64_t d1) {
    load_rows(p, P, j0, a.N, a.p_sr, d, d1);
  }
  __device__ __forceinline__ void load_q(const T* Q, const Args& a, int t_lo, int u0, int tr, int64_t d,
                                         int64_t d1) {
    load_rows(q, Q + t_lo * a.t_sr, u0, tr, a.t_sr, d, d1);
  }
  __device__ __forceinline__ void store(StepTiles<T>& sm, float* psq, float* tsq, bool with_p) const {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int k = 0; k < 8; ++k) {
      const int r = row(k);
#pragma unroll
      for (int h = 0; h < kH; ++h) {
        sm.ps[r][lane + 32 * h] = p[k][h];
        sm.ts[r][lane + 32 * h] = q[k][h];
        const float x = to_f32(p[k][h]), y = to_f32(q[k][h]);
        if (with_p) psq[k] = fmaf(x, x, psq[k]);
        tsq[k] = fmaf(y, y, tsq[k]);
      }
    }
  }
  __device__ __forceinline__ static float reduce(float v) { return warp_sum(v); }
  __device__ __forceinline__ static bool leader() { return (threadIdx.x & 31) == 0; }
};

// 16-byte variant (rows and bases 16-byte aligned, D a multiple of the vector): each row step is
// 8 vectors of kVE elements; thread t owns rows k * 32 + t / 8 (k < 2), vector t % 8.
template <typename T>
struct Loader<T, true> {
  static constexpr int kBK = ATile<T>::kBK, kSlots = 2, kVE = 16 / static_cast<int>(sizeof(T));
  static_assert(kBK == 8 * kVE, "a row step is 8 vectors");
  uint4 p[2], q[2];
  __device__ __forceinline__ static int row(int k) { return k * 32 + (threadIdx.x >> 3); }
  __device__ __forceinline__ static int col() { return (threadIdx.x & 7) * kVE; }
  // Rows first + row(k) below `rows` of a row-major array (row stride sr), columns [d, d1); a
  // vector lies wholly inside or wholly outside [d, d1).
  __device__ __forceinline__ static void load_rows(uint4 (&dst)[2], const T* base, int64_t first, int64_t rows,
                                                   int64_t sr, int64_t d, int64_t d1) {
    const int64_t dd = d + col();
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int64_t r = first + row(k);
      dst[k] = (r < rows && dd < d1) ? *reinterpret_cast<const uint4*>(base + r * sr + dd) : make_uint4(0u, 0u, 0u, 0u);
    }
  }
  __device__ __forceinline__ void load_p(const T* P, const Args& a, int64_t j0, int64_t d, int64_t d1) {
    load_rows(p, P, j0, a.N, a.p_sr, d, d1);
  }
  __device__ __forceinline__ void load_q(const T* Q, const Args& a, int t_lo, int u0, int tr, int64_t d,
                                         int64_t d1) {
    load_rows(q, Q + t_lo * a.t_sr, u0, tr, a.t_sr, d, d1);
  }
  // 16-bit tiles take the vector as one 16-byte store: their rows are 144 B apart, so a vector
  // stays aligned, and the 8 lanes of a row write 128 contiguous bytes (no bank conflict). Per
  // element (STS.U16) that was 32 stores per thread and step instead of 4. fp32 rows are 33
  // floats apart (the FMA product reads columns), so fp32 stores per element.
  __device__ __forceinline__ void store(StepTiles<T>& sm, float* psq, float* tsq, bool with_p) const {
    constexpr bool kWhole = sizeof(T) == 2;
    static_assert(!kWhole || (ATile<T>::kLds * sizeof(T)) % 16 == 0, "16-bit tile rows keep 16-byte vectors aligned");
    const int c = col();
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const int r = row(k);
      const T* pv = reinterpret_cast<const T*>(&p[k]);
      const T* qv = reinterpret_cast<const T*>(&q[k]);
      if (kWhole) {
        *reinterpret_cast<uint4*>(&sm.ps[r][c]) = p[k];
        *reinterpret_cast<uint4*>(&sm.ts[r][c]) = q[k];
      }
#pragma unroll
      for (int e = 0; e < kVE; ++e) {
        if (!kWhole) {
          sm.ps[r][c + e] = pv[e];
          sm.ts[r][c + e] = qv[e];
        }
        const float x = to_f32(pv[e]), y = to_f32(qv[e]);
        if (with_p) psq[k] = fmaf(x, x, psq[k]);
        tsq[k] = fmaf(y, y, tsq[k]);
      }
    }
  }
  __device__ __forceinline__ static float reduce(float v) {  // over the 8 lanes of a row
#pragma unroll
    for (int o = 4; o > 0; o >>= 1) v += __shfl_xor_sync(kFull, v, o);
    return v;
  }
  __device__ __forceinline__ static bool leader() { return (threadIdx.x & 7) == 0; }
};

// ------------------------------------------------------------------------------------------
// Kernel A's cluster variant (sm_90, plan.cluster; FASTPRUNE_CUDA_CLUSTER=0 turns it off). The
// ksplit blocks of a (row tile, sample) form one thread block cluster. Each keeps its partials over its
// slice of D in its own shared memory instead of the workspace: S [64][ts], the patch sums of
// squares [64] and the prompt's [ts]. After a cluster barrier, block q finishes rows q, q +
// ksplit, ... of the tile from every block's partials, read through distributed shared memory.
// The plain kernel writes the partials to global memory, and the last block of the ksplit to
// arrive finishes all 64 rows alone, on 12 of 132 SMs at pi05 B=1 (run 5's ncu: 49.8 k cycles
// elapsed, SMs active 17.4 k on average). Without a D split (B >= 64 at pi05) the cluster is one
// block, which finishes its tile from its own shared memory instead of an L2 round trip of its
// partials.
constexpr int kMaxCluster = 8;      // blocks per cluster (the portable limit)
// Prompt widths: the partial S tile takes 64 * ts floats of shared memory, 94 KB in all at pi05
// (ts = 200, bf16). At one block per SM up to 512; at two (kernel A's variant for more than one
// wave of blocks) 256, so that two blocks' 109 KB each still fit an SM's 227 KB.
constexpr int64_t kClusterMaxTs = 512, kClusterMaxTs2 = 256;

struct ClusterSmem {
  float* part;  // [kBM][ts] partial S, then this block's finished rows of S
  float* psq;   // [kBM]
  float* tsq;   // [ts]
  float* invt;  // [ts] prompt scales of the range, from every block's sums
  int* tok;     // [ts] valid token of the range
};
// Dynamic shared memory of the cluster variant: SmemA first, then ClusterSmem's arrays.
template <typename T>
__host__ __device__ constexpr size_t cluster_smem_head() {
  return (sizeof(SmemA<T>) + 127) / 128 * 128;
}
__host__ __device__ inline size_t cluster_smem_bytes(size_t head, int64_t ts) {
  return head + static_cast<size_t>(kBM * ts + kBM + 3 * ts) * sizeof(float);
}
__device__ __forceinline__ ClusterSmem cluster_smem(unsigned char* base, size_t head, int64_t ts) {
  ClusterSmem c;
  c.part = reinterpret_cast<float*>(base + head);
  c.psq = c.part + kBM * ts;
  c.tsq = c.psq + kBM;
  c.invt = c.tsq + ts;
  c.tok = reinterpret_cast<int*>(c.invt + ts);
  return c;
}

// The tokens of a row that kernel A writes to S and A' for a prompt range of tr tokens: whole
// 64-token tiles, at most ts, with zeros past the range (kernel B loads its first 64-token tile
// before it reads the range). A multiple of 8, as ts is.
__device__ __forceinline__ int written_tokens(int64_t ts, int tr) {
  return static_cast<int>(mn<int64_t>(ts, static_cast<int64_t>((tr + kBT - 1) / kBT) * kBT));
}

// The finishing step of the cluster variant (every thread of every block of the cluster): S =
// raw * invp * invt on valid tokens (0 elsewhere), A' = exp((S - max) / sqrt(D)) over them, for the
// block's rows, written up to tw columns as the plain kernel's finishing step writes them. A
// warp takes a row; a lane adds the ksplit partials of its tokens in slice order. Rows are
// interleaved over the blocks, so a block reads and then overwrites only partial rows that no
// other block reads.
__device__ void finish_cluster(const Args& a, const ClusterSmem& cl, int64_t b, int64_t j0, int tr, int t_lo,
                               bool all_t, const bool* tm) {
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int ks = a.ksplit, rank = static_cast<int>(blockIdx.y);
  const int64_t N = a.N, ts = a.ts;
  const int rows_here = static_cast<int>(mn<int64_t>(kBM, N - j0));
  const int tw = written_tokens(ts, tr);
  // The ksplit loads of one sum go out together; ranks past ksplit add 0 (never mapped).
  auto sum_ranks = [&](float* p) {
    float v[kMaxCluster];
#pragma unroll
    for (int q = 0; q < kMaxCluster; ++q) v[q] = q < ks ? *fp_cluster_map(p, q) : 0.f;
    float sum = 0.f;
#pragma unroll
    for (int q = 0; q < kMaxCluster; ++q) sum += v[q];
    return sum;
  };
  fp_cluster_sync();  // every block's partials are in its shared memory
  // The warp's first row (its only one at pi05 B=1: 8 slices, 8 warps, 64 rows): its patch sums
  // and its first 64 tokens' partials load here, beside the prompt sums below. Loaded after the
  // barrier that publishes invt and tok, they were two more rounds of cluster loads on the
  // kernel's serial end (tokens past the range are read and not used).
  const int r0 = rank + ks * warp;
  const bool have_r0 = r0 < rows_here;
  const float p_r0 = have_r0 && lane < ks ? *fp_cluster_map(cl.psq + r0, lane) : 0.f;
  const float part_r0_lo = have_r0 && lane < tw ? sum_ranks(cl.part + r0 * ts + lane) : 0.f;
  const float part_r0_hi = have_r0 && lane + 32 < tw ? sum_ranks(cl.part + r0 * ts + lane + 32) : 0.f;
  for (int u = tid; u < tr; u += kThreads) {
    cl.invt[u] = rsqrtf(sum_ranks(cl.tsq + u) * a.inv_d + kEps);
    cl.tok[u] = all_t || tm[t_lo + u] ? 1 : 0;
  }
  if (rank == 0 && tid < rows_here) a.keys[b * N + j0 + tid] = 0ull;
  if (rank == 0 && blockIdx.x == 0 && tid == 0) zero_b_counter(a, b);
  __syncthreads();  // invt, tok
  for (int r = r0; r < rows_here; r += ks * kWarps) {
    float* own = cl.part + r * ts;
    const float p = r == r0 ? p_r0 : lane < ks ? *fp_cluster_map(cl.psq + r, lane) : 0.f;
    const float invp = rsqrtf(warp_sum(p) * a.inv_d + kEps);
    const int64_t row = (b * N + j0 + r) * ts;
    float m = -INFINITY;
    for (int u = lane; u < tw; u += 32) {
      const bool on = u < tr && cl.tok[u];
      const bool pre = r == r0 && u < lane + 64;  // loaded above
      const float s = on ? (pre ? (u == lane ? part_r0_lo : part_r0_hi) : sum_ranks(own + u)) * invp * cl.invt[u] : 0.f;
      if (on) m = fmaxf(m, s);
      own[u] = s;
      put_pair(a.S + row, ts, u, s * a.s_scale);
    }
    m = warp_max(m);
    for (int u = lane; u < tw; u += 32)
      put_pair(a.A + row, ts, u, u < tr && cl.tok[u] ? __expf((own[u] - m) * a.inv_sqrt_d) : 0.f);
  }
  fp_cluster_sync_relaxed();  // no block exits while another may still read its shared memory
}

// The finishing step of a cluster of one block (no D split: pi0.5 from B=11 on 132 SMs), where
// every partial is in the block's own shared memory: all its threads finish the tile at once.
// Thread (r, q) = (tid / 4, tid % 4) takes row r's tokens in groups of 8, groups q, q + 4, ...
// (one 16-byte store of each plane's halves per group); the 4 threads of a row are adjacent lanes
// and combine the row max by two shuffles. finish_cluster's warp per row did each row's loads,
// sums, max and stores one after another, 8 rows per warp: run 12's ncu put 23 % of the B=64
// kernel's warp samples after its main loop. The arithmetic is finish_cluster's on one block's
// partials. rows_here: the block's rows from j0 on (at most 64); first_tile: the block of the
// sample's first rows, which zeroes kernel B's counters.
__device__ void finish_block(const Args& a, const ClusterSmem& cl, int64_t b, int64_t j0, int rows_here, int tr,
                             int t_lo, bool all_t, const bool* tm, bool first_tile) {
  static_assert(kThreads == 4 * kBM, "4 threads per row");
  const int tid = threadIdx.x;
  const int64_t N = a.N, ts = a.ts;
  const int tw = written_tokens(ts, tr);
  __syncthreads();  // every thread's partials are in shared memory
  for (int u = tid; u < tr; u += kThreads) {
    cl.invt[u] = rsqrtf(cl.tsq[u] * a.inv_d + kEps);
    cl.tok[u] = all_t || tm[t_lo + u] ? 1 : 0;
  }
  if (tid < rows_here) a.keys[b * N + j0 + tid] = 0ull;
  if (first_tile && tid == 0) zero_b_counter(a, b);
  __syncthreads();  // invt, tok
  const int r = tid >> 2, q = tid & 3;
  const bool have = r < rows_here;
  float* own = cl.part + r * ts;
  const int64_t row = (b * N + j0 + r) * ts;
  const float invp = have ? rsqrtf(cl.psq[r] * a.inv_d + kEps) : 0.f;
  float m = -INFINITY;
  for (int u0 = 8 * q; have && u0 < tw; u0 += 32) {
    float x[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int u = u0 + e;
      const bool on = u < tr && cl.tok[u];
      const float s = on ? own[u] * invp * cl.invt[u] : 0.f;
      if (on) m = fmaxf(m, s);
      own[u] = s;
      x[e] = s * a.s_scale;
    }
    put_pair8(a.S + row, ts, u0, x);
  }
  m = fmaxf(m, __shfl_xor_sync(kFull, m, 1));  // every lane: rows past rows_here add -inf
  m = fmaxf(m, __shfl_xor_sync(kFull, m, 2));
  for (int u0 = 8 * q; have && u0 < tw; u0 += 32) {
    float x[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) {
      const int u = u0 + e;
      x[e] = u < tr && cl.tok[u] ? __expf((own[u] - m) * a.inv_sqrt_d) : 0.f;
    }
    put_pair8(a.A + row, ts, u0, x);
  }
}

// The prompt range [t_lo, t_hi) of a sample: first to last valid token, or all T when none is
// valid (all_t). Every thread of the block; s_lo and s_hi are two ints of shared memory, which
// keep the range's ends (t_hi - 1, or -1 for all_t) after the return.
struct PromptRange {
  bool all_t;
  int t_lo, t_hi;
};
__device__ __forceinline__ PromptRange prompt_range(const bool* tm, int64_t T, int* s_lo, int* s_hi) {
  const int tid = threadIdx.x;
  if (tid == 0) {
    *s_lo = INT_MAX;
    *s_hi = -1;
  }
  __syncthreads();
  if (tm != nullptr) {
    int lo = INT_MAX, hi = -1;
    for (int64_t t = tid; t < T; t += kThreads) {
      if (tm[t]) {
        lo = mn(lo, static_cast<int>(t));
        hi = mx(hi, static_cast<int>(t));
      }
    }
    if (hi >= 0) {
      atomicMin(s_lo, lo);
      atomicMax(s_hi, hi);
    }
  }
  __syncthreads();
  PromptRange r;
  r.all_t = *s_hi < 0;
  r.t_lo = r.all_t ? 0 : *s_lo;
  r.t_hi = r.all_t ? static_cast<int>(T) : *s_hi + 1;
  return r;
}

// Kernel A's shared memory: a static SmemA for the plain kernel, dynamic for the cluster variant.
template <typename T, bool kCluster>
__device__ __forceinline__ unsigned char* smem_a() {
  if constexpr (kCluster) {
    return fp_dyn_smem();
  } else {
    __shared__ __align__(128) unsigned char raw[sizeof(SmemA<T>)];
    return raw;
  }
}

// The 16-byte variant is held to 128 registers, 2 blocks per SM, without spills (kMinBlocks 2);
// where the grid is one wave of one block per SM (pi05 at B=1: 132 blocks), its variant at one
// block per SM has the registers to batch the finishing step's loads. The scalar variant
// (unaligned inputs) needs 192-246 (sm_90) for its wider register sets: one block per SM.
// kCluster: the cluster variant above.
template <typename T, bool kVec, int kMinBlocks, bool kCluster>
__global__ void __launch_bounds__(kThreads, kMinBlocks) scores_kernel(Args a) {
  using Ld = Loader<T, kVec>;
  constexpr int kBK = ATile<T>::kBK, kSlots = Ld::kSlots;
  unsigned char* const smem = smem_a<T, kCluster>();
  SmemA<T>& sm = *reinterpret_cast<SmemA<T>*>(smem);
  const ClusterSmem cl = cluster_smem(smem, cluster_smem_head<T>(), a.ts);  // kCluster only

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int64_t rt = blockIdx.x, b = blockIdx.z;
  const int ks = blockIdx.y;
  const int64_t B = a.B, N = a.N, T_ = a.T, D = a.D, ts = a.ts;
  const int64_t j0 = rt * kBM;
  const T* P = static_cast<const T*>(a.patches) + b * a.p_sb;
  const T* Q = static_cast<const T*>(a.task) + b * a.t_sb;
  const bool* tm = a.task_mask != nullptr ? a.task_mask + b * T_ : nullptr;
  const int64_t d0 = static_cast<int64_t>(ks) * a.kchunk;
  const int64_t d1 = mn(D, d0 + a.kchunk);

  // Two steps of loads in flight (ld0, ld1). The patch rows of the first two steps do not depend
  // on the prompt range, so they go out before the mask scan below and its latency overlaps
  // theirs. So do the prompt rows, on the guess that the range starts at token 0 (pi0.5's
  // prompts are a prefix, and a prompt with no valid token starts there too): rows 0-63 below
  // T. Rows past the range are loaded but unused (partials and norms are kept for u < tr only).
  // Loaded after the scan, they waited for it: one more L2 round trip before the first step. A
  // range that starts later loads them again after the scan.
  Ld ld0, ld1;
  if (d0 < d1) ld0.load_p(P, a, j0, d0, d1);
  if (d0 + kBK < d1) ld1.load_p(P, a, j0, d0 + kBK, d1);
  const int t_all = static_cast<int>(T_);
  if (d0 < d1) ld0.load_q(Q, a, 0, 0, t_all, d0, d1);
  if (d0 + kBK < d1) ld1.load_q(Q, a, 0, 0, t_all, d0 + kBK, d1);

  // 1. The prompt range.
  const PromptRange range = prompt_range(tm, T_, &sm.t_lo, &sm.t_hi);
  const bool all_t = range.all_t;
  const int t_lo = range.t_lo, t_hi = range.t_hi;
  const int tr = t_hi - t_lo;

  if (rt == 0 && ks == 0) {  // per-sample facts for kernel B (one writer)
    if (tid == 0) {
      a.trange[2 * b] = t_lo;
      a.trange[2 * b + 1] = t_hi;
    }
    int any = 1;
    if (a.patch_mask != nullptr) {
      any = 0;
      const bool* pm = a.patch_mask + b * N;
      for (int64_t j = tid; j < N; j += kThreads) any |= pm[j] ? 1 : 0;
    }
    any = __syncthreads_or(any);
    if (tid == 0) a.anyp[b] = any;
  }

  // 2. Partial S and sums of squares over d in [d0, d1).
  float* part = a.part + (static_cast<int64_t>(ks) * B + b) * N * ts;
  float* tsq_out = a.tsq + ((static_cast<int64_t>(ks) * B + b) * a.row_tiles + rt) * ts;
  float psq[kSlots];
#pragma unroll
  for (int k = 0; k < kSlots; ++k) psq[k] = 0.f;

  for (int u0 = 0; u0 < tr; u0 += kBT) {  // token tiles
    float tsq[kSlots];
#pragma unroll
    for (int k = 0; k < kSlots; ++k) tsq[k] = 0.f;
    AccA<T, UseMma<T>::value> acc;
    acc.zero();
    // The step at d + 2 kBK is loaded into the registers just stored to shared memory, before
    // the multiply of step d. The loop runs two steps per trip so that each register set is
    // named at compile time (a run-time index would put it in local memory); the first of a trip
    // uses tile buffer 0, the second buffer 1 (SmemA).
    auto step = [&](Ld& ld, StepTiles<T>& tiles, int64_t d) {
      ld.store(tiles, psq, tsq, u0 == 0);
      __syncthreads();
      if (d + 2 * kBK < d1) {
        ld.load_p(P, a, j0, d + 2 * kBK, d1);
        ld.load_q(Q, a, t_lo, u0, tr, d + 2 * kBK, d1);
      }
      acc.step(tiles, u0, tr);
    };
    if (u0 > 0) {  // the first token tile's patch loads went out before the mask scan
      if (d0 < d1) ld0.load_p(P, a, j0, d0, d1);
      if (d0 + kBK < d1) ld1.load_p(P, a, j0, d0 + kBK, d1);
    }
    if (u0 > 0 || t_lo != 0) {  // and its prompt loads, if the range starts at token 0
      if (d0 < d1) ld0.load_q(Q, a, t_lo, u0, tr, d0, d1);
      if (d0 + kBK < d1) ld1.load_q(Q, a, t_lo, u0, tr, d0 + kBK, d1);
    }
    for (int64_t d = d0; d < d1; d += 2 * kBK) {
      step(ld0, sm.buf[0], d);
      if (d + kBK < d1) step(ld1, sm.buf[1], d + kBK);
    }
    __syncthreads();  // the last products read the tile buffers, which cs overlays
    acc.store(sm.cs);
    __syncthreads();
    for (int e = tid; e < kBM * kBT; e += kThreads) {
      const int r = e / kBT, c = e % kBT;
      const int64_t j = j0 + r;
      const int u = u0 + c;
      if (j < N && u < tr) {
        if constexpr (kCluster) cl.part[r * ts + u] = sm.cs[r][c];
        else part[j * ts + u] = sm.cs[r][c];
      }
    }
#pragma unroll
    for (int k = 0; k < kSlots; ++k) {
      const float v = Ld::reduce(tsq[k]);
      const int u = u0 + Ld::row(k);
      if (Ld::leader() && u < tr) {
        if constexpr (kCluster) cl.tsq[u] = v;
        else tsq_out[u] = v;
      }
    }
    __syncthreads();  // cs, and the tile buffers it overlays, are rewritten by the next token tile
  }
#pragma unroll
  for (int k = 0; k < kSlots; ++k) {
    const float v = Ld::reduce(psq[k]);
    const int64_t j = j0 + Ld::row(k);
    if (Ld::leader() && j < N) {
      if constexpr (kCluster) cl.psq[Ld::row(k)] = v;
      else a.psq[(static_cast<int64_t>(ks) * B + b) * N + j] = v;
    }
  }
  // With PDL, kernel B is scheduled once every block of this one is here (it waits for our
  // writes in pdl_wait): its launch overlaps the finishing steps below, the serial end of this
  // kernel, and its blocks do not hold SM slots through the loop over D (v77; until then this
  // came first, and runs 4 and 5 measured PDL slower). Kernel A itself is a plain launch: it
  // follows the previous call in stream order.
  pdl_launch_dependents();
  if constexpr (kCluster) {
    // The prompt range and mask again, from shared memory (written once, before the loop) and
    // the arguments: held in registers through the loop over D, they spilled at 128 registers
    // once finish_block was added.
    const bool all_again = sm.t_hi < 0;
    const int lo_again = all_again ? 0 : sm.t_lo;
    const int tr_again = all_again ? static_cast<int>(T_) : sm.t_hi + 1 - lo_again;
    const bool* tm_again = a.task_mask != nullptr ? a.task_mask + b * T_ : nullptr;
    if (a.ksplit == 1)
      finish_block(a, cl, b, j0, static_cast<int>(mn<int64_t>(kBM, N - j0)), tr_again, lo_again, all_again, tm_again,
                   rt == 0);
    else finish_cluster(a, cl, b, j0, tr_again, lo_again, all_again, tm_again);
    return;
  }

  // 3. The last of the ksplit blocks of (row tile, sample) to arrive finalises the tile.
  __syncthreads();
  if (tid == 0) sm.is_last = arrive_tagged(&a.counters_a[2 * (b * a.row_tiles + rt)], a.ksplit);
  __syncthreads();
  if (!sm.is_last) return;
  if (tid == 0 && rt == 0) zero_b_counter(a, b);

  // 4. S and A' of the tile from the ksplit partials, one 64 x 64 token tile at a time.
  //
  // Norm sums over the slices: thread (g, c) = (tid / 64, tid % 64) loads slices q = g, g + 4,
  // ... of row c's patch sum (psq) and of token c's prompt sum (tsq), kMaxSplit / 4 of each at
  // once and unpredicated (a slice past ksplit reads the last one and adds 0). The loads go out
  // beside the first partial loads below; the 4 groups' sums are then added in a fixed order, so
  // the result does not depend on timing. (A loop per row and token, 64 threads each, took 3 + 3
  // dependent L2 round trips before the partials' 11.) At one block per SM the patch sums load
  // inside the first token tile's pass: loaded before it, their sum (loop-invariant) was hoisted
  // right behind them, and its wait held back the partials' loads by one L2 round trip (sm_90
  // SASS). At 128 registers that placement spills (40 B), so the 2-block variant keeps the wait.
  constexpr int kGroups = kThreads / kBM, kPerGroup = kMaxSplit / kGroups;
  static_assert(kBM == kBT && kThreads % kBM == 0 && kMaxSplit % kGroups == 0, "norm-sum groups");
  const int grp = tid / kBM, lane64 = tid % kBM;
  auto load_slices = [&](float (&v)[kPerGroup], const float* x, int64_t q_stride) {
#pragma unroll
    for (int k = 0; k < kPerGroup; ++k) v[k] = __ldcg(x + mn(grp + k * kGroups, a.ksplit - 1) * q_stride);
  };
  auto add_slices = [&](const float (&v)[kPerGroup]) {
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < kPerGroup; ++k) sum += grp + k * kGroups < a.ksplit ? v[k] : 0.f;
    return sum;
  };
  constexpr bool kPsqInPass = kMinBlocks == 1;
  float psq_v[kPerGroup];
  auto load_psq = [&] { load_slices(psq_v, a.psq + b * N + mn<int64_t>(j0 + lane64, N - 1), B * N); };
  if constexpr (!kPsqInPass) load_psq();
  if (tid < kBM && j0 + tid < N) a.keys[b * N + j0 + tid] = 0ull;
  constexpr int kOwn = kBM / kWarps;          // rows per warp: warp + kWarps * i
  const int rows_here = static_cast<int>(mn<int64_t>(kBM, N - j0));
  const int n_tiles = (tr + kBT - 1) / kBT;
  float* Sb = a.S + (b * N + j0) * ts;
  float* Ab = a.A + (b * N + j0) * ts;
  // Token flags of the tile at u0: nonzero on valid tokens of the range, for thread c < kBT's
  // token u0 + c (the mask byte is loaded now and used later); token_flags stores them to sm.tok
  // (the caller synchronises before use).
  auto token_flag = [&](int u0) {
    const bool in = tid < kBT && u0 + tid < tr;
    return (in && all_t ? 1 : 0) | ld_u8_if(all_t ? tm : tm + t_lo + mn(u0 + tid, tr - 1), in && !all_t);
  };
  auto token_flags = [&](int u0) {
    const int flag = token_flag(u0);
    if (tid < kBT) sm.tok[tid] = flag;
  };
  auto in_range = [&](int r, int u) { return r < rows_here && u < tr; };
  const int tw = written_tokens(ts, tr);
  auto in_written = [&](int r, int u) { return r < rows_here && u < tw; };

  // Pass 1: S = raw * invp * invt on valid tokens (0 elsewhere), and each row's maximum.
  float m_run[kOwn];
#pragma unroll
  for (int i = 0; i < kOwn; ++i) m_run[i] = -INFINITY;
  for (int u0 = 0; u0 < tr; u0 += kBT) {
    float tsq_v[kPerGroup];
    load_slices(tsq_v, a.tsq + (b * a.row_tiles + rt) * ts + mn(u0 + lane64, tr - 1), B * a.row_tiles * ts);
    if constexpr (kPsqInPass) {
      if (u0 == 0) load_psq();
    }
    // Each thread sums 4 rows x 4 adjacent columns of the ksplit partials, with 16-byte loads
    // (a row is ts floats, ts % 4 == 0, u0 % 64 == 0). A row past the tile reads the last one and
    // a column group past ts the first (what is out of range adds 0): a load predicated on them
    // was issued only after the previous one had been added, one L2 round trip per element (ncu
    // on an H200: most of this kernel's 43 us at the pi05 shape, in the 12 finishing blocks).
    // The loads of kQ slices go out before any of them is added (in slice order); a slice past
    // ksplit loads zeros (ldcg_if). The 16-byte variant at one block per SM takes kQ = 11 (245
    // registers, no spills): one round trip for pi05's 11 slices (132 SMs; 9-10 on 108-114 SMs),
    // where a loop over single slices compiled to about one per slice and batches of 4 to 3
    // (sm_90 SASS). The scalar variant spills at 11 and keeps 4; at 128 registers 3 or 4 slices
    // spill, so there kQ = 2.
    constexpr int kC4 = kBT / 4, kRowStep = kThreads / kC4, kRows4 = kBM / kRowStep,
                  kQ = kMinBlocks == 1 ? (kVec ? 11 : 4) : 2;
    static_assert(kThreads % kC4 == 0 && kBM % kRowStep == 0, "4 x 4 elements per thread");
    const int c4 = 4 * (tid % kC4), r0 = tid / kC4;
    const float* pq = a.part + (b * N + j0) * ts + (u0 + c4 < ts ? u0 + c4 : 0);
    const int64_t q_stride = B * N * ts;
    float4 raw[kRows4];
#pragma unroll
    for (int k = 0; k < kRows4; ++k) raw[k] = float4{0.f, 0.f, 0.f, 0.f};
    // The token flags' mask bytes are loaded behind the first batch and stored after the last
    // (ld_u8_if). Loaded before it, their wait held warps 0-1 back by an L2 round trip: the
    // compiler moves the shared-memory store up to the load's result wherever it is written.
    int tok_flag = 0;
    for (int q0 = 0; q0 < a.ksplit; q0 += kQ) {
      float4 v[kQ][kRows4];
#pragma unroll
      for (int i = 0; i < kQ; ++i) {
        const bool in = i == 0 || q0 + i < a.ksplit;
#pragma unroll
        for (int k = 0; k < kRows4; ++k)
          v[i][k] = ldcg_if(pq + (q0 + i) * q_stride + mn(r0 + k * kRowStep, rows_here - 1) * ts, in);
      }
      if (q0 == 0) tok_flag = token_flag(u0);
#pragma unroll
      for (int i = 0; i < kQ; ++i) {
#pragma unroll
        for (int k = 0; k < kRows4; ++k) {
          raw[k].x += v[i][k].x;
          raw[k].y += v[i][k].y;
          raw[k].z += v[i][k].z;
          raw[k].w += v[i][k].w;
        }
      }
    }
    if (tid < kBT) sm.tok[tid] = tok_flag;
    if (u0 == 0) sm.psq_part[grp][lane64] = add_slices(psq_v);
    sm.tsq_part[grp][lane64] = add_slices(tsq_v);
    __syncthreads();  // the groups' sums
    if (tid < kBM) {
      float p = 0.f, t = 0.f;
#pragma unroll
      for (int g = 0; g < kGroups; ++g) {
        p += sm.psq_part[g][tid];
        t += sm.tsq_part[g][tid];
      }
      if (u0 == 0) sm.invp[tid] = rsqrtf((j0 + tid < N ? p : 0.f) * a.inv_d + kEps);
      sm.invt[tid] = rsqrtf((u0 + tid < tr ? t : 0.f) * a.inv_d + kEps);
    }
    __syncthreads();  // tok, invt, invp
#pragma unroll
    for (int k = 0; k < kRows4; ++k) {
      const float rk[4] = {raw[k].x, raw[k].y, raw[k].z, raw[k].w};
      const int r = r0 + k * kRowStep;
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int c = c4 + i;
        const float s = in_range(r, u0 + c) && sm.tok[c] ? rk[i] * sm.invp[r] * sm.invt[c] : 0.f;
        sm.cs[r][c] = s;
      }
    }
    __syncthreads();
    // S to the workspace from the tile. In the loop above, or unrolled, the compiler kept a row
    // address per iteration live: 28-44 B spilled at 2 blocks per SM (sm_80).
#pragma unroll 1
    for (int e = tid; e < kBM * kBT; e += kThreads) {
      const int r = e / kBT, c = e % kBT;
      if (in_written(r, u0 + c)) put_pair(Sb + r * ts, ts, u0 + c, sm.cs[r][c] * a.s_scale);
    }
#pragma unroll
    for (int i = 0; i < kOwn; ++i) {
      const int r = warp + kWarps * i;
      float m = -INFINITY;
      for (int c = lane; c < kBT; c += 32)
        if (sm.tok[c]) m = fmaxf(m, sm.cs[r][c]);
      m_run[i] = fmaxf(m_run[i], warp_max(m));
    }
    __syncthreads();  // cs and the token flags are rewritten next
  }

  // Pass 2: A' = exp((S - max) / sqrt(D)) on valid tokens (0 elsewhere). Kernel B takes the row
  // argmax of A'_i . S_j, which a positive scale of row i does not change, so A' is not normalised
  // (PERF_LOG v69). With one token tile (pi0.5: 48 valid tokens) S is still in shared memory;
  // with more it is read back.
#pragma unroll
  for (int i = 0; i < kOwn; ++i)
    if (lane == 0) sm.rowm[warp + kWarps * i] = m_run[i];
  const float s_unscale = 1.f / a.s_scale;  // a power of 2: exact
  for (int u0 = 0; u0 < tr; u0 += kBT) {
    if (n_tiles > 1) {
      token_flags(u0);
      for (int e = tid; e < kBM * kBT; e += kThreads) {
        const int r = e / kBT, c = e % kBT;
        sm.cs[r][c] = in_range(r, u0 + c) ? get_pair(Sb + r * ts, ts, u0 + c) * s_unscale : 0.f;
      }
    }
    __syncthreads();  // rowm; the reloaded tile
    for (int e = tid; e < kBM * kBT; e += kThreads) {
      const int r = e / kBT, c = e % kBT;
      if (in_written(r, u0 + c))
        put_pair(Ab + r * ts, ts, u0 + c, sm.tok[c] ? __expf((sm.cs[r][c] - sm.rowm[r]) * a.inv_sqrt_d) : 0.f);
    }
    if (n_tiles > 1) __syncthreads();  // cs and the token flags are rewritten by the next tile
  }
}

// ------------------------------------------------------------------------------------------
// Kernel B tail (one block per sample, the last to arrive): idx, votes, keep rule, kept list.
//
// Shared memory of kernel B: the A and S tiles of the main phase, then (the tiles are dead by
// then) the tail's vote counts and vote histogram when N <= kTailSmemMaxN. The tail's passes
// over votes are then shared-memory reads and atomics instead of L2 round trips; larger N keeps
// both in the workspace (read with __ldcg: other blocks' lines never sit in our L1).
//
// Tile rows are padded to kLdu = kBU + 4 floats: the FMA product reads 4 consecutive tokens of
// a row as one 16-byte load, and 8 threads reading 8 rows hit 32 distinct banks. The tensor-core
// product's fragment stores into such a tile need 32-byte aligned addresses: the tiles are
// 128-byte aligned, its fragments start every 16 rows (16 x 68 floats = 4352 B) and every 16
// columns (64 B).
constexpr int kLdu = kBU + 4;
static_assert((16 * kLdu * sizeof(float)) % 32 == 0, "fragment rows stay 32-byte aligned");
// The tensor-core product takes both tiles as fp16 halves x = hi + lo (SelectMma), as kernel A
// wrote them (put_pair). Their rows are kLdh = kBU + 8 halves (144 B): a fragment's 16 rows start 32-byte
// aligned, and the 8 rows of each of its shared loads hit distinct banks. The product goes to
// `prod` over the S halves, dead by then.
constexpr int kLdh = kBU + 8;
static_assert((16 * kLdh * sizeof(__half)) % 32 == 0 && kBU % 16 == 0, "fragment rows stay 32-byte aligned");
#if FP_HAVE_MMA
union SelectSmem {
  struct {
    alignas(128) __half ah[kBM][kLdh];
    alignas(128) __half al[kBM][kLdh];
    union {
      struct {
        alignas(128) __half sh[kBM][kLdh];
        alignas(128) __half sl[kBM][kLdh];
      } s;
      alignas(128) float prod[kBM][kLdu];
    } out;
  } tile;
  int tail[2 * kBM * kLdu];
};
#else
union SelectSmem {
  struct {
    alignas(128) float as[kBM][kLdu];
    alignas(128) float ss[kBM][kLdu];
  } tile;
  int tail[2 * kBM * kLdu];
};
#endif
constexpr int kTailSmemInts = 2 * kBM * kLdu;
constexpr int64_t kTailSmemMaxN = 2048;  // covers pi0.5's 768 patches and 6 cameras' 1536
static_assert(2 * (kTailSmemMaxN + 1) <= kTailSmemInts, "votes and hist of N + 1 ints each fit");

template <bool kSmem>
__device__ __forceinline__ int vload(const int* p) {
  if constexpr (kSmem) return *p;
  else return __ldcg(p);
}

// The tail's passes over columns j and over vote values: each thread takes a contiguous segment
// of ceil(n / kThreads) items, so one block scan orders a whole pass (v1-v8 walked 256-item
// chunks with a scan each: 11 scans at N = 768 in budget mode, 3 now).
// Indices are int: the plan admits N < INT_MAX only.
__device__ __forceinline__ void segment(int n, int* lo, int* hi) {
  const int per = (n + kThreads - 1) / kThreads;
  *lo = mn(n, per * static_cast<int>(threadIdx.x));
  *hi = mn(n, *lo + per);
}

// A masked patch's vote count starts here, so that it stays negative whatever it gets.
constexpr int kMasked = INT_MIN / 2;

// The keep rule on a sample's vote counts (kMasked and below for masked patches), every thread of
// the block: implicit / budget / cap, the kept list in increasing j into `list`, the count to
// *count_out (where not null) and returned to every thread.
template <bool kSmem>
__device__ int keep_rule(const Args& a, const int* votes, int* hist, int* list, int64_t* count_out, int* s_warp,
                         long long* s_warp64, int* s_vstar, int* s_above) {
  const int tid = threadIdx.x;
  const int N = static_cast<int>(a.N);
  const bool budget = a.keep_tokens > 0;
  int limit = budget && a.keep_tokens < N ? static_cast<int>(a.keep_tokens) : N;
  if (a.max_tokens > 0 && a.max_tokens < limit) limit = static_cast<int>(a.max_tokens);
  auto eligible = [&](int, int v) { return v >= 0 && (budget || v > 0); };
  int j_lo, j_hi;
  segment(N, &j_lo, &j_hi);

  int cnt = 0;
  for (int j = j_lo; j < j_hi; ++j) cnt += eligible(j, vload<kSmem>(&votes[j])) ? 1 : 0;
  int n_elig = 0;
  const int elig_before = block_excl_scan(cnt, s_warp, &n_elig);
  auto finish = [&](int count) {
    if (tid == 0 && count_out != nullptr) *count_out = count;
    return count;
  };
  if (n_elig <= limit) {  // block-uniform: every eligible patch is kept, placed by the scan above
    int pos = elig_before;
    for (int j = j_lo; j < j_hi; ++j) {
      if (eligible(j, vload<kSmem>(&votes[j]))) list[pos++] = j;
    }
    return finish(n_elig);
  }

  // Budget: keep the `limit` eligible patches with most votes, lower index first. v* is the
  // vote count at the cut: all with votes > v* (fewer than limit) and the lowest-index `need`
  // of those with votes == v*. Bins are walked from v = N down, position p = N - v.
  for (int j = tid; j < N; j += kThreads) {
    const int v = vload<kSmem>(&votes[j]);
    if (eligible(j, v)) atomicAdd(&hist[v], 1);
  }
  __syncthreads();
  int p_lo, p_hi;
  segment(N + 1, &p_lo, &p_hi);
  int h_seg = 0;
  for (int p = p_lo; p < p_hi; ++p) h_seg += vload<kSmem>(&hist[N - p]);
  int tot = 0;
  int above = block_excl_scan(h_seg, s_warp, &tot);  // eligible with votes > N - p_lo
  for (int p = p_lo; p < p_hi; ++p) {
    const int h = vload<kSmem>(&hist[N - p]);
    if (above < limit && above + h >= limit) {  // exactly one bin in the block
      *s_vstar = N - p;
      *s_above = above;
    }
    above += h;
  }
  __syncthreads();
  const int vstar = *s_vstar;
  const int need = limit - *s_above;

  // The kept list in increasing j. One scan of packed counts per segment: ties (votes == v*)
  // in the high 32 bits, the other kept patches in the low 32. A tie is kept when fewer than
  // `need` ties precede it, so the patches kept before j are the non-ties before it plus
  // min(need, ties before it). Exactly `limit` are kept.
  long long packed = 0;
  for (int j = j_lo; j < j_hi; ++j) {
    const int v = vload<kSmem>(&votes[j]);
    if (eligible(j, v)) packed += v == vstar ? (1ll << 32) : (v > vstar ? 1ll : 0ll);
  }
  long long packed_tot = 0;
  const long long before = block_excl_scan(packed, s_warp64, &packed_tot);
  int sure = static_cast<int>(before & 0xffffffffll), ties = static_cast<int>(before >> 32);
  for (int j = j_lo; j < j_hi; ++j) {
    const int v = vload<kSmem>(&votes[j]);
    const bool e = eligible(j, v);
    const bool tie = e && v == vstar, keep_sure = e && v > vstar;
    if (keep_sure || (tie && ties < need)) list[sure + mn(ties, need)] = j;
    sure += keep_sure ? 1 : 0;
    ties += tie ? 1 : 0;
  }
  return finish(limit);
}

template <bool kSmem>
__device__ void keep_tail(const Args& a, int64_t b, int* votes, int* hist, int* s_warp,
                          long long* s_warp64, int* s_vstar, int* s_above) {
  const int tid = threadIdx.x;
  const int N = static_cast<int>(a.N);
  const bool* pm = a.patch_mask != nullptr ? a.patch_mask + b * N : nullptr;
  const bool mask_rows = a.mask_voters && pm != nullptr;
  const unsigned long long* keys = a.keys + b * N;

  // The passes below load kBatch items per thread at once, unpredicated (an index past the end
  // reads item N - 1, unused): a loop that loads and then updates `votes` waited for each load
  // in turn. A masked patch starts at kMasked votes, so no pass reads the mask again: it stays
  // negative whatever it gets (all votes go to column 0 when no patch is valid).
  //
  // The first batch of keys is loaded before the vote counts are cleared, so that its L2 round
  // trip overlaps the mask's: the tail waited for one, then the other (the finishing step is
  // the kernel's serial end at pi05 B=1; run 10's ncu put about 8 k cycles on its one SM).
  constexpr int kBatch = 4;
  unsigned long long key[kBatch];
  bool voter[kBatch];
  auto load_rows = [&](int i0) {
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      key[k] = __ldcg(&keys[mn(i0 + tid + k * kThreads, N - 1)]);
      voter[k] = true;
    }
    if (mask_rows) {
#pragma unroll
      for (int k = 0; k < kBatch; ++k) voter[k] = pm[mn(i0 + tid + k * kThreads, N - 1)];
    }
  };
  auto vote_rows = [&](int i0) {
#pragma unroll
    for (int k = 0; k < kBatch; ++k) {
      const int i = i0 + tid + k * kThreads;
      if (i >= N) break;
      const int j = key_column(key[k], N);
      if (a.idx_out != nullptr) a.idx_out[b * N + i] = voter[k] ? j : -1;
      if (a.want_keep && voter[k]) atomicAdd(&votes[j], 1);
    }
  };
  load_rows(0);
  if (a.want_keep) {
    for (int j0 = 0; j0 <= N; j0 += kBatch * kThreads) {
      bool on[kBatch];
#pragma unroll
      for (int k = 0; k < kBatch; ++k) on[k] = true;
      if (pm != nullptr) {
#pragma unroll
        for (int k = 0; k < kBatch; ++k) on[k] = pm[mn(j0 + tid + k * kThreads, N - 1)];
      }
#pragma unroll
      for (int k = 0; k < kBatch; ++k) {
        const int j = j0 + tid + k * kThreads;
        if (j <= N) {
          votes[j] = j < N && !on[k] ? kMasked : 0;
          hist[j] = 0;
        }
      }
    }
  }
  __syncthreads();
  vote_rows(0);
  for (int i0 = kBatch * kThreads; i0 < N; i0 += kBatch * kThreads) {
    load_rows(i0);
    vote_rows(i0);
  }
  if (!a.want_keep) return;
  __syncthreads();

  keep_rule<kSmem>(a, votes, hist, a.list + b * a.N, a.counts_out + b, s_warp, s_warp64, s_vstar, s_above);
}

#if FP_HAVE_MMA
// The 64 x 64 product A_i . S_j of kernel B on tensor cores, as three fp16 products of the
// tiles' fp16 halves (SelectSmem): a.b ~ a_lo.b_hi + a_hi.b_lo + a_hi.b_hi, small terms first.
// The dropped a_lo.b_lo is ~2^-22 of a.b, so the result stays within fp32 rounding of the FMA
// product, far inside SPEC's 1e-3 of a row's score range: as 3xTF32 did (v15), with half its
// tensor-core instructions and the split once per value, by kernel A (PERF_LOG v59, v69).
// A' is in [0, 1] and |S| <= D (RMS-normalised rows), S scaled by Args::s_scale into fp16's range.
// mma_f16x3: one fragment's three products, in that order.
template <typename A, typename B, typename C>
__device__ __forceinline__ void mma_f16x3(C& acc, const A& a_hi, const A& a_lo, const B& b_hi, const B& b_lo) {
  nvcuda::wmma::mma_sync(acc, a_lo, b_hi, acc);
  nvcuda::wmma::mma_sync(acc, a_hi, b_lo, acc);
  nvcuda::wmma::mma_sync(acc, a_hi, b_hi, acc);
}
struct MmaPair {  // a warp's two 16 x 16 accumulators
  nvcuda::wmma::fragment<nvcuda::wmma::accumulator, 16, 16, 16, float> acc[2];
  __device__ __forceinline__ void zero() {
    nvcuda::wmma::fill_fragment(acc[0], 0.f);
    nvcuda::wmma::fill_fragment(acc[1], 0.f);
  }
};
// Kernel B's layout: warp w owns rows 16 (w % 4) .. +16 and columns 32 (w / 4) .. +32.
struct SelectMma : MmaPair {
  // Tokens [0, ku) of A rows ah / al (lda halves apart) and S rows sh / sl; ku is rounded up to
  // 16 over their zero padding.
  __device__ __forceinline__ void step(const __half* ah, const __half* al, unsigned lda, const __half (*sh)[kLdh],
                                       const __half (*sl)[kLdh], int ku) {
    using namespace nvcuda;
    const int warp = threadIdx.x >> 5;
    const int ra = 16 * (warp & 3), cb = 32 * (warp >> 2);
    for (int k = 0; k < ku; k += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a_hi, a_lo;
      load_frag(a_hi, ah + ra * lda + k, lda);
      load_frag(a_lo, al + ra * lda + k, lda);
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        // B[k][n] = S[j = n][k]: the S tile read column-major.
        wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b_hi, b_lo;
        load_frag(b_hi, &sh[cb + 16 * c][k], kLdh);
        load_frag(b_lo, &sl[cb + 16 * c][k], kLdh);
        mma_f16x3(acc[c], a_hi, a_lo, b_hi, b_lo);
      }
    }
  }
  // Kernel B's tiles.
  __device__ __forceinline__ void step(const SelectSmem& sm, int ku) {
    step(&sm.tile.ah[0][0], &sm.tile.al[0][0], kLdh, sm.tile.out.s.sh, sm.tile.out.s.sl, ku);
  }
  // The product into a [64][kLdu] shared tile.
  __device__ __forceinline__ void store(float (*out)[kLdu]) const {
    const int warp = threadIdx.x >> 5;
    const int ra = 16 * (warp & 3), cb = 32 * (warp >> 2);
    nvcuda::wmma::store_matrix_sync(&out[ra][cb], acc[0], kLdu, nvcuda::wmma::mem_row_major);
    nvcuda::wmma::store_matrix_sync(&out[ra][cb + 16], acc[1], kLdu, nvcuda::wmma::mem_row_major);
  }
};
#endif

// The best packed key of row mr = tid / 4 of column tile ct's 64 x 64 product `prod`, over its
// allowed columns (column c's bit is bit c % 32 of cols[c / 32]); the same in the row's 4 lanes.
// Thread (mr, mq) reads row mr's columns mq + 4 k (k < 16): a row's 64 scores are 4 lanes' and
// one warp's loads hit 32 distinct banks (row stride kLdu = 4 mod 32 banks). In the product's
// layout (4 rows x 4 columns a thread) each row's merge took 4 shuffle rounds of 64-bit keys;
// here 2.
__device__ __forceinline__ unsigned long long tile_best(const float (*prod)[kLdu], const unsigned* cols, int ct) {
  const int mr = threadIdx.x >> 2, mq = threadIdx.x & 3;
  // The row's best of this thread's 16 columns (mq + 4 k), packed once: the maximum m over the
  // allowed columns (fmaxf passes over NaN), then the lowest allowed column equal to it, found
  // as the lowest set bit of a mask. Column c's bit is bit 4 k of ok[k / 8], as cols holds
  // it. pack_key's order: -0 ties +0 (the compare), and NaN ranks below every number but above
  // a disallowed column: a row whose allowed scores are all NaN (m stays -inf and no allowed
  // score equals it) takes its lowest allowed column as NaN. About 7 instructions a score,
  // where v51's chain, which tracked NaN at every step, took 14 (sm_90 SASS, PERF_LOG v68).
  const unsigned ok[2] = {(cols[0] >> mq) & 0x11111111u, (cols[1] >> mq) & 0x11111111u};
  const float* row = &prod[mr][mq];
  float v[16];
  float m = -INFINITY;
#pragma unroll
  for (int k = 0; k < 16; ++k) {
    v[k] = row[4 * k];
    m = fmaxf(m, (ok[k >> 3] >> (4 * (k & 7))) & 1u ? v[k] : -INFINITY);
  }
  unsigned eq[2] = {0u, 0u};
#pragma unroll
  for (int k = 0; k < 16; ++k) eq[k >> 3] |= v[k] == m ? 1u << (4 * (k & 7)) : 0u;
  eq[0] &= ok[0];
  eq[1] &= ok[1];
  const bool hit = (eq[0] | eq[1]) != 0u;
  const unsigned w0 = hit ? eq[0] : ok[0], w1 = hit ? eq[1] : ok[1];
  const int bk = w0 != 0u ? (__ffs(w0) - 1) >> 2 : w1 != 0u ? 8 + ((__ffs(w1) - 1) >> 2) : -1;
  unsigned long long best =
      bk < 0 ? 0ull : pack_key(hit ? m : __int_as_float(0x7fffffff), ct * kBM + mq + 4 * bk);
  best = max_u64(best, __shfl_xor_sync(kFull, best, 1));  // the row's 4 lanes
  best = max_u64(best, __shfl_xor_sync(kFull, best, 2));
  return best;
}

// Kernel B: score' tiles = A[i, :] . S[j, :] over the prompt range, row argmax merged across
// column tiles by atomicMax on packed keys; the sample's last block runs keep_tail.
// Block (row tile, column split, sample) takes the column tiles split, split + gridDim.y, ...:
// at pi05 B=1 one each (gridDim.y = column tiles fills the GPU), at B=64 six, so that its
// prologue, its row atomics and (for a prompt range of one 64-token step) its A tile are paid once
// per block, not once per 64 x 64 tile (Plan::col_splits).
// 4 blocks per SM: the tensor-core product (sm_80+) fits 64 registers without spills (at 48 it
// spilled); left free, nvcc took 77-80, which fits only 3.
__global__ void __launch_bounds__(kThreads, 4) select_kernel(Args a) {
  __shared__ SelectSmem sm;
#if FP_HAVE_MMA
  auto& prod = sm.tile.out.prod;  // the tile's product, for the merge
#else
  auto& as = sm.tile.as;
  auto& ss = sm.tile.ss;
  auto& prod = ss;
#endif
  __shared__ int s_warp[kWarps];
  __shared__ long long s_warp64[kWarps];
  __shared__ int s_last, s_vstar, s_above;

  const int tid = threadIdx.x;
  const int64_t b = blockIdx.z, N = a.N, ts = a.ts;
  const int64_t i0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int n_ct = static_cast<int>(a.row_tiles), ct_step = static_cast<int>(gridDim.y);
  const bool* pm = a.patch_mask != nullptr ? a.patch_mask + b * N : nullptr;
  // Column indices in 32 bits (the plan admits N < INT_MAX only): the merge below is the
  // kernel's busiest code after the product, and a 64-bit compare is two instructions.
  const int n32 = static_cast<int>(N);
  pdl_wait();  // everything below reads or updates what kernel A wrote
  const int tr = a.trange[2 * b + 1] - a.trange[2 * b];
  const bool anyp = a.anyp[b] != 0;
  const float* Ab = a.A + b * N * ts;
  const float* Sb = a.S + b * N * ts;

  // Tiles of 64 tokens of A' (rows i) and S (rows j) in shared memory, zeros from u_end on. The
  // first tile's loads do not wait for the prompt range: kernel A wrote zeros past it up to
  // min(ts, 64), so the row stride alone bounds them (do-while: tr >= 1 always).
  //
  // The rows hold fp16 halves (put_pair), copied as they are: thread (hr, hq) takes rows hr and
  // hr + 32, tokens u0 + 8 hq .. + 7 of both planes, four 16-byte loads, all of a step's issued
  // before its stores. ts % 8 == 0 in a 16-byte aligned workspace, and kernel A's zeros past the
  // range reach a multiple of 8, so the bound rounds up to 8. (Until v69 the rows were fp32 and
  // every tile was split into halves here: PERF_LOG v69.)
  const int hr = tid >> 3, hq = tid & 7;
  auto fetch_tile = [&](uint4 (&v)[4], const float* src, int64_t row0, int u0) {
    const int u_end = u0 == 0 ? static_cast<int>(mn<int64_t>(ts, kBU)) : (tr + 7) & ~7;
    const int u = u0 + 8 * hq;
    const uint4* at = reinterpret_cast<const uint4*>(reinterpret_cast<const __half*>(src + (row0 + hr) * ts) + u);
    const int64_t rows = N - row0 - hr;  // rows hr + 32 k below it exist
    const int64_t lo = ts / 8, down = 8 * ts;  // in 16-byte units: the lo plane, 32 rows
    const uint4 z = make_uint4(0u, 0u, 0u, 0u);
    const bool in = u < u_end;
    v[0] = in && rows > 0 ? at[0] : z;
    v[1] = in && rows > 0 ? at[lo] : z;
    v[2] = in && rows > 32 ? at[down] : z;
    v[3] = in && rows > 32 ? at[down + lo] : z;
  };
#if FP_HAVE_MMA
  auto put_tile = [&](__half (&hi)[kBM][kLdh], __half (&lo)[kBM][kLdh], const uint4 (&v)[4]) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      *reinterpret_cast<uint4*>(&hi[hr + 32 * k][8 * hq]) = v[2 * k];
      *reinterpret_cast<uint4*>(&lo[hr + 32 * k][8 * hq]) = v[2 * k + 1];
    }
  };
  auto put_a = [&](const uint4 (&v)[4]) { put_tile(sm.tile.ah, sm.tile.al, v); };
  auto put_s = [&](const uint4 (&v)[4]) { put_tile(sm.tile.out.s.sh, sm.tile.out.s.sl, v); };
#else
  // The FMA product takes fp32 tiles: hi + lo again. Thread (ty, tx) multiplies rows ty + 16 r
  // by columns tx + 16 c.
  const int tx = tid & 15, ty = tid >> 4;
  auto put_tile = [&](float (&dst)[kBM][kLdu], const uint4 (&v)[4]) {
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const __half* h = reinterpret_cast<const __half*>(&v[2 * k]);
      const __half* l = reinterpret_cast<const __half*>(&v[2 * k + 1]);
      float x[8];
#pragma unroll
      for (int e = 0; e < 8; ++e) x[e] = __half2float(h[e]) + __half2float(l[e]);
      *reinterpret_cast<float4*>(&dst[hr + 32 * k][8 * hq]) = float4{x[0], x[1], x[2], x[3]};
      *reinterpret_cast<float4*>(&dst[hr + 32 * k][8 * hq + 4]) = float4{x[4], x[5], x[6], x[7]};
    }
  };
  auto put_a = [&](const uint4 (&v)[4]) { put_tile(as, v); };
  auto put_s = [&](const uint4 (&v)[4]) { put_tile(ss, v); };
#endif

  // The best packed key of row mr over the tiles done (0 below every key), the same in the 4
  // threads of the row (tile_best's layout).
  const int mr = tid >> 2, mq = tid & 3;
  unsigned long long row_best = 0ull;
  // The allowed columns of the tile, bit c for column c: warps 0 and 1 ballot one column a lane.
  __shared__ unsigned s_cols[2];
  for (int ct = blockIdx.y; ct < n_ct; ct += ct_step) {
    const int64_t c0 = static_cast<int64_t>(ct) * kBM;
    // Allowed columns: all; or the valid patches; or column 0 alone when none is valid (anyp is
    // set without a mask). The mask loads here and is used after the product.
    bool col_ok = false;
    if (tid < kBM) {
      const int j = ct * kBM + tid;
      col_ok = j < n32 && (anyp ? pm == nullptr || pm[j] : j == 0);
    }
#if FP_HAVE_MMA
    SelectMma tc;
    tc.zero();
#else
    // This thread's 4 x 4 outputs: rows ty + 16 r, columns tx + 16 c of the tile.
    float acc[4][4];
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[r][c] = 0.f;
#endif
    int u0 = 0;
    do {
      // With one token step the A tile of the first column tile serves all of them. The S fetch
      // is written in both branches: with the A tile's fetch and store each under its own `if`,
      // the select kernel spilled 16 B at its 64 registers (sm_90).
      uint4 vs[4];
      if (ct == static_cast<int>(blockIdx.y) || tr > kBU) {
        uint4 va[4];
        fetch_tile(va, Ab, i0, u0);
        fetch_tile(vs, Sb, c0, u0);
        put_a(va);
      } else {
        fetch_tile(vs, Sb, c0, u0);
      }
      put_s(vs);
      __syncthreads();
      const int ku = mn(kBU, tr - u0);
#if FP_HAVE_MMA
      tc.step(sm, ku);
#else
      // Four tokens per step, as float4 loads: a thread's 4 rows and 4 columns are 8 shared loads
      // per 64 FMAs. With one token per step they were 32, and by count the loop was bound by
      // shared-memory bandwidth rather than by the FMAs. Tokens past tr are 0 in both tiles
      // (kernel A's zeros or the load bound), so rounding ku up to 4 adds only zeros.
#pragma unroll
      for (int k = 0; k < ku; k += 4) {
        float4 av[4], sv[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) av[r] = *reinterpret_cast<const float4*>(&as[ty + 16 * r][k]);
#pragma unroll
        for (int c = 0; c < 4; ++c) sv[c] = *reinterpret_cast<const float4*>(&ss[tx + 16 * c][k]);
#pragma unroll
        for (int r = 0; r < 4; ++r)
#pragma unroll
          for (int c = 0; c < 4; ++c) {
            float x = acc[r][c];
            x = fmaf(av[r].x, sv[c].x, x);
            x = fmaf(av[r].y, sv[c].y, x);
            x = fmaf(av[r].z, sv[c].z, x);
            acc[r][c] = fmaf(av[r].w, sv[c].w, x);
          }
      }
#endif
      __syncthreads();
      u0 += kBU;
    } while (u0 < tr);
    // The product over the S tile, which is dead (the A tile may serve the next column tile).
#if FP_HAVE_MMA
    tc.store(prod);
#else
#pragma unroll
    for (int r = 0; r < 4; ++r)
#pragma unroll
      for (int c = 0; c < 4; ++c) ss[ty + 16 * r][tx + 16 * c] = acc[r][c];
#endif
    if (tid < kBM) {
      const unsigned bits = __ballot_sync(kFull, col_ok);
      if ((tid & 31) == 0) s_cols[tid >> 5] = bits;
    }
    __syncthreads();
    row_best = max_u64(row_best, tile_best(prod, s_cols, ct));
    if (ct + ct_step < n_ct) __syncthreads();  // before the next tile's S loads overwrite the product
  }
  if (mq == 0 && i0 + mr < N && row_best != 0ull) atomicMax(&a.keys[b * N + i0 + mr], row_best);
  // The gather kernel, launched the same way, is scheduled once every block is past its column
  // tiles and waits for the tail below (v77, as in kernel A).
  pdl_launch_dependents();

  __syncthreads();
  if (tid == 0) s_last = arrive(&a.counters_b[b]) == static_cast<int>(gridDim.x * gridDim.y) - 1;
  __syncthreads();
  if (!s_last) return;
  if (N <= kTailSmemMaxN) {
    keep_tail<true>(a, b, sm.tail, sm.tail + N + 1, s_warp, s_warp64, &s_vstar, &s_above);
  } else {
    keep_tail<false>(a, b, a.votes + b * (N + 1), a.hist + b * (N + 1), s_warp, s_warp64, &s_vstar,
                     &s_above);
  }
}

// Arguments of the gather-pad: kernel C, or the one-cluster kernel's last phase (K = 0: none).
struct GArgs {
  int64_t N, D, K;
  const void* patches;
  int64_t p_sb, p_sr;
  const int* list;
  const int64_t* counts;
  void* pruned;
  bool* kept_mask;
  int64_t* kept_idx;
};

// ------------------------------------------------------------------------------------------
// The one-cluster kernel (PERF_LOG v80, v81; opt-in, plan.one_cluster): kernels A and B as one
// launch, each sample one thread block cluster of C <= 16 blocks (sm_90's largest; grid (B, C)),
// block r taking patch rows R r .. R r + R - 1 over all of D (R = Args::oc_rows <= 64, so N <=
// 1024) in kernel A's and B's 64-row tiles, zeros past its rows. At B=1 the three kernels are
// chains of round trips with a launch, a drain and a gpu-scope arrival between them (PERF_LOG lead
// 1); here cluster barriers order the phases, and the loads go out as deep cp.async rings, since
// 12-16 SMs must keep their whole share of the 3 MB of patches and the prompt in flight. The
// clusters of a call share nothing and wait for no other (they run in no set order, as many at
// once as the GPCs hold):
//   phase 1: the D steps of the row tile and the prompt's token tile through kOcStages step
//            buffers (kernel A's tiles, product and sums of squares; the sums read each thread's
//            own landed vectors, in the register path's order), then kernel A's finish_block:
//            S and A' of the tile as fp16 halves in the workspace; cluster barrier;
//   phase 2: the block's A' rows in shared memory for every token step, every S column tile of
//            the sample through a ring of kOcRing, kernel B's product (of the block's rows only,
//            OcMma) and merge: the block owns its rows' argmax, stored without atomics; cluster
//            barrier;
//   phase 3: every block leaves its rows' votes in shared memory; after a cluster barrier
//            each block that needs the kept list (every block with a gather, else block 0)
//            counts all blocks' votes, read through distributed shared memory, and runs kernel
//            B's keep rule;
//   phase 4 (prune_padded, K = max_tokens <= N): kernel C's gather-pad by every block from its
//            own kept list (gather_in_cluster), so that the call is this one launch.
// prune (K known only after a host read) and select keep kernel C, or none. Only 16-bit inputs
// with 16-byte rows (the rings copy 16-byte vectors and the product is wmma); everything else
// keeps kernels A, B and C.
constexpr int kOcStages = 8;     // D steps in flight in phase 1: 8 x 16 KB a block
constexpr int kOcRing = 6;       // S column tiles in flight in phase 2
constexpr int kOcMaxTiles = 16;  // row tiles: blocks a cluster
constexpr size_t kOcSmemMax = 227 * 1024;

// Block-wide scalars and the tail's scan scratch, at the start of the dynamic shared memory (a
// cluster kernel keeps all of its shared memory there).
struct OcHead {
  int t_lo, t_hi;
  unsigned cols[kOcMaxTiles * kBM / 32];  // allowed columns, bit c % 32 of word c / 32
  int s_warp[kWarps];
  long long s_warp64[kWarps];
  int s_vstar, s_above;
};
constexpr size_t kOcHead = (sizeof(OcHead) + 127) / 128 * 128;
struct OcSTile {  // one S column tile of phase 2's ring
  alignas(128) __half sh[kBM][kLdh];
  alignas(128) __half sl[kBM][kLdh];
};
// Phase 2's A' rows: every 64-token step of the range, padded by 8 halves (kLdh's reason).
__host__ __device__ inline int64_t oc_lda(int64_t ts) { return (ts + kBU - 1) / kBU * kBU + 8; }
// Bytes past the head: phase 1's step buffers and ClusterSmem arrays (cs overlays the first two
// buffers), phase 2's A' rows, product tile and ring, or phases 3 and 4's, whichever is largest.
// Step buffers of 16-bit tiles (StepTiles<__half> and <__nv_bfloat16> are alike).
__host__ __device__ inline size_t oc_phase1_bytes(int64_t ts) {
  return kOcStages * sizeof(StepTiles<__half>) + static_cast<size_t>(kBM * ts + kBM + 3 * ts) * sizeof(float);
}
__host__ __device__ inline size_t oc_phase2_bytes(int64_t ts) {
  return 2 * kBM * static_cast<size_t>(oc_lda(ts)) * sizeof(__half) + 2 * sizeof(float) * kBM * kLdu +
         kOcRing * sizeof(OcSTile);
}
__host__ __device__ inline size_t oc_smem_bytes(int64_t N, int64_t ts) {
  // phases 3 and 4: the block's picks [kBM], vote counts [N], histogram [N + 1] and kept list
  // [N], each 16-byte aligned, then at least one gather slot a thread (16 bytes)
  const size_t p1 = oc_phase1_bytes(ts), p2 = oc_phase2_bytes(ts),
               p3 = (kBM + 3 * static_cast<size_t>(N) + 12) * sizeof(int) + kThreads * 16;
  const size_t p12 = p1 > p2 ? p1 : p2;
  return kOcHead + (p12 > p3 ? p12 : p3);
}
static_assert(sizeof(StepTiles<__half>) % 128 == 0 && sizeof(StepTiles<__half>) == sizeof(StepTiles<__nv_bfloat16>),
              "step buffers stay 128-byte aligned");
static_assert(sizeof(float) * kBM * (kBT + 4) <= 2 * sizeof(StepTiles<__half>), "cs overlays two step buffers");
static_assert((sizeof(float) * kBM * kLdu) % 128 == 0 && sizeof(OcSTile) % 128 == 0, "phase 2 arrays stay aligned");

#if FP_HAVE_MMA
// Phase 2's product: SelectMma's, of the block's rg row groups of 16 only (rows past them are not
// multiplied), its 4 rg fragments of a 64-column tile dealt so that each sub-partition of the SM
// (warp w issues on sub-partition w % 4) takes column group w % 4's rg of them: warp w rows
// 16 (w / 4) where w / 4 < rg, and rows 16 (w / 4 + 2) where w / 4 + 2 < rg. SelectMma's layout
// (rows 16 (w % 4)) gives every sub-partition 4 fragments however many rows hold data: at pi05's
// 48-row blocks a quarter of its tensor-core work multiplied zeros. Each fragment's products are
// SelectMma's, in its order: the same sums, bit for bit. The block's A' rows are the same for every
// column tile, so a warp keeps its A' fragments of a 64-token step in registers (v83: up to 16
// fragments; the kernel takes 139 registers, sm_90, no spills): per tile it loads only its S
// fragments from shared memory, where it also loaded its A' fragments (PERF_LOG v82's traffic).
struct OcMma : MmaPair {
  using FragA = nvcuda::wmma::fragment<nvcuda::wmma::matrix_a, 16, 16, 16, __half, nvcuda::wmma::row_major>;
  int rg;  // row groups of 16 that hold rows (1..4)
  FragA a_hi[2][kBU / 16], a_lo[2][kBU / 16];  // the warp's A' fragments of one 64-token step
  __device__ __forceinline__ explicit OcMma(int rows) : rg((rows + 15) / 16) {}
  // The warp's A' fragments of tokens [0, ku) of rows ah / al (lda halves apart): loaded once for
  // every column tile where the prompt range is one 64-token step (pi0.5), else once per step.
  __device__ __forceinline__ void load_a(const __half* ah, const __half* al, unsigned lda, int ku) {
    const int g = (threadIdx.x >> 5) >> 2;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if (g + 2 * h >= rg) break;
      const int ra = 16 * (g + 2 * h);
#pragma unroll
      for (int k = 0; k < kBU / 16; ++k) {
        if (16 * k >= ku) break;
        load_frag(a_hi[h][k], ah + ra * lda + 16 * k, lda);
        load_frag(a_lo[h][k], al + ra * lda + 16 * k, lda);
      }
    }
  }
  // The held A' fragments by S rows sh / sl, tokens [0, ku); warp-uniform branches.
  __device__ __forceinline__ void step(const __half (*sh)[kLdh], const __half (*sl)[kLdh], int ku) {
    using namespace nvcuda;
    const int warp = threadIdx.x >> 5, g = warp >> 2, cb = 16 * (warp & 3);
    if (g >= rg) return;
    const bool two = g + 2 < rg;
#pragma unroll
    for (int k = 0; k < kBU / 16; ++k) {
      if (16 * k >= ku) break;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> b_hi, b_lo;
      load_frag(b_hi, &sh[cb][16 * k], kLdh);
      load_frag(b_lo, &sl[cb][16 * k], kLdh);
      mma_f16x3(acc[0], a_hi[0][k], a_lo[0][k], b_hi, b_lo);
      if (two) mma_f16x3(acc[1], a_hi[1][k], a_lo[1][k], b_hi, b_lo);
    }
  }
  // The product's rows 0 .. 16 rg - 1 into a [64][kLdu] shared tile (the rest is left as it was).
  __device__ __forceinline__ void store(float (*out)[kLdu]) const {
    const int warp = threadIdx.x >> 5, g = warp >> 2, cb = 16 * (warp & 3);
    if (g < rg) nvcuda::wmma::store_matrix_sync(&out[16 * g][cb], acc[0], kLdu, nvcuda::wmma::mem_row_major);
    if (g + 2 < rg) nvcuda::wmma::store_matrix_sync(&out[16 * (g + 2)][cb], acc[1], kLdu, nvcuda::wmma::mem_row_major);
  }
};
#endif

// Phase 4: block rt of sample b's C takes output rows rt, rt + C, ... of the sample's kept `list`
// (this block's shared memory) and `count` (rows at or past it are zeros). Each thread copies its
// 16-byte vectors of as many rows as the buffer holds into its own slots (cp.async: one round trip
// for all of them), waits for its own copies and stores them. A thread reads back only its own
// slots, so no block barrier orders them.
template <typename T>
__device__ void gather_in_cluster(const GArgs& g, int64_t b, int rt, int C, const int* list, int count,
                                  unsigned char* buf, size_t buf_bytes) {
  const int tid = threadIdx.x;
  const int K = static_cast<int>(g.K);
  const int64_t out0 = b * g.K;  // the sample's first output row
  const int nvec = static_cast<int>(g.D * static_cast<int64_t>(sizeof(T)) / 16);  // vectors a row
  const int rows_here = K > rt ? (K - rt + C - 1) / C : 0;
  for (int i = tid; i < rows_here; i += kThreads) {
    const int r = rt + C * i;
    const bool real = r < count;
    g.kept_mask[out0 + r] = real;
    g.kept_idx[out0 + r] = real ? list[r] : 0;
  }
  uint4* const slot = reinterpret_cast<uint4*>(buf);
  const int chunk = static_cast<int>(buf_bytes / 16);
  const int items = rows_here * nvec;
  // The sample's rows (strides in vectors: whole ones, one_cluster_applies)
  const uint4* const P = static_cast<const uint4*>(g.patches) + b * g.p_sb * static_cast<int64_t>(sizeof(T)) / 16;
  const int64_t sr = g.p_sr * static_cast<int64_t>(sizeof(T)) / 16;
  for (int q0 = 0; q0 < items; q0 += chunk) {
    const int q1 = mn(items, q0 + chunk);
    for (int q = q0 + tid; q < q1; q += kThreads) {
      const int r = rt + C * (q / nvec);
      if (r < count) fp_cp_async16(&slot[q - q0], P + list[r] * sr + q % nvec, true);
    }
    fp_cp_async_commit();
    fp_cp_async_wait<0>();
    for (int q = q0 + tid; q < q1; q += kThreads) {
      const int i = q / nvec, r = rt + C * i;
      reinterpret_cast<uint4*>(g.pruned)[(out0 + r) * nvec + q % nvec] =
          r < count ? slot[q - q0] : make_uint4(0u, 0u, 0u, 0u);
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads, 1) one_cluster_kernel(Args a, GArgs g) {
#if FP_HAVE_MMA
  using Ld = Loader<T, true>;
  constexpr int kBK = ATile<T>::kBK;
  static_assert(sizeof(T) == 2, "16-bit inputs");
  unsigned char* const smem = fp_dyn_smem();
  OcHead& hd = *reinterpret_cast<OcHead*>(smem);
  unsigned char* const body = smem + kOcHead;
  StepTiles<T>* const stage = reinterpret_cast<StepTiles<T>*>(body);
  const ClusterSmem cl = cluster_smem(body, kOcStages * sizeof(StepTiles<T>), a.ts);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int rt = static_cast<int>(blockIdx.y), C = static_cast<int>(gridDim.y);  // rank, blocks
  const int64_t b = blockIdx.x;  // the cluster's sample
  const int64_t N = a.N, T_ = a.T, D = a.D, ts = a.ts;
  const int64_t j0 = static_cast<int64_t>(rt) * a.oc_rows;
  const int rows_here = static_cast<int>(mn<int64_t>(a.oc_rows, N - j0));  // the rest of the 64-row tiles is zeros
  const T* P = static_cast<const T*>(a.patches) + b * a.p_sb;
  const T* Q = static_cast<const T*>(a.task) + b * a.t_sb;
  const bool* tm = a.task_mask != nullptr ? a.task_mask + b * T_ : nullptr;
  const bool* pm = a.patch_mask != nullptr ? a.patch_mask + b * N : nullptr;
  const int64_t row0 = b * N;  // the sample's first row in the [B * N] workspace arrays and idx_out
  const int n_steps = static_cast<int>((D + kBK - 1) / kBK);

  // Phase 1. The copies of D step s into step buffer s % kOcStages: patch rows j0 + row(k) below
  // rows_here and prompt rows t_lo + u0 + row(k) below tr, zeros elsewhere (Loader<T, true>'s
  // thread layout).
  // Every call commits a group, empty past the last step, so that a wait for "all but the
  // newest kOcStages - 2" always means the step in hand.
  auto issue = [&](int s, int t_lo, int u0, int tr) {
    if (s < n_steps) {
      StepTiles<T>& st = stage[s % kOcStages];
      const int c = Ld::col();
      const int64_t dd = static_cast<int64_t>(s) * kBK + c;
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const int r = Ld::row(k);
        const bool pj = r < rows_here && dd < D, pu = u0 + r < tr && dd < D;
        fp_cp_async16(&st.ps[r][c], pj ? P + (j0 + r) * a.p_sr + dd : P, pj);
        fp_cp_async16(&st.ts[r][c], pu ? Q + (t_lo + u0 + r) * a.t_sr + dd : Q, pu);
      }
    }
    fp_cp_async_commit();
  };
  // The first steps go out before the prompt range is known, on kernel A's guess that it starts
  // at token 0 (pi0.5's prompts are a prefix): rows past the range are copied and not used.
  for (int s = 0; s < kOcStages - 1; ++s) issue(s, 0, 0, static_cast<int>(T_));
  const PromptRange range = prompt_range(tm, T_, &hd.t_lo, &hd.t_hi);
  const bool all_t = range.all_t;
  const int t_lo = range.t_lo, tr = range.t_hi - range.t_lo;
  if (t_lo != 0) {  // a wrong guess: the same buffers again, after the thread's own copies landed
    fp_cp_async_wait<0>();
    for (int s = 0; s < kOcStages - 1; ++s) issue(s, t_lo, 0, tr);
  }

  float psq[2] = {0.f, 0.f};
  for (int u0 = 0; u0 < tr; u0 += kBT) {  // token tiles, the patches streamed again for each
    if (u0 > 0)
      for (int s = 0; s < kOcStages - 1; ++s) issue(s, t_lo, u0, tr);
    float tsq[2] = {0.f, 0.f};
    AccA<T, true> acc;
    acc.zero();
    for (int s = 0; s < n_steps; ++s) {
      fp_cp_async_wait<kOcStages - 2>();
      // Every thread's copies of step s have landed, and every thread is past the product of step
      // s - 1, whose buffer the copies below refill.
      __syncthreads();
      issue(s + kOcStages - 1, t_lo, u0, tr);
      const StepTiles<T>& st = stage[s % kOcStages];
      const int c = Ld::col();
#pragma unroll
      for (int k = 0; k < 2; ++k) {
        const uint4 pv4 = *reinterpret_cast<const uint4*>(&st.ps[Ld::row(k)][c]);
        const uint4 qv4 = *reinterpret_cast<const uint4*>(&st.ts[Ld::row(k)][c]);
        const T* pv = reinterpret_cast<const T*>(&pv4);
        const T* qv = reinterpret_cast<const T*>(&qv4);
#pragma unroll
        for (int e = 0; e < Ld::kVE; ++e) {
          const float x = to_f32(pv[e]), y = to_f32(qv[e]);
          if (u0 == 0) psq[k] = fmaf(x, x, psq[k]);
          tsq[k] = fmaf(y, y, tsq[k]);
        }
      }
      acc.step(st, u0, tr);
    }
    __syncthreads();  // the last products read the step buffers, which cs overlays
    float(*cs)[kBT + 4] = reinterpret_cast<float(*)[kBT + 4]>(body);
    acc.store(cs);
    __syncthreads();
    for (int e = tid; e < kBM * kBT; e += kThreads) {
      const int r = e / kBT, c = e % kBT;
      if (r < rows_here && u0 + c < tr) cl.part[r * ts + u0 + c] = cs[r][c];
    }
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      const float v = Ld::reduce(tsq[k]);
      const int u = u0 + Ld::row(k);
      if (Ld::leader() && u < tr) cl.tsq[u] = v;
    }
    __syncthreads();  // cs overlays the buffers that the next token tile's copies fill
  }
#pragma unroll
  for (int k = 0; k < 2; ++k) {
    const float v = Ld::reduce(psq[k]);
    if (Ld::leader() && Ld::row(k) < rows_here) cl.psq[Ld::row(k)] = v;
  }
  finish_block(a, cl, b, j0, rows_here, tr, t_lo, all_t, tm, false);  // no kernel B: its counter stays
  fp_cluster_sync();  // every block's S and A' rows are in the workspace

  // Phase 2. The block's A' rows, all 64-token steps of the range (zeros past u_end, the range
  // rounded up to 8 as kernel B's fetch_tile bounds it), with the ring's first group.
  const int lda = static_cast<int>(oc_lda(ts));
  __half* const ah = reinterpret_cast<__half*>(body);
  __half* const al = ah + kBM * lda;
  // Two product tiles: column tile ct's in prod + (ct & 1) kBM, merged while the next one is multiplied.
  float(*const prod)[kLdu] = reinterpret_cast<float(*)[kLdu]>(al + kBM * lda);
  OcSTile* const ring = reinterpret_cast<OcSTile*>(prod + 2 * kBM);
  const int n_u = (tr + kBU - 1) / kBU, n_ct = static_cast<int>(a.row_tiles), n_items = n_ct * n_u;
  const int u_end = (tr + 7) & ~7;
  {
    const int vecs = n_u * kBU / 8;  // 16-byte vectors a row and plane
    for (int e = tid; e < 2 * kBM * vecs; e += kThreads) {
      const int plane = e / (kBM * vecs), r = e / vecs % kBM, u = 8 * (e % vecs);
      const bool on = r < rows_here && u < u_end;
      const __half* src = reinterpret_cast<const __half*>(a.A + (row0 + j0 + r) * ts) + plane * ts + u;
      fp_cp_async16((plane ? al : ah) + r * lda + u, on ? src : reinterpret_cast<const __half*>(a.A), on);
    }
  }
  // Item k: column tile k / n_u, token step k % n_u, into ring entry k % kOcRing (kernel B's
  // fetch_tile layout: rows hr and hr + 32, tokens 8 hq .. + 7, both planes).
  const int hr = tid >> 3, hq = tid & 7;
  auto issue_s = [&](int k) {
    if (k < n_items) {
      OcSTile& t = ring[k % kOcRing];
      const int64_t c0 = static_cast<int64_t>(k / n_u) * kBM;
      const int u = (k % n_u) * kBU + 8 * hq;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const int64_t j = c0 + hr + 32 * h;
        const bool on = j < N && u < u_end;
        const __half* src = reinterpret_cast<const __half*>(a.S + (row0 + j) * ts) + u;
        fp_cp_async16(&t.sh[hr + 32 * h][8 * hq], on ? src : reinterpret_cast<const __half*>(a.S), on);
        fp_cp_async16(&t.sl[hr + 32 * h][8 * hq], on ? src + ts : reinterpret_cast<const __half*>(a.S), on);
      }
    }
    fp_cp_async_commit();
  };
  for (int k = 0; k < kOcRing - 1; ++k) issue_s(k);
  // Allowed columns: the valid patches, all without a mask, column 0 alone when none is valid.
  for (int w = warp; w < 2 * n_ct; w += kWarps) {
    const int64_t j = 32 * w + lane;
    const unsigned bits = __ballot_sync(kFull, j < N && (pm == nullptr || pm[j]));
    if (lane == 0) hd.cols[w] = bits;
  }
  __syncthreads();
  unsigned any = 0u;
  for (int w = 0; w < 2 * n_ct; ++w) any |= hd.cols[w];

  const int mr = tid >> 2, mq = tid & 3;
  unsigned long long row_best = 0ull;  // tile_best's layout
  OcMma tc(rows_here);
  // Warps whose 8 rows (tile_best's layout) are past the multiplied ones merge nothing: their
  // rows of the product tile hold whatever was there.
  const bool merges = 8 * warp < 16 * tc.rg;
  auto merge = [&](int ct) {  // column tile ct's product
    const unsigned cols[2] = {any != 0u ? hd.cols[2 * ct] : (ct == 0 ? 1u : 0u), any != 0u ? hd.cols[2 * ct + 1] : 0u};
    if (merges) row_best = max_u64(row_best, tile_best(prod + (ct & 1) * kBM, cols, ct));
  };
  // One block barrier an item (v85): a column tile's product is merged at the end of the next
  // tile's product, after that item's barrier, so warps that have stored their part of one tile go
  // on to merge the tile before it while others still multiply. Tile ct's store overwrites tile
  // ct - 2's product, merged before the barrier of tile ct's first item. The merges are a
  // maximum of packed keys, so their order changes nothing.
  for (int k = 0; k < n_items; ++k) {
    const int ct = k / n_u, st = k % n_u;
    fp_cp_async_wait<kOcRing - 2>();
    // Every thread's copies of item k (and of the A' rows) have landed; every thread is past item
    // k - 1's product, whose ring entry the copies below refill, its store of a product tile and
    // its merge of the tile before.
    __syncthreads();
    issue_s(k + kOcRing - 1);
    if (st == 0) tc.zero();
    const OcSTile& t = ring[k % kOcRing];
    const int ku = mn(kBU, tr - st * kBU);
    if (n_u > 1 || k == 0) tc.load_a(ah + st * kBU, al + st * kBU, static_cast<unsigned>(lda), ku);
    tc.step(t.sh, t.sl, ku);
    if (st == n_u - 1) {
      tc.store(prod + (ct & 1) * kBM);
      if (ct > 0) merge(ct - 1);
    }
  }
  __syncthreads();  // the last tile's product (every sample has one: its prompt range holds a token)
  merge(n_ct - 1);
  // Phase 3. Each block decodes its own rows' argmax (the row index, or -1 for a masked voter,
  // to idx_out) and leaves its rows' votes (picks, -1 for none) in its shared memory. Then every
  // block that needs the kept list counts all C blocks' picks (C x 64 through distributed shared
  // memory, all in flight at once) and runs the keep rule itself: the gather reads the list from
  // its own shared memory, with no barrier after the keep rule and no round trip to L2 for the list
  // (v84). Without a gather (prune's kernel C reads the list from the workspace) only block 0 does.
  // Kernel B's tail instead loads every row's key back from L2 and counts all N rows' votes on one
  // SM. The keys stay in the workspace as kernel B leaves them (the emulator decodes a prune's
  // selection from them).
  __syncthreads();  // phase 2's shared memory is dead
  int* const picks = reinterpret_cast<int*>(body);  // [kBM]; the cluster's blocks read it up to their arrivals
  if (mq == 0) {
    int pick = -1;
    if (mr < rows_here) {
      const int64_t i = j0 + mr;
      const int j = key_column(row_best, N);
      const bool voter = !a.mask_voters || pm == nullptr || pm[i];
      a.keys[row0 + i] = row_best;
      if (a.idx_out != nullptr) a.idx_out[row0 + i] = voter ? j : -1;
      if (voter) pick = j;
    }
    picks[mr] = pick;
  }
  if (!a.want_keep) return;
  const bool gather = g.K > 0, keeps = gather || rt == 0;  // block-uniform
  int* const votes = picks + kBM;             // [N], 16-byte aligned
  int* const hist = votes + (N + 3) / 4 * 4;  // [N + 1]
  int* const list = hist + (N + 4) / 4 * 4;   // [N]
  if (keeps) {
    for (int j = tid; j < N; j += kThreads) votes[j] = pm != nullptr && !pm[j] ? kMasked : 0;
    for (int j = tid; j <= N; j += kThreads) hist[j] = 0;
  }
  fp_cluster_sync();  // every block's picks (and this block's cleared counts)
  if (keeps) {
    constexpr int kPer = kOcMaxTiles * kBM / kThreads;  // picks a thread: block q's rows x % kBM
    static_assert(kOcMaxTiles * kBM % kThreads == 0, "every thread reads kPer picks");
    int v[kPer];
#pragma unroll
    for (int e = 0; e < kPer; ++e) {
      const int x = tid + e * kThreads, q = x / kBM;
      v[e] = q < C ? *fp_cluster_map(picks + x % kBM, q) : -1;
    }
#pragma unroll
    for (int e = 0; e < kPer; ++e)
      if (v[e] >= 0) atomicAdd(&votes[v[e]], 1);
  }
  __syncthreads();  // the counts; every thread has its remote picks in hand
  fp_cluster_arrive_relaxed();  // this block reads no other block's shared memory again
  int count = 0;
  if (keeps) {
    count = keep_rule<true>(a, votes, hist, gather ? list : a.list + b * N, rt == 0 ? a.counts_out + b : nullptr,
                            hd.s_warp, hd.s_warp64, &hd.s_vstar, &hd.s_above);
    __syncthreads();  // the list
  }
  if (gather) {
    unsigned char* const buf = reinterpret_cast<unsigned char*>(list + (N + 3) / 4 * 4);
    gather_in_cluster<T>(g, b, rt, C, list, count, buf, oc_smem_bytes(N, ts) - kOcHead - (buf - body));
  }
  fp_cluster_wait();  // no block leaves before every block has read its picks
#else
  (void)a;  // never launched: one_cluster_applies needs the tensor-core path
  (void)g;
#endif
}

// ------------------------------------------------------------------------------------------
// Kernel C: gather-pad. Block (x, b) copies output rows kGatherRows x .. + kGatherRows of sample
// b (grid-stride over a sample's rows, so that no block divides a flat row index by K: a 64-bit
// division is a ~100-instruction call in front of the block's first load). Each thread loads its
// column of every one of the block's rows before it stores any: at one row per block a thread
// had one 16-byte load in flight at pi0.5's D = 2048, and the kernel took 25.0 µs at B=64
// against 19.6 for Triton's 8 rows a program (run 13).
constexpr int kGatherRows = 4;

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads) gather_kernel(GArgs g) {
  pdl_wait();  // the kept lists and counts of kernel B
  const int64_t b = blockIdx.y;
  const int64_t count = g.counts[b];
  for (int64_t r0 = static_cast<int64_t>(blockIdx.x) * kGatherRows; r0 < g.K;
       r0 += static_cast<int64_t>(gridDim.x) * kGatherRows) {
    // Rows past K are not stored; rows at or past the count are zeros (their list entries are
    // stale workspace, loaded beside the others and dropped).
    const T* src[kGatherRows];
    T* dst[kGatherRows];
    bool real[kGatherRows], here[kGatherRows];
#pragma unroll
    for (int i = 0; i < kGatherRows; ++i) {
      const int64_t r = r0 + i;
      here[i] = r < g.K;
      real[i] = r < count;
      const int listed = r < g.N ? g.list[b * g.N + r] : 0;
      const int64_t j = real[i] ? static_cast<int64_t>(listed) : 0;
      const int64_t row = b * g.K + (here[i] ? r : 0);
      if (threadIdx.x == 0 && here[i]) {
        g.kept_mask[row] = real[i];
        g.kept_idx[row] = j;
      }
      src[i] = static_cast<const T*>(g.patches) + b * g.p_sb + j * g.p_sr;
      dst[i] = static_cast<T*>(g.pruned) + row * g.D;
    }
    if (kVec) {
      const int64_t n = g.D * static_cast<int64_t>(sizeof(T)) / 16;
      for (int64_t e = threadIdx.x; e < n; e += kThreads) {
        uint4 v[kGatherRows];
#pragma unroll
        for (int i = 0; i < kGatherRows; ++i)
          v[i] = real[i] ? reinterpret_cast<const uint4*>(src[i])[e] : make_uint4(0u, 0u, 0u, 0u);
#pragma unroll
        for (int i = 0; i < kGatherRows; ++i)
          if (here[i]) reinterpret_cast<uint4*>(dst[i])[e] = v[i];
      }
    } else {
      for (int64_t e = threadIdx.x; e < g.D; e += kThreads) {
        T v[kGatherRows];
#pragma unroll
        for (int i = 0; i < kGatherRows; ++i) v[i] = real[i] ? src[i][e] : zero_of<T>();
#pragma unroll
        for (int i = 0; i < kGatherRows; ++i)
          if (here[i]) dst[i][e] = v[i];
      }
    }
  }
}

// ------------------------------------------------------------------------------------------
// Host side
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
size_t align16(size_t x) { return (x + 15) & ~static_cast<size_t>(15); }

template <typename P>
P* ws_at(void* ws, size_t off) {
  return reinterpret_cast<P*>(static_cast<unsigned char*>(ws) + off);
}

bool plan_fits(const Problem& p, const Plan& plan) {
  return plan.B == p.B && plan.N == p.N && plan.T == p.T && plan.D == p.D && p.B >= 1 && p.N >= 1 &&
         p.T >= 1 && p.D >= 1 && p.B <= 65535 && plan.row_tiles <= 65535 && p.N < INT_MAX &&
         p.T < INT_MAX && plan.ksplit >= 1 && plan.ksplit <= kMaxSplit && plan.col_splits >= 1 &&
         plan.col_splits <= plan.row_tiles;
}

Args make_args(const Problem& p, const Plan& plan, void* ws) {
  Args a{};
  a.B = p.B;
  a.N = p.N;
  a.T = p.T;
  a.D = p.D;
  a.patches = p.patches;
  a.p_sb = p.patches_sb;
  a.p_sr = p.patches_sr;
  a.task = p.task;
  a.t_sb = p.task_sb;
  a.t_sr = p.task_sr;
  a.task_mask = p.task_mask;
  a.patch_mask = p.patch_mask;
  a.mask_voters = p.mask_voters ? 1 : 0;
  a.row_tiles = plan.row_tiles;
  a.ts = plan.ts;
  a.kchunk = plan.kchunk;
  a.ksplit = plan.ksplit;
  a.inv_d = static_cast<float>(1.0 / static_cast<double>(p.D));
  a.inv_sqrt_d = static_cast<float>(1.0 / std::sqrt(static_cast<double>(p.D)));
  int s_shift = 0;  // |S| <= D: D * 2^-s_shift <= 32768
  while ((int64_t{32768} << s_shift) < p.D) ++s_shift;
  a.s_scale = std::ldexp(1.f, -s_shift);
  a.counters_a = ws_at<unsigned long long>(ws, plan.off_counters);
  a.counters_b = reinterpret_cast<int*>(a.counters_a + 2 * p.B * plan.row_tiles);
  a.part = ws_at<float>(ws, plan.off_part);
  a.psq = ws_at<float>(ws, plan.off_psq);
  a.tsq = ws_at<float>(ws, plan.off_tsq);
  a.S = ws_at<float>(ws, plan.off_s);
  a.A = ws_at<float>(ws, plan.off_a);
  a.keys = ws_at<unsigned long long>(ws, plan.off_keys);
  a.trange = ws_at<int>(ws, plan.off_trange);
  a.anyp = ws_at<int>(ws, plan.off_anyp);
  a.votes = ws_at<int>(ws, plan.off_votes);
  a.hist = ws_at<int>(ws, plan.off_hist);
  a.list = ws_at<int>(ws, plan.off_list);
  return a;
}

// 16-byte loads in kernel A when every task/patch row start is 16-byte aligned.
bool vec_rows(const Problem& p) {
  const int64_t ve = p.dtype == DType::kFloat32 ? 4 : 8;
  return p.D % ve == 0 && p.patches_sb % ve == 0 && p.patches_sr % ve == 0 && p.task_sb % ve == 0 &&
         p.task_sr % ve == 0 && reinterpret_cast<uintptr_t>(p.patches) % 16 == 0 &&
         reinterpret_cast<uintptr_t>(p.task) % 16 == 0;
}

// The FMA emulator build has no tensor-core path, which the one-cluster kernel takes.
#if defined(FASTPRUNE_CUDA_EMU) && !defined(FASTPRUNE_EMU_MMA)
constexpr bool kOneClusterBuilt = false;
#else
constexpr bool kOneClusterBuilt = true;
#endif

// The one-cluster kernel where it applies and the device places its cluster, with phase 4's
// gather-pad when g.K > 0: whether it was launched. Rows a block: the fewest multiple of 16 that
// spreads N over at most 16 blocks (pi05: 48 rows, 16 blocks, so that each SM takes in 48 patch
// rows a D step beside the prompt's 48, not 64), or whole 64-row tiles (12 blocks at pi05) where
// the device does not place that many.
bool launch_one_cluster(const Problem& p, const Plan& plan, const Args& a, const GArgs& g, cudaStream_t stream) {
  if (!one_cluster_applies(p, plan)) return false;
  const size_t smem = oc_smem_bytes(p.N, plan.ts);
  const int64_t spread = ceil_div(ceil_div(p.N, kOcMaxTiles), 16) * 16;
  const int64_t tries[2] = {spread, kBM};
  for (int t = 0; t < (spread < kBM ? 2 : 1); ++t) {
    const int64_t rows = tries[t];
    const unsigned cy = static_cast<unsigned>(ceil_div(p.N, rows));
    Args with_rows = a;
    with_rows.oc_rows = static_cast<int>(rows);
    auto launch = [&](auto kernel) {
      if (!fp_cluster_fits(kernel, kThreads, cy, smem, kOcSmemMax, stream)) return false;
      fp_launch_cluster(kernel, dim3(static_cast<unsigned>(p.B), cy, 1), kThreads, cy, smem, kOcSmemMax, stream,
                        with_rows, g);
      return true;
    };
    if (p.dtype == DType::kFloat16 ? launch(one_cluster_kernel<__half>) : launch(one_cluster_kernel<__nv_bfloat16>))
      return true;
  }
  return false;
}

cudaError_t launch_ab(const Problem& p, const Plan& plan, const Args& a, cudaStream_t stream) {
  if (launch_one_cluster(p, plan, a, GArgs{}, stream)) return cudaGetLastError();
  const bool vec = vec_rows(p);
  const bool cluster = plan.cluster && vec;
  const dim3 grid_a(static_cast<unsigned>(plan.row_tiles), static_cast<unsigned>(plan.ksplit),
                    static_cast<unsigned>(p.B));
  auto launch_a = [&](auto t) {
    using T = decltype(t);
    const size_t head = cluster_smem_head<T>();
    auto clusters = [&](auto kernel, int64_t max_ts) {
      fp_launch_cluster(kernel, grid_a, kThreads, static_cast<unsigned>(plan.ksplit), cluster_smem_bytes(head, plan.ts),
                        cluster_smem_bytes(head, max_ts), stream, a);
    };
    if (!vec) fp_launch(scores_kernel<T, false, 1, false>, grid_a, kThreads, stream, false, a);
    else if (cluster && plan.a_one_wave) clusters(scores_kernel<T, true, 1, true>, kClusterMaxTs);
    else if (cluster) clusters(scores_kernel<T, true, 2, true>, kClusterMaxTs2);
    else if (plan.a_one_wave) fp_launch(scores_kernel<T, true, 1, false>, grid_a, kThreads, stream, false, a);
    else fp_launch(scores_kernel<T, true, 2, false>, grid_a, kThreads, stream, false, a);
  };
  switch (p.dtype) {
    case DType::kFloat32:
      launch_a(float{});
      break;
    case DType::kFloat16:
      launch_a(__half{});
      break;
    case DType::kBFloat16:
      launch_a(__nv_bfloat16{});
      break;
    default:
      return cudaErrorInvalidValue;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const dim3 grid_b(static_cast<unsigned>(plan.row_tiles), static_cast<unsigned>(plan.col_splits),
                    static_cast<unsigned>(p.B));
  fp_launch(select_kernel, grid_b, kThreads, stream, plan.pdl, a);
  return cudaGetLastError();
}

}  // namespace

bool one_cluster_applies(const Problem& p, const Plan& plan) {
  return kOneClusterBuilt && plan.one_cluster && p.dtype != DType::kFloat32 && vec_rows(p);
}

Plan make_plan(int64_t B, int64_t N, int64_t T, int64_t D, int num_sms, bool pdl, int ksplit, bool cluster,
               bool one_cluster) {
  Plan plan;
  plan.pdl = pdl;
  plan.B = B;
  plan.N = N;
  plan.T = T;
  plan.D = D;
  plan.row_tiles = ceil_div(N, kBM);
  plan.ts = ceil_div(T, 8) * 8;  // put_pair's 16-byte groups of 8 halves
  // Kernel A has row_tiles * B blocks without a D split; split D to fill about one wave.
  const int64_t base = plan.row_tiles * B;
  int64_t want = ksplit > 0 ? ksplit : ceil_div(num_sms > 0 ? num_sms : 1, base > 0 ? base : 1);
  const int64_t most = ceil_div(D, kChunkAlign);
  if (want > most) want = most;
  if (want > kMaxSplit) want = kMaxSplit;
  if (cluster && ksplit <= 0 && want > kMaxCluster) want = kMaxCluster;
  if (want < 1) want = 1;
  plan.kchunk = ceil_div(ceil_div(D, want), kChunkAlign) * kChunkAlign;
  plan.ksplit = static_cast<int>(ceil_div(D, plan.kchunk));
  plan.a_one_wave = num_sms > 0 && base * plan.ksplit <= num_sms;
  plan.cluster = cluster && plan.ksplit <= kMaxCluster && plan.ts <= (plan.a_one_wave ? kClusterMaxTs : kClusterMaxTs2);
  plan.one_cluster = one_cluster && plan.row_tiles <= kOcMaxTiles && oc_smem_bytes(N, plan.ts) <= kOcSmemMax;
  // Kernel B: column splits for about two waves at its 4 blocks per SM, with the same number of
  // column tiles in every block (pi05: 12 splits of one tile at B=1, 6 of 2 at B=8, 2 of 6 at
  // B=64).
  const int64_t want_b = ceil_div(2 * 4 * static_cast<int64_t>(num_sms > 0 ? num_sms : 1), base > 0 ? base : 1);
  plan.col_splits = ceil_div(plan.row_tiles, ceil_div(plan.row_tiles, want_b));

  const size_t f = sizeof(float), i = sizeof(int);
  const size_t Bz = static_cast<size_t>(B), Nz = static_cast<size_t>(N), ts = static_cast<size_t>(plan.ts);
  const size_t rtz = static_cast<size_t>(plan.row_tiles), ksz = static_cast<size_t>(plan.ksplit);
  size_t off = 0;
  auto take = [&](size_t bytes) {
    const size_t at = off;
    off = align16(off + bytes);
    return at;
  };
  plan.off_counters = take(2 * Bz * rtz * sizeof(unsigned long long) + Bz * i);
  plan.off_part = take(ksz * Bz * Nz * ts * f);
  plan.off_psq = take(ksz * Bz * Nz * f);
  plan.off_tsq = take(ksz * Bz * rtz * ts * f);
  plan.off_s = take(Bz * Nz * ts * f);
  plan.off_a = take(Bz * Nz * ts * f);
  plan.off_keys = take(Bz * Nz * sizeof(unsigned long long));
  plan.off_trange = take(Bz * 2 * i);
  plan.off_anyp = take(Bz * i);
  plan.off_votes = take(Bz * (Nz + 1) * i);
  plan.off_hist = take(Bz * (Nz + 1) * i);
  plan.off_list = take(Bz * Nz * i);
  plan.workspace_bytes = off;
  return plan;
}

#ifndef FASTPRUNE_CUDA_EMU
bool kernels_have_sm90() {
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, select_kernel) != cudaSuccess) {
    (void)cudaGetLastError();  // a failed query is no launch error: plain launches then
    return false;
  }
  return attr.ptxVersion >= 90;
}
#endif

cudaError_t launch_select(const Problem& p, const Plan& plan, void* workspace, int64_t* idx_out,
                          cudaStream_t stream) {
  if (!plan_fits(p, plan) || idx_out == nullptr) return cudaErrorInvalidValue;
  Args a = make_args(p, plan, workspace);
  a.idx_out = idx_out;
  a.want_keep = 0;
  return launch_ab(p, plan, a, stream);
}

namespace {
// Kernels A and B's arguments up to the kept lists and counts (max_tokens <= 0: no cap).
Args keep_args(const Problem& p, const Plan& plan, void* workspace, int64_t keep_tokens, int64_t max_tokens,
               int64_t* counts_out) {
  Args a = make_args(p, plan, workspace);
  a.counts_out = counts_out;
  a.want_keep = 1;
  a.keep_tokens = keep_tokens;
  a.max_tokens = max_tokens;
  return a;
}
}  // namespace

cudaError_t launch_keep(const Problem& p, const Plan& plan, void* workspace, int64_t keep_tokens,
                        int64_t* counts_out, cudaStream_t stream) {
  if (!plan_fits(p, plan) || counts_out == nullptr) return cudaErrorInvalidValue;
  return launch_ab(p, plan, keep_args(p, plan, workspace, keep_tokens, 0, counts_out), stream);
}

namespace {
GArgs make_gargs(const Problem& p, const Plan& plan, const void* workspace, const int64_t* counts, int64_t K,
                 void* pruned, bool* kept_mask, int64_t* kept_idx) {
  GArgs g{};
  g.N = p.N;
  g.D = p.D;
  g.K = K;
  g.patches = p.patches;
  g.p_sb = p.patches_sb;
  g.p_sr = p.patches_sr;
  g.list = reinterpret_cast<const int*>(static_cast<const unsigned char*>(workspace) + plan.off_list);
  g.counts = counts;
  g.pruned = pruned;
  g.kept_mask = kept_mask;
  g.kept_idx = kept_idx;
  return g;
}
}  // namespace

cudaError_t launch_prune_padded(const Problem& p, const Plan& plan, void* workspace, int64_t keep_tokens,
                                int64_t max_tokens, int64_t* counts_out, void* pruned, bool* kept_mask,
                                int64_t* kept_idx, cudaStream_t stream) {
  if (!plan_fits(p, plan) || counts_out == nullptr || max_tokens < 1) return cudaErrorInvalidValue;
  const Args a = keep_args(p, plan, workspace, keep_tokens, max_tokens, counts_out);
  // Phase 4 of the one-cluster kernel: at most N rows (its row arithmetic is 32-bit), each a whole
  // number of 16-byte vectors (one_cluster_applies), into a 16-byte aligned output.
  if (max_tokens <= p.N && reinterpret_cast<uintptr_t>(pruned) % 16 == 0 &&
      launch_one_cluster(p, plan, a, make_gargs(p, plan, workspace, counts_out, max_tokens, pruned, kept_mask, kept_idx),
                         stream))
    return cudaGetLastError();
  const cudaError_t err = launch_ab(p, plan, a, stream);
  if (err != cudaSuccess) return err;
  return launch_gather(p, plan, workspace, counts_out, max_tokens, pruned, kept_mask, kept_idx, stream);
}

cudaError_t launch_gather(const Problem& p, const Plan& plan, const void* workspace,
                          const int64_t* counts, int64_t K, void* pruned, bool* kept_mask,
                          int64_t* kept_idx, cudaStream_t stream) {
  if (!plan_fits(p, plan) || K < 1) return cudaErrorInvalidValue;
  const GArgs g = make_gargs(p, plan, workspace, counts, K, pruned, kept_mask, kept_idx);
  const int64_t row_groups = ceil_div(K, kGatherRows);
  const dim3 grid(static_cast<unsigned>(row_groups < (int64_t{1} << 20) ? row_groups : (int64_t{1} << 20)),
                  static_cast<unsigned>(p.B));
  const size_t es = p.dtype == DType::kFloat32 ? 4 : 2;
  const bool vec = (p.D * es) % 16 == 0 && (p.patches_sb * es) % 16 == 0 && (p.patches_sr * es) % 16 == 0 &&
                   reinterpret_cast<uintptr_t>(p.patches) % 16 == 0 && reinterpret_cast<uintptr_t>(pruned) % 16 == 0;
  switch (p.dtype) {
    case DType::kFloat32:
      if (vec) fp_launch(gather_kernel<float, true>, grid, kThreads, stream, plan.pdl, g);
      else fp_launch(gather_kernel<float, false>, grid, kThreads, stream, plan.pdl, g);
      break;
    case DType::kFloat16:
      if (vec) fp_launch(gather_kernel<__half, true>, grid, kThreads, stream, plan.pdl, g);
      else fp_launch(gather_kernel<__half, false>, grid, kThreads, stream, plan.pdl, g);
      break;
    case DType::kBFloat16:
      if (vec) fp_launch(gather_kernel<__nv_bfloat16, true>, grid, kThreads, stream, plan.pdl, g);
      else fp_launch(gather_kernel<__nv_bfloat16, false>, grid, kThreads, stream, plan.pdl, g);
      break;
    default:
      return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace fastprune_cuda
