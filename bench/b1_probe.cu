// What one launch of a thread block cluster can do at pi0.5 batch 1: the numbers that PERF_LOG
// lead 1 (one launch of a 16-CTA cluster for B=1, estimated 7-9 µs from arithmetic alone) rests
// on, measured before anyone writes that kernel. Plain CUDA, no torch; prints one JSON object.
//
//   nvcc -O3 -std=c++17 -arch=sm_90 bench/b1_probe.cu -o b1_probe && ./b1_probe > b1_probe.json
//
// (bench/gpu_check step `probe_b1`.) Every time is device time per launch from CUDA-graph replay
// (20 launches a graph, median of 5 rounds of 50 replays), as the op benchmark's graph rows, with
// its input resident in L2 as theirs is. Every CTA asks for 128 KB of shared memory or more, so
// that a cluster's 16 CTAs take 16 SMs, as the design's would (small CTAs share SMs). A row whose
// launch the GPU refuses reads -1; each row also goes to stderr as it finishes. Keys:
//   launch_us               an empty kernel of one block: a kernel boundary inside a graph
//   launch_cluster16_us     the same as one cluster of 16 CTAs (the non-portable size)
//   max_active_clusters     clusters of 8 and 16 CTAs at 200 KB of shared memory each that the
//                           GPU holds at once (cudaOccupancyMaxActiveClusters; 0: none)
//   stream_us               16 CTAs (one cluster) streaming their share of pi0.5's patches
//                           (3 MB, 192 KB a CTA) and, in the `_task` rows, each the whole valid
//                           prompt as well (48 x 2048 bf16 more a CTA; distinct bytes here, the
//                           same ones in the design), by 16-byte loads (1024 threads a CTA) or
//                           by bulk copies into shared memory (TMA, cp.async.bulk, 4 stages of
//                           32 KB); the `grid128_4MB` rows 32 KB in
//                           each of 128 CTAs without a cluster (the bandwidth the three-kernel
//                           design draws on), by loads (256 threads a CTA) or one bulk copy
//   allgather_us            every CTA of the cluster copies every CTA's share of S (768 x 48 as
//                           fp16 hi and lo halves, 144 KB in all: each CTA's rows select over all
//                           of S, their A' rows stay local) out of distributed shared memory
//   cluster_sync_us         one cluster barrier of 16 CTAs (64 in a row, less one, per barrier)
//   mma_us                  16 CTAs (one cluster) each doing its share of the tensor-core work
//                           with warp-level MMA (wmma 16x16x16 fp16, fp32 accumulate, fragments
//                           from shared memory, 8 warps; bf16 runs at the same rate) as 64 x 64 x
//                           64 tile steps, launch included: `s_share` 48 patch rows x 48 prompt
//                           tokens x 2048 (S, 4.7 M multiply-adds a CTA: 18 steps' worth, the
//                           work with no padding) and `select_share` 48 rows x 768 columns x 48
//                           tokens x 3 (the f16x3 selection, 5.3 M: 21 steps); `_padded` the
//                           same shares in whole 64 x 64 x 64 tiles (48 rows and 48 tokens padded
//                           to 64: 32 and 36 steps), the simplest kernel's work
//   chain_ns                one dependent round trip, from a thread that waits for each result
//                           before the next (the slope of 1 against 257 in a row): `l2` a load
//                           through L2 (__ldcg) hopping over a 4 MB random cycle, resident in
//                           L2; `dsmem` a load from another CTA's shared memory in a cluster of
//                           16; `atomic_gpu` a gpu-scope acq_rel atomic add (the arrival of the
//                           current kernels' last-block-done counters). Every phase of the
//                           B=1 kernels is a chain of such trips, which the estimates in
//                           PERF_LOG price at 0.4-0.7 µs for L2 without a measurement
#include <cooperative_groups.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <vector>

namespace cg = cooperative_groups;

#define CHECK(x)                                                                                  \
  do {                                                                                            \
    const cudaError_t e_ = (x);                                                                   \
    if (e_ != cudaSuccess) {                                                                      \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                               \
    }                                                                                             \
  } while (0)

