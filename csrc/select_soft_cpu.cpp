// CPU implementation of fastprune::select_soft / select_soft_backward (SPEC "Training").
//
// Per sample, in float32 (float64 for float64 inputs, which gradcheck uses):
//   P = rms(patches), Tn = rms(valid prompt rows), S = P Tn^T [N, Tv], A = softmax(S / sqrt(D)),
//   Qr = A Tn, c = rsqrt(mean(Qr^2) + eps), and the score through the rank-Tv identity
//   score[i, j] = c_i / sqrt(D) * Z[i, j] with Z = A S^T  (no N x N x D product).
//   score' = score + noise_scale * U (U: seeded Philox4x32-10, or an explicit tensor) on allowed
//   columns, -inf elsewhere; idx = argmax (lowest j on a tie), lse = logsumexp.
// The backward recomputes everything above row chunk by row chunk (the only N x N buffers are
// [chunk, N]); its one N x N x D product is dSoft = G X^T. Everything else is N x N x Tv or
// N x Tv x D: with dScore = soft * (dSoft - delta), delta = rowsum(soft * dSoft):
//   dc = rowsum(dScore * Z) / sqrt(D),  dZ = dScore * c / sqrt(D),  dA = dZ S,  dS = dZ^T A,
//   then back through rms(Qr), Qr = A Tn, the prompt softmax, S = P Tn^T and both RMSNorms;
//   the straight-through direct term adds G[i] to the gradient of patches[idx[i]].
// Samples run one per thread when B >= threads (see for_samples); per sample the temporaries
// are a few N x D and [chunk, N] buffers.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <string>
#include <limits>
#include <numeric>
#include <optional>
#include <vector>

#include "backend.h"
#include "parallel_ops.h"
#include "prune_checks.h"
#include "ties.h"

namespace fastprune {
namespace {

constexpr double kEps = 1e-6;
constexpr int64_t kChunk = 128;  // rows of the [chunk, N] score block

// Philox4x32-10 with key (seed lo, seed hi) and counter (i * N + j, b, offset lo, offset hi);
// the first output word, as (x >> 8) * 2^-24 in [0, 1). Identical to the Triton kernel (tl.philox)
// and to pi05_fastprune.select_soft.philox_uniform.
inline float philox_uniform(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3, uint32_t k0,
                            uint32_t k1) {
  constexpr uint32_t kA = 0xD2511F53u, kB = 0xCD9E8D57u, kKA = 0x9E3779B9u, kKB = 0xBB67AE85u;
  for (int r = 0; r < 10; ++r) {
    const uint64_t p0 = static_cast<uint64_t>(kA) * c0;
    const uint64_t p2 = static_cast<uint64_t>(kB) * c2;
    const uint32_t n0 = static_cast<uint32_t>(p2 >> 32) ^ c1 ^ k0;
    const uint32_t n2 = static_cast<uint32_t>(p0 >> 32) ^ c3 ^ k1;
    c1 = static_cast<uint32_t>(p2);
    c3 = static_cast<uint32_t>(p0);
    c0 = n0;
    c2 = n2;
    k0 += kKA;
    k1 += kKB;
  }
  return static_cast<float>(c0 >> 8) * (1.0f / 16777216.0f);
}

struct NoiseSpec {
  double scale = 0.0;                // 0: no noise
  std::optional<at::Tensor> noise;   // explicit [B, N, N], else seeded
  uint64_t seed = 0, offset = 0;
};

NoiseSpec noise_spec(const at::Tensor& patches, const std::optional<at::Tensor>& noise_scale,
                     const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& noise) {
  NoiseSpec ns;
  const int64_t B = patches.size(0), N = patches.size(1);
  if (noise_scale.has_value()) {
    FASTPRUNE_CHECK(noise_scale->numel() == 1, "fastprune: noise_scale must be a one-element tensor, got shape %s",
                    ShapeStr(noise_scale->sizes()).s);
    ns.scale = noise_scale->item<double>();
  }
  if (noise.has_value()) {
    FASTPRUNE_CHECK(noise->dim() == 3 && noise->size(0) == B && noise->size(1) == N && noise->size(2) == N,
                    "fastprune: noise must be [%lld, %lld, %lld], got shape %s", static_cast<long long>(B),
                    static_cast<long long>(N), static_cast<long long>(N), ShapeStr(noise->sizes()).s);
    FASTPRUNE_CHECK(noise->is_floating_point(), "fastprune: noise must be floating point, got %s",
                    dtype_str(noise->scalar_type()));
    FASTPRUNE_CHECK(noise->device() == patches.device(), "fastprune: noise is on %s, patches on %s",
                    DeviceStr(noise->device()).s, DeviceStr(patches.device()).s);
    ns.noise = noise->contiguous();
  } else if (ns.scale != 0.0) {
    TORCH_CHECK(seed.has_value(), "fastprune: noise_scale without noise needs a seed tensor");
  }
  if (seed.has_value()) {
    FASTPRUNE_CHECK(seed->scalar_type() == at::kLong && seed->numel() == 2,
                    "fastprune: seed must be an int64 tensor of 2 elements (seed, offset), got %s of shape %s",
                    dtype_str(seed->scalar_type()), ShapeStr(seed->sizes()).s);
    auto s = seed->to(at::kCPU).contiguous();
    ns.seed = static_cast<uint64_t>(s.data_ptr<int64_t>()[0]);
    ns.offset = static_cast<uint64_t>(s.data_ptr<int64_t>()[1]);
  }
  return ns;
}

// U[b, r0:r1, :] as a float32 [r1 - r0, N] tensor.
at::Tensor noise_rows(const NoiseSpec& ns, int64_t b, int64_t r0, int64_t r1, int64_t N,
                      const at::TensorOptions& opt) {
  if (ns.noise.has_value()) return (*ns.noise)[b].slice(0, r0, r1).to(opt.dtype());
  auto u = at::empty({r1 - r0, N}, opt.dtype(at::kFloat));
  float* up = u.data_ptr<float>();
  const uint32_t k0 = static_cast<uint32_t>(ns.seed), k1 = static_cast<uint32_t>(ns.seed >> 32);
  const uint32_t o0 = static_cast<uint32_t>(ns.offset), o1 = static_cast<uint32_t>(ns.offset >> 32);
  at::parallel_for(0, r1 - r0, 8, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const uint32_t base = static_cast<uint32_t>((r0 + r) * N);
      for (int64_t j = 0; j < N; ++j)
        up[r * N + j] = philox_uniform(base + static_cast<uint32_t>(j), static_cast<uint32_t>(b), o0, o1, k0, k1);
    }
  });
  return u.to(opt.dtype());
}

