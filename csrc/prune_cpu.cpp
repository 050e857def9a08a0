// Fused CPU implementation of fastprune::select / prune / prune_padded.
//
// Per sample, through the SPEC identity idx[i] = argmax_j sum_t A[i,t] S[j,t]:
//   1. row tiles of patches (upcast to fp32 one tile at a time): S = rms(P) Tn^T over valid
//      prompt tokens only, A = softmax(S / sqrt(D));                  -> [N, Tv] each
//   2. row tiles of A against the allowed columns of S: a [tile, N] block, its row argmax;
//   3. votes, implicit or budget keep, compaction, gather of the raw patch rows.
// The largest buffers are N x Tv; nothing N x N lives beyond one row tile.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "eval_ops.h"
#include "parallel_ops.h"
#include "ties.h"

namespace fastprune {
namespace {

constexpr double kEps = 1e-6;
// Rows per tile. Each tile makes about a dozen ATen calls: halving the tiles (64 rows before)
// took the select op at pi05 from 2.0-2.3 ms to 1.8 ms (B=1, when the tiles still ran one after
// the other). 128 rows still give a pi0.5 sample 6 tiles to share among threads.
constexpr int64_t kRowTile = 128;

// float32 accumulation for float32/16/bf16 inputs; float64 inputs (CPU only) stay float64.
at::ScalarType acc_type(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// Row argmax over the allowed columns `cols` of a [R, cols.size()] block: the first column that
// reaches the row's maximum over its values above -inf, or the first column when it has none
// (NaN never compares greater, so it cannot win, and an all-NaN row keeps the first column). Two
// passes: the maxima of 64-column groups (8 independent chains each) and the row's, then the
// first group that reaches it and the first column there. A search for the first column from
// the row's start was half of this function's time at the pi05 shape; one compare-and-branch
// loop over (value, index) pairs before that was slower still.
template <typename scalar_t>
void row_argmax(const at::Tensor& block, const std::vector<int64_t>& cols, int64_t* out) {
  constexpr int kChains = 8;
  constexpr int64_t kGroup = 64;
  constexpr scalar_t kNegInf = -std::numeric_limits<scalar_t>::infinity();
  const scalar_t* cp = block.data_ptr<scalar_t>();
  const int64_t rows = block.size(0), na = block.size(1);
  std::vector<scalar_t> gmax((na + kGroup - 1) / kGroup);
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = cp + r * na;
    scalar_t best_v = kNegInf;
    for (int64_t g = 0, k0 = 0; k0 < na; ++g, k0 += kGroup) {
      const int64_t k1 = std::min(na, k0 + kGroup);
      scalar_t m[kChains];
      std::fill(m, m + kChains, kNegInf);
      int64_t k = k0;
      for (; k + kChains <= k1; k += kChains)
        for (int c = 0; c < kChains; ++c) m[c] = row[k + c] > m[c] ? row[k + c] : m[c];
      for (; k < k1; ++k) m[0] = row[k] > m[0] ? row[k] : m[0];
      for (int c = 1; c < kChains; ++c) m[0] = m[c] > m[0] ? m[c] : m[0];
      gmax[g] = m[0];
      best_v = m[0] > best_v ? m[0] : best_v;
    }
    int64_t best = 0;
    if (best_v > kNegInf) {  // -0 == +0: the first of either
      int64_t g = 0;
      while (gmax[g] != best_v) ++g;
      best = g * kGroup;
      while (row[best] != best_v) ++best;
    }
    out[r] = cols[best];
  }
}

// 1 / rms of each row of `x` (already in the accumulation type), as a column [R, 1]. One
// pass over the row (the norm), no normalised copy of it.
at::Tensor inv_rms(const at::Tensor& x) {
  const double d = static_cast<double>(x.size(-1));
  return at::rsqrt(at::linalg_vector_norm(x, 2, {-1}, /*keepdim=*/true).square_().div_(d).add_(kEps));
}

// Indices where a bool row is true; all indices when `fallback_all` and none is true, or
// {0} when `fallback_all` is false and none is true.
std::vector<int64_t> true_indices(const std::optional<at::Tensor>& mask, int64_t b, int64_t len,
                                  bool fallback_all) {
  std::vector<int64_t> out;
  if (mask.has_value()) {
    const bool* m = mask->data_ptr<bool>() + b * len;
    for (int64_t i = 0; i < len; ++i)
      if (m[i]) out.push_back(i);
  }
  if (out.empty()) {
    if (mask.has_value() && !fallback_all) return {0};
    out.resize(len);
    std::iota(out.begin(), out.end(), 0);
  }
  return out;
}

// Row argmax idx [B, N] of the LightVLA score; -1 for non-voters when mask_voters.
at::Tensor select_rows(const at::Tensor& patches_in, const at::Tensor& task,
                       const std::optional<at::Tensor>& task_mask_in,
                       const std::optional<at::Tensor>& patch_mask_in, bool mask_voters) {
  const auto patches = patches_in.contiguous();
  std::optional<at::Tensor> task_mask, patch_mask;
  if (task_mask_in) task_mask = task_mask_in->contiguous();
  if (patch_mask_in) patch_mask = patch_mask_in->contiguous();
  const int64_t B = patches.size(0), N = patches.size(1), D = patches.size(2), T = task.size(1);
  const double inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(D));
  const int64_t tiles = (N + kRowTile - 1) / kRowTile;