constexpr int kThreads = 256;
constexpr int kCluster = 16;
constexpr int64_t kPatchBytes = 768LL * 2048 * 2;           // pi0.5's patches, bf16
constexpr int64_t kTaskBytes = 48LL * 2048 * 2;             // 48 valid prompt tokens, bf16
constexpr int64_t kShareBytes = kPatchBytes / kCluster;     // 192 KB: 48 patch rows a CTA
constexpr int kChunk = 32 * 1024, kStages = 4;              // the bulk copies' ring
constexpr int kGatherBytes = 768 * 48 * 2 * 2;              // S as fp16 hi and lo halves
constexpr size_t kBigSmem = 200 * 1024;

__global__ void empty_kernel() {}

// An XOR of everything a block read, so that no load is optimised away.
__device__ void write_checksum(uint32_t acc, uint32_t* out) {
  __shared__ uint32_t s;
  if (threadIdx.x == 0) s = 0;
  __syncthreads();
  atomicXor(&s, acc);
  __syncthreads();
  if (threadIdx.x == 0) out[blockIdx.x] = s;
}

// Block b reads n16 16-byte words from src + b * stride16 with kT threads (n16 a multiple of
// kT * 4). ptxas keeps about 5 such loads of a thread in flight however many are written ahead
// of their use (sm_90 SASS), so the bytes in flight come from the thread count: 4 a thread at
// 1024 threads, 64 KB a CTA.
template <int kT>
__global__ void __launch_bounds__(kT) load_kernel(const uint4* src, int64_t stride16, int64_t n16, uint32_t* out) {
  constexpr int kInFlight = 4;
  const uint4* p = src + blockIdx.x * stride16;
  uint32_t acc = 0;
  for (int64_t i = threadIdx.x; i < n16; i += kT * kInFlight) {
    uint4 v[kInFlight];
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) v[k] = __ldcg(p + i + static_cast<int64_t>(k) * kT);
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) acc ^= v[k].x ^ v[k].y ^ v[k].z ^ v[k].w;
  }
  write_checksum(acc, out);
}

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// The same reads as bulk copies (the TMA's cp.async.bulk) of kChunk bytes into a ring of kStages
// shared-memory buffers, each with an mbarrier that its copy completes; thread 0 issues, every
// thread reads a buffer once its copy has landed. bytes is a multiple of kChunk.
__global__ void __launch_bounds__(kThreads) bulk_kernel(const unsigned char* src, int64_t stride, int64_t bytes,
                                                        uint32_t* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  uint64_t* bars = reinterpret_cast<uint64_t*>(smem);
  unsigned char* buf = smem + 128;
  const unsigned char* p = src + blockIdx.x * stride;
  const int n_chunks = static_cast<int>(bytes / kChunk);
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(smem_addr(&bars[s])));
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();
  auto issue = [&](int c) {
    const int s = c % kStages;
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(smem_addr(&bars[s])), "r"(kChunk)
                 : "memory");
    asm volatile(
        "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
            smem_addr(buf + s * kChunk)),
        "l"(p + static_cast<int64_t>(c) * kChunk), "r"(kChunk), "r"(smem_addr(&bars[s]))
        : "memory");
  };
  if (threadIdx.x == 0)
    for (int c = 0; c < kStages && c < n_chunks; ++c) issue(c);
  uint32_t acc = 0;
  for (int c = 0; c < n_chunks; ++c) {
    const int s = c % kStages;
    const uint32_t parity = static_cast<uint32_t>((c / kStages) & 1);
    uint32_t done = 0;
    while (!done) {
      asm volatile(
          "{\n\t.reg .pred p;\n\t"
          "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
          "selp.u32 %0, 1, 0, p;\n\t}"
          : "=r"(done)
          : "r"(smem_addr(&bars[s])), "r"(parity)
          : "memory");
    }
    const uint4* q = reinterpret_cast<const uint4*>(buf + s * kChunk);
    for (int i = threadIdx.x; i < kChunk / 16; i += kThreads) {
      const uint4 v = q[i];
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    __syncthreads();  // every thread has read buffer s before the next copy into it
    if (threadIdx.x == 0 && c + kStages < n_chunks) issue(c + kStages);
  }
  write_checksum(acc, out);
}