std::vector<int64_t> valid_tokens(const std::optional<at::Tensor>& mask, int64_t b, int64_t T) {
  std::vector<int64_t> out;
  if (mask.has_value()) {
    const bool* m = mask->data_ptr<bool>() + b * T;
    for (int64_t t = 0; t < T; ++t)
      if (m[t]) out.push_back(t);
  }
  if (out.empty()) {  // no mask, or a sample without a valid token: all tokens (SPEC)
    out.resize(T);
    std::iota(out.begin(), out.end(), 0);
  }
  return out;
}

// Allowed columns as a bool [N]: patch_mask[b], or column 0 alone when it has none (SPEC).
at::Tensor allowed_columns(const std::optional<at::Tensor>& patch_mask, int64_t b, int64_t N,
                           const at::Device& dev) {
  if (!patch_mask.has_value()) return at::ones({N}, at::TensorOptions().dtype(at::kBool).device(dev));
  auto a = (*patch_mask)[b].clone();
  if (!a.any().item<bool>()) a[0] = true;
  return a;
}

// The scoring chain of one sample, everything but N x N. Only xp is N x D: with
// K = Tn Tn^T, |Qr_i|^2 = A_i K A_i^T, so Qr = A Tn is never formed.
struct Sample {
  at::Tensor xp, rp;           // [N, D] raw patches (compute dtype), [N] rsqrt row norms
  at::Tensor vt, xt, rt, Tn;   // [Tv] token ids, [Tv, D] raw, [Tv], normalised
  at::Tensor S, A, AK, c;      // [N, Tv] = P Tn^T, softmax, A K; [N] = rsqrt(mean(Qr^2) + eps)
  at::Tensor allowed;          // [N] bool
};

at::Tensor rsqrt_mean_square(const at::Tensor& x) {
  const double d = static_cast<double>(x.size(-1));
  return at::rsqrt(at::linalg_vector_norm(x, 2, {-1}).square() / d + kEps);
}