  // Per sample: normalised valid prompt rows (transposed), allowed columns, S and A. The right
  // operands of the tiles' products are contiguous [K, cols] copies: a transposed view as the
  // right operand made MKL's single-threaded sgemm ~1.5x slower at pi05's [128, 2048] x [2048, 48].
  std::vector<at::Tensor> tn_t(B), S(B), A(B);
  std::vector<std::vector<int64_t>> allowed(B);
  for (int64_t b = 0; b < B; ++b) {
    auto valid = true_indices(task_mask, b, T, /*fallback_all=*/true);
    auto vt = at::from_blob(valid.data(), {(int64_t)valid.size()}, at::kLong).clone();
    auto t = task[b].index_select(0, vt).to(acc_type(patches));
    tn_t[b] = (t * inv_rms(t)).t().contiguous();
    S[b] = at::empty({N, (int64_t)valid.size()}, patches.options().dtype(acc_type(patches)));
    A[b] = at::empty_like(S[b]);
    allowed[b] = without_later_copies(patches[b], true_indices(patch_mask, b, N, /*fallback_all=*/false));
  }

  parallel_ops(0, B * tiles, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / tiles, r0 = (w % tiles) * kRowTile, r1 = std::min(N, r0 + kRowTile);
      // rms(P) Tn^T = diag(1/rms(P)) (P Tn^T): scale the product's rows, not the tile.
      auto p = patches[b].slice(0, r0, r1).to(acc_type(patches));
      auto s = at::mm(p, tn_t[b]).mul_(inv_rms(p));
      S[b].slice(0, r0, r1).copy_(s);
      A[b].slice(0, r0, r1).copy_(at::softmax(s * inv_sqrt_d, -1));
    }
  });

  // Only the allowed columns of S take part, less the later copies of a patch (ties.h); keeping
  // them in index order makes the first maximum of a compacted row the lowest such j.
  // Transposed: [Tv, allowed].
  std::vector<at::Tensor> s_allowed_t(B);
  for (int64_t b = 0; b < B; ++b) {
    if ((int64_t)allowed[b].size() == N) {
      s_allowed_t[b] = S[b].t().contiguous();
    } else {
      auto cols = at::from_blob(allowed[b].data(), {(int64_t)allowed[b].size()}, at::kLong).clone();
      s_allowed_t[b] = S[b].index_select(0, cols).t().contiguous();
    }
  }

  auto idx = at::empty({B, N}, patches.options().dtype(at::kLong));
  int64_t* idx_ptr = idx.data_ptr<int64_t>();
  parallel_ops(0, B * tiles, [&](int64_t begin, int64_t end) {
    for (int64_t w = begin; w < end; ++w) {
      const int64_t b = w / tiles, r0 = (w % tiles) * kRowTile, r1 = std::min(N, r0 + kRowTile);
      auto c = at::mm(A[b].slice(0, r0, r1), s_allowed_t[b]);
      int64_t* out = idx_ptr + b * N + r0;
      if (c.scalar_type() == at::kDouble)
        row_argmax<double>(c, allowed[b], out);
      else
        row_argmax<float>(c, allowed[b], out);
    }
  });

  if (mask_voters && patch_mask.has_value()) idx.masked_fill_(patch_mask->logical_not(), -1);
  return idx;
}