// Each CTA fills its share of kGatherBytes, then copies all the cluster's shares (its own from
// distributed shared memory too, as a kernel would not special-case it) into its own buffer.
__global__ void __launch_bounds__(kThreads) allgather_kernel(uint32_t* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  cg::cluster_group cluster = cg::this_cluster();
  const unsigned n = cluster.num_blocks(), rank = cluster.block_rank();
  const int share16 = kGatherBytes / 16 / static_cast<int>(n);
  uint4* mine = reinterpret_cast<uint4*>(smem);
  uint4* all = mine + share16;
  for (int i = threadIdx.x; i < share16; i += kThreads) mine[i] = make_uint4(rank, i, rank ^ i, 1u);
  cluster.sync();
  constexpr int kInFlight = 8;
  const int total = share16 * static_cast<int>(n);
  for (int e = threadIdx.x; e < total; e += kThreads * kInFlight) {
    uint4 v[kInFlight];
#pragma unroll
    for (int k = 0; k < kInFlight; ++k) {
      const int f = e + k * kThreads;
      v[k] = f < total ? cluster.map_shared_rank(mine, f / share16)[f % share16] : make_uint4(0u, 0u, 0u, 0u);
    }
#pragma unroll
    for (int k = 0; k < kInFlight; ++k)
      if (e + k * kThreads < total) all[e + k * kThreads] = v[k];
  }
  cluster.sync();  // no CTA leaves while another may still read its shared memory
  uint32_t acc = 0;
  for (int i = threadIdx.x; i < total; i += kThreads) acc ^= all[i].x ^ all[i].w;
  write_checksum(acc, out);
}

__global__ void __launch_bounds__(kThreads) cluster_sync_kernel(int iters, uint32_t* out) {
  cg::cluster_group cluster = cg::this_cluster();
  for (int i = 0; i < iters; ++i) cluster.sync();
  if (threadIdx.x == 0) out[blockIdx.x] = static_cast<uint32_t>(iters);
}

// `steps` tile steps of a 64 x 64 output over 64 of K, fragments from shared memory, as the
// fused kernel's products would run: warp w owns rows 16 (w % 4) and columns 32 (w / 4) as two
// 16 x 16 accumulators (kernel A's layout in kernels/prune_cuda.cu). The tiles stay in shared
// memory (the probe times the tensor cores and fragment loads, not the streaming); steps
// alternate between two copies of each, so that the fragment loads stay in the loop.
// fp16: wmma's bf16 fragment loads take generic addresses (32-bit loads instead of LDSM; see
// load_frag in kernels/prune_cuda.cu), which would time the loads rather than the products.
constexpr int kTile = 64, kLd = kTile + 8;  // wmma: ldm % 8 == 0; +8 staggers the banks
__global__ void __launch_bounds__(kThreads) mma_kernel(int steps, uint32_t* out) {
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char smem[];
  __half* a = reinterpret_cast<__half*>(smem);  // [2][kTile][kLd], then b the same
  __half* b = a + 2 * kTile * kLd;
  for (int i = threadIdx.x; i < 2 * kTile * kLd; i += kThreads) {
    a[i] = __float2half(static_cast<float>((i * 7 + blockIdx.x) % 13) / 16.f);
    b[i] = __float2half(static_cast<float>((i * 5) % 11) / 16.f);
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, ra = 16 * (warp % 4), cb = 32 * (warp / 4);
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2];
  wmma::fill_fragment(acc[0], 0.f);
  wmma::fill_fragment(acc[1], 0.f);
  for (int s = 0; s < steps; ++s) {
    const __half* as = a + (s & 1) * kTile * kLd;
    const __half* bs = b + (s & 1) * kTile * kLd;
#pragma unroll
    for (int kk = 0; kk < kTile; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> fa;
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::col_major> fb[2];
      wmma::load_matrix_sync(fa, as + ra * kLd + kk, kLd);
#pragma unroll
      for (int c = 0; c < 2; ++c) wmma::load_matrix_sync(fb[c], bs + (cb + 16 * c) * kLd + kk, kLd);
#pragma unroll
      for (int c = 0; c < 2; ++c) wmma::mma_sync(acc[c], fa, fb[c], acc[c]);
    }
  }
  float sum = 0.f;
  for (int c = 0; c < 2; ++c)
    for (int e = 0; e < acc[c].num_elements; ++e) sum += acc[c].x[e];
  write_checksum(__float_as_uint(sum), out);
}

