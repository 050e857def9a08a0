// Launch API of the CUDA C++ fastprune kernels (kernels/prune_cuda.cu), on raw pointers and a
// cudaStream_t only: no ATen/c10/torch header, so the .cu compiles with plain nvcc. The ATen
// binding (csrc/prune_cuda.cpp) checks inputs, allocates the outputs and the workspace and
// calls these functions on the current stream.
//
// Pipeline (SPEC), 3 kernels and nothing else (no memset: kernel A's arrival counters are tagged
// words that need no zeroing, and kernel A zeroes kernel B's):
//   kernel A grid (row tiles, D splits, B): partial S = P Tn^T (raw rows, 16-byte loads when
//            aligned, tensor-core wmma on fp16/bf16 at sm_80+, fp32 FMA otherwise) and partial
//            row sums of squares over one slice of D; the last block of
//            each (row tile, sample) to arrive reduces the slices in a fixed order, applies the
//            RMS scales and writes S and A' = exp((S - row max) / sqrt(D)) (unnormalised
//            softmax, which leaves each row's argmax as it is) as fp16 halves hi + lo, zeros past
//            the prompt range up to 64 columns, and zeroes its argmax keys. With plan.cluster (sm_90,
//            the default there) the D splits of a row tile are one thread block cluster
//            instead: the partials stay in shared memory, every block finishes a share of the
//            rows;
//   kernel B grid (row tiles, column splits, B): score' = A S^T tiles with fp32 accumulation
//            (tensor-core wmma on fp16 halves of A and S at sm_80+, fp32 FMA otherwise), each block looping over
//            its split's column tiles; per-row argmax merged across the splits by a packed
//            64-bit atomicMax (higher score, then lower index; NaN never wins); the last block of each sample decodes idx, counts votes,
//            applies the implicit / budget / cap rule and writes the sorted kept list and counts;
//   kernel C grid-stride over (B, K) rows: gather-pad of the kept rows (16-byte copies when
//            aligned), kept_mask, kept_idx.
// With plan.one_cluster (sm_90, opt-in until measured) kernels A and B are one launch of one thread
// block cluster per sample instead (one_cluster_kernel: phases ordered by cluster barriers,
// loads through deep cp.async rings, the argmax owned by the block of its row tile), and for
// prune_padded (launch_prune_padded) kernel C's gather-pad is that launch's last phase.
// With plan.pdl (sm_90+, opt-in: measured slower on an H200), B and C are programmatic dependent
// launches: each may be scheduled while its predecessor runs and waits for it on the device
// before touching its outputs.
// Nothing here synchronises with the host; the dynamic-K op reads the counts once, for K.
#pragma once

#ifndef FASTPRUNE_CUDA_EMU  // tests/cpp/cuda_emu.h stands in for the CUDA runtime in CPU tests
#include <cuda_runtime.h>
#endif

#include <cstddef>
#include <cstdint>

namespace fastprune_cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One call's inputs. Strides are in elements; the last dimension of patches and task must be
// contiguous (stride 1). Masks are contiguous [B, N] / [B, T] bool arrays or nullptr.
struct Problem {
  int64_t B = 0, N = 0, T = 0, D = 0;
  DType dtype = DType::kFloat32;
  const void* patches = nullptr;
  int64_t patches_sb = 0, patches_sr = 0;
  const void* task = nullptr;
  int64_t task_sb = 0, task_sr = 0;
  const bool* task_mask = nullptr;
  const bool* patch_mask = nullptr;
  bool mask_voters = false;
};

