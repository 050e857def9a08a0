// Input checks of the fastprune eval ops, shared by every C++ backend so that a bad call
// fails with the same message, naming the argument and the shapes, before any kernel runs.
#pragma once

#include <ATen/ATen.h>

#include <optional>

namespace fastprune {

inline void check_prune_inputs(
    const at::Tensor& patches,
    const at::Tensor& task,
    const std::optional<at::Tensor>& task_mask,
    const std::optional<at::Tensor>& patch_mask,
    std::optional<int64_t> keep_tokens,
    std::optional<int64_t> max_tokens) {
  TORCH_CHECK(patches.dim() == 3, "fastprune: patches must be [B, N, D], got shape ", patches.sizes());
  TORCH_CHECK(task.dim() == 3, "fastprune: task must be [B, T, D], got shape ", task.sizes());
  const auto B = patches.size(0), N = patches.size(1), D = patches.size(2), T = task.size(1);
  TORCH_CHECK(
      task.size(0) == B && task.size(2) == D,
      "fastprune: task ", task.sizes(), " does not match patches ", patches.sizes(),
      " in batch or width");
  TORCH_CHECK(N >= 1 && T >= 1 && D >= 1, "fastprune: patches ", patches.sizes(), " and task ",
              task.sizes(), " need N, T and D >= 1");
  const auto dt = patches.scalar_type();
  // float64 (CPU only) serves exactness tests of float64 models; it is computed in float64.
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 ||
                  (dt == at::kDouble && patches.device().is_cpu()),
              "fastprune: patches must be float32, float16 or bfloat16 (float64 on CPU), got ", dt,
              " on ", patches.device());
  TORCH_CHECK(task.scalar_type() == dt, "fastprune: task dtype ", task.scalar_type(),
              " differs from patches dtype ", dt);
  TORCH_CHECK(task.device() == patches.device(), "fastprune: task is on ", task.device(),
              ", patches on ", patches.device());
  auto check_mask = [&](const std::optional<at::Tensor>& m, const char* name, int64_t len) {
    if (!m.has_value()) return;
    TORCH_CHECK(m->scalar_type() == at::kBool, "fastprune: ", name, " must be bool, got ",
                m->scalar_type());
    TORCH_CHECK(m->dim() == 2 && m->size(0) == B && m->size(1) == len, "fastprune: ", name,
                " must be [", B, ", ", len, "], got shape ", m->sizes());
    TORCH_CHECK(m->device() == patches.device(), "fastprune: ", name, " is on ", m->device(),
                ", patches on ", patches.device());
  };
  check_mask(task_mask, "task_mask", T);
  check_mask(patch_mask, "patch_mask", N);
  if (keep_tokens.has_value()) {
    TORCH_CHECK(*keep_tokens >= 1 && *keep_tokens <= N, "fastprune: keep_tokens must be in [1, ",
                N, "] for patches ", patches.sizes(), ", got ", *keep_tokens);
  }
  if (max_tokens.has_value()) {
    TORCH_CHECK(*max_tokens >= 1, "fastprune: max_tokens must be >= 1, got ", *max_tokens);
  }
}

}  // namespace fastprune