// Dependent round trips (chain_ns): thread 0 follows `hops` links, each read only once the
// previous one has returned. l2: next[] holds a random cycle over 128-byte slots of a 4 MB
// buffer (no two hops in one line, no pattern a prefetcher follows).
__global__ void l2_chain_kernel(const uint32_t* next, int hops, uint32_t* out) {
  uint32_t i = 0;
  if (threadIdx.x == 0)
    for (int h = 0; h < hops; ++h) i = __ldcg(next + i);
  if (threadIdx.x == 0) out[blockIdx.x] = i;
}

// dsmem: CTA 0 of the cluster follows a cycle that the last CTA holds in its shared memory
// (kChainSlots links 32 words apart, a stride of 7 slots).
constexpr int kChainSlots = 1024;
__global__ void __launch_bounds__(kThreads) dsmem_chain_kernel(int hops, uint32_t* out) {
  extern __shared__ __align__(128) unsigned char smem[];
  cg::cluster_group cluster = cg::this_cluster();
  uint32_t* link = reinterpret_cast<uint32_t*>(smem);
  for (int k = threadIdx.x; k < kChainSlots; k += kThreads) link[32 * k] = 32u * ((k + 7) % kChainSlots);
  cluster.sync();
  uint32_t i = 0;
  if (cluster.block_rank() == 0 && threadIdx.x == 0) {
    const uint32_t* far = cluster.map_shared_rank(link, cluster.num_blocks() - 1);
    for (int h = 0; h < hops; ++h) i = far[i];
  }
  cluster.sync();  // the last CTA stays until the chain is done with its shared memory
  if (threadIdx.x == 0) out[blockIdx.x] = i;
}

// atomic_gpu: each add's address depends on the previous add's result (masked to word 0 by a
// run-time argument of 0, which the compiler cannot fold).
__global__ void atomic_chain_kernel(unsigned* counter, unsigned mask, int hops, uint32_t* out) {
  unsigned v = 0;
  if (threadIdx.x == 0) {
    for (int h = 0; h < hops; ++h)
      asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;" : "=r"(v) : "l"(counter + (v & mask)) : "memory");
    out[blockIdx.x] = v;
  }
}

// The launch configuration of `grid` CTAs of `threads` as clusters of `cluster` CTAs (1: none).
struct Config {
  cudaLaunchConfig_t cfg{};
  cudaLaunchAttribute attr{};
  Config(int grid, int threads, int cluster, size_t smem, cudaStream_t stream) {
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(threads);
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    attr.id = cudaLaunchAttributeClusterDimension;
    attr.val.clusterDim.x = cluster;
    attr.val.clusterDim.y = attr.val.clusterDim.z = 1;
    cfg.attrs = &attr;
    cfg.numAttrs = cluster > 1 ? 1 : 0;
  }
  Config(const Config&) = delete;  // cfg.attrs points into the object
};

// kernel<<<grid, threads, smem, stream>>>(args...) as clusters of `cluster` CTAs; the launch's
// error, if any.
template <typename... Params, typename... Args>
cudaError_t launch(void (*kernel)(Params...), int grid, int threads, int cluster, size_t smem, cudaStream_t stream,
                   Args... args) {
  const Config c(grid, threads, cluster, smem, stream);
  return cudaLaunchKernelEx(&c.cfg, kernel, args...);
}

template <typename... Params>
void allow(void (*kernel)(Params...), size_t smem) {
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeNonPortableClusterSizeAllowed, 1));
}