// The kept patch indices of one sample, increasing (implicit or budget rule, optional cap).
std::vector<int64_t> kept_indices(const int64_t* idx_row, const bool* valid_row, int64_t N,
                                  std::optional<int64_t> keep_tokens, std::optional<int64_t> cap) {
  std::vector<int64_t> votes(N, 0);
  for (int64_t i = 0; i < N; ++i)
    if (idx_row[i] >= 0) ++votes[idx_row[i]];
  std::vector<int64_t> eligible;
  for (int64_t j = 0; j < N; ++j)
    if ((valid_row == nullptr || valid_row[j]) && (keep_tokens.has_value() || votes[j] > 0))
      eligible.push_back(j);
  int64_t limit = keep_tokens.value_or(N);
  if (cap.has_value()) limit = std::min(limit, *cap);
  if ((int64_t)eligible.size() > limit) {
    // Budget rule: most votes first, lower index on a tie.
    std::nth_element(eligible.begin(), eligible.begin() + limit, eligible.end(),
                     [&](int64_t a, int64_t b) {
                       return votes[a] != votes[b] ? votes[a] > votes[b] : a < b;
                     });
    eligible.resize(limit);
    std::sort(eligible.begin(), eligible.end());
  }
  return eligible;
}

PruneOut prune_rows(
    const at::Tensor& patches, const at::Tensor& task, const std::optional<at::Tensor>& task_mask,
    const std::optional<at::Tensor>& patch_mask, std::optional<int64_t> keep_tokens,
    std::optional<int64_t> max_tokens, bool mask_voters) {
  const int64_t B = patches.size(0), N = patches.size(1), D = patches.size(2);
  auto idx = select_rows(patches, task, task_mask, patch_mask, mask_voters);
  const int64_t* idx_ptr = idx.data_ptr<int64_t>();
  std::optional<at::Tensor> valid;
  if (patch_mask) valid = patch_mask->contiguous();

  std::vector<std::vector<int64_t>> kept(B);
  at::parallel_for(0, B, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b)
      kept[b] = kept_indices(idx_ptr + b * N, valid ? valid->data_ptr<bool>() + b * N : nullptr, N,
                             keep_tokens, max_tokens);
  });

  int64_t K = 1;
  for (const auto& k : kept) K = std::max<int64_t>(K, k.size());
  if (max_tokens.has_value()) K = *max_tokens;

  auto pruned = at::zeros({B, K, D}, patches.options());
  auto kept_mask = at::zeros({B, K}, patches.options().dtype(at::kBool));
  auto kept_idx = at::zeros({B, K}, patches.options().dtype(at::kLong));
  auto counts = at::empty({B}, patches.options().dtype(at::kLong));
  parallel_ops(0, B, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t c = kept[b].size();
      counts[b].fill_(c);
      if (c == 0) continue;
      auto rows = at::from_blob(kept[b].data(), {c}, at::kLong);
      kept_idx[b].narrow(0, 0, c).copy_(rows);
      kept_mask[b].narrow(0, 0, c).fill_(true);
      pruned[b].narrow(0, 0, c).copy_(patches[b].index_select(0, rows));
    }
  });
  return {pruned, kept_mask, kept_idx, counts};
}

struct CpuKernels {
  static constexpr bool kTritonPlans = false;  // Triton on CPU tensors is the interpreter (tests)
  static void check_device_backend(const std::string& backend) {
    TORCH_CHECK(backend != "cuda", "fastprune: backend='cuda' needs CUDA tensors, got CPU tensors");
  }
  static at::Tensor select(const at::Tensor& patches, const at::Tensor& task,
                           const std::optional<at::Tensor>& task_mask,
                           const std::optional<at::Tensor>& patch_mask, bool mask_voters) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // as parallel_ops' chunks (parallel_ops.h)
    return select_rows(patches, task, task_mask, patch_mask, mask_voters);
  }
  static PruneOut prune(const at::Tensor& patches, const at::Tensor& task,
                        const std::optional<at::Tensor>& task_mask,
                        const std::optional<at::Tensor>& patch_mask, std::optional<int64_t> keep_tokens,
                        std::optional<int64_t> max_tokens, bool mask_voters) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return prune_rows(patches, task, task_mask, patch_mask, keep_tokens, max_tokens, mask_voters);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("select", &EvalOps<CpuKernels>::select);
  m.impl("prune", &EvalOps<CpuKernels>::prune);
  m.impl("prune_padded", &EvalOps<CpuKernels>::prune_padded);
}

}  // namespace fastprune