Sample prepare(const at::Tensor& patches, const at::Tensor& task,
               const std::optional<at::Tensor>& task_mask,
               const std::optional<at::Tensor>& patch_mask, int64_t b, at::ScalarType acc) {
  Sample s;
  const int64_t N = patches.size(1), D = patches.size(2), T = task.size(1);
  const double inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(D));
  s.xp = patches[b].to(acc);
  s.rp = rsqrt_mean_square(s.xp);
  auto valid = valid_tokens(task_mask, b, T);
  s.vt = at::from_blob(valid.data(), {(int64_t)valid.size()}, at::kLong).clone().to(patches.device());
  s.xt = task[b].index_select(0, s.vt).to(acc);
  s.rt = rsqrt_mean_square(s.xt);
  s.Tn = s.xt * s.rt.unsqueeze(1);
  s.S = at::mm(s.xp, s.Tn.t()).mul_(s.rp.unsqueeze(1));
  s.A = at::softmax(s.S * inv_sqrt_d, -1);
  s.AK = at::mm(s.A, at::mm(s.Tn, s.Tn.t()));
  s.c = at::rsqrt((s.AK * s.A).sum(-1) / static_cast<double>(D) + kEps);
  s.allowed = allowed_columns(patch_mask, b, N, patches.device());
  return s;
}

// score'[r0:r1, :] of one sample, -inf on disallowed columns; also returns Z.
at::Tensor noisy_scores(const Sample& s, const NoiseSpec& ns, int64_t b, int64_t r0, int64_t r1,
                        double inv_sqrt_d, at::Tensor* Z_out) {
  const int64_t N = s.S.size(0);
  auto Z = at::mm(s.A.slice(0, r0, r1), s.S.t());
  auto score = Z * (s.c.slice(0, r0, r1) * inv_sqrt_d).unsqueeze(1);
  if (ns.scale != 0.0) score.add_(noise_rows(ns, b, r0, r1, N, score.options()), ns.scale);
  score.masked_fill_(s.allowed.logical_not().unsqueeze(0), -std::numeric_limits<double>::infinity());
  if (Z_out) *Z_out = Z;
  return score;
}

// Runs body(b) for every sample: one sample per thread when there are enough samples (ATen ops
// inside then run single-threaded: one barrier per call, not one per op), else samples in turn
// with intra-op parallel ATen ops. Both run the same ops on a sample, but its values can round
// differently between them (ATen's parallel reductions split their sums by thread): a fuzz run
// saw gradients of one sample differ by ~1e-7 relative alone (B=1) and within a batch of 4.
template <typename F>
void for_samples(int64_t B, const F& body) {
  if (B >= at::get_num_threads() && B > 1) {
    parallel_ops(0, B, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) body(b);
    });
  } else {
    for (int64_t b = 0; b < B; ++b) body(b);
  }
}

at::ScalarType acc_type(const at::Tensor& patches) {
  return patches.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_soft_rows(
    const at::Tensor& patches_in, const at::Tensor& task_in,
    const std::optional<at::Tensor>& task_mask_in, const std::optional<at::Tensor>& patch_mask_in,
    const NoiseSpec& ns) {
  const auto patches = patches_in.contiguous();
  const auto task = task_in.contiguous();
  std::optional<at::Tensor> task_mask, patch_mask;
  if (task_mask_in) task_mask = task_mask_in->contiguous();
  if (patch_mask_in) patch_mask = patch_mask_in->contiguous();
  const int64_t B = patches.size(0), N = patches.size(1), D = patches.size(2);
  const auto acc = acc_type(patches);
  const double inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(D));

  auto selected = at::empty_like(patches);
  auto idx = at::empty({B, N}, patches.options().dtype(at::kLong));
  auto lse = at::empty({B, N}, patches.options().dtype(acc));
  for_samples(B, [&](int64_t b) {
    const Sample s = prepare(patches, task, task_mask, patch_mask, b, acc);
    // Without noise a later copy of a patch ties with the original: it may not win (ties.h).
    std::optional<at::Tensor> not_winners;
    if (ns.scale == 0.0) {
      const auto allowed = s.allowed.nonzero().flatten();
      const std::vector<int64_t> cols(allowed.data_ptr<int64_t>(), allowed.data_ptr<int64_t>() + allowed.numel());
      const auto winners = without_later_copies(patches[b], cols);
      if (winners.size() < cols.size()) {
        auto w = at::from_blob(const_cast<int64_t*>(winners.data()), {(int64_t)winners.size()}, at::kLong);
        not_winners = at::ones({N}, s.allowed.options()).index_fill_(0, w, false);
      }
    }
    for (int64_t r0 = 0; r0 < N; r0 += kChunk) {
      const int64_t r1 = std::min(N, r0 + kChunk);
      auto score = noisy_scores(s, ns, b, r0, r1, inv_sqrt_d, nullptr);
      const auto hard = not_winners ? score.masked_fill(not_winners->unsqueeze(0), -std::numeric_limits<double>::infinity())
                                    : score;
      // torch.argmax: first maximal index (NaN counts as maximal; never out of range).
      idx[b].slice(0, r0, r1).copy_(hard.argmax(-1));
      lse[b].slice(0, r0, r1).copy_(at::logsumexp(score, -1));
    }
    selected[b].copy_(patches[b].index_select(0, idx[b]));
  });
  return {selected, idx, lse};
}

