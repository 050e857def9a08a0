// C entry point of the CUDA-emulated kernels (tests/test_cuda_build.py loads it with ctypes):
// kernels/prune_cuda.cu compiled as host C++ against cuda_emu.h. The workspace starts filled with
// the 8-byte word ws_word (all ones, NaN bytes, by default) and is followed by a guard zone, so a
// kernel that reads memory it did not write or writes past its workspace shows up in the
// results. runs > 1 runs the op again on the workspace as the run before left it, as a CUDA-graph
// replay does; the outputs are the last run's.
#include "cuda_emu.h"

#include "prune_cuda.cu"

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

extern "C" int fp_emu_run(int op, int dtype, int64_t B, int64_t N, int64_t T, int64_t D, const void* patches,
                          int64_t p_sb, int64_t p_sr, const void* task, int64_t t_sb, int64_t t_sr,
                          const bool* task_mask, const bool* patch_mask, int mask_voters, int64_t keep_tokens,
                          int64_t max_tokens, int num_sms, int* cluster, int64_t* idx_out, int64_t* counts_out, void* pruned,
                          bool* kept_mask, int64_t* kept_idx, int64_t k_capacity, int64_t* k_out,
                          uint64_t ws_word, int runs) {
  using namespace fastprune_cuda;
  Problem p;
  p.B = B;
  p.N = N;
  p.T = T;
  p.D = D;
  p.dtype = static_cast<DType>(dtype);
  p.patches = patches;
  p.patches_sb = p_sb;
  p.patches_sr = p_sr;
  p.task = task;
  p.task_sb = t_sb;
  p.task_sr = t_sr;
  p.task_mask = task_mask;
  p.patch_mask = patch_mask;
  p.mask_voters = mask_voters != 0;
  // *cluster, in: bit 0 asks for kernel A's cluster variant, bit 1 for the one-cluster kernel; out:
  // bit 0 kernel A ran as clusters, bit 1 the one-cluster kernel applies (whether the emulated
  // device placed it shows in the launches).
  const Plan plan = make_plan(B, N, T, D, num_sms, /*pdl=*/true, /*ksplit=*/0, (*cluster & 1) != 0, (*cluster & 2) != 0);
  const bool one = one_cluster_applies(p, plan);
  *cluster = (plan.cluster && !one ? 1 : 0) | (one ? 2 : 0);  // bits 8 on: the last run's kernel launches
  constexpr size_t kGuard = 4096;
  std::vector<uint64_t> words((plan.workspace_bytes + 7) / 8, ws_word);
  std::vector<unsigned char> ws(plan.workspace_bytes + kGuard, 0xff);
  std::memcpy(ws.data(), words.data(), plan.workspace_bytes);
  for (int run = 0; run < runs; ++run) {
    const int launches_before = emu::g_launches;
    if (op == 0) {
      if (launch_select(p, plan, ws.data(), idx_out, nullptr) != cudaSuccess) return -1;
    } else if (op == 2) {  // prune_padded: one call, as the binding makes it
      if (max_tokens > k_capacity) return -2;
      *k_out = max_tokens;
      if (launch_prune_padded(p, plan, ws.data(), keep_tokens, max_tokens, counts_out, pruned, kept_mask, kept_idx,
                              nullptr) != cudaSuccess)
        return -1;
    } else {
      if (launch_keep(p, plan, ws.data(), keep_tokens, counts_out, nullptr) != cudaSuccess) return -1;
      int64_t K = 1;  // the largest count, as the binding reads it
      for (int64_t b = 0; b < B; ++b) K = counts_out[b] > K ? counts_out[b] : K;
      if (K > k_capacity) return -2;
      *k_out = K;
      if (launch_gather(p, plan, ws.data(), counts_out, K, pruned, kept_mask, kept_idx, nullptr) != cudaSuccess)
        return -3;
    }
    *cluster = (*cluster & 0xff) | (emu::g_launches - launches_before) << 8;
    if (op != 0) {
      // The row argmax behind this selection, decoded from the packed keys.
      const auto* keys = reinterpret_cast<const unsigned long long*>(ws.data() + plan.off_keys);
      for (int64_t i = 0; i < B * N; ++i) idx_out[i] = 0xffffffffll - static_cast<int64_t>(keys[i] & 0xffffffffull);
    }
    for (size_t i = 0; i < kGuard; ++i)
      if (ws[plan.workspace_bytes + i] != 0xff) return -4;
    // Kernel A's arrival counters end fresh for the next run (or untouched: the cluster variant has none).
    const auto* counters = reinterpret_cast<const uint64_t*>(ws.data() + plan.off_counters);
    for (int64_t i = 0; i < 2 * B * plan.row_tiles; ++i)
      if (counters[i] != kFreshCounter && counters[i] != ws_word) return -5;
  }
  return plan.ksplit;
}

