// Input checks of the fastprune eval ops, shared by every C++ backend so that a bad call
// fails with the same message, naming the argument and the shapes, before any kernel runs.
#pragma once

#include <ATen/ATen.h>

#include "check.h"

#include <optional>

namespace fastprune {

inline void check_prune_inputs(
    const at::Tensor& patches,
    const at::Tensor& task,
    const std::optional<at::Tensor>& task_mask,
    const std::optional<at::Tensor>& patch_mask,
    std::optional<int64_t> keep_tokens,
    std::optional<int64_t> max_tokens) {
  FASTPRUNE_CHECK(patches.dim() == 3, "fastprune: patches must be [B, N, D], got shape %s",
                  ShapeStr(patches.sizes()).s);
  FASTPRUNE_CHECK(task.dim() == 3, "fastprune: task must be [B, T, D], got shape %s", ShapeStr(task.sizes()).s);
  const auto B = patches.size(0), N = patches.size(1), D = patches.size(2), T = task.size(1);
  FASTPRUNE_CHECK(task.size(0) == B && task.size(2) == D,
                  "fastprune: task %s does not match patches %s in batch or width", ShapeStr(task.sizes()).s,
                  ShapeStr(patches.sizes()).s);
  FASTPRUNE_CHECK(N >= 1 && T >= 1 && D >= 1, "fastprune: patches %s and task %s need N, T and D >= 1",
                  ShapeStr(patches.sizes()).s, ShapeStr(task.sizes()).s);
  const auto dt = patches.scalar_type();
  // float64 (CPU only) serves exactness tests of float64 models; it is computed in float64.
  FASTPRUNE_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 ||
                      (dt == at::kDouble && patches.device().is_cpu()),
                  "fastprune: patches must be float32, float16 or bfloat16 (float64 on CPU), got %s on %s",
                  dtype_str(dt), DeviceStr(patches.device()).s);
  FASTPRUNE_CHECK(task.scalar_type() == dt, "fastprune: task dtype %s differs from patches dtype %s",
                  dtype_str(task.scalar_type()), dtype_str(dt));
  FASTPRUNE_CHECK(task.device() == patches.device(), "fastprune: task is on %s, patches on %s",
                  DeviceStr(task.device()).s, DeviceStr(patches.device()).s);
  auto check_mask = [&](const std::optional<at::Tensor>& m, const char* name, int64_t len) {
    if (!m.has_value()) return;
    FASTPRUNE_CHECK(m->scalar_type() == at::kBool, "fastprune: %s must be bool, got %s", name,
                    dtype_str(m->scalar_type()));
    FASTPRUNE_CHECK(m->dim() == 2 && m->size(0) == B && m->size(1) == len,
                    "fastprune: %s must be [%lld, %lld], got shape %s", name, static_cast<long long>(B),
                    static_cast<long long>(len), ShapeStr(m->sizes()).s);
    FASTPRUNE_CHECK(m->device() == patches.device(), "fastprune: %s is on %s, patches on %s", name,
                    DeviceStr(m->device()).s, DeviceStr(patches.device()).s);
  };
  check_mask(task_mask, "task_mask", T);
  check_mask(patch_mask, "patch_mask", N);
  if (keep_tokens.has_value()) {
    FASTPRUNE_CHECK(*keep_tokens >= 1 && *keep_tokens <= N,
                    "fastprune: keep_tokens must be in [1, %lld] for patches %s, got %lld",
                    static_cast<long long>(N), ShapeStr(patches.sizes()).s, static_cast<long long>(*keep_tokens));
  }
  if (max_tokens.has_value()) {
    FASTPRUNE_CHECK(*max_tokens >= 1, "fastprune: max_tokens must be >= 1, got %lld",
                    static_cast<long long>(*max_tokens));
  }
}

}  // namespace fastprune
