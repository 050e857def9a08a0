// Entry points of fastprune::select / prune / prune_padded for one dispatch key: backend
// choice, input checks (before any kernel), then the Triton ops (on CUDA, their launch plans) or
// the device's own kernels.
// Shared by the CPU and CUDA registrations so both behave the same on every bad input.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <tuple>

#include "backend.h"
#include "prune_checks.h"
#include "triton_plan.h"

namespace fastprune {

using PruneOut = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// `Kernels` provides
//   static void check_device_backend(const std::string&)  rejects backends of other devices
//   static at::Tensor select(patches, task, task_mask, patch_mask, mask_voters)
//   static PruneOut prune(patches, task, task_mask, patch_mask, keep_tokens, max_tokens, mask_voters)
//   static constexpr bool kTritonPlans  whether backend="triton" replays recorded launch plans
//                                       (CUDA) instead of calling fastprune::triton_* (CPU)
//   replay_triton(op, inputs..., flags)  with kTritonPlans: the replay of the call's plan, or
//                                       nullopt where none is stored
template <class Kernels>
struct EvalOps {
  using OptTensor = std::optional<at::Tensor>;

  static at::Tensor select(const at::Tensor& patches, const at::Tensor& task, const OptTensor& task_mask,
                           const OptTensor& patch_mask, bool mask_voters, c10::string_view backend) {
    if (use_triton(backend, patches, task, task_mask, patch_mask, std::nullopt, std::nullopt)) {
      if constexpr (Kernels::kTritonPlans)
        return planned(triton_plan::Op::kSelect, patches, task, task_mask, patch_mask, std::nullopt, std::nullopt,
                       mask_voters)[0];
      return call_triton("fastprune::triton_select", {patches, task, task_mask, patch_mask, mask_voters})[0]
          .toTensor();
    }
    return Kernels::select(patches, task, task_mask, patch_mask, mask_voters);
  }

  static PruneOut prune(const at::Tensor& patches, const at::Tensor& task, const OptTensor& task_mask,
                        const OptTensor& patch_mask, std::optional<int64_t> keep_tokens, bool mask_voters,
                        c10::string_view backend) {
    if (use_triton(backend, patches, task, task_mask, patch_mask, keep_tokens, std::nullopt)) {
      if constexpr (Kernels::kTritonPlans) {
        return unpack(planned(triton_plan::Op::kPrune, patches, task, task_mask, patch_mask, keep_tokens,
                              std::nullopt, mask_voters));
      }
      return unpack(call_triton("fastprune::triton_prune",
                                {patches, task, task_mask, patch_mask, keep_tokens, mask_voters}));
    }
    return Kernels::prune(patches, task, task_mask, patch_mask, keep_tokens, std::nullopt, mask_voters);
  }

  static PruneOut prune_padded(const at::Tensor& patches, const at::Tensor& task, const OptTensor& task_mask,
                               const OptTensor& patch_mask, std::optional<int64_t> keep_tokens,
                               int64_t max_tokens, bool mask_voters, c10::string_view backend) {
    if (use_triton(backend, patches, task, task_mask, patch_mask, keep_tokens, max_tokens)) {
      if constexpr (Kernels::kTritonPlans) {
        return unpack(planned(triton_plan::Op::kPrunePadded, patches, task, task_mask, patch_mask, keep_tokens,
                              max_tokens, mask_voters));
      }
      return unpack(call_triton("fastprune::triton_prune_padded",
                                {patches, task, task_mask, patch_mask, keep_tokens, max_tokens, mask_voters}));
    }
    return Kernels::prune(patches, task, task_mask, patch_mask, keep_tokens, max_tokens, mask_voters);
  }

 private:
  // Checks the backend and the inputs; true when the call goes to the Triton ops.
  static bool use_triton(c10::string_view backend_view, const at::Tensor& patches, const at::Tensor& task,
                         const OptTensor& task_mask, const OptTensor& patch_mask,
                         std::optional<int64_t> keep_tokens, std::optional<int64_t> max_tokens) {
    const std::string backend(backend_view);
    check_backend(backend);
    Kernels::check_device_backend(backend);
    check_prune_inputs(patches, task, task_mask, patch_mask, keep_tokens, max_tokens);
    return backend == "triton";
  }

  // backend="triton" on a device whose Kernels replay launch plans (triton_plan.h): the plan of
  // the call's key, or else the Python launch code, which runs the call and records its plan.
  static std::vector<at::Tensor> planned(triton_plan::Op op, const at::Tensor& patches, const at::Tensor& task,
                                         const OptTensor& task_mask, const OptTensor& patch_mask,
                                         std::optional<int64_t> keep_tokens, std::optional<int64_t> max_tokens,
                                         bool mask_voters) {
    if (auto out = Kernels::replay_triton(op, patches, task, task_mask, patch_mask, keep_tokens, max_tokens,
                                          mask_voters))
      return std::move(*out);
    return call_triton("fastprune::triton_record", {triton_plan::op_name(op), patches, task, task_mask, patch_mask,
                                                     keep_tokens, max_tokens, mask_voters})[0]
        .toTensorVector();
  }

  static PruneOut unpack(const std::vector<c10::IValue>& s) {
    return {s[0].toTensor(), s[1].toTensor(), s[2].toTensor(), s[3].toTensor()};
  }
  static PruneOut unpack(const std::vector<at::Tensor>& s) { return {s[0], s[1], s[2], s[3]}; }
};

}  // namespace fastprune
