// Launch plans of the Triton backend: one eager call of fastprune::select or prune_padded with
// backend="triton", recorded once per call key by the Python launch code (kernels/prune_triton.py,
// `plan_of`) and replayed here from C++ on later calls with the same key.
//
// Why: an eager Triton call spends most of its host time in Python (binding the launch
// arguments, triton's launcher, torch.library's layers): 194.5 us per call on the H200 machine
// in run 5, where the CUDA C++ backend's op took 23.5 us. A replay allocates the same buffers,
// zeroes the same bytes and launches the same compiled kernels (their CUfunction handles) with
// the call's own tensors, as the CUDA backend does.
//
// A plan holds everything a call derives from its key: buffer shapes, kernel grids, integer
// and float arguments, which argument is which input or buffer. The key is everything the
// launch code reads: the op, device, dtypes, shapes, mask presence and dtypes, keep_tokens,
// max_tokens, mask_voters and each input's address modulo 16 (triton specialises a pointer on
// 16-byte alignment). Only contiguous inputs have a key (the launch code copies others).
//
// Encoding (int64 list, written by kernels/prune_triton.py `plan_of`):
//   [kPlanVersion, n_buffers, n_fills, n_launches, n_outputs,
//    per buffer: scalar type (c10::ScalarType), ndim, sizes...,
//    per fill: buffer, byte offset, bytes                      (zeroed before the launches),
//    per launch: CUfunction, grid x, y, z, threads per block, dynamic shared bytes, n_params,
//                per param: kind, a, b                           (ParamKind),
//    per output: buffer]
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

namespace fastprune {
namespace triton_plan {

constexpr int64_t kPlanVersion = 1;

enum class Op : int64_t { kSelect = 0, kPrunePadded = 1 };

enum class ParamKind : int64_t {
  kInput = 0,   // a: input (0 patches, 1 task, 2 task_mask, 3 patch_mask), b: byte offset
  kBuffer = 1,  // a: buffer, b: byte offset
  kInt32 = 2,   // a: value
  kInt64 = 3,   // a: value
  kFloat32 = 4, // a: the float's bits
  kNull = 5,    // a null pointer (triton's global and profile scratch, unused by these kernels)
};

struct Param {
  ParamKind kind;
  int64_t a, b;
};

struct Launch {
  uint64_t function;
  uint32_t grid[3];
  uint32_t block;
  uint32_t shared;
  std::vector<Param> params;
};

struct Buffer {
  c10::ScalarType dtype;
  std::vector<int64_t> sizes;
};

struct Fill {
  int64_t buffer, offset, bytes;
};

struct Plan {
  std::vector<Buffer> buffers;
  std::vector<Fill> fills;
  std::vector<Launch> launches;
  std::vector<int64_t> outputs;
};

using Key = std::vector<int64_t>;

// The call's key; nullopt when it has none (a non-contiguous input).
std::optional<Key> key_of(Op op, const at::Tensor& patches, const at::Tensor& task,
                          const std::optional<at::Tensor>& task_mask, const std::optional<at::Tensor>& patch_mask,
                          std::optional<int64_t> keep_tokens, std::optional<int64_t> max_tokens, bool mask_voters);

// The plan stored under `key`, or null.
std::shared_ptr<const Plan> find(const Key& key);

// One call's buffers and the kernels' parameter values, ready to launch: `args[i]` points at
// the value of launch i's parameter i (the kernel parameter array of cuLaunchKernel).
struct Prepared {
  std::vector<at::Tensor> buffers;
  std::vector<std::vector<uint64_t>> values;  // one 8-byte slot per parameter
  std::vector<std::vector<void*>> args;
};

Prepared prepare(const Plan& plan, const at::Tensor& patches, const at::Tensor& task,
                 const std::optional<at::Tensor>& task_mask, const std::optional<at::Tensor>& patch_mask);

}  // namespace triton_plan
}  // namespace fastprune
