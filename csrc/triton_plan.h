// Launch plans of the Triton backend: one eager call of fastprune::select, prune or prune_padded
// with backend="triton", recorded once per call key by the Python launch code
// (kernels/prune_triton.py, `plan_of`) and replayed here from C++ on later calls with the same key.
//
// Why: an eager Triton call spends most of its host time in Python (binding the launch
// arguments, triton's launcher, torch.library's layers): 194.5 us per call on the H200 machine
// in run 5, where the CUDA C++ backend's op took 23.5 us. A replay allocates the same buffers
// and launches the same compiled kernels (their CUfunction handles) with
// the call's own tensors, as the CUDA backend does.
//
// A plan holds everything a call derives from its key: buffer shapes, kernel grids, integer
// and float arguments, which argument is which input or buffer. `prune` also reads the kept-row
// count K on the host between its launches (its one sync): the launches from `k_launch` on, and
// the buffers with a K dimension, take K's value then. The key is everything the
// launch code reads: the op, device, dtypes, shapes, mask presence and dtypes, keep_tokens,
// max_tokens, mask_voters and each input's address modulo 16 (triton specialises a pointer on
// 16-byte alignment). Only contiguous inputs have a key (the launch code copies others). Plans
// stay for the life of the process (well under a KB each; a serving loop has a few keys).
//
// Encoding (int64 list, written by kernels/prune_triton.py `plan_of`):
//   [kPlanVersion, n_buffers, n_launches, n_outputs,
//    k_launch, k_buffer, k_offset   (prune: the first launch after the host read of K, and where
//                                    K is, an int32 at a byte offset of a buffer; else -1, 0, 0),
//    per buffer: scalar type (c10::ScalarType), ndim, sizes... (-1: K),
//    per launch: CUfunction, grid x, y, z (-b: ceil(K / b)), threads per block, dynamic shared
//                bytes, n_params,
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

constexpr int64_t kPlanVersion = 2;  // 2: no fills (the kernels need no zeroed bytes)

enum class Op : int64_t { kSelect = 0, kPrunePadded = 1, kPrune = 2 };

// "select", "prune" or "prune_padded": the op's name in the schema and in the recording op.
const char* op_name(Op op);

enum class ParamKind : int64_t {
  kInput = 0,   // a: input (0 patches, 1 task, 2 task_mask, 3 patch_mask), b: byte offset
  kBuffer = 1,  // a: buffer, b: byte offset
  kInt32 = 2,   // a: value
  kInt64 = 3,   // a: value
  kFloat32 = 4, // a: the float's bits
  kNull = 5,    // a null pointer (triton's global and profile scratch, unused by these kernels)
  kK = 6,       // K, as an int32
};

struct Param {
  ParamKind kind;
  int64_t a, b;
};

struct Launch {
  uint64_t function;
  int64_t grid[3];  // -b: ceil(K / b)
  uint32_t block;
  uint32_t shared;
  std::vector<Param> params;
};

struct Buffer {
  c10::ScalarType dtype;
  std::vector<int64_t> sizes;  // -1: K
  bool has_k = false;
};

struct Plan {
  int64_t k_launch = -1, k_buffer = 0, k_offset = 0;
  std::vector<Buffer> buffers;
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

// One replay's buffers and kernel parameter values. A replay allocates the buffers without a K
// dimension, launches up to `k_launch`, and (prune) reads K, then allocates the rest and launches
// the others.
class Replay {
 public:
  Replay(const Plan& plan, const at::Tensor& patches, const at::Tensor& task,
         const std::optional<at::Tensor>& task_mask, const std::optional<at::Tensor>& patch_mask);
  // The buffers with a K dimension, for this K (>= 1).
  void allocate_k(int64_t k);
  // Launch i's kernel parameter array (cuLaunchKernel's kernelParams) and grid: each slot holds
  // an address, an integer or a float's bits, and lives as long as this Replay.
  void** args(size_t i);
  void grid(size_t i, uint32_t out[3]) const;
  // The kernel's view of launch i's parameter j (an address, an integer, a float's bits).
  int64_t value(size_t i, size_t j) const;
  const std::vector<at::Tensor>& buffers() const { return buffers_; }

 private:
  const Plan& plan_;
  const at::Tensor* inputs_[4];
  int64_t k_ = -1;
  std::vector<at::Tensor> buffers_;  // undefined until allocated
  std::vector<std::vector<uint64_t>> values_;  // one 8-byte slot per parameter
  std::vector<std::vector<void*>> args_;
};

}  // namespace triton_plan
}  // namespace fastprune
