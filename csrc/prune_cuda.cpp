// CUDA implementation of fastprune::select / prune / prune_padded: the ATen side of the
// kernels in kernels/prune_cuda.cu (checks, device guard, current stream, dtype, workspace and
// outputs). Built only with CUDA torch (setup.py / CMakeLists.txt add *_cuda.cpp then).
//
// backend: "auto"/"cuda" run these kernels; "triton" replays the Triton launch plan recorded for
// the call's key (replay_triton below), or without one has fastprune::triton_record run the
// call and record it (eval_ops.h); "cpu" is an error on CUDA tensors. `prune` reads the
// kept-count maximum on the host once (its only sync, to size K); `prune_padded` never syncs
// (CUDA-graph capturable).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <algorithm>
#include <climits>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <string>
#include <tuple>
#include <vector>

#include "eval_ops.h"
#include "launch_function.h"
#include "prune_cuda.h"
#include "triton_plan.h"

namespace fastprune {
namespace {

void check_launch(cudaError_t err, const char* what) {
  FASTPRUNE_CHECK(err == cudaSuccess, "fastprune: CUDA %s failed: %s", what, cudaGetErrorString(err));
}

// What the plan needs from the device, queried once per device: the SM count (sizes the D split)
// and whether kernels B and C go out as programmatic dependent launches. Those are opt-in
// (FASTPRUNE_CUDA_PDL=1, on compute capability 9.0+ with kernels built for it): on an H200 they
// made the pi05 call slower, 4-6 us in CUDA-graph replay and 14-25 us of host time per eager call
// (bench/results/h200-2026-11-26/run4 and run5, bench against bench_nopdl).
// FASTPRUNE_CUDA_KSPLIT=k fixes the number of D slices of kernel A, for benchmark sweeps
// (bench/gpu_check step bench_ksplit); unset, the plan fills about one wave.
// Kernel A runs as thread block clusters where the plan allows it (pi05: every batch size), on
// the same conditions as PDL; FASTPRUNE_CUDA_CLUSTER=0 turns that off. On an H200 the clusters
// took kernel A from 13.7 to 8.0 us at pi05 B=1 and from 145 to 140 us at B=64
// (bench/results/h200-2026-11-27/run6, bench_cluster against bench).
// FASTPRUNE_CUDA_ONE_CLUSTER=1 (opt-in, same conditions; not yet measured on a GPU, PERF_LOG
// v80, v81) runs kernels A and B as one launch, one thread block cluster a sample, where it
// applies (prune_cuda.h, make_plan).
struct DeviceFacts {
  int sms = 0;
  bool pdl = false;
  bool cluster = false;
  bool one_cluster = false;
  int ksplit = 0;
};

// A switch read from the environment: "1" on, "0" off, unset the default.
bool env_flag(const char* name, bool unset) {
  const char* v = std::getenv(name);
  if (v == nullptr) return unset;
  FASTPRUNE_CHECK(std::strcmp(v, "0") == 0 || std::strcmp(v, "1") == 0, "fastprune: %s must be 0 or 1, got '%s'",
                  name, v);
  return v[0] == '1';
}

DeviceFacts device_facts(int device) {
  static std::mutex mu;
  static std::vector<DeviceFacts> cache;
  std::lock_guard<std::mutex> lock(mu);
  if (device >= static_cast<int>(cache.size())) cache.resize(device + 1);
  DeviceFacts& f = cache[device];
  if (f.sms == 0) {
    int n = 0, major = 0;
    check_launch(cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device), "device query");
    check_launch(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device), "device query");
    const bool sm90 = major >= 9 && fastprune_cuda::kernels_have_sm90();
    f.pdl = sm90 && env_flag("FASTPRUNE_CUDA_PDL", false);
    f.cluster = sm90 && env_flag("FASTPRUNE_CUDA_CLUSTER", true);
    f.one_cluster = sm90 && env_flag("FASTPRUNE_CUDA_ONE_CLUSTER", false);
    if (const char* k = std::getenv("FASTPRUNE_CUDA_KSPLIT")) {
      char* end = nullptr;
      const long v = std::strtol(k, &end, 10);
      FASTPRUNE_CHECK(*k != '\0' && *end == '\0' && v >= 1 && v <= fastprune_cuda::kMaxSplit,
                      "fastprune: FASTPRUNE_CUDA_KSPLIT must be an integer in [1, %d], got '%s'",
                      fastprune_cuda::kMaxSplit, k);
      f.ksplit = static_cast<int>(v);
    }
    f.sms = n > 0 ? n : 1;
  }
  return f;
}

fastprune_cuda::DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return fastprune_cuda::DType::kFloat32;
    case at::kHalf:
      return fastprune_cuda::DType::kFloat16;
    case at::kBFloat16:
      return fastprune_cuda::DType::kBFloat16;
    default:
      FASTPRUNE_CHECK(false, "fastprune: patches dtype %s is not float32, float16 or bfloat16", dtype_str(t));
  }
}