std::tuple<at::Tensor, at::Tensor> select_soft_backward_rows(
    const at::Tensor& grad_in, const at::Tensor& patches_in, const at::Tensor& task_in,
    const std::optional<at::Tensor>& task_mask_in, const std::optional<at::Tensor>& patch_mask_in,
    const NoiseSpec& ns, const at::Tensor& idx_in, const at::Tensor& lse_in) {
  const auto patches = patches_in.contiguous();
  const auto task = task_in.contiguous();
  const auto grad = grad_in.contiguous();
  const auto idx = idx_in.contiguous();
  std::optional<at::Tensor> task_mask, patch_mask;
  if (task_mask_in) task_mask = task_mask_in->contiguous();
  if (patch_mask_in) patch_mask = patch_mask_in->contiguous();
  const int64_t B = patches.size(0), N = patches.size(1), D = patches.size(2);
  const auto acc = acc_type(patches);
  const auto lse = lse_in.to(acc).contiguous();
  const double inv_sqrt_d = 1.0 / std::sqrt(static_cast<double>(D));

  auto grad_patches = at::empty_like(patches);
  auto grad_task = at::zeros_like(task);
  for_samples(B, [&](int64_t b) {
    const Sample s = prepare(patches, task, task_mask, patch_mask, b, acc);
    const int64_t Tv = s.vt.size(0);
    auto g = grad[b].to(acc);
    auto dA = at::empty({N, Tv}, s.A.options());
    auto dS = at::zeros({N, Tv}, s.A.options());
    auto dc = at::empty({N}, s.A.options());
    for (int64_t r0 = 0; r0 < N; r0 += kChunk) {
      const int64_t r1 = std::min(N, r0 + kChunk);
      at::Tensor Z;
      auto score = noisy_scores(s, ns, b, r0, r1, inv_sqrt_d, &Z);
      auto soft = score.sub_(lse[b].slice(0, r0, r1).unsqueeze(1)).exp_();
      auto dsoft = at::mm(g.slice(0, r0, r1), s.xp.t());  // the one N x N x D product
      auto delta = (soft * dsoft).sum(-1, /*keepdim=*/true);
      auto dscore = dsoft.sub_(delta).mul_(soft);
      dc.slice(0, r0, r1).copy_((dscore * Z).sum(-1).mul_(inv_sqrt_d));
      auto dZ = dscore.mul_((s.c.slice(0, r0, r1) * inv_sqrt_d).unsqueeze(1));
      dA.slice(0, r0, r1).copy_(at::mm(dZ, s.S));
      dS.addmm_(dZ.t(), s.A.slice(0, r0, r1));
    }
    // c = rsqrt(|Qr|^2 / D + eps), Qr = A Tn:  dQr = -k Qr with k = dc c^3 / D, so
    // dA += dQr Tn^T = -k (A K) and dTn = A^T dQr = -(A^T diag(k) A) Tn.
    auto k = dc * s.c.pow(3) / static_cast<double>(D);
    dA.sub_(s.AK * k.unsqueeze(1));
    auto dTn = at::mm(at::mm(s.A.t(), s.A * k.unsqueeze(1)), s.Tn).neg_();
    // A = softmax(S / sqrt(D)) over the valid tokens.
    auto dL = s.A * (dA - (s.A * dA).sum(-1, /*keepdim=*/true));
    dS.add_(dL, inv_sqrt_d);
    // S = P Tn^T with P = rp xp:  dTn += dS^T P;  dP = dS Tn and the rms backward
    // dxp = rp dP - xp rp^3 (xp . dP) / D, where xp . dP = rowsum(dS * S) / rp.
    auto dS_rp = dS * s.rp.unsqueeze(1);
    dTn.addmm_(dS_rp.t(), s.xp);
    auto coef = s.rp.square() * (dS * s.S).sum(-1) / static_cast<double>(D);
    auto dxp = at::addmm(s.xp * coef.neg().unsqueeze(1), dS_rp, s.Tn);
    dxp.index_add_(0, idx[b], g);  // straight-through direct term, in row order
    auto dxt = dTn * s.rt.unsqueeze(1) -
               s.xt * (s.rt.pow(3) * (s.xt * dTn).sum(-1) / static_cast<double>(D)).unsqueeze(1);
    grad_patches[b].copy_(dxp);
    grad_task[b].index_copy_(0, s.vt, dxt.to(task.scalar_type()));
  });
  return {grad_patches, grad_task};
}

