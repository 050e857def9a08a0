// Backend choice shared by the C++ implementations of the fastprune ops. "triton" reaches the
// Python-registered Triton launchers, so the same op call reaches every backend: on CUDA tensors
// by replaying the call's recorded launch plan, or recording it through fastprune::triton_record
// (eval_ops.h, triton_plan.h); on CPU tensors (the Triton interpreter, for tests) through the
// dispatcher as fastprune::triton_*. LibTorch users without Python get "cpu"/"cuda".
#pragma once

#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/core/stack.h>

#include "check.h"

#include <string>
#include <vector>

namespace fastprune {

inline void check_backend(const std::string& backend) {
  FASTPRUNE_CHECK(backend == "auto" || backend == "cpu" || backend == "triton" || backend == "cuda",
                  "fastprune: backend must be 'auto', 'cpu', 'triton' or 'cuda', got '%s'", backend.c_str());
}

// Calls the Triton op `name` with a boxed argument stack and returns its outputs.
inline std::vector<c10::IValue> call_triton(const char* name, std::vector<c10::IValue> stack) {
  auto handle = c10::Dispatcher::singleton().findSchema({name, ""});
  FASTPRUNE_CHECK(handle.has_value(),
                  "fastprune: backend='triton' needs %s, which `import pi05_fastprune` registers when triton "
                  "is installed",
                  name);
  handle->callBoxed(&stack);
  return stack;
}

}  // namespace fastprune