// Inputs in the layout the kernels take (last dim contiguous, contiguous masks), the problem
// description, the plan and its workspace. Tensors are held here so the pointers stay valid.
struct Prepared {
  at::Tensor patches, task, task_mask, patch_mask, workspace;
  fastprune_cuda::Problem problem;
  fastprune_cuda::Plan plan;
};

Prepared prepare(const at::Tensor& patches, const at::Tensor& task,
                 const std::optional<at::Tensor>& task_mask,
                 const std::optional<at::Tensor>& patch_mask, bool mask_voters) {
  Prepared r;
  r.patches = patches.stride(2) == 1 ? patches : patches.contiguous();
  r.task = task.stride(2) == 1 ? task : task.contiguous();
  if (task_mask.has_value()) r.task_mask = task_mask->contiguous();
  if (patch_mask.has_value()) r.patch_mask = patch_mask->contiguous();
  const int64_t B = patches.size(0), N = patches.size(1), D = patches.size(2), T = task.size(1);
  FASTPRUNE_CHECK(B <= 65535, "fastprune: the CUDA kernels take at most 65535 samples, got patches %s",
                  ShapeStr(patches.sizes()).s);
  FASTPRUNE_CHECK(N < INT_MAX && T < INT_MAX && (N + 63) / 64 <= 65535,
                  "fastprune: patches %s and task %s are too long for the CUDA kernels", ShapeStr(patches.sizes()).s,
                  ShapeStr(task.sizes()).s);
  auto& p = r.problem;
  p.B = B;
  p.N = N;
  p.T = T;
  p.D = D;
  p.dtype = to_dtype(patches.scalar_type());
  p.patches = r.patches.data_ptr();
  p.patches_sb = r.patches.stride(0);
  p.patches_sr = r.patches.stride(1);
  p.task = r.task.data_ptr();
  p.task_sb = r.task.stride(0);
  p.task_sr = r.task.stride(1);
  p.task_mask = r.task_mask.defined() ? r.task_mask.data_ptr<bool>() : nullptr;
  p.patch_mask = r.patch_mask.defined() ? r.patch_mask.data_ptr<bool>() : nullptr;
  p.mask_voters = mask_voters;
  const DeviceFacts dev = device_facts(patches.get_device());
  r.plan = fastprune_cuda::make_plan(B, N, T, D, dev.sms, dev.pdl, dev.ksplit, dev.cluster, dev.one_cluster);
  r.workspace = at::empty({static_cast<int64_t>(r.plan.workspace_bytes)},
                          patches.options().dtype(at::kByte));
  return r;
}

at::Tensor run_select(const at::Tensor& patches, const at::Tensor& task,
                      const std::optional<at::Tensor>& task_mask,
                      const std::optional<at::Tensor>& patch_mask, bool mask_voters) {
  const c10::cuda::CUDAGuard guard(patches.device());
  auto idx = at::empty({patches.size(0), patches.size(1)}, patches.options().dtype(at::kLong));
  if (patches.size(0) == 0) return idx;
  Prepared r = prepare(patches, task, task_mask, patch_mask, mask_voters);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_launch(fastprune_cuda::launch_select(r.problem, r.plan, r.workspace.data_ptr(),
                                             idx.data_ptr<int64_t>(), stream),
               "select kernel launch");
  return idx;
}

// Kernels A and B (selection up to the kept lists), then the gather-pad to K rows.
PruneOut run_prune(const at::Tensor& patches, const at::Tensor& task,
                   const std::optional<at::Tensor>& task_mask,
                   const std::optional<at::Tensor>& patch_mask, std::optional<int64_t> keep_tokens,
                   std::optional<int64_t> max_tokens, bool mask_voters) {
  const c10::cuda::CUDAGuard guard(patches.device());
  const int64_t B = patches.size(0), D = patches.size(2);
  const auto long_opts = patches.options().dtype(at::kLong);
  auto counts = at::empty({B}, long_opts);
  if (B == 0) {
    const int64_t K = max_tokens.value_or(1);
    return {at::empty({0, K, D}, patches.options()),
            at::empty({0, K}, patches.options().dtype(at::kBool)), at::empty({0, K}, long_opts),
            counts};
  }
  Prepared r = prepare(patches, task, task_mask, patch_mask, mask_voters);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  auto outputs = [&](int64_t K) {
    return PruneOut{at::empty({B, K, D}, patches.options()), at::empty({B, K}, patches.options().dtype(at::kBool)),
                    at::empty({B, K}, long_opts), counts};
  };
  if (max_tokens.has_value()) {  // static shape: no host sync
    PruneOut out = outputs(*max_tokens);
    check_launch(fastprune_cuda::launch_prune_padded(r.problem, r.plan, r.workspace.data_ptr(), keep_tokens.value_or(0),
                                                     *max_tokens, counts.data_ptr<int64_t>(),
                                                     std::get<0>(out).data_ptr(), std::get<1>(out).data_ptr<bool>(),
                                                     std::get<2>(out).data_ptr<int64_t>(), stream),
                 "prune_padded kernel launch");
    return out;
  }
  check_launch(fastprune_cuda::launch_keep(r.problem, r.plan, r.workspace.data_ptr(), keep_tokens.value_or(0),
                                           counts.data_ptr<int64_t>(), stream),
               "selection kernel launch");
  // The op's only host sync: the largest kept count sizes the output. The counts come over as they
  // are (one copy of B words, as one word would be) and the host takes their maximum, so that no
  // kernel keeps a running maximum across samples: the one-cluster kernel's clusters run in no set
  // order, and none of them could zero such a maximum before the others raise it.
  const at::Tensor host_counts = counts.to(at::kCPU);
  const int64_t* c = host_counts.data_ptr<int64_t>();
  PruneOut out = outputs(std::max<int64_t>(1, *std::max_element(c, c + B)));
  check_launch(fastprune_cuda::launch_gather(r.problem, r.plan, r.workspace.data_ptr(), counts.data_ptr<int64_t>(),
                                             std::get<0>(out).size(1), std::get<0>(out).data_ptr(),
                                             std::get<1>(out).data_ptr<bool>(), std::get<2>(out).data_ptr<int64_t>(),
                                             stream),
               "gather kernel launch");
  return out;
}

