// launch_function.h. The driver API is reached through the runtime's entry-point query, so the
// library needs no link against libcuda (torch's wheels load the driver themselves).
#include "launch_function.h"

#include <cuda.h>

namespace fastprune_cuda {
namespace {

template <typename Fn>
Fn driver_entry(const char* name) {
  void* fn = nullptr;
  cudaDriverEntryPointQueryResult found;
  if (cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &found) != cudaSuccess ||
      found != cudaDriverEntryPointSuccess)
    return nullptr;
  return reinterpret_cast<Fn>(fn);
}

using LaunchKernel = CUresult (*)(CUfunction, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned,
                                  CUstream, void**, void**);
using GetErrorName = CUresult (*)(CUresult, const char**);
using CtxGetCurrent = CUresult (*)(CUcontext*);

}  // namespace

cudaError_t make_context_current(int device) {
  static const CtxGetCurrent current = driver_entry<CtxGetCurrent>("cuCtxGetCurrent");
  CUcontext ctx = nullptr;
  if (current != nullptr && current(&ctx) == CUDA_SUCCESS && ctx != nullptr) return cudaSuccess;
  return cudaSetDevice(device);  // since CUDA 12.0 this makes the device's primary context current
}

int launch_function(uint64_t function, const uint32_t grid[3], uint32_t block, uint32_t shared,
                    cudaStream_t stream, void** params) {
  static const LaunchKernel launch = driver_entry<LaunchKernel>("cuLaunchKernel");
  if (launch == nullptr) return -1;
  return static_cast<int>(launch(reinterpret_cast<CUfunction>(function), grid[0], grid[1], grid[2], block, 1, 1,
                                 shared, reinterpret_cast<CUstream>(stream), params, nullptr));
}

const char* launch_function_error(int status) {
  static const GetErrorName name_of = driver_entry<GetErrorName>("cuGetErrorName");
  const char* name = nullptr;
  if (status < 0 || name_of == nullptr || name_of(static_cast<CUresult>(status), &name) != CUDA_SUCCESS ||
      name == nullptr)
    return status == -1 ? "cuLaunchKernel unavailable" : "unknown";
  return name;
}

}  // namespace fastprune_cuda