// The emulator's own check (test_emulator_orders_warps_only_at_barriers): each thread of 2 blocks
// of 2 warps writes its shared slot, then, after a block barrier or without one, reads the slot
// of the lane 32 away, in the other warp. Stamps differ by block, so a read that comes before
// the other warp's write returns what the block before left there.
namespace {
__global__ void barrier_probe_kernel(int with_barrier, float* out) {
  __shared__ float slot[64];
  const int t = static_cast<int>(threadIdx.x);
  slot[t] = static_cast<float>(1000 * (blockIdx.x + 1) + t);
  if (with_barrier) __syncthreads();
  out[blockIdx.x * 64 + t] = slot[(t + 32) % 64];
}
}  // namespace

extern "C" void fp_emu_barrier_probe(int with_barrier, float* out) {
  emu::launch([&] { barrier_probe_kernel(with_barrier, out); }, dim3(2), dim3(64), 1, 0);
}

// The sanitizer's own check (test_emulator_stops_at_undefined_behaviour): a 16-byte store 8
// bytes past an aligned address (kind 0), or a shared-memory index one past the array (kind 1),
// which the GPU faults on or lets corrupt its neighbour. Built with UBSan, either ends the
// process with a report.
namespace {
__global__ void ub_probe_kernel(int kind, int past, float* out) {
  __shared__ float slot[64];
  __shared__ uint4 vec[2];
  const int t = static_cast<int>(threadIdx.x);
  if (kind == 0) {
    *reinterpret_cast<uint4*>(reinterpret_cast<unsigned char*>(vec) + past) = make_uint4(1u, 2u, 3u, 4u);
  } else {
    slot[t + past] = 1.f;
  }
  out[t] = slot[t % 64] + static_cast<float>(vec[0].x);
}
}  // namespace

extern "C" void fp_emu_ub_probe(int kind, int past, float* out) {
  emu::launch([&] { ub_probe_kernel(kind, past, out); }, dim3(1), dim3(64), 1, 0);
}

// The launch check's own test (test_emulator_refuses_what_the_gpu_refuses): a cluster launch of an
// empty kernel with the given shared memory, opt-in and cluster size.
namespace {
__global__ void empty_kernel() {}
}  // namespace

extern "C" void fp_emu_launch_probe(int64_t smem_bytes, int64_t smem_max, int cluster_y) {
  fastprune_cuda::fp_launch_cluster(empty_kernel, dim3(1, static_cast<unsigned>(cluster_y)), dim3(32),
                                    static_cast<unsigned>(cluster_y), static_cast<size_t>(smem_bytes),
                                    static_cast<size_t>(smem_max), nullptr);
}

// The split cluster barrier's checks (test_emulator_checks_split_cluster_barriers), on a cluster of
// two blocks: arrive, then wait (kind 0, right); a wait without an arrival (1); a second arrive
// before the wait (2); a thread that ends with its arrival pending (3).
namespace {
__global__ void split_barrier_kernel(int kind) {
  if (kind != 1) fp_cluster_arrive_relaxed();
  if (kind == 2) fp_cluster_arrive_relaxed();
  if (kind != 3) fp_cluster_wait();
}
}  // namespace

extern "C" void fp_emu_split_barrier_probe(int kind) {
  emu::launch([&] { split_barrier_kernel(kind); }, dim3(1, 2), dim3(32), 2, 0);
}