// backend="triton" with a launch plan for the call's key (triton_plan.h): the recorded kernel
// launches, on the call's tensors and new buffers, on the current stream (so also
// under CUDA-graph capture); for prune, the host read of K between them, as its launch code does.
// nullopt when there is no plan: the Python launch code runs the call and records one.
std::optional<std::vector<at::Tensor>> replay_triton(triton_plan::Op op, const at::Tensor& patches,
                                                     const at::Tensor& task,
                                                     const std::optional<at::Tensor>& task_mask,
                                                     const std::optional<at::Tensor>& patch_mask,
                                                     std::optional<int64_t> keep_tokens,
                                                     std::optional<int64_t> max_tokens, bool mask_voters) {
  const auto key = triton_plan::key_of(op, patches, task, task_mask, patch_mask, keep_tokens, max_tokens, mask_voters);
  const auto plan = key ? triton_plan::find(*key) : nullptr;
  if (plan == nullptr) return std::nullopt;
  const c10::cuda::CUDAGuard guard(patches.device());
  check_launch(fastprune_cuda::make_context_current(patches.get_device()), "context of a Triton plan");
  triton_plan::Replay r(*plan, patches, task, task_mask, patch_mask);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  for (size_t i = 0; i < plan->launches.size(); ++i) {
    if (static_cast<int64_t>(i) == plan->k_launch) {
      // prune's one host sync: the largest kept count sizes the output.
      const at::Tensor& holder = r.buffers()[plan->k_buffer];
      const auto bytes = holder.view({-1}).view(at::kByte);
      r.allocate_k(std::max<int64_t>(1, bytes.narrow(0, plan->k_offset, 4).view(at::kInt).item<int>()));
    }
    const triton_plan::Launch& l = plan->launches[i];
    uint32_t grid[3];
    r.grid(i, grid);
    const int status = fastprune_cuda::launch_function(l.function, grid, l.block, l.shared, stream, r.args(i));
    FASTPRUNE_CHECK(status == 0, "fastprune: launch %zu of a Triton plan failed: %s", i,
                    fastprune_cuda::launch_function_error(status));
  }
  std::vector<at::Tensor> out;
  for (int64_t o : plan->outputs) out.push_back(r.buffers()[o]);
  return out;
}

struct CudaKernels {
  static constexpr bool kTritonPlans = true;
  static constexpr auto replay_triton = &fastprune::replay_triton;
  static void check_device_backend(const std::string& backend) {
    TORCH_CHECK(backend != "cpu",
                "fastprune: backend='cpu' needs CPU tensors, got CUDA tensors (use backend='cuda', "
                "'triton' or 'auto', or move the inputs to the CPU)");
  }
  static at::Tensor select(const at::Tensor& patches, const at::Tensor& task,
                           const std::optional<at::Tensor>& task_mask,
                           const std::optional<at::Tensor>& patch_mask, bool mask_voters) {
    return run_select(patches, task, task_mask, patch_mask, mask_voters);
  }
  static PruneOut prune(const at::Tensor& patches, const at::Tensor& task,
                        const std::optional<at::Tensor>& task_mask,
                        const std::optional<at::Tensor>& patch_mask, std::optional<int64_t> keep_tokens,
                        std::optional<int64_t> max_tokens, bool mask_voters) {
    return run_prune(patches, task, task_mask, patch_mask, keep_tokens, max_tokens, mask_voters);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(fastprune, CUDA, m) {
  m.impl("select", &EvalOps<CudaKernels>::select);
  m.impl("prune", &EvalOps<CudaKernels>::prune);
  m.impl("prune_padded", &EvalOps<CudaKernels>::prune_padded);
}

}  // namespace fastprune