void check_cpu_backend(const std::string& backend) {
  check_backend(backend);
  TORCH_CHECK(backend != "cuda", "fastprune: backend='cuda' needs CUDA tensors, got CPU tensors");
}

void check_saved(const at::Tensor& patches, const at::Tensor& t, const char* name,
                 at::ScalarType dtype) {
  FASTPRUNE_CHECK(t.dim() == 2 && t.size(0) == patches.size(0) && t.size(1) == patches.size(1),
                  "fastprune: %s must be [%lld, %lld], got shape %s", name, static_cast<long long>(patches.size(0)),
                  static_cast<long long>(patches.size(1)), ShapeStr(t.sizes()).s);
  FASTPRUNE_CHECK(t.scalar_type() == dtype, "fastprune: %s must be %s, got %s", name, dtype_str(dtype),
                  dtype_str(t.scalar_type()));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> select_soft_cpu(
    const at::Tensor& patches, const at::Tensor& task, const std::optional<at::Tensor>& task_mask,
    const std::optional<at::Tensor>& patch_mask, const std::optional<at::Tensor>& noise_scale,
    const std::optional<at::Tensor>& seed, const std::optional<at::Tensor>& noise,
    c10::string_view backend_view) {
  const std::string backend(backend_view);
  check_cpu_backend(backend);
  check_prune_inputs(patches, task, task_mask, patch_mask, std::nullopt, std::nullopt);
  const auto ns = noise_spec(patches, noise_scale, seed, noise);
  if (backend == "triton") {
    auto out = call_triton("fastprune::triton_select_soft",
                           {patches, task, task_mask, patch_mask, noise_scale, seed, noise});
    return {out[0].toTensor(), out[1].toTensor(), out[2].toTensor()};
  }
  return select_soft_rows(patches, task, task_mask, patch_mask, ns);
}

std::tuple<at::Tensor, at::Tensor> select_soft_backward_cpu(
    const at::Tensor& grad, const at::Tensor& patches, const at::Tensor& task,
    const std::optional<at::Tensor>& task_mask, const std::optional<at::Tensor>& patch_mask,
    const std::optional<at::Tensor>& noise_scale, const std::optional<at::Tensor>& seed,
    const std::optional<at::Tensor>& noise, const at::Tensor& idx, const at::Tensor& lse,
    c10::string_view backend_view) {
  const std::string backend(backend_view);
  check_cpu_backend(backend);
  check_prune_inputs(patches, task, task_mask, patch_mask, std::nullopt, std::nullopt);
  FASTPRUNE_CHECK(grad.sizes() == patches.sizes() && grad.scalar_type() == patches.scalar_type(),
                  "fastprune: grad must match patches %s %s, got %s %s", ShapeStr(patches.sizes()).s,
                  dtype_str(patches.scalar_type()), ShapeStr(grad.sizes()).s, dtype_str(grad.scalar_type()));
  check_saved(patches, idx, "idx", at::kLong);
  check_saved(patches, lse, "lse", acc_type(patches));
  const auto ns = noise_spec(patches, noise_scale, seed, noise);
  if (backend == "triton") {
    auto out = call_triton("fastprune::triton_select_soft_backward",
                           {grad, patches, task, task_mask, patch_mask, noise_scale, seed, noise, idx, lse});
    return {out[0].toTensor(), out[1].toTensor()};
  }
  return select_soft_backward_rows(grad, patches, task, task_mask, patch_mask, ns, idx, lse);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CPU, m) {
  m.impl("select_soft", &select_soft_cpu);
  m.impl("select_soft_backward", &select_soft_backward_cpu);
}

}  // namespace fastprune