// Device µs per launch of `one` (which launches once on a stream) from CUDA-graph replay, or a
// negative number where the launch fails (its error then goes to stderr).
template <class F>
double per_launch_us(const char* name, F one) {
  constexpr int kPerGraph = 20, kReplays = 50, kRounds = 5;
  cudaStream_t s;
  CHECK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
  cudaError_t err = one(s);
  if (err == cudaSuccess) err = cudaStreamSynchronize(s);
  if (err != cudaSuccess) {
    std::fprintf(stderr, "%s: %s\n", name, cudaGetErrorString(err));
    cudaGetLastError();
    CHECK(cudaStreamDestroy(s));
    return -1.0;
  }
  cudaGraph_t graph;
  cudaGraphExec_t exec;
  CHECK(cudaStreamBeginCapture(s, cudaStreamCaptureModeThreadLocal));
  for (int i = 0; i < kPerGraph; ++i) CHECK(one(s));
  CHECK(cudaStreamEndCapture(s, &graph));
  CHECK(cudaGraphInstantiate(&exec, graph, 0));
  CHECK(cudaGraphLaunch(exec, s));
  cudaEvent_t t0, t1;
  CHECK(cudaEventCreate(&t0));
  CHECK(cudaEventCreate(&t1));
  std::vector<double> us;
  for (int r = 0; r < kRounds; ++r) {
    CHECK(cudaEventRecord(t0, s));
    for (int g = 0; g < kReplays; ++g) CHECK(cudaGraphLaunch(exec, s));
    CHECK(cudaEventRecord(t1, s));
    CHECK(cudaEventSynchronize(t1));
    float ms = 0.f;
    CHECK(cudaEventElapsedTime(&ms, t0, t1));
    us.push_back(1e3 * ms / (kPerGraph * kReplays));
  }
  std::sort(us.begin(), us.end());
  CHECK(cudaEventDestroy(t0));
  CHECK(cudaEventDestroy(t1));
  CHECK(cudaGraphExecDestroy(exec));
  CHECK(cudaGraphDestroy(graph));
  CHECK(cudaStreamDestroy(s));
  std::fprintf(stderr, "%s: %.3f us\n", name, us[kRounds / 2]);
  return us[kRounds / 2];
}