// Grid shape and workspace layout for one problem size (depends on B, N, T, D and the SM count
// only, so the same shape always gives the same reduction order: reproducible results).
struct Plan {
  int64_t B = 0, N = 0, T = 0, D = 0;
  int64_t row_tiles = 0;  // ceil(N / 64)
  int64_t ts = 0;         // row stride (in floats) of the [N, T] arrays: T rounded up to 8
  int ksplit = 1;         // slices of D in kernel A
  bool a_one_wave = false;  // kernel A's blocks fit one per SM (its variant with twice the registers)
  int64_t col_splits = 0;   // kernel B's blocks per row tile, each taking every col_splits-th column tile
  int64_t kchunk = 0;     // width of one slice of D (a multiple of 64, kChunkAlign in the .cu)
  bool pdl = false;       // kernels B and C as programmatic dependent launches (sm_90+)
  bool cluster = false;   // kernel A's D splits as one thread block cluster per row tile (sm_90+)
  bool one_cluster = false;  // kernels A and B as one launch, a cluster a sample (one_cluster_applies)
  // Byte offsets into the workspace (all 16-byte aligned).
  size_t off_counters = 0;  // counters_a [B*row_tiles][2] u64 (tagged), counters_b [B] int
  size_t off_part = 0;                  // [ksplit][B][N][ts] fp32 partial S
  size_t off_psq = 0;                   // [ksplit][B][N] fp32 partial sums of squares of patches
  size_t off_tsq = 0;                   // [ksplit][B][row_tiles][ts] fp32 partial sums of squares of task rows
  size_t off_s = 0;                     // [B][N][ts] S * s_scale (RMS-normalised) as fp16 halves, ts hi then ts lo a row
  size_t off_a = 0;                     // [B][N][ts] A' (unnormalised softmax) as fp16 halves, the same way
  size_t off_keys = 0;                  // [B][N] u64 packed argmax keys
  size_t off_trange = 0;                // [B][2] int: first valid prompt token, end of range
  size_t off_anyp = 0;                  // [B] int: sample has a valid patch
  size_t off_votes = 0;                 // [B][N+1] int
  size_t off_hist = 0;                  // [B][N+1] int
  size_t off_list = 0;                  // [B][N] int: kept indices, increasing
  size_t workspace_bytes = 0;
};

// Most D slices of kernel A (its finishing step loads them all).
constexpr int kMaxSplit = 32;

// num_sms: multiprocessor count of the device (sizes the D split at small batch).
// pdl: launch kernels B and C as programmatic dependent launches, so that each is scheduled
// while its predecessor finishes (compute capability 9.0+ only).
// ksplit > 0: split D into that many slices (at most kMaxSplit and D / 64) instead of about one
// wave's worth of kernel A blocks; for benchmark sweeps (FASTPRUNE_CUDA_KSPLIT).
// cluster: kernel A as thread block clusters (compute capability 9.0+ only) where it applies: at
// most 8 D slices, prompts of at most 512 tokens (256 when the blocks take more than one wave),
// 16-byte aligned inputs. An automatic D split is then held to 8 slices (the portable cluster
// size).
// one_cluster: kernels A and B as one launch of one thread block cluster of at most 16 blocks per
// sample (compute capability 9.0+ only; PERF_LOG v80, v81) where it applies: at most 16 row tiles
// (N <= 1024), prompts short enough for its shared memory (T <= 312), and (one_cluster_applies)
// 16-bit inputs with 16-byte aligned rows. The launch falls back to kernels A and B where the
// device cannot place the cluster.
Plan make_plan(int64_t B, int64_t N, int64_t T, int64_t D, int num_sms, bool pdl, int ksplit, bool cluster,
               bool one_cluster);

// Whether launch_select / launch_keep run the one-cluster kernel for this problem (the device's
// cluster placement aside).
bool one_cluster_applies(const Problem& p, const Plan& plan);

// Whether the kernels loaded for the current device were compiled for compute_90+, so that
// they carry the wait of a dependent launch and the cluster instructions; code JIT-compiled
// from older PTX does not.
bool kernels_have_sm90();

// Row argmax idx [B, N] int64 (contiguous); -1 for non-voters when mask_voters and a
// patch_mask is given. Kernels A and B.
cudaError_t launch_select(const Problem& p, const Plan& plan, void* workspace, int64_t* idx_out,
                          cudaStream_t stream);

// Selection up to the kept lists, with no cap (prune's dynamic K): kernels A and B. keep_tokens <= 0:
// implicit mode. Writes counts_out [B] int64.
cudaError_t launch_keep(const Problem& p, const Plan& plan, void* workspace, int64_t keep_tokens,
                        int64_t* counts_out, cudaStream_t stream);

// prune_padded: launch_keep capped at max_tokens (>= 1), then the gather-pad to K = max_tokens rows
// (outputs as launch_gather's). Where the one-cluster kernel applies, the cap is at most N and
// `pruned` 16-byte aligned, that kernel does both: one launch.
cudaError_t launch_prune_padded(const Problem& p, const Plan& plan, void* workspace, int64_t keep_tokens,
                                int64_t max_tokens, int64_t* counts_out, void* pruned, bool* kept_mask,
                                int64_t* kept_idx, cudaStream_t stream);

// Gather-pad into K rows (kernel C): pruned [B, K, D] contiguous (input dtype), kept_mask [B, K]
// bool, kept_idx [B, K] int64; counts from launch_keep (each <= K).
cudaError_t launch_gather(const Problem& p, const Plan& plan, const void* workspace,
                          const int64_t* counts, int64_t K, void* pruned, bool* kept_mask,
                          int64_t* kept_idx, cudaStream_t stream);

}  // namespace fastprune_cuda