int max_clusters(int cluster) {
  const Config c(cluster, kThreads, cluster, kBigSmem, nullptr);
  int n = 0;
  if (cudaOccupancyMaxActiveClusters(&n, bulk_kernel, &c.cfg) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

int main() {
  cudaDeviceProp prop{};
  CHECK(cudaGetDeviceProperties(&prop, 0));
  const int64_t task_share = kShareBytes + kTaskBytes;  // a CTA's patch rows and the whole prompt
  unsigned char* src = nullptr;
  uint32_t* out = nullptr;
  CHECK(cudaMalloc(&src, kCluster * task_share));
  CHECK(cudaMemset(src, 1, kCluster * task_share));
  CHECK(cudaMalloc(&out, 1024 * sizeof(uint32_t)));
  CHECK(cudaDeviceSynchronize());  // the memset, before the timing streams (non-blocking) read
  const size_t smem = 128 + static_cast<size_t>(kStages) * kChunk;  // 128 KB: one CTA an SM
  allow(bulk_kernel, kBigSmem);
  allow(allgather_kernel, kBigSmem);
  allow(cluster_sync_kernel, kBigSmem);
  allow(empty_kernel, kBigSmem);
  allow(load_kernel<1024>, kBigSmem);
  allow(load_kernel<256>, kBigSmem);
  allow(mma_kernel, kBigSmem);
  allow(dsmem_chain_kernel, kBigSmem);
  const uint4* src16 = reinterpret_cast<const uint4*>(src);
  const int clusters8 = max_clusters(8), clusters16 = max_clusters(kCluster);
  // A 16-CTA cluster that the GPU cannot place is not launched: its failure might be sticky and
  // end the probe before it prints.
  auto in_cluster16 = [&](const char* name, auto one) {
    if (clusters16 > 0) return per_launch_us(name, one);
    std::fprintf(stderr, "%s: skipped (no 16-CTA cluster fits)\n", name);
    return -1.0;
  };

  const double launch_us =
      per_launch_us("launch", [&](cudaStream_t s) { return launch(empty_kernel, 1, kThreads, 1, smem, s); });
  const double launch16_us = in_cluster16("launch_cluster16", [&](cudaStream_t s) {
    return launch(empty_kernel, kCluster, kThreads, kCluster, smem, s);
  });
  auto loads = [&](const char* name, int grid, int cluster, int64_t bytes) {
    auto one = [=](cudaStream_t s) {
      return cluster > 1 ? launch(load_kernel<1024>, grid, 1024, cluster, smem, s, src16, bytes / 16, bytes / 16, out)
                         : launch(load_kernel<256>, grid, 256, cluster, smem, s, src16, bytes / 16, bytes / 16, out);
    };
    return cluster > 1 ? in_cluster16(name, one) : per_launch_us(name, one);
  };
  auto bulk = [&](const char* name, int grid, int cluster, int64_t bytes) {
    auto one = [=](cudaStream_t s) {
      return launch(bulk_kernel, grid, kThreads, cluster, smem, s, static_cast<const unsigned char*>(src), bytes,
                    bytes, out);
    };
    return cluster > 1 ? in_cluster16(name, one) : per_launch_us(name, one);
  };
  const double ld16 = loads("load_cluster16", kCluster, kCluster, kShareBytes);
  const double ld16_task = loads("load_cluster16_task", kCluster, kCluster, task_share);
  const double ld_grid = loads("load_grid128_4MB", 128, 1, kChunk);
  const double bk16 = bulk("bulk_cluster16", kCluster, kCluster, kShareBytes);
  const double bk16_task = bulk("bulk_cluster16_task", kCluster, kCluster, task_share);
  const double bk_grid = bulk("bulk_grid128_4MB", 128, 1, kChunk);  // one 32 KB copy a CTA
  const double gather_us = in_cluster16("allgather16", [&](cudaStream_t s) {
    const size_t gather_smem = static_cast<size_t>(kGatherBytes) / kCluster + kGatherBytes;
    return launch(allgather_kernel, kCluster, kThreads, kCluster, gather_smem, s, out);
  });
  const double sync1 = in_cluster16("cluster_sync1", [&](cudaStream_t s) {
    return launch(cluster_sync_kernel, kCluster, kThreads, kCluster, smem, s, 1, out);
  });
  const double sync64 = in_cluster16("cluster_sync64", [&](cudaStream_t s) {
    return launch(cluster_sync_kernel, kCluster, kThreads, kCluster, smem, s, 64, out);
  });

  // A CTA's share of pi0.5's products in 64 x 64 x 64 steps (262144 multiply-adds each): the
  // multiply-adds alone, and in whole tiles (48 rows and 48 tokens padded to 64).
  constexpr int kStepMacs = kTile * kTile * kTile;
  constexpr int kSSteps = 48 * 48 * 2048 / kStepMacs;                                 // 18
  constexpr int kSelectSteps = (48 * 768 * 48 * 3 + kStepMacs - 1) / kStepMacs;       // 21
  constexpr int kSStepsPadded = 2048 / kTile, kSelectStepsPadded = 768 / kTile * 3;  // 32, 36
  auto mma = [&](const char* name, int steps) {
    return in_cluster16(name, [&, steps](cudaStream_t s) {
      return launch(mma_kernel, kCluster, kThreads, kCluster, smem, s, steps, out);
    });
  };
  const double mma_s = mma("mma_s_share", kSSteps);
  const double mma_select = mma("mma_select_share", kSelectSteps);
  const double mma_s_padded = mma("mma_s_share_padded", kSStepsPadded);
  const double mma_select_padded = mma("mma_select_share_padded", kSelectStepsPadded);

  // chain_ns: (t(1 + kHops) - t(1)) / kHops, so the launch and the single trip cancel.
  constexpr int kHops = 256;
  constexpr uint32_t kL2Slots = (4u << 20) / 128;
  std::vector<uint32_t> next(kL2Slots * 32u, 0u), order(kL2Slots);
  for (uint32_t k = 0; k < kL2Slots; ++k) order[k] = k;
  uint64_t rng = 0x9E3779B97F4A7C15ull;  // a fixed shuffle: the same cycle every run
  for (uint32_t k = kL2Slots - 1; k > 0; --k) {
    rng = rng * 6364136223846793005ull + 1442695040888963407ull;
    std::swap(order[k], order[static_cast<uint32_t>(rng >> 33) % (k + 1)]);
  }
  for (uint32_t k = 0; k < kL2Slots; ++k) next[32u * order[k]] = 32u * order[(k + 1) % kL2Slots];
  uint32_t* next_d = nullptr;
  unsigned* counter = nullptr;
  CHECK(cudaMalloc(&next_d, next.size() * sizeof(uint32_t)));
  CHECK(cudaMemcpy(next_d, next.data(), next.size() * sizeof(uint32_t), cudaMemcpyHostToDevice));
  CHECK(cudaMalloc(&counter, sizeof(unsigned)));
  CHECK(cudaMemset(counter, 0, sizeof(unsigned)));
  auto slope = [&](double one, double many) { return one > 0 && many > 0 ? 1e3 * (many - one) / kHops : -1.0; };
  auto l2 = [&](const char* name, int hops) {
    return per_launch_us(name, [=](cudaStream_t s) { return launch(l2_chain_kernel, 1, 32, 1, 0, s, next_d, hops, out); });
  };
  auto dsmem = [&](const char* name, int hops) {
    return in_cluster16(name, [=](cudaStream_t s) {
      return launch(dsmem_chain_kernel, kCluster, kThreads, kCluster, smem, s, hops, out);
    });
  };
  auto atomic = [&](const char* name, int hops) {
    return per_launch_us(name, [=](cudaStream_t s) {
      return launch(atomic_chain_kernel, 1, 32, 1, 0, s, counter, 0u, hops, out);
    });
  };
  const double chain_l2 = slope(l2("l2_chain1", 1), l2("l2_chain257", 1 + kHops));
  const double chain_dsmem = slope(dsmem("dsmem_chain1", 1), dsmem("dsmem_chain257", 1 + kHops));
  const double chain_atomic = slope(atomic("atomic_chain1", 1), atomic("atomic_chain257", 1 + kHops));

  std::printf(
      "{\"gpu\": \"%s\", \"sms\": %d, \"launch_us\": %.3f, \"launch_cluster16_us\": %.3f, "
      "\"max_active_clusters\": {\"8\": %d, \"16\": %d}, "
      "\"stream_us\": {\"load_cluster16\": %.3f, \"load_cluster16_task\": %.3f, \"load_grid128_4MB\": %.3f, "
      "\"bulk_cluster16\": %.3f, \"bulk_cluster16_task\": %.3f, \"bulk_grid128_4MB\": %.3f}, "
      "\"allgather_us\": %.3f, \"cluster_sync_us\": %.4f, "
      "\"mma_us\": {\"s_share\": %.3f, \"select_share\": %.3f, \"s_share_padded\": %.3f, "
      "\"select_share_padded\": %.3f}, "
      "\"chain_ns\": {\"l2\": %.1f, \"dsmem\": %.1f, \"atomic_gpu\": %.1f}}\n",
      prop.name, prop.multiProcessorCount, launch_us, launch16_us, clusters8, clusters16, ld16, ld16_task, ld_grid,
      bk16, bk16_task, bk_grid, gather_us, sync1 > 0 && sync64 > 0 ? (sync64 - sync1) / 63 : -1.0, mma_s,
      mma_select, mma_s_padded, mma_select_padded, chain_l2, chain_dsmem, chain_atomic);
  CHECK(cudaFree(next_d));
  CHECK(cudaFree(counter));
  CHECK(cudaFree(src));
  CHECK(cudaFree(out));
  return 0;
}
